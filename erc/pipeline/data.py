"""Batches of whole dialogues from a shard set, held in memory when they fit.

:func:`load_splits` opens a shard set, picks the modalities a run uses and the train/dev/test
dialogues (holding out a seeded share of the training dialogues as dev when the set has no dev
split, as the IEMOCAP papers do). :class:`DialogueDataset` gives one dialogue per item: all of
its dialogues are read once into memory when they fit (per-frame features included), else each
is read from the shards when asked for; :func:`collate_dialogues` pads a list of them into the
batch every model takes::

    text / audio / visual           (B, L, D) float32   the selected modalities
    text_mask / audio_mask / ...    (B, L)    bool      modality present (False on padding)
    visual_frames                   (B, L, F, D_visual) only when asked for (``frames=True``)
    visual_frame_mask               (B, L, F) bool
    mask                            (B, L)    bool      a real utterance (False on padding)
    speaker                         (B, L)    long      per-dialogue speaker index (0 on padding)
    label                           (B, L)    long      -1 on padding and unlabeled utterances
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from erc.errors import ConfigError, ShardError
from erc.pipeline.shards import DialogueRef, ShardSet

DEV_FRACTION = 0.1
MEMORY_SHARE = 0.5  # a dataset is held in memory when it needs at most this share of the available memory


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (psutil, else /proc/meminfo), None if unknown."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class DataSplits:
    """The dialogues of one run and what the model needs to know about them."""

    shards: ShardSet
    modalities: list[str]
    train: list[DialogueRef]
    dev: list[DialogueRef]
    test: list[DialogueRef]
    held_out_dev: list[str]  # training dialogue ids used as dev (empty when the set has a dev split)
    label_names: list[str]
    input_dims: dict[str, int]
    class_counts: list[int]  # labeled training utterances per class
    num_speakers: int  # 1 + the largest per-dialogue speaker index in the set


def select_modalities(shards: ShardSet, modalities: Sequence[str] | None) -> list[str]:
    """The requested modalities in shard order (all the set holds when ``None``)."""
    if modalities is None:
        return list(shards.modalities)
    if not modalities:
        raise ConfigError("at least one modality must be selected")
    missing = [m for m in modalities if m not in shards.modalities]
    if missing:
        raise ConfigError(f"{shards.directory}: the shards hold {shards.modalities}, not {missing}")
    return [m for m in shards.modalities if m in modalities]


def hold_out_dev(train: list[DialogueRef], seed: int, fraction: float = DEV_FRACTION) -> tuple[list[DialogueRef], list[DialogueRef]]:
    """Split training dialogues into (train, dev): ``fraction`` of them (at least one), chosen by ``seed``."""
    if len(train) < 2:
        raise ConfigError(f"cannot hold out a dev set from {len(train)} training dialogue(s)")
    ids = sorted(r.dialogue_id for r in train)
    random.Random(seed).shuffle(ids)
    dev_ids = set(ids[: max(1, round(fraction * len(ids)))])
    return [r for r in train if r.dialogue_id not in dev_ids], [r for r in train if r.dialogue_id in dev_ids]


def load_splits(
    features: Path, modalities: Sequence[str] | None = None, *, seed: int, allow_partial: bool = False
) -> DataSplits:
    """Open the shard set at ``features`` and pick the dialogues and modalities of a run (an incomplete
    set raises :class:`~erc.errors.IncompleteShardSetError` unless ``allow_partial``)."""
    shards = ShardSet(Path(features), allow_partial=allow_partial)
    selected = select_modalities(shards, modalities)
    train, dev, test = (shards.dialogues(s) for s in ("train", "dev", "test"))
    for name, refs in (("train", train), ("test", test)):
        if not refs:
            raise ShardError(f"{shards.directory}: the shard set has no {name} dialogues")
    held_out: list[str] = []
    if not dev:
        train, dev = hold_out_dev(train, seed)
        held_out = [r.dialogue_id for r in dev]
    class_counts = np.zeros(len(shards.label_names), np.int64)
    num_speakers = 1
    train_refs = set(train)
    for ref in shards.refs:
        rows = shards.load(ref)
        num_speakers = max(num_speakers, int(rows["speaker_index"].max()) + 1)
        if ref in train_refs:
            labels = rows["label"][rows["label"] >= 0]
            class_counts += np.bincount(labels, minlength=len(class_counts))
    return DataSplits(
        shards=shards,
        modalities=selected,
        train=train,
        dev=dev,
        test=test,
        held_out_dev=held_out,
        label_names=list(shards.label_names),
        input_dims={m: shards.dims[m] for m in selected},
        class_counts=class_counts.tolist(),
        num_speakers=num_speakers,
    )


class DialogueDataset(Dataset):
    """One item per dialogue.

    ``in_memory=None`` (default) reads every dialogue once, in one pass over each shard, when the
    items (per-frame features included with ``frames=True``) need at most ``MEMORY_SHARE`` of the
    available memory; otherwise (or with ``in_memory=False``) a dialogue is read when first asked
    for, its utterance-level features are kept and its per-frame features re-read every time.
    """

    def __init__(
        self, shards: ShardSet, refs: list[DialogueRef], modalities: list[str], *, frames: bool = False,
        in_memory: bool | None = None,
    ):
        if frames and "visual" not in modalities:
            raise ConfigError("visual frames were asked for but the visual modality is not selected")
        self.shards, self.refs, self.modalities, self.frames = shards, refs, modalities, frames
        self._cache: dict[int, dict[str, Any]] = {}
        if in_memory is None:
            available = available_memory()
            in_memory = available is not None and self.nbytes() <= MEMORY_SHARE * available
        self.in_memory = in_memory
        if in_memory:
            self._read_all()

    def __len__(self) -> int:
        return len(self.refs)

    def nbytes(self) -> int:
        """Memory the items take (features, masks, speakers, labels; frames when asked for)."""
        per_utterance = sum(4 * self.shards.dims[m] + 1 for m in self.modalities) + 2 * 4
        if self.frames and self.refs:
            frames = self.shards.load(self.refs[0], frames=True)["visual_frames"]
            per_utterance += frames.shape[1] * (4 * frames.shape[2] + 1)
        return per_utterance * sum(len(r) for r in self.refs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i in self._cache:
            return self._cache[i]
        item = self._item(self.shards.load(self.refs[i], frames=self.frames), slice(None))
        if not self.frames:
            self._cache[i] = item
        return item

    def _read_all(self) -> None:
        """Fill the cache with every item, reading each run of adjacent dialogues of a shard at once."""
        order = sorted(range(len(self.refs)), key=lambda i: (str(self.refs[i].shard), self.refs[i].start))
        runs: list[list[int]] = []
        for i in order:
            last = self.refs[runs[-1][-1]] if runs else None
            if last is not None and last.shard == self.refs[i].shard and last.stop == self.refs[i].start:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            first, last = self.refs[run[0]], self.refs[run[-1]]
            rows = self.shards.load(DialogueRef(first.shard, first.start, last.stop, "", first.split), frames=self.frames)
            for i in run:
                ref = self.refs[i]
                self._cache[i] = self._item(rows, slice(ref.start - first.start, ref.stop - first.start))

    def _item(self, rows: dict[str, Any], span: slice) -> dict[str, Any]:
        item = {"speaker": rows["speaker_index"][span], "label": rows["label"][span]}
        for m in self.modalities:
            item[m] = rows["features"][m][span]
            item[f"{m}_mask"] = rows["present"][m][span]
        if self.frames:
            item["visual_frames"] = rows["visual_frames"][span]
            item["visual_frame_mask"] = rows["visual_frame_mask"][span]
        return item


def collate_dialogues(items: list[dict[str, Any]], modalities: list[str], *, frames: bool = False) -> dict[str, torch.Tensor]:
    """Pad dialogues to the longest one and stack them into a batch (see the module docstring)."""
    lengths = [len(item["label"]) for item in items]
    size, longest = len(items), max(lengths)
    batch = {
        "mask": torch.zeros(size, longest, dtype=torch.bool),
        "speaker": torch.zeros(size, longest, dtype=torch.long),
        "label": torch.full((size, longest), -1, dtype=torch.long),
    }
    for m in modalities:
        batch[m] = torch.zeros(size, longest, items[0][m].shape[-1])
        batch[f"{m}_mask"] = torch.zeros(size, longest, dtype=torch.bool)
    if frames:
        batch["visual_frames"] = torch.zeros(size, longest, *items[0]["visual_frames"].shape[1:])
        batch["visual_frame_mask"] = torch.zeros(size, longest, items[0]["visual_frame_mask"].shape[1], dtype=torch.bool)
    for b, (item, n) in enumerate(zip(items, lengths)):
        batch["mask"][b, :n] = True
        for key, value in item.items():
            batch[key][b, :n] = torch.from_numpy(np.asarray(value))
    return batch


def make_loader(
    dataset: DialogueDataset, batch_size: int, *, shuffle: bool, seed: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Batches of ``batch_size`` dialogues; the shuffling order depends only on ``seed``.
    ``pin_memory`` (for a CUDA device) lets ``to_device`` copy batches asynchronously."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=partial(collate_dialogues, modalities=dataset.modalities, frames=dataset.frames),
        pin_memory=pin_memory,
    )
