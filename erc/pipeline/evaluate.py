"""Metrics, checkpoints, and `erc evaluate`: the test metrics of a run recomputed from its best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from torch import nn
from torch.utils.data import DataLoader

from erc.errors import ConfigError
from erc.models.registry import build_model
from erc.pipeline.data import DialogueDataset, load_splits, make_loader

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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) label of every labeled utterance, in loader order."""
    model.eval()
    true, predicted = [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits = model(batch).logits
        labeled = batch["label"] >= 0
        true.append(batch["label"][labeled].cpu())
        predicted.append(logits.argmax(-1)[labeled].cpu())
    return torch.cat(true).numpy(), torch.cat(predicted).numpy()


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
    return model.to(device)


def evaluate_run(run_dir: Path, features: Path | None = None, *, device: str = "auto") -> dict[str, Any]:
    """Test metrics of ``run_dir``'s best checkpoint on the shard set it was trained on (or ``features``)."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    splits = load_splits(features or checkpoint["features"], checkpoint["modalities"], seed=checkpoint["seed"])
    recorded_hash = json.loads((run_dir / "index.json").read_text())["config_hash"]
    if splits.shards.index["config_hash"] != recorded_hash or splits.label_names != checkpoint["label_names"]:
        raise ConfigError(
            f"{splits.shards.directory}: extracted with config {splits.shards.index['config_hash']} and labels "
            f"{splits.label_names}; the run used {recorded_hash} and {checkpoint['label_names']}"
        )
    torch_device = resolve_device(device)
    model = load_model(checkpoint, torch_device)
    test = DialogueDataset(splits.shards, splits.test, splits.modalities, frames=checkpoint["frames"])
    true, predicted = predict(model, make_loader(test, checkpoint["batch_size"], shuffle=False), torch_device)
    return classification_metrics(true, predicted, splits.label_names)
