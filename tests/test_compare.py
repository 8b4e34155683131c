"""`erc compare`: run specs, ablation settings, and a tiny comparison end to end through the CLI."""

import json

import pytest
import yaml
from test_train import DIMS, LABELS, TINY, features  # noqa: F401  (shared synthetic shard set fixture)
from typer.testing import CliRunner

from erc.cli.main import app
from erc.errors import ConfigError
from erc.pipeline.compare import RunSpec, parse_run_spec, split_specs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_run_specs_reach_every_ablation():
    assert split_specs("multiemo,multiemo[modalities=text,audio;no-swfc], lmam") == [
        "multiemo", "multiemo[modalities=text,audio;no-swfc]", "lmam"]
    assert parse_run_spec("multiemo[modalities=text,audio;no-swfc;no-hgr]") == RunSpec(
        "multiemo[modalities=text,audio;no-swfc;no-hgr]", "multiemo", {"use_swfc": False, "use_hgr": False}, ("text", "audio"))
    assert parse_run_spec("multiemo[no-multiattn;fusion=lmam]").overrides == {"multiattn": False, "fusion": "lmam"}
    assert parse_run_spec("pairwise[no-density;no-pair-loss;inter_weight=0.5]").overrides == {
        "use_density": False, "use_pair_loss": False, "inter_weight": 0.5}
    assert parse_run_spec("mcn-cl[no-psa;no-contrast]", "plain").overrides == {"psa": False, "use_contrast": False}
    assert parse_run_spec("lmam[no-lmam]").overrides == {"lmam": False}
    for bad, message in [("nomodel", "unknown model"), ("multiemo[no-psa]", "no switch"),
                         ("multiemo[colour=red]", "no config field"), ("multiemo[swfc]", "cannot read setting")]:
        with pytest.raises(ConfigError, match=message):
            parse_run_spec(bad)
    with pytest.raises(ConfigError, match="unbalanced"):
        split_specs("multiemo[no-swfc")


def test_compare_two_models_two_seeds(features, tmp_path):  # noqa: F811
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "concat": {"model": TINY["concat"], "train": {"batch_size": 8, "lr": 5e-3}},
        "multiemo": {"model": TINY["multiemo"], "train": {"batch_size": 8, "lr": 5e-3}},
    }))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, [
        "compare", "--features", str(features), "--models", "concat", "--variant", "MultiEMO text+audio=multiemo[modalities=text,audio]",
        "--seeds", "2", "--epochs", "2", "--out", str(out), "--config", str(config), "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results] == ["concat", "MultiEMO text+audio"]
    assert results[1]["modalities"] == ["text", "audio"]
    for entry in results:
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        for run in entry["runs"]:
            metrics = json.loads((out / "runs" / entry["label"].replace(" ", "_").replace("+", "_") / f"seed{run['seed']}"
                                  / "metrics.json").read_text())
            assert metrics["test"] == run["test"] and len(metrics["history"]) == 2
    run_config = yaml.safe_load((out / "runs" / "MultiEMO_text_audio" / "seed1" / "config.yaml").read_text())
    assert sorted(run_config["modalities"]) == ["audio", "text"] and run_config["seed"] == 1
    assert run_config["model_config"]["model_dim"] == 16 and run_config["train"]["epochs"] == 2
    concat_params = results[0]["parameters"]
    # concat: per modality a 16-wide projection and a bidirectional GRU (hidden 16), then a 96 -> 32 -> 3 MLP
    gru = 2 * (3 * 16 * 16 + 3 * 16 * 16 + 2 * 3 * 16)
    assert concat_params == sum(d * 16 + 16 + gru for d in DIMS.values()) + 96 * 32 + 32 + 32 * 3 + 3
    table = (out / "comparison.md").read_text()
    wf1 = [r["test"]["weighted_f1"] for r in results[0]["runs"]]
    mean, std = 100 * sum(wf1) / 2, 100 * abs(wf1[0] - wf1[1]) / 2 ** 0.5
    assert f"| concat | concat | {mean:.2f} ± {std:.2f} |" in table
    assert f"{concat_params:,}" in table and all(name in table for name in LABELS)
    assert "concat vs MultiEMO text+audio: Δ =" in table and "seed spread" in table
    # each difference rescored from the best checkpoints, with its interval over the test dialogues
    [difference] = json.loads((out / "differences.json").read_text())
    assert (difference["a"], difference["b"]) == ("concat", "MultiEMO text+audio")
    means = [100 * sum(r["test"]["weighted_f1"] for r in entry["runs"]) / 2 for entry in results]
    assert difference["weighted_f1_difference"] == pytest.approx(means[0] - means[1], abs=1e-6)
    low, high = difference["interval_95"]
    assert low < high and f"test-dialogue interval [{low:+.2f}, {high:+.2f}]" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "comparison.md" in result.output.replace("\n", "")


def test_compare_refuses_a_used_directory(features, tmp_path):  # noqa: F811
    from erc.pipeline.compare import CompareConfig, compare

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ConfigError, match="already holds"):
        compare(CompareConfig(features=features, out=tmp_path / "used", models=["concat"]))
    with pytest.raises(ConfigError, match="distinct"):
        compare(CompareConfig(features=features, out=tmp_path / "new", models=["concat", "concat"]))
