"""`erc train` / `erc evaluate` on a synthetic shard set whose labels need two modalities together.

Each utterance carries a text symbol t and an audio symbol a, both uniform over {0, 1, 2} and
independent; its label is (t + a) mod 3. Text alone, audio alone and visual (pure noise) alone
therefore say nothing about the label, while text and audio together determine it.

Every model trains with its full default objective: MultiEMO and xLSTM-MultiEMO with SWFC and
Soft-HGR at the authors' scale (erc.models.losses). They run without their dialogue context
encoders (speed; the label here depends on nothing but the utterance itself). At the literal eq 19
scale SWFC outweighed cross-entropy and MultiEMO stayed near chance on this task.
"""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from model_checks import DIMS
from typer.testing import CliRunner

from erc.cli.main import app
from erc.errors import ConfigError
from erc.pipeline.evaluate import classification_metrics, evaluate_run
from erc.pipeline.shards import ShardSet, UtteranceRecord, write_shard_set
from erc.pipeline.train import TrainConfig, train

LABELS = ["zero", "one", "two"]
TINY = {
    "text-only": {"hidden_dim": 16, "dropout": 0.0},
    "concat": {"projection_dim": 16, "hidden_dim": 16, "classifier_hidden_dim": 32, "dropout": 0.0},
    "multiemo": {
        "projection_dims": {"text": 16, "audio": 16, "visual": 16}, "context_modalities": [], "model_dim": 16,
        "num_heads": 2, "ffn_dim": 32, "num_layers": 1, "classifier_hidden_dim": 32, "dropout": 0.0,
    },
    "xlstm-multiemo": {
        "projection_dims": {"text": 16, "audio": 16, "visual": 16}, "use_context": False, "model_dim": 16,
        "num_heads": 2, "ffn_dim": 32, "encoder_layers": 1, "num_layers": 1, "classifier_hidden_dim": 32,
        "dropout": 0.0, "max_dialogue_length": 16,
    },
}
EPOCHS, BATCH, LR = 20, 8, 5e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """80 dialogues of 6-12 utterances (64 train, 16 test, no dev split); 5% of audio missing."""
    root = tmp_path_factory.mktemp("xor_shards")
    rng = np.random.default_rng(0)
    prototypes = {m: 4.0 * np.linalg.qr(rng.normal(size=(d, 3)))[0].T for m, d in DIMS.items()}
    records = []
    for k in range(80):
        split = "train" if k < 64 else "test"
        for i in range(int(rng.integers(6, 13))):
            t, a = rng.integers(3, size=2)
            features = {
                "text": prototypes["text"][t] + rng.normal(size=DIMS["text"]),
                "audio": None if rng.random() < 0.05 else prototypes["audio"][a] + rng.normal(size=DIMS["audio"]),
                "visual": rng.normal(size=DIMS["visual"]),
            }
            records.append(UtteranceRecord(
                utterance_id=f"d{k}_u{i}", dialogue_id=f"d{k}", utterance_index=i, split=split,
                speaker=f"s{i % 2}", speaker_index=i % 2, text="", label=int((t + a) % 3),
                features={m: None if v is None else v.astype(np.float32) for m, v in features.items()},
            ))
    write_shard_set(root, records, dataset="xor", label_names=LABELS, dims=DIMS, num_frames=2,
                    dialogues_per_shard=20)
    return root


def _train(features, out, model, modalities=None, seed=0, epochs=EPOCHS):
    config = TrainConfig(model=model, features=features, out=out, epochs=epochs, batch_size=BATCH, lr=LR, seed=seed,
                         device="cpu", modalities=modalities, model_overrides=TINY[model])
    return train(config)


@pytest.fixture(scope="module")
def cli_run(features, tmp_path_factory):
    """The fused concat model trained through the real CLI; YAML settings under the command-line flags."""
    tmp = tmp_path_factory.mktemp("cli")
    config_file = tmp / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({"model": TINY["concat"], "train": {"epochs": 99, "lr": LR, "weight_decay": 0.0}}))
    run_dir = tmp / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", "concat", "--features", str(features), "--out", str(run_dir), "--config", str(config_file),
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--seed", "0", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    return run_dir, result.output


@pytest.mark.parametrize("model", ["concat", "multiemo", "xlstm-multiemo"])
def test_fusion_beats_every_single_modality(model, features, tmp_path, cli_run):
    if model == "concat":
        fused = json.loads((cli_run[0] / "metrics.json").read_text())["test"]
    else:
        fused = _train(features, tmp_path / "fused", model).test
    singles = {m: _train(features, tmp_path / m, model, [m]).test for m in DIMS}
    assert fused["accuracy"] > 0.8, fused
    for modality, single in singles.items():
        assert single["accuracy"] < 0.5, (modality, single)
        assert fused["weighted_f1"] > single["weighted_f1"] + 0.3, (modality, single)


def test_run_directory_holds_everything(cli_run, features):
    run_dir, output = cli_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "run.json", "index.json", "best.pt", "metrics.json", "confusion_matrix.png",
            "confusion_matrix.csv", "training_curves.png"} <= names
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["epochs"] == EPOCHS and config["train"]["lr"] == LR and config["train"]["weight_decay"] == 0.0
    assert config["preset"] is None and config["model_config"]["hidden_dim"] == 16 and config["seed"] == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["versions"]["torch"] == torch.__version__.split("+")[0] and run["seed"] == 0
    assert run["config_hash"] == json.loads((features / "index.json").read_text())["config_hash"]
    assert json.loads((run_dir / "index.json").read_text()) == json.loads((features / "index.json").read_text())
    assert len(run["held_out_dev"]) == 6 and set(run["held_out_dev"]) == set(run["dialogues"]["dev"])
    assert not set(run["dialogues"]["dev"]) & set(run["dialogues"]["train"]) and len(run["dialogues"]["train"]) == 58
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["history"]) == EPOCHS and {"ce", "total"} <= set(metrics["history"][0]["train"])
    best = max(metrics["history"], key=lambda h: h["dev"]["weighted_f1"])
    assert metrics["best_epoch"] == best["epoch"] and metrics["dev"]["weighted_f1"] == best["dev"]["weighted_f1"]
    matrix = np.array(metrics["test"]["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == metrics["test"]["utterances"]
    rows = (run_dir / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == LABELS and [int(v) for v in rows[1].split(",")[1:]] == matrix[0].tolist()
    for png in ("confusion_matrix.png", "training_curves.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(run_dir / "best.pt", weights_only=False)
    assert checkpoint["model"] == "concat" and checkpoint["label_names"] == LABELS and checkpoint["epoch"] == best["epoch"]
    assert checkpoint["input_dims"] == DIMS
    assert f"{metrics['test']['weighted_f1']:.4f}" in output


def test_evaluate_reproduces_training_metrics_exactly(cli_run):
    run_dir, _ = cli_run
    reported = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert evaluate_run(run_dir, device="cpu") == reported
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"{reported['weighted_f1']:.4f}" in result.output


def test_evaluate_writes_each_test_utterance_with_its_prediction(cli_run, features, tmp_path):
    run_dir, _ = cli_run
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--device", "cpu", "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    reported = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert len(rows) == reported["utterances"] and not list(tmp_path.glob(".*partial"))
    shards = ShardSet(features)
    expected = [(uid, LABELS[label]) for meta in map(shards.load, shards.dialogues("test"))
                for uid, label in zip(meta["utterance_id"], meta["label"])]
    assert [(row["utterance_id"], row["label"]) for row in rows] == expected
    probabilities = np.array([[float(row[f"p_{name}"]) for name in LABELS] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [LABELS[k] for k in probabilities.argmax(axis=1)] == [row["predicted"] for row in rows]
    true, predicted = ([LABELS.index(row[key]) for row in rows] for key in ("label", "predicted"))
    assert classification_metrics(np.array(true), np.array(predicted), LABELS) == reported
    bad = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--device", "cpu", "--predictions", str(tmp_path / "p.txt")])
    assert bad.exit_code != 0 and "p.txt" in bad.output and not (tmp_path / "p.txt").exists()


def test_same_seed_gives_identical_metrics(cli_run, features, tmp_path):
    first = json.loads((cli_run[0] / "metrics.json").read_text())
    again = _train(features, tmp_path / "again", "concat")
    assert again.test == first["test"] and again.best_epoch == first["best_epoch"]
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(again.history) == strip(first["history"])
    other = _train(features, tmp_path / "other", "concat", seed=1, epochs=2)
    assert strip(other.history) != strip(first["history"][:2])


def test_bad_requests_fail_clearly(features, tmp_path, cli_run):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            train(TrainConfig(model="concat", features=features, out=tmp_path / "gpu", device="cuda"))
        result = CliRunner().invoke(app, ["train", "--model", "concat", "--features", str(features),
                                          "--out", str(tmp_path / "gpu"), "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA" in result.output
    with pytest.raises(ConfigError, match="already holds"):
        train(TrainConfig(model="concat", features=features, out=cli_run[0]))
    with pytest.raises(ConfigError, match="face"):
        train(TrainConfig(model="concat", features=features, out=tmp_path / "m", modalities=["text", "face"]))
    with pytest.raises(ConfigError, match="6 classes"):
        train(TrainConfig(model="multiemo", features=features, out=tmp_path / "p", preset="iemocap"))
    with pytest.raises(ConfigError, match="text-only needs text"):
        train(TrainConfig(model="text-only", features=features, out=tmp_path / "t", modalities=["audio"]))


def test_text_only_reads_text_alone(features, tmp_path):
    with_all = _train(features, tmp_path / "all", "text-only", epochs=2)
    text = _train(features, tmp_path / "text", "text-only", ["text"], epochs=2)
    assert with_all.test == text.test and with_all.history[-1]["train"] == text.history[-1]["train"]


@pytest.mark.parametrize("model", ["text-only", "concat"])
def test_baselines_ignore_padding_and_missing_modalities(model):
    from erc.models.registry import build_model

    torch.manual_seed(0)
    net = build_model(model, input_dims=DIMS, num_classes=3, overrides=TINY[model]).eval()
    short = {m: torch.randn(1, 3, d) for m, d in DIMS.items()}
    batch = {**short, "mask": torch.ones(1, 3, dtype=torch.bool), "speaker": torch.zeros(1, 3, dtype=torch.long),
             "label": torch.zeros(1, 3, dtype=torch.long), **{f"{m}_mask": torch.ones(1, 3, dtype=torch.bool) for m in DIMS}}
    batch["audio_mask"][0, 1] = False
    padded = {k: torch.cat([v, torch.randn_like(v[:, :2]) if v.is_floating_point() else torch.ones_like(v[:, :2])], 1)
              for k, v in batch.items()}
    padded["mask"][0, 3:] = False
    padded["audio"][0, 1] = 100.0  # an absent modality's values must not matter
    with torch.no_grad():
        alone, beside = net(batch).logits, net(padded).logits
    torch.testing.assert_close(beside[:, :3], alone)


def test_weight_average_is_what_dev_scores_and_the_checkpoint_keeps(features, tmp_path):
    """``ema_decay``: the checkpoint holds the moving average, not the last weights trained."""
    def run(name, ema_decay):
        config = TrainConfig(model="concat", features=features, out=tmp_path / name, epochs=3, batch_size=BATCH,
                             lr=LR, ema_decay=ema_decay, device="cpu", model_overrides=TINY["concat"])
        result = train(config)
        weights = torch.load(tmp_path / name / "best.pt", weights_only=False)["state_dict"]
        return result, weights, yaml.safe_load((tmp_path / name / "config.yaml").read_text())

    plain, plain_weights, _ = run("plain", None)
    # a decay of ~0 averages nothing: the latest weights, as without the option
    latest, latest_weights, _ = run("latest", 1e-12)
    assert latest.best_epoch == plain.best_epoch
    for name, value in plain_weights.items():
        torch.testing.assert_close(latest_weights[name], value, atol=1e-5, rtol=1e-5)
    slow, slow_weights, recorded = run("slow", 0.9)
    assert recorded["train"]["ema_decay"] == 0.9
    assert max((slow_weights[k] - v).abs().max().item() for k, v in plain_weights.items() if v.is_floating_point()) > 1e-3
    with pytest.raises(ConfigError, match="ema_decay"):
        run("bad", 1.0)
