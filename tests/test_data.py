"""Dialogue batches from a shard set: padding, masks, dev hold-out, modality selection, class counts."""

from collections import Counter

import numpy as np
import pytest
import torch

from erc.errors import ConfigError
from erc.pipeline.data import DialogueDataset, collate_dialogues, load_splits, make_loader
from erc.pipeline.shards import UtteranceRecord, build_index, config_hash, write_shard

DIMS = {"text": 4, "audio": 6, "visual": 5}
FRAMES = 3
LABELS = ["calm", "upset", "glad"]


def _dialogue(dialogue_id: str, n: int, split: str, rng: np.random.Generator, dims: dict[str, int]) -> list[UtteranceRecord]:
    records = []
    for i in range(n):
        frames = rng.normal(size=(FRAMES, DIMS["visual"])).astype(np.float32)
        features = {m: rng.normal(size=d).astype(np.float32) for m, d in dims.items()}
        if "audio" in dims and i % 4 == 1:
            features["audio"] = None  # a missing modality
        records.append(
            UtteranceRecord(
                utterance_id=f"{dialogue_id}_u{i}", dialogue_id=dialogue_id, utterance_index=i, split=split,
                speaker=f"s{i % 3}", speaker_index=i % 3, text=f"line {i}",
                label=-1 if i == n - 1 and split == "train" else int(rng.integers(len(LABELS))),
                features=features, visual_frames=frames if "visual" in dims else None,
                visual_frame_mask=np.array([True, i % 2 == 0, False]) if "visual" in dims else None,
            )
        )
    return records


def _write_set(root, splits: dict[str, int], dims=DIMS, seed: int = 0) -> list[UtteranceRecord]:
    """Dialogues of 2..7 utterances over two shards; returns every record written."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    config = {"dataset": "unit"}
    attrs = {"dataset": "unit", "label_names": LABELS, "config": config, "config_hash": config_hash(config),
             "versions": {}, "weights": {}}
    records = [r for split, count in splits.items() for k in range(count)
               for r in _dialogue(f"{split}{k:02d}", 2 + k % 6, split, rng, dims)]
    half = next(i for i, r in enumerate(records) if i >= len(records) // 2 and r.utterance_index == 0)
    for name, part in (("00000.h5", records[:half]), ("00001.h5", records[half:])):
        write_shard(root / "shards" / name, part, attrs=attrs, dims=dims, num_frames=FRAMES)
    build_index(root)
    return records


def test_batch_pads_dialogues_and_takes_masks_from_present(tmp_path):
    records = _write_set(tmp_path, {"train": 6, "dev": 2, "test": 2})
    splits = load_splits(tmp_path, seed=0)
    dataset = DialogueDataset(splits.shards, splits.train[:3], splits.modalities)
    batch = collate_dialogues([dataset[i] for i in range(3)], splits.modalities)
    lengths = [len(r) for r in splits.train[:3]]
    assert lengths == [2, 3, 4]
    assert batch["text"].shape == (3, 4, 4) and batch["audio"].shape == (3, 4, 6) and batch["visual"].shape == (3, 4, 5)
    assert batch["mask"].sum(1).tolist() == lengths
    assert "visual_frames" not in batch
    for b, ref in enumerate(splits.train[:3]):
        rows = [r for r in records if r.dialogue_id == ref.dialogue_id]
        n = len(rows)
        assert batch["label"][b, :n].tolist() == [r.label for r in rows]
        assert (batch["label"][b, n:] == -1).all() and (batch["speaker"][b, :n] == torch.tensor([r.speaker_index for r in rows])).all()
        assert batch["audio_mask"][b].tolist() == [r.features["audio"] is not None for r in rows] + [False] * (4 - n)
        assert batch["text_mask"][b].tolist() == [True] * n + [False] * (4 - n)
        np.testing.assert_array_equal(batch["text"][b, :n].numpy(), np.stack([r.features["text"] for r in rows]))
        assert not batch["text"][b, n:].any() and not batch["audio"][b, 1].any()
    assert batch["text"].dtype == torch.float32 and batch["label"].dtype == torch.long


def test_frames_only_when_asked(tmp_path):
    records = _write_set(tmp_path, {"train": 3, "test": 1})
    splits = load_splits(tmp_path, seed=0)
    dataset = DialogueDataset(splits.shards, splits.test, splits.modalities, frames=True)
    batch = next(iter(make_loader(dataset, 4, shuffle=False)))
    assert batch["visual_frames"].shape == (1, 2, FRAMES, 5) and batch["visual_frame_mask"].shape == (1, 2, FRAMES)
    np.testing.assert_array_equal(batch["visual_frames"][0, 1].numpy(), records[-1].visual_frames)
    assert batch["visual_frame_mask"][0].tolist() == [[True, True, False], [True, False, False]]
    with pytest.raises(ConfigError, match="visual"):
        DialogueDataset(splits.shards, splits.test, ["text"], frames=True)


def test_dev_hold_out_is_ten_percent_seeded_and_disjoint(tmp_path):
    _write_set(tmp_path, {"train": 40, "test": 3})
    first, again, other = (load_splits(tmp_path, seed=s) for s in (7, 7, 8))
    assert len(first.dev) == 4 and len(first.train) == 36
    train_ids, dev_ids = {r.dialogue_id for r in first.train}, {r.dialogue_id for r in first.dev}
    assert not train_ids & dev_ids and len(train_ids | dev_ids) == 40
    assert sorted(first.held_out_dev) == sorted(dev_ids)
    assert first.held_out_dev == again.held_out_dev
    assert set(first.held_out_dev) != set(other.held_out_dev)
    assert all(r.split == "test" for r in first.test)


def test_existing_dev_split_is_used(tmp_path):
    _write_set(tmp_path / "set", {"train": 5, "dev": 2, "test": 2})
    splits = load_splits(tmp_path / "set", seed=0)
    assert splits.held_out_dev == [] and [r.dialogue_id for r in splits.dev] == ["dev00", "dev01"]
    assert len(splits.train) == 5


def test_modality_selection(tmp_path):
    _write_set(tmp_path / "full", {"train": 3, "test": 1})
    splits = load_splits(tmp_path / "full", ["visual", "text"], seed=0)
    assert splits.modalities == ["text", "visual"] and splits.input_dims == {"text": 4, "visual": 5}
    batch = collate_dialogues([DialogueDataset(splits.shards, splits.test, splits.modalities)[0]], splits.modalities)
    assert {"text", "visual", "text_mask", "visual_mask"} <= set(batch) and "audio" not in batch
    _write_set(tmp_path / "no_visual", {"train": 3, "test": 1}, dims={"text": 4, "audio": 6})
    with pytest.raises(ConfigError, match="visual"):
        load_splits(tmp_path / "no_visual", ["text", "visual"], seed=0)


def test_class_counts_and_speakers_come_from_training_dialogues(tmp_path):
    records = _write_set(tmp_path, {"train": 30, "test": 4})
    splits = load_splits(tmp_path, seed=3)
    train_ids = {r.dialogue_id for r in splits.train}
    counts = Counter(r.label for r in records if r.dialogue_id in train_ids and r.label >= 0)
    assert splits.class_counts == [counts[k] for k in range(len(LABELS))]
    assert sum(splits.class_counts) < sum(1 for r in records if r.split == "train")  # held out + unlabeled
    assert splits.num_speakers == 3


def test_shuffled_order_depends_only_on_seed(tmp_path):
    _write_set(tmp_path, {"train": 12, "test": 1})
    splits = load_splits(tmp_path, seed=0)
    dataset = DialogueDataset(splits.shards, splits.train, splits.modalities)

    def order(seed):
        return [b["text"][:, 0].sum().item() for b in make_loader(dataset, 3, shuffle=True, seed=seed)]

    assert order(1) == order(1) and order(1) != order(2)
