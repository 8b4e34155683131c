"""Metrics, checkpoints, and `erc evaluate`: the test metrics of a run recomputed from its best checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch import nn
from torch.utils.data import DataLoader

from erc.errors import ConfigError
from erc.models.context import use_xlstm_backend
from erc.models.registry import build_model
from erc.pipeline.data import DataSplits, DialogueDataset, load_splits, make_loader

CHECKPOINT = "best.pt"


def resolve_device(device: str) -> torch.device:
    """``auto`` = CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(device)


PRECISIONS = ("fp32", "bf16", "auto")


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16)."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^(flags|Features)\s*:.*\b(avx512_bf16|amx_bf16|bf16)\b", cpuinfo, re.MULTILINE) is not None


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16". ``auto`` = bf16 on a CUDA GPU that computes it natively and on CPUs with
    native bf16, else fp32; ``bf16`` is honoured anywhere (emulated where it is not native)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The forward pass's autocast context for a resolved precision (fp32: autocast off)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def float32(value: Any) -> Any:
    """``value`` with its floating-point tensors (also inside dicts and dataclasses such as
    ``ModelOutput``) in float32, so that losses are computed in float32 after a bf16 forward.
    float32 tensors are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: float32(v) for key, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: float32(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    return value


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to ``device``; asynchronous on CUDA when the loader pins its memory."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) label of every labeled utterance, in loader order (in float32; read back
    from the device once, at the end)."""
    true, predicted, _ = predict_probabilities(model, loader, device)
    return true, predicted


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``predict`` and also the (N, C) class probabilities (softmax of the logits) of each utterance."""
    model.eval()
    true, predicted, probabilities = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits = model(batch).logits.float()
        labeled = batch["label"] >= 0
        true.append(batch["label"][labeled])
        predicted.append(logits.argmax(-1)[labeled])
        probabilities.append(logits[labeled].softmax(-1))
    return tuple(torch.cat(part).cpu().numpy() for part in (true, predicted, probabilities))  # type: ignore[return-value]


def classification_metrics(true: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Weighted F1 (the papers' headline number), accuracy, macro F1, per-class F1 and the confusion matrix."""
    classes = list(range(len(label_names)))
    per_class = f1_score(true, predicted, labels=classes, average=None, zero_division=0)
    return {
        "weighted_f1": float(f1_score(true, predicted, labels=classes, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(true, predicted)),
        "macro_f1": float(f1_score(true, predicted, labels=classes, average="macro", zero_division=0)),
        "per_class_f1": {name: float(f) for name, f in zip(label_names, per_class)},
        "confusion_matrix": confusion_matrix(true, predicted, labels=classes).tolist(),
        "utterances": int(len(true)),
    }


def dialogue_bootstrap_difference(
    true: np.ndarray, predicted: np.ndarray, reference: np.ndarray, dialogues: np.ndarray, *,
    resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """How much higher some runs score than others on one test set, and how sure that is.

    ``predicted`` (R, N) and ``reference`` (R', N): the predicted labels of two sets of runs (e.g. the
    seeds of two models; a single (N,) row is one run) for N utterances; ``true`` (N,); ``dialogues``
    (N,) the dialogue of each utterance. Returns (difference, low, high) in weighted-F1 points: the
    mean weighted F1 of ``predicted``'s runs minus that of ``reference``'s, and its ``confidence``
    interval from a paired bootstrap over DIALOGUES (``scipy.stats.bootstrap``, percentile method):
    each resample draws the dialogues with replacement and scores every run of both sets on the same
    draw. The utterances of a dialogue are not independent, so they are resampled together. The
    interval is the uncertainty that the test set's finite size leaves, which no number of training
    seeds removes.
    """
    from scipy.stats import bootstrap

    predicted, reference = np.atleast_2d(predicted), np.atleast_2d(reference)
    if not (len(true) == predicted.shape[1] == reference.shape[1] == len(dialogues)):
        raise ValueError("true, predicted, reference and dialogues must cover the same utterances")
    groups = np.unique(dialogues, return_inverse=True)[1]
    members = [np.flatnonzero(groups == g) for g in range(groups.max() + 1)]
    labels = np.unique(true)

    def difference(drawn: np.ndarray) -> float:
        rows = np.concatenate([members[g] for g in drawn])
        mean_score = lambda runs: float(np.mean([  # noqa: E731
            f1_score(true[rows], run[rows], labels=labels, average="weighted", zero_division=0) for run in runs
        ]))
        return 100 * (mean_score(predicted) - mean_score(reference))

    everything = np.arange(len(members))
    interval = bootstrap(
        (everything,), difference, vectorized=False, n_resamples=resamples, confidence_level=confidence,
        method="percentile", rng=np.random.default_rng(seed),
    ).confidence_interval
    return difference(everything), float(interval.low), float(interval.high)


def save_checkpoint(path: Path, module: nn.Module, **record: Any) -> None:
    """The weights plus what :func:`load_model` needs to rebuild the model (name, config, label names...)."""
    torch.save({"state_dict": module.state_dict(), **record}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: no checkpoint (did the run finish?)")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(checkpoint: dict[str, Any], device: torch.device) -> nn.Module:
    """Rebuild the model a checkpoint was saved from and load its weights."""
    model = build_model(
        checkpoint["model"],
        input_dims=checkpoint["input_dims"],
        num_classes=len(checkpoint["label_names"]),
        overrides=checkpoint["model_config"],
    )
    model.load_state_dict(checkpoint["state_dict"])
    model.to(device)
    use_xlstm_backend(model, device)
    return model


def predict_test_split(
    run_dir: Path, features: Path | None = None, *, device: str = "auto", allow_partial: bool = False,
) -> tuple[DataSplits, np.ndarray, np.ndarray, np.ndarray]:
    """(splits, true, predicted, probabilities): ``run_dir``'s best checkpoint on the test split of
    the shard set it was trained on (or ``features``, which must hold the same extraction; an
    incomplete set only with ``allow_partial``), in ``prediction_rows`` order."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    splits = load_splits(features or checkpoint["features"], checkpoint["modalities"], seed=checkpoint["seed"],
                         allow_partial=allow_partial)
    recorded_hash = json.loads((run_dir / "index.json").read_text())["config_hash"]
    if splits.shards.index["config_hash"] != recorded_hash or splits.label_names != checkpoint["label_names"]:
        raise ConfigError(
            f"{splits.shards.directory}: extracted with config {splits.shards.index['config_hash']} and labels "
            f"{splits.label_names}; the run used {recorded_hash} and {checkpoint['label_names']}"
        )
    torch_device = resolve_device(device)
    model = load_model(checkpoint, torch_device)
    test = DialogueDataset(splits.shards, splits.test, splits.modalities, frames=checkpoint["frames"])
    loader = make_loader(test, checkpoint["batch_size"], shuffle=False, pin_memory=torch_device.type == "cuda")
    return splits, *predict_probabilities(model, loader, torch_device)


def evaluate_run(
    run_dir: Path, features: Path | None = None, *, device: str = "auto", allow_partial: bool = False,
    predictions: Path | None = None,
) -> dict[str, Any]:
    """Test metrics of ``run_dir``'s best checkpoint on the shard set it was trained on (or ``features``;
    an incomplete set only with ``allow_partial``). ``predictions`` (``.csv`` or ``.json``) also gets
    one row per labeled test utterance: its ids, speaker, text, true and predicted emotion and the
    probability of every class, in the shards' order."""
    if predictions is not None:
        check_predictions_file(Path(predictions), "--predictions")
    splits, true, predicted, probabilities = predict_test_split(run_dir, features, device=device,
                                                                allow_partial=allow_partial)
    if predictions is not None:
        write_predictions(Path(predictions), prediction_rows(splits, true, predicted, probabilities))
    return classification_metrics(true, predicted, splits.label_names)


def prediction_rows(splits: DataSplits, true: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """Rows of ``erc evaluate --predictions``: the labeled test utterances in the order ``predict``
    returns them (the test dialogues in order, each one's utterances in order)."""
    names, rows = splits.label_names, []
    for ref in splits.test:
        meta = splits.shards.load(ref)
        for i in np.flatnonzero(meta["label"] >= 0):
            rows.append({
                "utterance_id": meta["utterance_id"][i], "dialogue_id": meta["dialogue_id"][i],
                "utterance_index": int(meta["utterance_index"][i]), "speaker": meta["speaker"][i],
                "text": meta["text"][i], "label": names[int(meta["label"][i])],
            })
    if len(rows) != len(true) or any(names.index(row["label"]) != t for row, t in zip(rows, true)):
        raise RuntimeError("test utterances and their predictions are out of step")  # a bug, not bad input
    for row, label, p in zip(rows, predicted, probabilities):
        row["predicted"] = names[int(label)]
        row.update({f"p_{name}": round(float(value), 6) for name, value in zip(names, p)})
    return rows


def check_predictions_file(path: Path, option: str) -> None:
    """Refuse, before any work, a predictions file ``write_predictions`` cannot write (named by ``option``)."""
    if path.suffix not in (".csv", ".json"):
        raise ConfigError(f"{option} {path}: write predictions to a .csv or .json file")


def write_predictions(path: Path, rows: list[dict]) -> None:
    """Rows as JSON (a list of objects) or CSV (one column per key, in first-seen order), written
    to a temporary file first and renamed, so an interrupted write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    if path.suffix == ".json":
        partial.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    else:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with partial.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    os.replace(partial, path)
