"""The shard writer/reader: round trip, masks, atomicity, truncated files."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from erc.errors import IncompleteShardSetError, ShardError
from erc.pipeline.shards import ShardSet, UtteranceRecord, build_index, config_hash, write_shard, write_shard_set

DIMS = {"text": 4, "audio": 6, "visual": 5}


def _records(dialogue: str, n: int, split: str, rng: np.random.Generator) -> list[UtteranceRecord]:
    out = []
    for i in range(n):
        frames = rng.normal(size=(3, 5)).astype(np.float32)
        out.append(
            UtteranceRecord(
                utterance_id=f"{dialogue}_u{i}", dialogue_id=dialogue, utterance_index=i, split=split,
                speaker=["Ann", "Bob"][i % 2], speaker_index=i % 2, text=f"line “{i}”", label=i % 2,
                features={
                    "text": rng.normal(size=4).astype(np.float32),
                    "audio": None if i == 1 else rng.normal(size=6).astype(np.float32),
                    "visual": frames.mean(0),
                },
                visual_frames=frames, visual_frame_mask=np.array([True, True, False]),
            )
        )
    return out


def _write_set(tmp_path, rng):
    (tmp_path / "shards").mkdir()
    config = {"dataset": "unit", "x": 1}
    attrs = {"dataset": "unit", "label_names": ["calm", "upset"], "config": config,
             "config_hash": config_hash(config), "versions": {"erc": "test"}, "weights": {}}
    first = _records("d0", 3, "train", rng) + _records("d1", 2, "test", rng)
    write_shard(tmp_path / "shards" / "00000.h5", first, attrs=attrs, dims=DIMS, num_frames=3,
                failures=[{"item": "d0_u1", "modality": "audio", "error": "no audio"}])
    second = _records("d2", 4, "train", rng)
    write_shard(tmp_path / "shards" / "00001.h5", second, attrs=attrs, dims=DIMS, num_frames=3)
    return first + second


def test_round_trip_and_index(tmp_path):
    records = _write_set(tmp_path, np.random.default_rng(0))
    index = build_index(tmp_path)
    assert [s["utterances"] for s in index["shards"]] == [5, 4]
    assert index["shards"][0]["splits"] == {"train": 3, "test": 2}
    assert index["shards"][0]["present"]["audio"] == 3  # utterance 1 of each dialogue has none
    assert index["shards"][0]["failures"][0]["item"] == "d0_u1"
    shards = ShardSet(tmp_path)
    # the canonical modality order, not index.json's sorted keys: a model's config (and MultiAttn's key
    # order) takes it from here
    assert shards.modalities == ["text", "audio", "visual"] and list(shards.dims) == ["audio", "text", "visual"]
    assert [r.dialogue_id for r in shards.dialogues("train")] == ["d0", "d2"]
    rows = shards.load(shards.dialogues("test")[0], frames=True)
    expected = [r for r in records if r.dialogue_id == "d1"]
    assert rows["text"] == ["line “0”", "line “1”"]
    np.testing.assert_array_equal(rows["features"]["text"], np.stack([r.features["text"] for r in expected]))
    np.testing.assert_array_equal(rows["visual_frames"][0], expected[0].visual_frames)
    d0 = shards.load(shards.dialogues("train")[0])
    assert d0["present"]["audio"].tolist() == [True, False, True]
    assert not d0["features"]["audio"][1].any()


def test_rejects_bad_vectors_and_leaves_no_file(tmp_path):
    rec = _records("d0", 2, "train", np.random.default_rng(1))
    rec[0].features["text"] = np.full(4, np.nan, np.float32)
    with pytest.raises(ShardError, match="d0_u0"):
        write_shard(tmp_path / "a.h5", rec, attrs={}, dims=DIMS, num_frames=3)
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_reported(tmp_path):
    _write_set(tmp_path, np.random.default_rng(2))
    build_index(tmp_path)
    shard = tmp_path / "shards" / "00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="00001.h5"):
        ShardSet(tmp_path)
    with pytest.raises(ShardError, match="00001.h5"):
        build_index(tmp_path)


def test_mixed_configs_refused(tmp_path):
    _write_set(tmp_path, np.random.default_rng(3))
    build_index(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    index["config_hash"] = "different"
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="another config"):
        ShardSet(tmp_path)


def _plan(tmp_path, names):
    (tmp_path / "plan.json").write_text(json.dumps({"config_hash": "x", "shards": {n: [] for n in names}}))


def test_set_missing_planned_shards_is_incomplete_and_refused(tmp_path):
    _write_set(tmp_path, np.random.default_rng(4))
    _plan(tmp_path, ["00000.h5", "00001.h5", "00002.h5"])  # the run stopped before writing 00002.h5
    index = build_index(tmp_path)
    assert index["complete"] is False and index["missing_shards"] == ["00002.h5"] and index["planned_shards"] == 3
    with pytest.raises(IncompleteShardSetError, match=r"1 of 3 planned shards are missing \(00002\.h5\).*--allow-partial"):
        ShardSet(tmp_path)
    partial = ShardSet(tmp_path, allow_partial=True)
    assert not partial.complete and partial.missing_shards == ["00002.h5"]
    assert [r.dialogue_id for r in partial.dialogues()] == ["d0", "d1", "d2"]
    # the plan, not a stale index, decides: an index without the flag is still checked against plan.json
    stale = {k: v for k, v in index.items() if k not in ("complete", "missing_shards")}
    (tmp_path / "index.json").write_text(json.dumps(stale))
    with pytest.raises(IncompleteShardSetError):
        ShardSet(tmp_path)
    _plan(tmp_path, ["00000.h5", "00001.h5"])
    assert build_index(tmp_path)["complete"] and ShardSet(tmp_path).complete


def test_shard_and_directory_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        synced.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "00000.h5"
    write_shard(target, _records("d0", 2, "train", np.random.default_rng(5)), attrs={}, dims=DIMS, num_frames=3)
    rename = next(i for i, entry in enumerate(synced) if isinstance(entry, tuple))
    tmp_name = synced[rename][1]
    assert Path(tmp_name).name.startswith(".00000.h5.") and tmp_name.endswith(".tmp")
    assert synced[rename - 1] == tmp_name, "the file is fsynced before the rename"
    assert synced[rename + 1] == str(tmp_path), "the directory is fsynced after the rename"
    assert [p.name for p in tmp_path.iterdir()] == ["00000.h5"]


def test_write_shard_set_groups_whole_dialogues_in_order(tmp_path):
    rng = np.random.default_rng(3)
    records = [r for k, n in enumerate((3, 1, 2, 4, 2)) for r in _records(f"d{k}", n, "train", rng)]
    index = write_shard_set(tmp_path, records, dataset="unit", label_names=["calm", "upset"], dims=DIMS,
                            num_frames=3, dialogues_per_shard=2)
    assert index["complete"] and [s["file"] for s in index["shards"]] == ["00000.h5", "00001.h5", "00002.h5"]
    shards = ShardSet(tmp_path)
    assert [(ref.shard.name, ref.dialogue_id) for ref in shards.refs] == [
        ("00000.h5", "d0"), ("00000.h5", "d1"), ("00001.h5", "d2"), ("00001.h5", "d3"), ("00002.h5", "d4")]
    loaded = [u for ref in shards.refs for u in shards.load(ref)["utterance_id"]]
    assert loaded == [r.utterance_id for r in records]
    shards.close()
