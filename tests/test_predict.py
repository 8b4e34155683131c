"""`erc predict`: a conversation from the training shards gets the predictions the model makes on those shards."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from erc.cli.predict import predict_command
from erc.errors import ConfigError
from erc.pipeline.data import DialogueDataset, collate_dialogues
from erc.pipeline.evaluate import load_checkpoint, load_model
from erc.pipeline.extract import ExtractConfig, extract
from erc.pipeline.predict import predict_conversation
from erc.pipeline.shards import ShardSet
from erc.pipeline.train import TrainConfig, train

CONCAT = {"projection_dim": 16, "hidden_dim": 16, "classifier_hidden_dim": 32, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(manifest_path, tiny_text_encoder, tmp_path_factory):
    """A concat model (text + audio) trained on the manifest corpus's shards."""
    work = tmp_path_factory.mktemp("predict")
    extract(ExtractConfig(dataset="manifest", root=manifest_path.parent, manifest=manifest_path, out=work / "shards",
                          modalities=("text", "audio"), text_model=str(tiny_text_encoder), dialogues_per_shard=2))
    train(TrainConfig(model="concat", features=work / "shards", out=work / "run", epochs=5, batch_size=2, lr=1e-2,
                      device="cpu", model_overrides=CONCAT))
    return work / "run"


def shard_probabilities(run_dir) -> dict[tuple[str, int], np.ndarray]:
    """The model's class probabilities for every utterance of its training shard set."""
    checkpoint = load_checkpoint(run_dir / "best.pt")
    model = load_model(checkpoint, torch.device("cpu")).eval()
    shards = ShardSet(checkpoint["features"])
    dataset = DialogueDataset(shards, shards.refs, checkpoint["modalities"])
    probabilities = {}
    with torch.no_grad():
        for i, ref in enumerate(shards.refs):
            batch = collate_dialogues([dataset[i]], checkpoint["modalities"])
            for index, p in zip(shards.load(ref)["utterance_index"], model(batch).logits[0].softmax(-1)):
                probabilities[(ref.dialogue_id, int(index))] = p.numpy()
    shards.close()
    return probabilities


def test_predictions_on_a_training_conversation_match_those_from_its_shards(run_dir, manifest_path, tmp_path):
    rows = predict_conversation(run_dir, manifest_path, tmp_path / "predictions.json", device="cpu")
    expected = shard_probabilities(run_dir)
    labels = load_checkpoint(run_dir / "best.pt")["label_names"]
    assert len(rows) == len(expected) == 14
    for row in rows:
        got = np.array([row[f"p_{name}"] for name in labels])
        np.testing.assert_allclose(got, expected[(row["dialogue_id"], row["utterance_index"])], atol=1e-5)
        assert row["predicted"] == labels[int(got.argmax())] and "label" in row
    assert json.loads((tmp_path / "predictions.json").read_text()) == rows


def test_cli_predicts_an_unlabelled_conversation_to_csv(run_dir, manifest_path, tmp_path):
    """A new manifest without label / split columns: a table per dialogue and a CSV with the probabilities."""
    conversation = tmp_path / "conversation.csv"
    with manifest_path.open() as source, conversation.open("w", newline="") as target:
        rows = [r for r in csv.DictReader(source) if r["dialogue_id"] == "trip"]
        writer = csv.DictWriter(target, fieldnames=["dialogue_id", "utterance_index", "speaker", "text", "video"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in rows)
    shutil.copytree(manifest_path.parent / "media", tmp_path / "media")
    app = typer.Typer()
    app.command()(predict_command)
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["--run", str(run_dir), "--manifest", str(conversation), "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "dialogue trip" in result.output and "We missed it again" in result.output
    with out.open() as file:
        written = list(csv.DictReader(file))
    expected = shard_probabilities(run_dir)
    labels = load_checkpoint(run_dir / "best.pt")["label_names"]
    assert [r["utterance_id"] for r in written] == ["trip_10", "trip_12", "trip_14"]  # the manifest's own indices
    assert [int(r["utterance_index"]) for r in written] == [0, 1, 2] and "label" not in written[0]
    for index, row in enumerate(written):
        got = np.array([float(row[f"p_{name}"]) for name in labels])
        np.testing.assert_allclose(got, expected[("trip", index)], atol=1e-5)


def _tampered_run(run_dir, tmp_path, edit) -> object:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    index = json.loads((copy / "index.json").read_text())
    edit(index)
    (copy / "index.json").write_text(json.dumps(index))
    return copy


def test_refuses_text_weights_other_than_the_recorded_ones(run_dir, manifest_path, tmp_path):
    def other_checksum(index):
        for name in index["weights"]["text"]["sha256"]:
            index["weights"]["text"]["sha256"][name] = "0" * 64

    with pytest.raises(ConfigError, match="text weights differ"):
        predict_conversation(_tampered_run(run_dir, tmp_path, other_checksum), manifest_path, device="cpu")


def test_refuses_a_run_whose_text_model_directory_is_another_encoder(run_dir, manifest_path, tmp_path):
    from erc.features.tiny_models import build_tiny_text_encoder

    other = build_tiny_text_encoder(tmp_path / "bert", style="bert")

    def other_model(index):
        index["config"]["text"]["model"] = str(other)

    with pytest.raises(ConfigError, match="text weights differ"):
        predict_conversation(_tampered_run(run_dir, tmp_path, other_model), manifest_path, device="cpu")


def test_refuses_a_missing_text_model_directory_and_a_bad_output_name(run_dir, manifest_path, tmp_path):
    def gone(index):
        index["config"]["text"]["model"] = str(tmp_path / "deleted")

    with pytest.raises(ConfigError, match="not found"):
        predict_conversation(_tampered_run(run_dir, tmp_path, gone), manifest_path, device="cpu")
    with pytest.raises(ConfigError, match=r"\.csv or \.json"):
        predict_conversation(run_dir, manifest_path, tmp_path / "out.txt", device="cpu")


@pytest.fixture(scope="module")
def visual_run(manifest_path, tiny_text_encoder, tmp_path_factory):
    """A concat model on text + visual features extracted with a ResNet-101 weight file (4 frames)."""
    from torchvision.models import resnet101

    work = tmp_path_factory.mktemp("predict_visual")
    torch.manual_seed(0)
    torch.save(resnet101().state_dict(), work / "face.pt")
    extract(ExtractConfig(dataset="manifest", root=manifest_path.parent, manifest=manifest_path, out=work / "shards",
                          modalities=("text", "visual"), text_model=str(tiny_text_encoder), face_weights=work / "face.pt",
                          num_frames=4, dialogues_per_shard=2))
    train(TrainConfig(model="concat", features=work / "shards", out=work / "run", epochs=3, batch_size=2, lr=1e-2,
                      device="cpu", model_overrides=CONCAT))
    return work


def test_visual_predictions_match_the_shards_and_changed_face_weights_are_refused(visual_run, manifest_path, tmp_path):
    run = visual_run / "run"
    rows = predict_conversation(run, manifest_path, device="cpu")
    expected = shard_probabilities(run)
    labels = load_checkpoint(run / "best.pt")["label_names"]
    assert len(rows) == len(expected)
    for row in rows:
        got = np.array([row[f"p_{name}"] for name in labels])
        np.testing.assert_allclose(got, expected[(row["dialogue_id"], row["utterance_index"])], atol=1e-4)
    weights = torch.load(visual_run / "face.pt")
    weights["fc.bias"] += 1.0  # the same file name, other weights
    torch.save(weights, visual_run / "face.pt")
    with pytest.raises(ConfigError, match="face weights differ"):
        predict_conversation(run, manifest_path, device="cpu")
