"""`erc train`: fit a registered model on a shard set and write a self-describing run directory.

Settings resolve in three layers: the model's preset (default: the shard set's dataset when the
model has a preset of that name, else none, i.e. the config class defaults and
``TrainHyperparameters`` defaults), then a YAML file with ``model:`` and ``train:`` sections shaped
like a preset entry, then the explicit options of :class:`TrainConfig`.

The checkpoint kept is the epoch with the best DEV weighted F1 (with ``ema_decay``, of the moving
average of the weights, which is then what dev scores and the checkpoint holds); the test split is
read once, after training. A model that offers training stages (``training_stages()``, e.g. pairwise fusion's PMF
then MFF/MAL) can be trained stage by stage (``stages``): the epoch loop runs once per stage with
the rest of the model frozen, and config.yaml and the history record the stages. A run directory holds::

    config.yaml          the resolved configuration (model config, training hyperparameters, data)
    run.json             seed, package versions, git revision, features dir, config hash, splits
    index.json           a copy of the shard set's index
    best.pt              weights + what is needed to rebuild the model (see evaluate.load_model)
    metrics.json         per-epoch history, best dev metrics, test metrics
    confusion_matrix.png / .csv, training_curves.png
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from erc.errors import ConfigError
from erc.models.blocks import TrainingStage
from erc.models.context import use_xlstm_backend
from erc.models.registry import MODELS, TrainHyperparameters, build_model, preset_names, train_hyperparameters
from erc.pipeline.data import DataSplits, DialogueDataset, load_splits, make_loader
from erc.pipeline.evaluate import (
    CHECKPOINT,
    autocast,
    classification_metrics,
    float32,
    load_checkpoint,
    predict,
    resolve_device,
    resolve_precision,
    save_checkpoint,
    to_device,
)
from erc.pipeline.plots import plot_confusion_matrix, plot_training_curves
from erc.provenance import package_versions

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class TrainConfig:
    """One training run. ``None`` fields come from the preset / YAML file (see the module docstring)."""

    model: str
    features: Path
    out: Path
    preset: str | None = None
    config_file: Path | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    ema_decay: float | None = None  # keep a moving average of the weights (see TrainHyperparameters)
    seed: int = 0
    device: str = "auto"
    modalities: list[str] | None = None  # default: the YAML's model.modalities, else all the shards hold
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"multiattn": False}
    grad_clip: float | None = None  # max gradient norm; None = no clipping
    stages: list[str] | None = None  # the model's training stages to run, in order (e.g. pairwise: pmf, mff)
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where the device computes it natively): the forward's autocast
    xlstm_backend: str = "auto"  # auto | cuda | vanilla: the sLSTM kernel (see erc.models.context.use_xlstm_backend)
    allow_partial: bool = False  # train on an incomplete shard set (an extraction stopped early)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    dev: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_revision() -> dict[str, Any] | None:
    """Commit and dirty flag of the erc checkout, or None when erc is not run from a git clone."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); a ConfigError naming the file otherwise."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc})") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the {what} must be a YAML mapping")
    return values


def _read_config_file(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {"model": {}, "train": {}}
    values = read_yaml_mapping(path, "training config")
    unknown = sorted(set(values) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (expected model: and train:)")
    return {"model": values.get("model") or {}, "train": values.get("train") or {}}


def _default_preset(model: str, dataset: str | None) -> str | None:
    return dataset if dataset in preset_names(model) else None


def _data_overrides(model: str, splits: DataSplits) -> dict[str, Any]:
    """What the data decides for the model config: its modalities and number of speakers."""
    fields = {f.name for f in dataclasses.fields(MODELS[model].config)}
    values = {"modalities": tuple(splits.modalities), "num_speakers": splits.num_speakers}
    return {k: v for k, v in values.items() if k in fields}


def jsonable(obj: Any) -> Any:
    """``obj`` as config.yaml records it: tuples as lists, anything JSON lacks as its string."""
    return json.loads(json.dumps(obj, default=str))


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` for the duration of the block."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def resolve_settings(
    config: TrainConfig, splits: DataSplits, from_file: dict[str, dict[str, Any]]
) -> tuple[str | None, TrainHyperparameters, dict[str, Any]]:
    """(preset, training hyperparameters, model config overrides): preset < YAML file < options < data."""
    preset = config.preset if config.preset is not None else _default_preset(config.model, splits.shards.index.get("dataset"))
    flags = {"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr, "ema_decay": config.ema_decay}
    hparams = train_hyperparameters(
        config.model, preset, {**from_file["train"], **{k: v for k, v in flags.items() if v is not None}}
    )
    if hparams.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {sorted(OPTIMIZERS)}, not {hparams.optimizer!r}")
    if hparams.epochs < 1 or hparams.batch_size < 1:
        raise ConfigError(f"epochs and batch size must be at least 1, got {hparams.epochs} and {hparams.batch_size}")
    if not 0.0 <= hparams.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {hparams.ema_decay}")
    return preset, hparams, {**from_file["model"], **config.model_overrides, **_data_overrides(config.model, splits)}


def train(
    config: TrainConfig,
    *,
    on_batch: Callable[[int, int, int], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train, keep the best-dev checkpoint, evaluate it on test, and write the run directory.

    ``on_batch(epoch, done, total)`` and ``on_epoch(record)`` report progress (the CLI draws a bar).
    Deterministic algorithms are switched on for CPU runs, so a seed reproduces a run exactly.
    """
    if config.model not in MODELS:
        raise ConfigError(f"unknown model {config.model!r}; known: {', '.join(sorted(MODELS))}")
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already holds files; give a new --out for each run")
    device = resolve_device(config.device)
    started = time.perf_counter()
    from_file = _read_config_file(config.config_file)
    splits = load_splits(config.features, config.modalities or from_file["model"].get("modalities"), seed=config.seed,
                         allow_partial=config.allow_partial)
    with closing(splits.shards), deterministic_algorithms(True) if device.type == "cpu" else nullcontext():
        preset, hparams, model_overrides = resolve_settings(config, splits, from_file)
        seed_everything(config.seed)
        model = build_model(
            config.model, input_dims=splits.input_dims, num_classes=len(splits.label_names),
            preset=preset, overrides=model_overrides,
        ).to(device)
        xlstm_backend = use_xlstm_backend(model, device, config.xlstm_backend)
        stages = plan_stages(model, config.stages, hparams) if config.stages else []
        frames = bool(getattr(model, "needs_frames", False))
        features = str(Path(config.features).resolve())
        out.mkdir(parents=True, exist_ok=True)
        resolved = {
            "model": config.model,
            "preset": preset,
            "config_file": str(config.config_file) if config.config_file else None,
            "model_config": dataclasses.asdict(model.config),
            "train": dataclasses.asdict(hparams),
            "grad_clip": config.grad_clip,
            "seed": config.seed,
            "device": str(device),
            "precision": resolve_precision(config.precision, device),
            "xlstm_backend": xlstm_backend,
            "features": features,
            "modalities": splits.modalities,
        }
        if stages:
            resolved["stages"] = [
                {**dataclasses.asdict(stage), "epochs": hp.epochs, "lr": hp.lr, "weight_decay": hp.weight_decay}
                for stage, hp in stages
            ]
        _write_run_files(out, resolved, splits)
        checkpoint_record = {
            "model": config.model,
            "model_config": resolved["model_config"],
            "label_names": splits.label_names,
            "input_dims": splits.input_dims,
            "modalities": splits.modalities,
            "frames": frames,
            "batch_size": hparams.batch_size,
            "seed": config.seed,
            "features": features,
        }

        def fit(fit_hparams: TrainHyperparameters, report: Callable[[dict[str, Any]], None] | None) -> tuple:
            return _fit(
                model, splits, fit_hparams, config, device, frames, out / CHECKPOINT, checkpoint_record, on_batch, report
            )

        history, best_epoch, best_dev = (
            _fit_stages(model, stages, fit, on_epoch, out / CHECKPOINT) if stages else fit(hparams, on_epoch)
        )
        model.load_state_dict(load_checkpoint(out / CHECKPOINT)["state_dict"])
        test_data = DialogueDataset(splits.shards, splits.test, splits.modalities, frames=frames)
        test = classification_metrics(
            *predict(model, make_loader(test_data, hparams.batch_size, shuffle=False), device), splits.label_names
        )

    seconds = time.perf_counter() - started
    metrics = {"best_epoch": best_epoch, "dev": best_dev, "test": test, "history": history, "seconds": seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_confusion_csv(out / "confusion_matrix.csv", test["confusion_matrix"], splits.label_names)
    plot_confusion_matrix(test["confusion_matrix"], splits.label_names, out / "confusion_matrix.png",
                          title=f"{config.model} test (weighted F1 {test['weighted_f1']:.3f})")
    terms = dict.fromkeys(name for record in history for name in record["train"])  # stages train on different terms
    curves = [{**record, "train": {name: record["train"].get(name, math.nan) for name in terms}} for record in history]
    plot_training_curves(curves, best_epoch, out / "training_curves.png")
    return TrainResult(run_dir=out, best_epoch=best_epoch, dev=best_dev, test=test, history=history, seconds=seconds)


def plan_stages(
    model: torch.nn.Module, names: list[str], hparams: TrainHyperparameters
) -> list[tuple[TrainingStage, TrainHyperparameters]]:
    """The model's training stages named in ``names``, each with its hyperparameters: its own
    learning rate and weight decay where it has them, its share of the run's epochs.

    The names must follow the model's order and end with its last stage (the one that trains what
    predicts).
    """
    offered = model.training_stages() if hasattr(model, "training_stages") else []
    order = [stage.name for stage in offered]
    if not offered:
        raise ConfigError(f"{type(model).__name__} has no training stages")
    unknown = [name for name in names if name not in order]
    if unknown:
        raise ConfigError(f"unknown training stage(s) {', '.join(unknown)}; {type(model).__name__} has {', '.join(order)}")
    positions = [order.index(name) for name in names]
    if positions != sorted(set(positions)) or positions[-1] != len(order) - 1:
        raise ConfigError(f"stages must follow the order {', '.join(order)} once each and end with {order[-1]}")
    chosen = [offered[i] for i in positions]
    counts = [None if s.epochs is None else max(1, round(s.epochs * hparams.epochs)) for s in chosen]
    left, free = hparams.epochs - sum(n for n in counts if n is not None), counts.count(None)
    shares = iter([left // free + (k < left % free) for k in range(free)]) if free else iter(())
    counts = [n if n is not None else next(shares) for n in counts]
    if min(counts) < 1:
        raise ConfigError(f"{hparams.epochs} epochs are too few for the stages {', '.join(names)}")
    return [
        (stage, dataclasses.replace(
            hparams, epochs=n, lr=hparams.lr if stage.lr is None else stage.lr,
            weight_decay=hparams.weight_decay if stage.weight_decay is None else stage.weight_decay,
        ))
        for stage, n in zip(chosen, counts)
    ]


def _fit_stages(
    model: torch.nn.Module,
    stages: list[tuple[TrainingStage, TrainHyperparameters]],
    fit: Callable[[TrainHyperparameters, Callable[[dict[str, Any]], None] | None], tuple],
    on_epoch: Callable[[dict[str, Any]], None] | None,
    checkpoint_path: Path,
) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """Run the epoch loop once per stage: only the stage's modules train (every other parameter is
    frozen), and each stage starts from the best-dev weights of the one before. History records
    carry their stage and run-wide epoch numbers; the result is the last stage's best."""
    history: list[dict[str, Any]] = []
    offset, best_epoch, best_dev = 0, 0, {}
    try:
        for stage, stage_hparams in stages:
            model.requires_grad_(False)
            for name in stage.modules:
                model.get_submodule(name).requires_grad_(True)
            model.begin_stage(stage.name)

            def relabel(record: dict[str, Any], name: str = stage.name, shift: int = offset) -> dict[str, Any]:
                epochs = {"epoch": record["epoch"] + shift, "best_epoch": record["best_epoch"] + shift}
                return {**record, "stage": name, **epochs}

            report = None if on_epoch is None else lambda record: on_epoch(relabel(record))
            records, best_epoch, best_dev = fit(stage_hparams, report)
            history += [relabel(record) for record in records]
            best_epoch += offset
            offset += stage_hparams.epochs
            model.load_state_dict(load_checkpoint(checkpoint_path)["state_dict"])
    finally:
        model.begin_stage(None)
        model.requires_grad_(True)
    return history, best_epoch, best_dev


def _fit(
    model: torch.nn.Module,
    splits: DataSplits,
    hparams: TrainHyperparameters,
    config: TrainConfig,
    device: torch.device,
    frames: bool,
    checkpoint_path: Path,
    checkpoint_record: dict[str, Any],
    on_batch: Callable[[int, int, int], None] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """The epoch loop; saves the best-dev checkpoint and returns (history, best epoch, its dev metrics).

    The forward pass runs under the run's precision (autocast), the losses and the dev evaluation
    in float32. Loss terms are summed on the device and read back once per epoch.
    """
    precision, pin = resolve_precision(config.precision, device), device.type == "cuda"
    train_loader = make_loader(
        DialogueDataset(splits.shards, splits.train, splits.modalities, frames=frames),
        hparams.batch_size, shuffle=True, seed=config.seed, pin_memory=pin,
    )
    dev_loader = make_loader(
        DialogueDataset(splits.shards, splits.dev, splits.modalities, frames=frames), hparams.batch_size,
        shuffle=False, pin_memory=pin,
    )
    optimizer = OPTIMIZERS[hparams.optimizer](
        model.parameters(), lr=hparams.lr, betas=hparams.betas, weight_decay=hparams.weight_decay
    )
    scheduler = (
        torch.optim.lr_scheduler.StepLR(optimizer, hparams.lr_decay_every, hparams.lr_decay_factor)
        if hparams.lr_decay_every > 0 else None
    )
    averaged = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(hparams.ema_decay), use_buffers=True)
        if hparams.ema_decay > 0 else None
    )
    evaluated = model if averaged is None else averaged.module  # what dev scores and the checkpoint keeps
    class_counts = torch.tensor(splits.class_counts, dtype=torch.float32, device=device)
    history: list[dict[str, Any]] = []
    best_epoch, best_dev = 0, {"weighted_f1": -1.0}
    for epoch in range(1, hparams.epochs + 1):
        epoch_started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = defaultdict(int)
        for step, batch in enumerate(train_loader, 1):
            batch = to_device(batch, device)
            with autocast(device, precision):
                output = model(batch)
            terms = model.loss(float32(output), batch, class_counts)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if averaged is not None:
                averaged.update_parameters(model)
            for name, value in terms.items():  # float64 sums on the device (.double() copies)
                sums[name] = sums[name].add_(value.detach()) if name in sums else value.detach().double()
                counts[name] += 1
            if on_batch is not None:
                on_batch(epoch, step, len(train_loader))
        if scheduler is not None:
            scheduler.step()
        dev = classification_metrics(*predict(evaluated, dev_loader, device), splits.label_names)
        totals = torch.stack(list(sums.values())).tolist() if sums else []  # the epoch's one read of the losses
        record = {
            "epoch": epoch,
            "lr": lr,
            "train": {name: total / counts[name] for name, total in zip(sums, totals)},
            "dev": {k: dev[k] for k in ("weighted_f1", "accuracy", "macro_f1")},
            "seconds": time.perf_counter() - epoch_started,
        }
        if dev["weighted_f1"] > best_dev["weighted_f1"]:
            best_epoch, best_dev = epoch, dev
            save_checkpoint(checkpoint_path, evaluated, epoch=epoch, **checkpoint_record)
        record["best_epoch"] = best_epoch
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history, best_epoch, best_dev


def _write_run_files(out: Path, resolved: dict[str, Any], splits: DataSplits) -> None:
    """config.yaml, run.json (provenance and the dialogues of each split) and the shard index copy."""
    (out / "config.yaml").write_text(yaml.safe_dump(jsonable(resolved), sort_keys=False))
    shutil.copyfile(splits.shards.directory / "index.json", out / "index.json")
    run = {
        "seed": resolved["seed"],
        "versions": package_versions(),
        "git": git_revision(),
        "torch_threads": torch.get_num_threads(),
        "device": resolved["device"],
        "precision": resolved["precision"],
        "xlstm_backend": resolved["xlstm_backend"],
        "features": resolved["features"],
        "dataset": splits.shards.index.get("dataset"),
        "config_hash": splits.shards.index["config_hash"],
        "label_names": splits.label_names,
        "input_dims": splits.input_dims,
        "num_speakers": splits.num_speakers,
        "class_counts": dict(zip(splits.label_names, splits.class_counts)),
        "held_out_dev": splits.held_out_dev,
        "dialogues": {name: [r.dialogue_id for r in refs] for name, refs in
                      (("train", splits.train), ("dev", splits.dev), ("test", splits.test))},
    }
    (out / "run.json").write_text(json.dumps(run, indent=2))


def _write_confusion_csv(path: Path, matrix: list[list[int]], label_names: list[str]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *label_names])
        for name, row in zip(label_names, matrix):
            writer.writerow([name, *row])
