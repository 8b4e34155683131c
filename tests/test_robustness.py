"""Issue 10, robustness: one bad file never ends or poisons a run.

A small manifest corpus mixes broken media of many kinds with valid but awkward media and goes
through the real `erc extract` (Dask LocalCluster, OpenCV/PyAV decoding, MTCNN, openSMILE, h5py);
then the failure paths of the run itself: an unforeseen exception (a real one: MTCNN on a 16x16
video raises ValueError), `--strict`, a worker process that dies (a real SIGSEGV in the worker,
injected through a Dask worker plugin because no media file crashes a decoder reproducibly), a set
stopped by `--max-failures` that `erc train` must refuse, and a scheduler that cannot be reached.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from distributed import WorkerPlugin
from typer.testing import CliRunner

from erc.cli.main import app
from erc.errors import ExtractionError
from erc.features.video import read_frames
from erc.pipeline.extract import ExtractConfig, extract
from erc.pipeline.shards import ShardSet
from erc.pipeline.synthetic import (
    emotion_signal,
    truncate_file,
    voiced_signal,
    write_face_video,
    write_wav,
)

FRAMES = 4
FIELDS = ["dialogue_id", "utterance_index", "speaker", "text", "label", "split", "video", "audio", "start", "end"]
LONG_TEXT = " ".join(["Ça alors, naïve façade — 東京で会いましょう! 😊"] * 150)  # ~1,000 words, non-ASCII


def _write_manifest(root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def _write_float_wav(path: Path, signal_: np.ndarray, rate: int, channels: int) -> Path:
    """32-bit float PCM wav at ``rate`` with ``channels`` channels (a sample format `wave` cannot write)."""
    layout = "mono" if channels == 1 else "stereo"
    samples = np.repeat(signal_[None, :], channels, axis=0).astype(np.float32)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(samples.T.reshape(1, -1).copy(), format="flt", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for packet in stream.encode(frame) + stream.encode(None):
            container.mux(packet)
    return path


def _decodable_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        count = 0
        try:
            for _ in container.decode(video=0):
                count += 1
        except av.FFmpegError:
            pass
        return count


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> tuple[Path, dict[str, set[str]], dict[str, set[str]]]:
    """(manifest, expected failed modalities per utterance id, modalities with media per utterance id)."""
    root = tmp_path_factory.mktemp("mixed")
    media = root / "media"
    media.mkdir()
    voice = voiced_signal(1.0, 16000, seed=1)
    rows, failing, with_media = [], {}, {}

    def add(dialogue, split, index, text, label, video=None, audio=None, start=None, end=None, fails=(), media_=()):
        rows.append({"dialogue_id": dialogue, "utterance_index": index, "speaker": ["Ann", "Ben"][index % 2],
                     "text": text, "label": label, "split": split, "video": video or "", "audio": audio or "",
                     "start": "" if start is None else start, "end": "" if end is None else end})
        failing[f"{dialogue}_{index}"] = set(fails)
        with_media[f"{dialogue}_{index}"] = set(media_)

    # valid but awkward media: every one of these items must come out whole
    write_face_video(media / "plain.mp4", 1.0, 12, (320, 180), seed=1, audio=voice)
    add("awkward", "train", 0, "Hello there.", "happy", video="media/plain.mp4", media_=("audio", "visual"))
    write_face_video(media / "odd_size.mp4", 1.0, 12, (250, 142), seed=2)  # not a multiple of 16, no audio track
    write_wav(media / "8k_mono.wav", voiced_signal(1.0, 8000, seed=2), 8000)
    add("awkward", "train", 1, "Fine, thanks.", "neutral", video="media/odd_size.mp4", audio="media/8k_mono.wav",
        media_=("audio", "visual"))
    _write_float_wav(media / "44k_stereo_float.wav", voiced_signal(1.0, 44100, seed=3), 44100, channels=2)
    add("awkward", "train", 2, LONG_TEXT, "sad", audio="media/44k_stereo_float.wav", media_=("audio",))
    # a faststart mp4 cut short: its header still counts every frame (the over-counting header)
    write_face_video(media / "overcount.mp4", 3.0, 12, (320, 180), seed=4, audio=voiced_signal(3.0, 16000, seed=4),
                     faststart=True)
    truncate_file(media / "overcount.mp4", 0.75)
    add("awkward", "train", 3, "I'm a cut download.", "angry", video="media/overcount.mp4", media_=("audio", "visual"))
    write_face_video(media / "long.mp4", 4.0, 12, (320, 180), seed=5, audio=voiced_signal(4.0, 48000, seed=5),
                     audio_rate=48000)
    add("awkward", "train", 4, "Inside a long clip.", "happy", video="media/long.mp4", start=2.1, end=3.3,
        media_=("audio", "visual"))

    # broken media of many kinds: each masks exactly the modalities listed
    (media / "zero.mp4").write_bytes(b"")
    add("broken", "train", 0, "Zero bytes.", "neutral", video="media/zero.mp4", fails=("audio", "visual"),
        media_=("audio", "visual"))
    (media / "random.mp4").write_bytes(np.random.default_rng(0).bytes(30_000))
    add("broken", "train", 1, "Random bytes.", "sad", video="media/random.mp4", fails=("audio", "visual"),
        media_=("audio", "visual"))
    write_face_video(media / "truncated.mp4", 1.0, 12, (320, 180), seed=6, audio=voice)  # index at the end: lost
    truncate_file(media / "truncated.mp4", 0.5)
    add("broken", "train", 2, "Truncated.", "angry", video="media/truncated.mp4", fails=("audio", "visual"),
        media_=("audio", "visual"))
    write_face_video(media / "no_audio.mp4", 1.0, 12, (320, 180), seed=7)
    add("broken", "train", 3, "No audio track.", "happy", video="media/no_audio.mp4", fails=("audio",),
        media_=("audio", "visual"))
    write_wav(media / "silence.wav", np.zeros(16000, np.float32), 16000)
    add("broken", "train", 4, "Silence.", "neutral", video="media/plain.mp4", audio="media/silence.wav",
        fails=("audio",), media_=("audio", "visual"))
    add("broken", "train", 5, "After the end.", "sad", video="media/plain.mp4", start=10.0, end=11.0,
        fails=("audio", "visual"), media_=("audio", "visual"))
    write_face_video(media / "empty_room.mp4", 1.0, 12, (320, 180), seed=8, audio=voice, faces=0)
    add("broken", "train", 6, "Nobody here.", "angry", video="media/empty_room.mp4", fails=("visual",),
        media_=("audio", "visual"))
    write_face_video(media / "thumbnail.mp4", 1.0, 12, (16, 16), seed=9, audio=voice)  # MTCNN: ValueError
    add("broken", "train", 7, "Tiny.", "happy", video="media/thumbnail.mp4", fails=("visual",),
        media_=("audio", "visual"))
    add("broken", "train", 8, "Gone.", "neutral", video="media/missing.mp4", fails=("audio", "visual"),
        media_=("audio", "visual"))

    for split, name in (("dev", "check"), ("test", "exam")):
        for i, label in enumerate(("happy", "sad")):
            write_face_video(media / f"{name}_{i}.mp4", 1.0, 12, (320, 180), seed=10 + i,
                             audio=emotion_signal(label, 1.0, 16000, seed=i))
            add(name, split, i, f"{name} line {i}.", label, video=f"media/{name}_{i}.mp4", media_=("audio", "visual"))
    return _write_manifest(root, rows), failing, with_media


@pytest.fixture(scope="module")
def mixed_run(mixed_corpus, tiny_text_encoder, tmp_path_factory):
    manifest, _, _ = mixed_corpus
    out = tmp_path_factory.mktemp("mixed_out") / "features"
    run = CliRunner().invoke(app, [
        "extract", "--dataset", "manifest", "--root", str(manifest.parent), "--manifest", str(manifest),
        "--out", str(out), "--text-model", str(tiny_text_encoder), "--random-face-weights",
        "--num-frames", str(FRAMES), "--dialogues-per-shard", "2", "--max-failures", "20",
    ])
    return run, out


def test_header_that_over_counts_still_gives_frames(mixed_corpus):
    path = mixed_corpus[0].parent / "media" / "overcount.mp4"
    capture = cv2.VideoCapture(str(path))
    header_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    decodable = _decodable_frames(path)
    assert header_count == 36 and 0 < decodable < header_count - FRAMES, "the fixture must over-count"
    with av.open(str(path)) as container:
        sequential = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    frames, indices = read_frames(path, None, None, num_frames=6)
    assert frames.shape[0] == 6 and indices[0] == 0 and indices[-1] == decodable - 1
    assert indices == sorted(indices) and len(set(indices)) == 6  # spread over the frames that exist
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, sequential[index])
    # a span reaching into the lost part keeps the frames of it that exist
    frames, indices = read_frames(path, 1.0, 3.0, num_frames=4)
    assert indices[0] == 12 and indices[-1] == decodable - 1


def test_mixed_corpus_every_broken_item_reported_every_valid_item_whole(mixed_corpus, mixed_run):
    _, failing, with_media = mixed_corpus
    run, out = mixed_run
    assert run.exit_code == 0, run.output
    assert "Traceback" not in run.output
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["missing_shards"] == []
    reported = {(f["item"], f["modality"]) for f in report["failures"]}
    expected = {(item, m) for item, modalities in failing.items() for m in modalities}
    assert reported == expected
    for failure in report["failures"]:
        assert "\n" not in failure["error"] and failure["error"], failure
        assert "media/" in failure["error"], f"the message names the file: {failure}"
        if failure["type"] in ("MediaError", "SilentAudioError", "NoFaceError"):
            assert "traceback" not in failure
    tiny = next(f for f in report["failures"] if f["item"] == "broken_7")
    assert tiny["type"] == "ValueError" and "thumbnail.mp4" in tiny["error"]
    assert "Traceback (most recent call last)" in tiny["traceback"]
    shards = ShardSet(out)
    seen = set()
    for ref in shards.dialogues():
        rows = shards.load(ref)
        for i, uid in enumerate(rows["utterance_id"]):
            seen.add(uid)
            assert rows["present"]["text"][i], uid
            for modality in ("audio", "visual"):
                present = bool(rows["present"][modality][i])
                assert present == (modality in with_media[uid] and modality not in failing[uid]), (uid, modality)
                vector = rows["features"][modality][i]
                assert bool(np.abs(vector).sum() > 0) == present, f"{uid} {modality}: masked rows are zero"
    shards.close()
    assert seen == set(failing)


def test_reading_ahead_gives_the_same_features_and_failures_as_reading_in_line(mixed_corpus, tmp_path):
    """MediaReader decodes frames and runs openSMILE in a background thread, items ahead of the
    networks: every vector and every failure (item, modality, message, order) equals reading each
    item when it is needed, over the mixed corpus's broken and awkward media."""
    from erc.pipeline.corpus import load_corpus
    from erc.pipeline.extract import extract_dialogues

    manifest = mixed_corpus[0]
    corpus = load_corpus("manifest", manifest.parent, manifest=manifest)
    config = ExtractConfig(dataset="manifest", root=manifest.parent, out=tmp_path / "unused", manifest=manifest,
                           modalities=("audio", "visual"), random_face_weights=True, num_frames=FRAMES)
    settings = config.worker_settings("cpu", 1)
    in_line = extract_dialogues(corpus.dialogues, corpus.label_names, settings, read_ahead=0)
    ahead = extract_dialogues(corpus.dialogues, corpus.label_names, settings, read_ahead=3)
    assert [f["item"] for f in ahead.failures] == [f["item"] for f in in_line.failures]
    for got, expected in zip(ahead.failures, in_line.failures):
        assert (got["modality"], got["type"], got["error"]) == (expected["modality"], expected["type"], expected["error"])
    assert len(in_line.failures) >= 10 and {f["modality"] for f in in_line.failures} == {"audio", "visual"}
    assert [r.utterance_id for r in ahead.records] == [r.utterance_id for r in in_line.records]
    for got, expected in zip(ahead.records, in_line.records):
        assert got.features.keys() == expected.features.keys(), got.utterance_id
        for modality, vector in expected.features.items():
            if vector is None:
                assert got.features[modality] is None, (got.utterance_id, modality)
            else:
                np.testing.assert_array_equal(got.features[modality], vector, err_msg=f"{got.utterance_id} {modality}")
        if expected.visual_frames is not None:
            np.testing.assert_array_equal(got.visual_frames, expected.visual_frames)
    assert sum(r.features.get("visual") is not None for r in in_line.records) >= 5


def test_strict_stops_at_the_first_unforeseen_exception(mixed_corpus, tiny_text_encoder, tmp_path):
    manifest = mixed_corpus[0]
    rows = [r for r in csv.DictReader(manifest.open(encoding="utf-8")) if r["dialogue_id"] == "broken"]
    strict_manifest = _write_manifest(manifest.parent / "strict", [
        {**r, "video": f"../{r['video']}" if r["video"] else "", "audio": f"../{r['audio']}" if r["audio"] else ""}
        for r in rows if r["utterance_index"] in ("6", "7")  # no face (foreseen), then the 16x16 video
    ] + [{**rows[0], "dialogue_id": "other", "split": "test", "video": "", "audio": ""}])
    run = CliRunner().invoke(app, [
        "extract", "--dataset", "manifest", "--root", str(strict_manifest.parent), "--manifest", str(strict_manifest),
        "--out", str(tmp_path / "strict"), "--text-model", str(tiny_text_encoder), "--random-face-weights",
        "--modalities", "visual", "--num-frames", str(FRAMES), "--max-failures", "10", "--strict",
    ])
    assert run.exit_code == 2, run.output
    assert "broken_7 [visual]" in run.output and "ValueError" in run.output and "--strict" in run.output
    assert "Traceback" not in run.output
    assert not list((tmp_path / "strict" / "shards").glob("*.h5")), "the shard with the error is not written"


# ----------------------------------------------------------------------------------------------------
# --max-failures leaves an incomplete set that train / evaluate refuse


@pytest.fixture(scope="module")
def stopped_set(tiny_text_encoder, tmp_path_factory):
    """Text+audio corpus whose 3rd dialogue (test) has a zero-byte file; --max-failures 0 stops the run there,
    before the six dialogues after it."""
    root = tmp_path_factory.mktemp("stopped")
    (root / "media").mkdir()
    rows = []
    plan = [("t1", "train"), ("t2", "train"), ("x", "test")] + [(f"later{i}", "train") for i in range(6)]
    for d, (dialogue, split) in enumerate(plan):
        for i, label in enumerate(("Joy", "sad", "joy")):
            name = f"media/{dialogue}_{i}.wav"
            if dialogue == "x" and i == 1:
                (root / name).write_bytes(b"")
            else:
                write_wav(root / name, emotion_signal(label, 1.2, 16000, seed=10 * d + i), 16000)
            rows.append({"dialogue_id": dialogue, "utterance_index": i, "speaker": "AB"[i % 2],
                         "text": f"{dialogue} says {label}", "label": label, "split": split, "video": "",
                         "audio": name, "start": "", "end": ""})
    manifest = _write_manifest(root, rows)
    out = root / "features"
    run = CliRunner().invoke(app, [
        "extract", "--dataset", "manifest", "--root", str(root), "--out", str(out), "--text-model",
        str(tiny_text_encoder), "--modalities", "text,audio", "--dialogues-per-shard", "1", "--max-failures", "0",
        "--labels", "sad,JOY",
    ])
    return run, manifest, out


def test_max_failures_leaves_an_incomplete_set_that_train_refuses(stopped_set, tmp_path):
    run, _, out = stopped_set
    assert run.exit_code == 2 and "more than --max-failures 0" in run.output, run.output
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False and index["missing_shards"], "the stopped run's index must not look complete"
    assert index["label_names"] == ["sad", "JOY"], "--labels fixes the vocabulary and its order (case-insensitive)"
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] and not report["complete"]
    shown = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert shown["complete"] is False and shown["missing_shards"] == index["missing_shards"]

    refused = CliRunner().invoke(app, ["train", "--model", "text-only", "--features", str(out), "--out",
                                       str(tmp_path / "refused"), "--epochs", "1", "--device", "cpu"])
    assert refused.exit_code == 2 and "incomplete shard set" in refused.output and "--allow-partial" in refused.output
    assert not (tmp_path / "refused" / "best.pt").exists()

    accepted = CliRunner().invoke(app, ["train", "--model", "text-only", "--features", str(out), "--out",
                                        str(tmp_path / "partial"), "--epochs", "1", "--device", "cpu",
                                        "--allow-partial"])
    assert accepted.exit_code == 0, accepted.output
    assert json.loads((tmp_path / "partial" / "index.json").read_text())["complete"] is False
    evaluated = CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "partial"), "--device", "cpu"])
    assert evaluated.exit_code == 2 and "incomplete shard set" in evaluated.output
    evaluated = CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "partial"), "--device", "cpu",
                                         "--allow-partial"])
    assert evaluated.exit_code == 0, evaluated.output


def test_resuming_the_stopped_set_completes_it(stopped_set, tiny_text_encoder, tmp_path):
    import shutil

    _, manifest, out = stopped_set
    copy = shutil.copytree(out, tmp_path / "features")
    before = {p.name for p in (copy / "shards").glob("*.h5")}
    result = extract(ExtractConfig(dataset="manifest", root=manifest.parent, out=copy, text_model=str(tiny_text_encoder),
                                   modalities=("text", "audio"), dialogues_per_shard=1, max_failures=5,
                                   labels=("sad", "JOY")))
    assert result.complete and result.shards_skipped >= len(before)
    shards = ShardSet(copy)
    assert shards.complete and len(shards.dialogues()) == 9
    assert [f["item"] for f in json.loads((copy / "report.json").read_text())["failures"]] == ["x_1"]


# ----------------------------------------------------------------------------------------------------
# a worker process that dies, and a scheduler that is not there


class SegfaultOnCrashFiles(WorkerPlugin):
    """Worker plugin: in every worker process (restarted ones too), reading audio from a file named
    ``crash*`` kills the process with SIGSEGV, as a crashing native decoder would."""

    name = "erc-test-segfault"

    def setup(self, worker):
        import erc.features.audio as audio_module

        original = audio_module.AudioExtractor.extract
        if getattr(original, "_crashes", False):
            return

        def extract(self, path, start=None, end=None):
            if Path(path).name.startswith("crash"):
                os.kill(os.getpid(), signal.SIGSEGV)
            return original(self, path, start, end)

        extract._crashes = True
        audio_module.AudioExtractor.extract = extract


def test_a_worker_that_dies_becomes_a_reported_item(tmp_path):
    import sys

    import cloudpickle
    import dask
    from distributed import Client, LocalCluster

    root = tmp_path / "corpus"
    (root / "media").mkdir(parents=True)
    rows = []
    for d, dialogue in enumerate(("first", "second")):
        for i in range(2):  # the second dialogue's first file crashes the worker
            name = "crash.wav" if (d, i) == (1, 0) else f"{dialogue}_{i}.wav"
            write_wav(root / "media" / name, voiced_signal(1.0, 16000, seed=d * 2 + i), 16000)
            rows.append({"dialogue_id": dialogue, "utterance_index": i, "speaker": "AB"[i], "text": f"{dialogue} {i}",
                         "label": "calm", "split": ["train", "test"][d], "video": "", "audio": f"media/{name}",
                         "start": "", "end": ""})
    _write_manifest(root, rows)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this test file
    # as erc's own local cluster: a dead worker fails its one task at once
    with dask.config.set({"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=50)
    try:
        with Client(cluster) as client:
            client.register_plugin(SegfaultOnCrashFiles())
            result = extract(ExtractConfig(dataset="manifest", root=root, out=tmp_path / "out",
                                           modalities=("audio",), dialogues_per_shard=1, max_failures=3,
                                           scheduler=cluster.scheduler_address))
    finally:
        cluster.close()
    assert result.complete
    assert [(f["item"], f["modality"], f["type"]) for f in result.failures] == [("second_0", "audio", "KilledWorker")]
    assert "crash.wav" in result.failures[0]["error"]
    shards = ShardSet(tmp_path / "out")
    for ref in shards.dialogues():
        rows_ = shards.load(ref)
        for uid, present in zip(rows_["utterance_id"], rows_["present"]["audio"]):
            assert present == (uid != "second_0"), uid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_unreachable_or_without_workers_is_a_clear_error_not_a_hang(tiny_text_encoder, tmp_path):
    from distributed import LocalCluster

    root = tmp_path / "corpus"
    root.mkdir()
    _write_manifest(root, [{"dialogue_id": "d", "utterance_index": i, "speaker": "A", "text": "hi", "label": "calm",
                            "split": split, "video": "", "audio": "", "start": "", "end": ""}
                           for i, split in enumerate(("train",))])

    def config(address):
        return ExtractConfig(dataset="manifest", root=root, out=tmp_path / "out", text_model=str(tiny_text_encoder),
                             modalities=("text",), scheduler=address, scheduler_timeout=2, overwrite=True)

    started = time.monotonic()
    with pytest.raises(ExtractionError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:\d+ within 2 s"):
        extract(config(f"tcp://127.0.0.1:{_free_port()}"))
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with pytest.raises(ExtractionError, match="has no worker .waited 2 s.: start `dask worker"):
            extract(config(empty.scheduler_address))
    assert time.monotonic() - started < 30


def test_paths_given_to_workers_are_absolute(tmp_path, monkeypatch, tiny_text_encoder):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"0")
    config = ExtractConfig(dataset="manifest", root=Path("corpus"), manifest=Path("corpus/m.csv"), out=Path("out"),
                           face_weights=Path("w.pt"), text_model=os.path.relpath(tiny_text_encoder))
    assert all(p.is_absolute() for p in (config.root, config.manifest, config.out, config.face_weights))
    assert Path(config.text_model).is_absolute() and Path(config.text_model).samefile(tiny_text_encoder)
    settings = config.worker_settings("cpu", 1)
    assert Path(settings.face_weights).is_absolute() and Path(settings.text_model).is_absolute()


def test_each_local_worker_gets_its_own_gpu(monkeypatch):
    """--device cuda with several local workers on a machine with several GPUs: worker k uses GPU
    k mod count; a worker pinned by CUDA_VISIBLE_DEVICES, a single GPU, an explicit index, the CPU and
    a process outside Dask keep the device as given."""
    import distributed
    import torch

    from erc.pipeline.extract import worker_device

    class FakeWorker:
        def __init__(self, name):
            self.name = name

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_device("cuda") == "cuda"  # not in a worker
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name, expected in ((0, "cuda:0"), (3, "cuda:3"), (5, "cuda:1"), ("tcp-named", "cuda")):
        monkeypatch.setattr(distributed, "get_worker", lambda name=name: FakeWorker(name))
        assert worker_device("cuda") == expected
    assert worker_device("cuda:2") == "cuda:2" and worker_device("cpu") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert worker_device("cuda") == "cuda"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_device("cuda") == "cuda"
