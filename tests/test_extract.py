"""End to end: corpora on disk -> `erc extract` on a real Dask cluster -> shards, on every reader."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from erc.cli.main import app
from erc.errors import ConfigError, ErcError
from erc.pipeline.extract import ExtractConfig, extract
from erc.pipeline.shards import ShardSet

# Four sampled frames instead of twenty keep the end-to-end runs fast on 2 cores; the visual tests and
# the benchmark cover the 20-frame default.
FRAMES = 4


def _config(manifest: Path, out: Path, encoder: Path, **kw) -> ExtractConfig:
    return ExtractConfig(dataset="manifest", root=manifest.parent, manifest=manifest, out=out, num_frames=FRAMES,
                         text_model=str(encoder), random_face_weights=True, dialogues_per_shard=1, **kw)


def _features(directory: Path) -> dict[str, dict[str, np.ndarray]]:
    """utterance id -> modality -> vector (present modalities only), plus frame matrices."""
    shards = ShardSet(directory)
    out: dict[str, dict[str, np.ndarray]] = {}
    for ref in shards.dialogues():
        rows = shards.load(ref, frames="visual" in shards.modalities)
        for i, uid in enumerate(rows["utterance_id"]):
            assert uid not in out, f"{uid} stored twice"
            out[uid] = {m: rows["features"][m][i] for m in shards.modalities if rows["present"][m][i]}
            if "visual_frames" in rows:
                out[uid]["frames"] = rows["visual_frames"][i]
    shards.close()
    return out


def _assert_same_features(a: dict, b: dict) -> None:
    """Equal up to float32 summation order (thread counts differ between runs): every element within
    1e-5 of the vector's largest magnitude (random-weight ResNet outputs reach 1e4)."""
    assert a.keys() == b.keys()
    for uid in a:
        assert a[uid].keys() == b[uid].keys(), uid
        for name in a[uid]:
            scale = float(np.abs(b[uid][name]).max()) or 1.0
            np.testing.assert_allclose(a[uid][name], b[uid][name], rtol=0, atol=1e-5 * scale, err_msg=f"{uid} {name}")


@pytest.fixture(scope="module")
def manifest_reference(manifest_path, tiny_text_encoder, tmp_path_factory):
    """The manifest corpus extracted once with one local worker: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    result = extract(_config(manifest_path, out, tiny_text_encoder, workers=1))
    return out, result


def test_manifest_end_to_end(manifest_reference, manifest_path, tiny_text_encoder):
    out, result = manifest_reference
    from erc.pipeline.corpus import read_manifest

    corpus = read_manifest(manifest_path)
    shards = ShardSet(out)
    assert result.utterances == corpus.num_utterances == sum(len(r) for r in shards.dialogues())
    assert shards.label_names == corpus.label_names
    assert shards.dims["audio"] == 6373 and shards.dims["visual"] == 1000
    for dialogue in corpus.dialogues:
        ref = next(r for r in shards.dialogues() if r.dialogue_id == dialogue.dialogue_id)
        rows = shards.load(ref, frames=True)
        assert ref.split == dialogue.split
        assert rows["speaker"] == [u.speaker for u in dialogue.utterances]
        assert rows["speaker_index"].tolist() == [u.speaker_index for u in dialogue.utterances]
        assert [corpus.label_names[y] for y in rows["label"]] == [u.label for u in dialogue.utterances]
        for i, u in enumerate(dialogue.utterances):
            # a modality without media is a mask, never a zero vector passed off as data
            assert rows["present"]["visual"][i] == (u.video is not None), u.utterance_id
            assert rows["present"]["audio"][i] == (u.audio is not None or u.video is not None), u.utterance_id
            assert rows["present"]["text"][i]
            if rows["present"]["visual"][i]:
                frame_mask = rows["visual_frame_mask"][i]
                assert frame_mask.sum() >= 3, f"MTCNN found the face in only {frame_mask.sum()}/{FRAMES} frames"
                np.testing.assert_allclose(rows["visual_frames"][i][frame_mask].mean(0), rows["features"]["visual"][i],
                                           rtol=1e-4, atol=1e-4)
            else:
                assert not rows["features"]["visual"][i].any()
    attrs = json.loads((out / "index.json").read_text())
    assert attrs["weights"]["face"] == {"file": None, "random_init_seed": 0}
    assert attrs["weights"]["text"]["sha256"], "text weight hashes recorded"
    assert attrs["versions"]["torch"]
    assert attrs["config"]["text"]["model"] == str(tiny_text_encoder)


def test_rerun_skips_finished_shards(manifest_reference, manifest_path, tiny_text_encoder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(manifest_reference[0], out)
    result = extract(_config(manifest_path, out, tiny_text_encoder))
    assert result.shards_written == 0 and result.shards_skipped > 0


@pytest.mark.parametrize("change", [{"faces": "largest"}, {"detect_max_side": 320}, {"precision": "other"},
                                    {"text_precision": "bf16"}, {"compile": True}, {"device": "cuda"}],
                         ids=["faces", "detect_max_side", "precision", "text_precision", "compile", "device"])
def test_other_config_refused_without_overwrite(manifest_reference, manifest_path, tiny_text_encoder, tmp_path, change):
    """Every setting that changes the features is part of the resume key (so is erc's version)."""
    out = tmp_path / "copy"
    shutil.copytree(manifest_reference[0], out)
    if change.get("precision") == "other":  # the default (auto) resolved to bf16 or fp32 on this hardware
        ran = json.loads((out / "plan.json").read_text())["config"]["visual"]["precision"]
        change = {"precision": "fp32" if ran == "bf16" else "bf16"}
    with pytest.raises(ConfigError, match="--overwrite"):
        extract(_config(manifest_path, out, tiny_text_encoder, **change))
    plan = json.loads((out / "plan.json").read_text())
    import erc

    assert plan["config"]["erc_version"] == erc.__version__ and plan["config"]["visual"]["detect_max_side"] == 640


def test_settings_of_modalities_not_extracted_are_not_part_of_the_resume_key(manifest_path, tiny_text_encoder, tmp_path):
    """A text-only set is reused whatever the visual settings; a text setting still counts."""
    out = tmp_path / "text_only"
    first = extract(_config(manifest_path, out, tiny_text_encoder, modalities=("text",)))
    assert first.shards_written > 0
    assert json.loads((out / "plan.json").read_text())["config"]["visual"] is None
    again = extract(_config(manifest_path, out, tiny_text_encoder, modalities=("text",), faces="largest",
                            precision="fp32", detect_max_side=320))
    assert again.shards_written == 0 and again.shards_skipped == first.shards_written
    with pytest.raises(ConfigError, match="--overwrite"):
        extract(_config(manifest_path, out, tiny_text_encoder, modalities=("text",), text_max_length=64))


def test_precision_auto_resolves_on_the_hardware(manifest_path, tmp_path, monkeypatch):
    from erc.pipeline import evaluate

    def config(precision, text_precision="fp32"):
        return ExtractConfig(dataset="manifest", root=manifest_path.parent, out=tmp_path, random_face_weights=True,
                             precision=precision, text_precision=text_precision)

    monkeypatch.setattr(evaluate, "cpu_has_native_bf16", lambda: True)
    assert config("auto").precision == "bf16" and config("auto").text_precision == "fp32"
    assert config("fp32", "auto").text_precision == "bf16" and config("fp32", "auto").precision == "fp32"
    monkeypatch.setattr(evaluate, "cpu_has_native_bf16", lambda: False)
    assert config("auto").precision == "fp32" and config("bf16").precision == "bf16"
    assert config("fp32", "auto").text_precision == "fp32"
    with pytest.raises(ConfigError, match="--precision"):
        config("fp16")
    with pytest.raises(ConfigError, match="--text-precision"):
        config("fp32", "fp16")


def test_visual_needs_weights_or_explicit_random(manifest_path, tmp_path):
    with pytest.raises(ConfigError, match="--random-face-weights"):
        ExtractConfig(dataset="manifest", root=manifest_path.parent, out=tmp_path)


def test_two_workers_match_one_and_load_models_once(manifest_reference, manifest_path, tiny_text_encoder, tmp_path):
    result = extract(_config(manifest_path, tmp_path / "two", tiny_text_encoder, workers=2))
    assert result.shards_written > 2
    assert len(result.model_loads) <= 2 and sum(result.model_loads.values()) == len(result.model_loads)
    spent = json.loads((tmp_path / "two" / "report.json").read_text())["last_run"]["worker_seconds_per_modality"]
    assert set(spent) == {"text", "audio", "visual"} and all(seconds > 0 for seconds in spent.values())
    _assert_same_features(_features(manifest_reference[0]), _features(tmp_path / "two"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_cluster_via_dask_cli(manifest_reference, manifest_path, tiny_text_encoder, tmp_path):
    """A scheduler and two worker processes started with Dask's own command-line tools, on loopback,
    one with dask's default threads (one per core: its tasks run side by side on its one set of
    models), one with a single thread; each worker sizes torch's threads itself."""
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        time.sleep(2)
        for threads in ([], ["--nthreads", "1"]):  # dask's default (one thread per core), and one thread
            procs.append(subprocess.Popen([bin_dir / "dask", "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "1",
                                           *threads, "--no-dashboard"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "cluster"
        run = CliRunner().invoke(app, [
            "extract", "--dataset", "manifest", "--root", str(manifest_path.parent), "--manifest", str(manifest_path),
            "--out", str(out), "--text-model", str(tiny_text_encoder), "--random-face-weights",
            "--scheduler", f"tcp://127.0.0.1:{port}", "--dialogues-per-shard", "1", "--num-frames", str(FRAMES),
        ])
        assert run.exit_code == 0, run.output
        _assert_same_features(_features(manifest_reference[0]), _features(out))
        report = json.loads((out / "report.json").read_text())
        assert len(report["last_run"]["model_loads_per_worker"]) == 2, "both cluster workers took shards"
        assert sum(report["last_run"]["model_loads_per_worker"].values()) == 2, "one set of models per worker"
        # torch threads = this machine's cores shared among the worker's task threads: 1 each on the
        # default worker (as many task threads as cores), every core on the one-thread worker
        from erc.pipeline.extract import usable_cores

        cores = usable_cores()
        assert sorted(report["last_run"]["torch_threads_per_worker"].values()) == [1, cores]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_sigkill_then_resume_gives_the_same_shards(manifest_reference, manifest_path, tiny_text_encoder, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "erc.cli", "extract", "--dataset", "manifest", "--root", str(manifest_path.parent),
           "--manifest", str(manifest_path), "--out", str(out), "--text-model", str(tiny_text_encoder),
           "--random-face-weights", "--dialogues-per-shard", "1", "--num-frames", str(FRAMES)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "shards").glob("*.h5")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its local workers, mid-run
    proc.wait()
    finished_before = {p.name for p in (out / "shards").glob("*.h5")}
    assert finished_before, "the run was killed before writing any shard"
    result = extract(_config(manifest_path, out, tiny_text_encoder))
    assert result.shards_skipped >= len(finished_before)
    assert not list((out / "shards").glob(".*.tmp"))
    _assert_same_features(_features(manifest_reference[0]), _features(out))


def test_iemocap_end_to_end(iemocap_root, tiny_text_encoder, tmp_path):
    from erc.pipeline.corpus import read_iemocap

    corpus = read_iemocap(iemocap_root)
    out = tmp_path / "iemocap"
    result = extract(ExtractConfig(dataset="iemocap", root=iemocap_root, out=out, text_model=str(tiny_text_encoder),
                                   random_face_weights=True, num_frames=FRAMES))
    shards = ShardSet(out)
    assert result.failures == []
    assert shards.label_names == corpus.label_names and len(shards.label_names) == 6
    splits = {r.split for r in shards.dialogues()}
    assert splits == {"train", "test"}
    test_ids = {r.dialogue_id for r in shards.dialogues("test")}
    assert test_ids and all("Ses05" in d for d in test_ids)
    kept = 0
    for ref in shards.dialogues():
        rows = shards.load(ref, frames=True)
        assert set(rows["speaker"]) <= {"F", "M"}
        assert all(rows["present"]["audio"]) and all(rows["present"]["visual"])
        assert (rows["visual_frame_mask"].sum(1) >= 3).all()
        kept += len(rows["label"])
    assert kept == corpus.num_utterances
    index = json.loads((out / "index.json").read_text())
    assert index["dataset"] == "iemocap"


def test_meld_missing_and_corrupt_media_reported(meld_root, tiny_text_encoder, tmp_path):
    from erc.pipeline.corpus import read_meld

    meld_root = shutil.copytree(meld_root, tmp_path / "MELD.Raw")
    corpus = read_meld(meld_root)
    videos = sorted({u.video for d in corpus.dialogues for u in d.utterances if u.video and u.video.exists()})
    corrupt = videos[0]
    corrupt.write_bytes(os.urandom(4096))
    missing = [u for d in corpus.dialogues for u in d.utterances if not u.video.exists()]
    assert missing, "the MELD fixture leaves a video out"
    out = tmp_path / "meld"
    runner = CliRunner()
    run = runner.invoke(app, ["extract", "--dataset", "meld", "--root", str(meld_root), "--out", str(out),
                              "--text-model", str(tiny_text_encoder), "--random-face-weights", "--max-failures", "50",
                              "--num-frames", str(FRAMES)])
    assert run.exit_code == 0, run.output
    report = json.loads((out / "report.json").read_text())
    failed = {(f["item"], f["modality"]) for f in report["failures"]}
    corrupt_id = next(u.utterance_id for d in corpus.dialogues for u in d.utterances if u.video == corrupt)
    for uid in [corrupt_id] + [u.utterance_id for u in missing]:
        assert (uid, "audio") in failed and (uid, "visual") in failed, uid
    assert all(str(missing[0].video.name) in f["error"] for f in report["failures"] if f["item"] == missing[0].utterance_id)
    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    summary = json.loads(shown.stdout)
    assert summary["complete"]
    assert summary["splits"] == {s: len([u for d in corpus.split(s) for u in d.utterances]) for s in ("train", "dev", "test")}
    assert summary["missing"]["visual"] == summary["failures"]["utterances"] == 1 + len(missing)
    assert summary["missing"]["text"] == 0
    assert summary["provenance"]["weights"]["face"]["random_init_seed"] == 0
    # too many failures stop the run with a clear message
    again = runner.invoke(app, ["extract", "--dataset", "meld", "--root", str(meld_root), "--out", str(tmp_path / "strict"),
                                "--text-model", str(tiny_text_encoder), "--modalities", "audio", "--max-failures", "0"])
    assert again.exit_code == 2
    assert "more than --max-failures 0" in again.output


def test_text_only_needs_no_media(manifest_path, tiny_text_encoder, tmp_path):
    """--modalities text reads no media file at all: it works with every media file gone."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(manifest_path, bare / "manifest.csv")
    result = extract(ExtractConfig(dataset="manifest", root=bare, out=tmp_path / "out", text_model=str(tiny_text_encoder),
                                   modalities=("text",)))
    assert result.failures == []
    shards = ShardSet(tmp_path / "out")
    assert shards.modalities == ["text"]


def test_no_text_context_encodes_each_utterance_alone(manifest_path, tiny_text_encoder, tmp_path):
    """`erc extract --no-text-context`: every vector is its utterance's own single-segment input encoded
    on its own, not batched with its dialogue's other lines, and not the context run's; the shards record it."""
    from erc.features.text import TextConfig, TextExtractor
    from erc.pipeline.corpus import load_corpus

    def run(out: Path, *flags: str) -> dict[str, np.ndarray]:
        result = CliRunner().invoke(app, ["extract", "--dataset", "manifest", "--root", str(manifest_path.parent),
                                          "--out", str(out), "--text-model", str(tiny_text_encoder),
                                          "--modalities", "text", *flags])
        assert result.exit_code == 0, result.output
        return {uid: vectors["text"] for uid, vectors in _features(out).items() if "text" in vectors}

    alone, in_context = run(tmp_path / "alone", "--no-text-context"), run(tmp_path / "context")
    assert json.loads((tmp_path / "alone" / "index.json").read_text())["config"]["text"]["context"] is False
    extractor = TextExtractor(TextConfig(model=str(tiny_text_encoder), context=False))
    utterances = [u for d in load_corpus("manifest", manifest_path.parent).dialogues for u in d.utterances]
    assert alone.keys() == in_context.keys() == {u.utterance_id for u in utterances}
    for u in utterances:
        np.testing.assert_allclose(alone[u.utterance_id], extractor.extract_dialogue([u.speaker], [u.text])[0],
                                   atol=1e-5, err_msg=u.utterance_id)
    assert any(not np.allclose(alone[uid], in_context[uid], atol=1e-3) for uid in alone)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """`erc demo` as the README's first command runs it, and its model learns (slow: about 3 minutes
    on 2 cores; CI skips it): test weighted F1 far above predicting the majority class, and a dev
    curve that rises."""
    from sklearn.metrics import f1_score

    from erc.pipeline.corpus import read_manifest

    run = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert run.exit_code == 0, run.output
    metrics = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())
    test_labels = [u.label for d in read_manifest(tmp_path / "demo" / "corpus" / "manifest.csv").split("test")
                   for u in d.utterances]
    majority = max(set(test_labels), key=test_labels.count)
    majority_f1 = f1_score(test_labels, [majority] * len(test_labels), average="weighted")
    assert metrics["test"]["weighted_f1"] > majority_f1 + 0.3, (metrics["test"], majority_f1)
    dev_curve = [epoch["dev"]["weighted_f1"] for epoch in metrics["history"]]
    assert max(dev_curve) > dev_curve[0] + 0.2, dev_curve
    assert (tmp_path / "demo" / "run" / "confusion_matrix.png").stat().st_size > 0
    shards = ShardSet(tmp_path / "demo" / "features")
    assert shards.modalities == ["text", "audio", "visual"] and shards.dims["text"] == 384


def test_plan_shards_balances_whole_dialogues_by_size():
    """Default plan: whole dialogues in corpus order, each exactly once, in groups of half the
    target to the target plus one dialogue; long dialogues get groups of their own, short ones share.
    ``dialogues_per_shard`` keeps a fixed count."""
    from erc.pipeline.corpus import Dialogue
    from erc.pipeline.shards import plan_shards

    rng = np.random.default_rng(0)
    lengths = list(rng.integers(20, 111, 60)) + list(rng.integers(1, 25, 200))  # IEMOCAP-like, then MELD-like
    dialogues = [Dialogue(f"d{i}", "train", [None] * int(n)) for i, n in enumerate(lengths)]
    plan = plan_shards(dialogues, utterances=64)
    groups = list(plan.values())
    assert list(plan) == [f"{i:05d}.h5" for i in range(len(plan))]
    assert [d.dialogue_id for g in groups for d in g] == [d.dialogue_id for d in dialogues]
    sizes = [sum(len(d) for d in g) for g in groups]
    assert min(sizes[:-1]) >= 32  # only the last group may hold less than half the target
    assert all(size - len(group[-1]) < 64 for group, size in zip(groups, sizes))  # closed once it reached the target
    assert max(sizes) <= 64 + max(lengths)
    long_groups, short_groups = groups[: next(i for i, g in enumerate(groups) if g[0].dialogue_id == "d60")], groups[-10:]
    assert max(len(g) for g in long_groups) <= 3 and min(len(g) for g in short_groups[:-1]) >= 3
    fixed = plan_shards(dialogues, dialogues_per_shard=8)
    assert [len(g) for g in fixed.values()] == [8] * 32 + [4]


def _worker_environment() -> tuple[str | None, str | None]:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")


def test_local_workers_keep_glibcs_dynamic_mmap_threshold(tmp_path):
    """Dask's nanny would start workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    dynamic mmap threshold and made the networks' visual work ~25% slower per clip (measured in
    benchmarks/results/extract_throughput.md); erc's local cluster leaves it unset. The nanny's other
    variables stay (torch's threads are set explicitly per worker)."""
    from erc.pipeline.extract import _connect

    config = ExtractConfig(dataset="manifest", root=tmp_path, manifest=tmp_path / "m.csv", out=tmp_path / "out",
                           modalities=("text",), workers=1)
    before = os.environ.get("MALLOC_TRIM_THRESHOLD_")  # the nanny writes its variables into this process too
    client, cluster = _connect(config)
    try:
        environments = list(client.run(_worker_environment).values())
    finally:
        client.close()
        cluster.close()
    assert environments == [(before, "1")]
