"""HDF5 feature shards: the contract between extraction and training.

A shard set is a directory::

    OUT/plan.json          what the run will write: config, its hash, shard name -> dialogue ids
    OUT/shards/NNNNN.h5    whole dialogues, utterances contiguous and in dialogue order
    OUT/index.json         one entry per finished shard (counts per split and label), rebuilt from
                           the shards themselves, so it can never disagree with them; ``complete``
                           is true only when every shard of plan.json is on disk
    OUT/report.json        per-item failures of the whole run (also stored inside each shard)

Inside a shard (N utterances, F sampled frames)::

    utterance_id, dialogue_id, split, speaker, text   (N,) utf-8 strings
    utterance_index, speaker_index, label             (N,) int32; label -1 = unlabeled
    features/text          (N, D_text)   float32      only the modalities that were extracted
    features/audio         (N, 6373)     float32
    features/visual        (N, 1000)     float32
    features/visual_frames (N, F, 1000)  float32
    features/visual_frame_mask (N, F)    bool         frame had at least one face
    present/text|audio|visual (N,)       bool         False = missing modality (its row is zeros)
    attrs: format_version, dataset, label_names, modalities, dims, config, config_hash,
           versions, weights, failures (JSON strings where structured)

Shards are written to a temporary name, flushed to disk (fsync) and renamed into place (the
directory is fsynced too), so a shard on disk is complete even after a power cut. A set whose
plan.json names shards that are not on disk is incomplete: :class:`ShardSet` refuses it unless
``allow_partial=True``. Only this module reads or writes HDF5.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from erc.errors import IncompleteShardSetError, ShardError

FORMAT_VERSION = 1
MODALITIES = ("text", "audio", "visual")
_STR = h5py.string_dtype("utf-8")
_COLUMNS_STR = ("utterance_id", "dialogue_id", "split", "speaker", "text")
_COLUMNS_INT = ("utterance_index", "speaker_index", "label")


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able config (what decides whether two runs are the same)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _tmp_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique per writer (two writers of one shard never collide)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory: after this returns, ``path`` is on disk."""
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file, an fsync and a rename."""
    tmp = _tmp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class UtteranceRecord:
    """Everything a shard stores for one utterance. A modality that was not extracted or failed is
    ``None`` (stored as a zero row with ``present`` False)."""

    utterance_id: str
    dialogue_id: str
    utterance_index: int
    split: str
    speaker: str
    speaker_index: int
    text: str
    label: int
    features: dict[str, np.ndarray | None] = field(default_factory=dict)
    visual_frames: np.ndarray | None = None
    visual_frame_mask: np.ndarray | None = None


def write_shard(
    path: Path,
    records: list[UtteranceRecord],
    *,
    attrs: dict[str, Any],
    dims: dict[str, int],
    num_frames: int = 20,
    failures: list[dict[str, str]] | None = None,
) -> None:
    """Write ``records`` (whole dialogues, in order) as one shard, atomically.

    ``dims`` names the extracted modalities and their widths; ``attrs`` holds the provenance
    (dataset, label_names, config, config_hash, versions, weights).
    """
    if not records:
        raise ShardError(f"{path}: refusing to write an empty shard")
    n = len(records)
    tmp = _tmp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            for col in _COLUMNS_STR:
                f.create_dataset(col, data=[getattr(r, col) for r in records], dtype=_STR)
            for col in _COLUMNS_INT:
                f.create_dataset(col, data=np.array([getattr(r, col) for r in records], np.int32))
            for modality, dim in dims.items():
                matrix = np.zeros((n, dim), np.float32)
                present = np.zeros(n, bool)
                for i, r in enumerate(records):
                    vector = r.features.get(modality)
                    if vector is not None:
                        if vector.shape != (dim,) or not np.all(np.isfinite(vector)):
                            raise ShardError(
                                f"{r.utterance_id}: {modality} vector has shape {vector.shape} "
                                f"or non-finite values (expected ({dim},))"
                            )
                        matrix[i] = vector
                        present[i] = True
                f.create_dataset(f"features/{modality}", data=matrix)
                f.create_dataset(f"present/{modality}", data=present)
            if "visual" in dims:
                frames = np.zeros((n, num_frames, dims["visual"]), np.float32)
                frame_mask = np.zeros((n, num_frames), bool)
                for i, r in enumerate(records):
                    if r.visual_frames is not None and r.features.get("visual") is not None:
                        frames[i] = r.visual_frames
                        frame_mask[i] = r.visual_frame_mask
                f.create_dataset("features/visual_frames", data=frames, chunks=(1, num_frames, dims["visual"]))
                f.create_dataset("features/visual_frame_mask", data=frame_mask)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["dims"] = json.dumps(dims)
            f.attrs["modalities"] = json.dumps(list(dims))
            f.attrs["failures"] = json.dumps(failures or [])
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _attr(f: h5py.File, key: str) -> Any:
    value = f.attrs[key]
    if isinstance(value, str) and value.startswith(("[", "{")):
        return json.loads(value)
    return value


@dataclass
class ShardSummary:
    """What the index keeps of one finished shard."""

    file: str
    dialogues: int
    utterances: int
    splits: dict[str, int]
    dialogue_splits: dict[str, int]
    labels: dict[str, dict[str, int]]
    present: dict[str, int]
    failures: list[dict[str, str]]


DialogueT = TypeVar("DialogueT", bound=Sized)


def plan_shards(
    dialogues: Sequence[DialogueT], utterances: int = 64, dialogues_per_shard: int | None = None
) -> dict[str, list[DialogueT]]:
    """Group whole dialogues, in corpus order, into shards (each shard is one unit of work for a
    worker): ``dialogues_per_shard`` dialogues each if given, else size-balanced groups of about
    ``utterances`` utterances. A group closes once it reaches the target; a dialogue that would
    take a group of at least half the target past it starts the next group instead. So groups
    hold between half the target and the target plus one dialogue (or one longer dialogue), and
    a corpus of long dialogues (IEMOCAP: 20-110 utterances) gets as many units of work as one of
    short ones of the same size (MELD: about 10) instead of 8 dialogues a shard either way. A
    dialogue is anything with a length: a corpus ``Dialogue`` or a list of its records."""
    groups: list[list[DialogueT]] = []
    if dialogues_per_shard is not None:
        groups = [list(dialogues[i : i + dialogues_per_shard]) for i in range(0, len(dialogues), dialogues_per_shard)]
    else:
        size = 0
        for dialogue in dialogues:
            if groups and size < utterances and not (size >= utterances / 2 and size + len(dialogue) > utterances):
                groups[-1].append(dialogue)
                size += len(dialogue)
            else:
                groups.append([dialogue])
                size = len(dialogue)
    return {f"{i:05d}.h5": group for i, group in enumerate(groups)}


def write_shard_set(
    out: Path,
    records: list[UtteranceRecord],
    *,
    dataset: str,
    label_names: list[str],
    dims: dict[str, int],
    num_frames: int = 20,
    dialogues_per_shard: int = 8,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``records`` (whole dialogues, in order) as a shard set under ``out``: shards of
    ``dialogues_per_shard`` dialogues, named 00000.h5, 00001.h5, ..., and the index, which is
    returned. For features made outside ``erc extract`` (tests, benchmarks, your own extractors);
    ``config`` (default ``{"dataset": dataset}``) is recorded and hashed as extraction's is."""
    config = config if config is not None else {"dataset": dataset}
    attrs = {"dataset": dataset, "label_names": list(label_names), "config": config,
             "config_hash": config_hash(config), "versions": {}, "weights": {}}
    dialogues: list[list[UtteranceRecord]] = []
    for record in records:
        if not dialogues or dialogues[-1][-1].dialogue_id != record.dialogue_id:
            dialogues.append([])
        dialogues[-1].append(record)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for name, part in plan_shards(dialogues, dialogues_per_shard=dialogues_per_shard).items():
        write_shard(out / "shards" / name, [r for dialogue in part for r in dialogue], attrs=attrs, dims=dims,
                    num_frames=num_frames)
    return build_index(out)


def summarize_shard(path: Path) -> ShardSummary:
    """Open a shard, check it is whole, and count what it holds. Raises ShardError if it is not."""
    try:
        with h5py.File(path, "r") as f:
            label_names = _attr(f, "label_names")
            splits = _decode(f["split"][()])
            labels = f["label"][()]
            n = len(splits)
            per_split: dict[str, Counter] = {}
            for s, y in zip(splits, labels):
                per_split.setdefault(s, Counter())[label_names[y] if y >= 0 else "<unlabeled>"] += 1
            present = {}
            for m in _attr(f, "modalities"):
                if f[f"features/{m}"].shape[0] != n:
                    raise ShardError(f"{path}: features/{m} has {f[f'features/{m}'].shape[0]} rows, expected {n}")
                present[m] = int(f[f"present/{m}"][()].sum())
            dialogue_split = dict(zip(_decode(f["dialogue_id"][()]), splits))
            return ShardSummary(
                file=path.name,
                dialogues=len(dialogue_split),
                utterances=n,
                splits=dict(Counter(splits)),
                dialogue_splits=dict(Counter(dialogue_split.values())),
                labels={s: dict(c) for s, c in per_split.items()},
                present=present,
                failures=_attr(f, "failures"),
            )
    except ShardError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ShardError(f"{path}: not a complete erc shard ({exc})") from exc


def read_shard_attrs(path: Path) -> dict[str, Any]:
    """The provenance attributes of a shard (config, versions, weights, label names, dims...)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _attr(f, k) for k in f.attrs}
    except OSError as exc:
        raise ShardError(f"{path}: cannot open shard ({exc})") from exc


def planned_shards(out: Path) -> list[str] | None:
    """The shard names ``out/plan.json`` plans, or None for a set without a plan (written by hand)."""
    plan_path = Path(out) / "plan.json"
    if not plan_path.exists():
        return None
    try:
        return sorted(json.loads(plan_path.read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{plan_path}: unreadable plan ({type(exc).__name__}: {exc})") from exc


def build_index(out: Path, *, write: bool = True) -> dict[str, Any]:
    """Rebuild the index from the shards present in ``out/shards``; write ``index.json`` unless told not to.

    ``complete`` is true only when every shard plan.json names is on disk (a set without plan.json is
    complete when it holds any shard); ``missing_shards`` lists the planned ones that are not.
    """
    shard_paths = sorted((out / "shards").glob("*.h5"))
    summaries = [summarize_shard(p) for p in shard_paths]
    planned = planned_shards(out)
    missing = sorted(set(planned) - {p.name for p in shard_paths}) if planned is not None else []
    index: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "shards": [vars(s) for s in summaries],
        "complete": bool(shard_paths) and not missing,
        "planned_shards": len(planned) if planned is not None else len(shard_paths),
        "missing_shards": missing,
    }
    if shard_paths:
        attrs = read_shard_attrs(shard_paths[0])
        for key in ("dataset", "label_names", "dims", "modalities", "config", "config_hash", "versions", "weights"):
            index[key] = attrs.get(key)
    if write:
        write_json_atomic(out / "index.json", index)
    return index


@dataclass(frozen=True)
class DialogueRef:
    """Where one dialogue's rows are: shard file and row range."""

    shard: Path
    start: int
    stop: int
    dialogue_id: str
    split: str

    def __len__(self) -> int:
        return self.stop - self.start


class ShardSet:
    """Lazy reader of a shard set directory (reads rows of one dialogue at a time).

    A set whose plan names shards that are not on disk (an extraction stopped by ``--max-failures``
    or killed) raises :class:`IncompleteShardSetError` unless ``allow_partial=True``; ``complete``
    and ``missing_shards`` say what it lacks.
    """

    def __init__(self, directory: Path, *, allow_partial: bool = False):
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.exists():
            raise ShardError(f"{self.directory}: no index.json (not an erc shard set, or extraction did not finish)")
        self.index = json.loads(index_path.read_text())
        if not self.index.get("shards"):
            raise ShardError(f"{self.directory}: the shard set holds no shards")
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{self.directory}: shard format {self.index.get('format_version')} != {FORMAT_VERSION}")
        planned = planned_shards(self.directory)
        indexed = {entry["file"] for entry in self.index["shards"]}
        if planned is not None:
            self.missing_shards = sorted(set(planned) - indexed)
            self.complete = not self.missing_shards
        else:  # no plan: trust the index's own record (absent in sets written before it existed)
            self.missing_shards = list(self.index.get("missing_shards") or [])
            self.complete = not self.missing_shards and self.index.get("complete", True) is not False
        if not self.complete and not allow_partial:
            missing = self.missing_shards
            raise IncompleteShardSetError(
                f"{self.directory}: incomplete shard set: {len(missing)} of {len(planned or indexed) or '?'} planned "
                f"shards are missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); its extraction "
                "stopped early (see report.json). Re-run `erc extract` to finish it, or pass --allow-partial to "
                "use only the shards on disk"
            )
        self.label_names: list[str] = self.index["label_names"]
        self.dims: dict[str, int] = self.index["dims"]
        # canonical order (text, audio, visual), whatever order index.json's sorted keys give: the
        # models' configs take it from here, and MultiAttn's key order follows it (its docstring's order)
        self.modalities: list[str] = sorted(self.dims, key=lambda m: MODALITIES.index(m) if m in MODALITIES else len(MODALITIES))
        self.config: dict[str, Any] = self.index["config"]
        self.refs: list[DialogueRef] = []
        self._files: dict[Path, h5py.File] = {}
        for entry in self.index["shards"]:
            path = self.directory / "shards" / entry["file"]
            try:
                with h5py.File(path, "r") as f:
                    if _attr(f, "config_hash") != self.index["config_hash"]:
                        raise ShardError(f"{path}: extracted with another config than the rest of the set")
                    dialogue_ids = _decode(f["dialogue_id"][()])
                    splits = _decode(f["split"][()])
            except OSError as exc:
                raise ShardError(f"{path}: missing or truncated shard ({exc})") from exc
            if len(dialogue_ids) != entry["utterances"]:
                raise ShardError(f"{path}: holds {len(dialogue_ids)} utterances, index says {entry['utterances']}")
            start = 0
            for i in range(1, len(dialogue_ids) + 1):
                if i == len(dialogue_ids) or dialogue_ids[i] != dialogue_ids[start]:
                    self.refs.append(DialogueRef(path, start, i, dialogue_ids[start], splits[start]))
                    start = i

    def dialogues(self, split: str | None = None) -> list[DialogueRef]:
        return [r for r in self.refs if split is None or r.split == split]

    def _file(self, path: Path) -> h5py.File:
        if path not in self._files:
            self._files[path] = h5py.File(path, "r")
        return self._files[path]

    def load(self, ref: DialogueRef, *, frames: bool = False) -> dict[str, Any]:
        """Rows of one dialogue: metadata lists, ``features`` and ``present`` per modality."""
        f = self._file(ref.shard)
        rows = slice(ref.start, ref.stop)
        out: dict[str, Any] = {col: _decode(f[col][rows]) for col in _COLUMNS_STR}
        out.update({col: f[col][rows] for col in _COLUMNS_INT})
        out["features"] = {m: f[f"features/{m}"][rows] for m in self.modalities}
        out["present"] = {m: f[f"present/{m}"][rows] for m in self.modalities}
        if frames and "visual" in self.modalities:
            out["visual_frames"] = f["features/visual_frames"][rows]
            out["visual_frame_mask"] = f["features/visual_frame_mask"][rows]
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state
