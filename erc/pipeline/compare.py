"""`erc compare`: train several models (and ablations) over several seeds and tabulate the results.

A *run spec* names a registered model with optional settings in brackets, separated by ``;``::

    multiemo                              the model as its preset / config file define it
    multiemo[no-swfc]                     a boolean config field switched off
    multiemo[no-swfc;no-hgr]              several settings
    multiemo[modalities=text,audio]       train on a subset of the shards' modalities
    multiemo[fusion=lmam]                 any config field: NAME=VALUE (VALUE read as YAML)
    mcn-cl[temperature=0.2;no-psa]

``no-NAME`` sets the boolean config field NAME to False, or ``use_NAME`` when NAME is not a field
(dashes read as underscores): ``no-swfc`` -> ``use_swfc``, ``no-multiattn`` -> ``multiattn``,
``no-psa`` -> ``psa``, ``no-density`` -> ``use_density``, ``no-lmam`` -> ``lmam``. Every paper's
ablations (modalities, fusion on/off, each loss on/off) are thus one spec each, and one compare
call runs them all::

    erc compare --features feats/ --seeds 3 --out cmp/ \\
        --models 'multiemo,multiemo[no-multiattn],multiemo[no-swfc],multiemo[modalities=text,audio]'

``--variant LABEL=SPEC`` adds a run spec under a readable label (``--variant "w/o SWFC=multiemo[no-swfc]"``).
``--config FILE`` is a YAML either with ``model:`` / ``train:`` sections for every run, or with
one such mapping per model name.

Each spec is trained once per seed (0 .. seeds-1) by :func:`erc.pipeline.train.train`; run
directories go to ``OUT/runs/<label>/seed<k>``. The summary is ``OUT/comparison.md`` (mean ± std
over seeds of test weighted F1 and accuracy, per-class F1, parameter count, seconds per training
epoch, and which differences exceed the seed spread and the test set's sampling),
``OUT/comparison.png``, ``OUT/results.json`` and ``OUT/differences.json``. A difference between two
specs counts as larger than the seed spread when |Δ mean| > std_a + std_b (sample standard
deviations over seeds); with one seed there is no spread and nothing is claimed. Seeds do not
measure how much a score owes to the particular test dialogues, so each difference also gets a 95%
interval from a paired bootstrap over the test dialogues
(:func:`erc.pipeline.evaluate.dialogue_bootstrap_difference`, every run rescored from its best
checkpoint); the test set resolves a difference only where that interval excludes 0.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from erc.errors import ConfigError
from erc.models.registry import MODELS
from erc.pipeline.evaluate import (
    CHECKPOINT,
    dialogue_bootstrap_difference,
    load_checkpoint,
    load_model,
    predict_test_split,
    prediction_rows,
)
from erc.pipeline.plots import plt
from erc.pipeline.train import TrainConfig, TrainResult, read_yaml_mapping, train

METRICS = ("weighted_f1", "accuracy")


@dataclass(frozen=True)
class RunSpec:
    """One row of the comparison: a model plus config overrides and modalities."""

    label: str
    model: str
    overrides: dict[str, Any] = field(default_factory=dict)
    modalities: tuple[str, ...] | None = None


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of run specs, keeping commas inside brackets."""
    specs, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ConfigError(f"unbalanced brackets in {text!r}")
        if char == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += char
    if depth:
        raise ConfigError(f"unbalanced brackets in {text!r}")
    specs.append(current.strip())
    return [s for s in specs if s]


def parse_run_spec(spec: str, label: str | None = None) -> RunSpec:
    """``model`` or ``model[setting;setting...]`` -> RunSpec (see the module docstring)."""
    match = re.fullmatch(r"\s*([\w-]+)\s*(?:\[(.*)\])?\s*", spec)
    if match is None:
        raise ConfigError(f"cannot read run spec {spec!r}: expected MODEL or MODEL[SETTING;...]")
    model, settings = match.group(1), match.group(2)
    if model not in MODELS:
        raise ConfigError(f"{spec!r}: unknown model {model!r}; known: {', '.join(sorted(MODELS))}")
    fields = {f.name for f in dataclasses.fields(MODELS[model].config)}
    overrides: dict[str, Any] = {}
    modalities = None
    for setting in filter(None, (s.strip() for s in (settings or "").split(";"))):
        if "=" in setting:
            name, value = (part.strip() for part in setting.split("=", 1))
            if name == "modalities":
                modalities = tuple(m.strip() for m in value.split(",") if m.strip())
                continue
            name = name.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"{spec!r}: {model} has no config field {name!r}")
            overrides[name] = yaml.safe_load(value)
        elif setting.startswith("no-"):
            name = setting[3:].replace("-", "_")
            target = name if name in fields else f"use_{name}"
            if target not in fields:
                raise ConfigError(f"{spec!r}: {model} has no switch {name!r} (neither {name} nor use_{name})")
            overrides[target] = False
        else:
            raise ConfigError(f"{spec!r}: cannot read setting {setting!r} (expected NAME=VALUE or no-NAME)")
    return RunSpec(label or spec.strip(), model, overrides, modalities)


@dataclass
class CompareConfig:
    features: Path
    out: Path
    models: list[str]  # run specs
    seeds: int = 3
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    ema_decay: float | None = None  # a moving average of the weights (see TrainHyperparameters)
    config_file: Path | None = None
    variants: dict[str, str] = field(default_factory=dict)  # label -> run spec
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | auto, see TrainConfig
    allow_partial: bool = False  # train on an incomplete shard set (see TrainConfig)
    bootstrap_resamples: int = 2000  # of the test dialogues, for each difference's interval


@dataclass
class RunSummary:
    """One spec over all seeds."""

    spec: RunSpec
    runs: list[dict[str, Any]]  # per seed: seed, run_dir, test metrics, seconds per epoch
    parameters: int
    test_predicted: np.ndarray | None = None  # (seeds, test utterances) predicted labels, set by ``compare``

    def values(self, metric: str) -> list[float]:
        return [r["test"][metric] for r in self.runs]

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values(metric))

    def std(self, metric: str) -> float:
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def per_class_mean(self) -> dict[str, float]:
        names = self.runs[0]["test"]["per_class_f1"]
        return {n: statistics.fmean(r["test"]["per_class_f1"][n] for r in self.runs) for n in names}

    def seconds_per_epoch(self) -> float:
        return statistics.fmean(r["seconds_per_epoch"] for r in self.runs)


@dataclass
class ComparisonResult:
    summaries: list[RunSummary]
    markdown: Path
    plot: Path
    results: Path
    differences: Path


def _slug(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("_") or "run"


def _config_files(config_file: Path | None, specs: list[RunSpec], out: Path) -> dict[str, Path | None]:
    """Per model, the YAML with model:/train: sections its runs read (None = presets only)."""
    if config_file is None:
        return {s.model: None for s in specs}
    values = read_yaml_mapping(config_file, "compare config")
    if set(values) <= {"model", "train"}:
        return {s.model: Path(config_file) for s in specs}
    unknown = sorted(set(values) - set(MODELS))
    if unknown:
        raise ConfigError(f"{config_file}: neither model:/train: sections nor model names: {', '.join(unknown)}")
    files: dict[str, Path | None] = {}
    for model in {s.model for s in specs}:
        if model in values:
            path = out / "configs" / f"{model}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(values[model]))
            files[model] = path
        else:
            files[model] = None
    return files


def _parameter_count(run_dir: Path) -> int:
    model = load_model(load_checkpoint(run_dir / CHECKPOINT), torch.device("cpu"))
    return sum(p.numel() for p in model.parameters())


def compare(
    config: CompareConfig, *, on_run: Callable[[RunSpec, int, TrainResult], None] | None = None
) -> ComparisonResult:
    """Train every spec with every seed, then write comparison.md, comparison.png, results.json."""
    specs = [parse_run_spec(s) for s in config.models] + [parse_run_spec(s, label) for label, s in config.variants.items()]
    if not specs:
        raise ConfigError("nothing to compare: give --models and/or --variant")
    labels = [s.label for s in specs]
    if len(set(map(_slug, labels))) != len(labels):
        raise ConfigError(f"run labels must be distinct: {labels}")
    if config.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {config.seeds}")
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already holds files; give a new --out for each comparison")
    out.mkdir(parents=True, exist_ok=True)
    config_files = _config_files(config.config_file, specs, out)
    summaries = []
    for spec in specs:
        runs = []
        for seed in range(config.seeds):
            run_dir = out / "runs" / _slug(spec.label) / f"seed{seed}"
            result = train(TrainConfig(
                model=spec.model, features=config.features, out=run_dir, config_file=config_files[spec.model],
                epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, ema_decay=config.ema_decay, seed=seed,
                device=config.device, precision=config.precision, allow_partial=config.allow_partial,
                modalities=list(spec.modalities) if spec.modalities else None, model_overrides=dict(spec.overrides),
            ))
            runs.append({
                "seed": seed, "run_dir": str(run_dir), "best_epoch": result.best_epoch, "test": result.test,
                "seconds_per_epoch": statistics.fmean(h["seconds"] for h in result.history),
            })
            if on_run is not None:
                on_run(spec, seed, result)
        summaries.append(RunSummary(spec, runs, _parameter_count(Path(runs[0]["run_dir"]))))
    true, dialogues = _test_predictions(summaries, config)
    intervals = {
        (a.spec.label, b.spec.label): dialogue_bootstrap_difference(
            true, a.test_predicted, b.test_predicted, dialogues, resamples=config.bootstrap_resamples)
        for a, b in combinations(summaries, 2)
    }
    markdown, plot, results = out / "comparison.md", out / "comparison.png", out / "results.json"
    differences = out / "differences.json"
    markdown.write_text(comparison_markdown(summaries, config.seeds, intervals))
    differences.write_text(json.dumps([  # in points; the difference rescored from the checkpoints
        {"a": a, "b": b, "weighted_f1_difference": intervals[a, b][0], "beyond_seed_spread": beyond,
         "interval_95": list(intervals[a, b][1:])}
        for a, b, _, beyond in spread_differences(summaries)
    ], indent=2))
    plot_comparison(summaries, plot)
    results.write_text(json.dumps(
        [{"label": s.spec.label, "model": s.spec.model, "overrides": s.spec.overrides,
          "modalities": s.spec.modalities, "parameters": s.parameters, "runs": s.runs} for s in summaries],
        indent=2, default=str,
    ))
    return ComparisonResult(summaries, markdown, plot, results, differences)


def _test_predictions(summaries: list[RunSummary], config: CompareConfig) -> tuple[np.ndarray, np.ndarray]:
    """Rescore every run's best checkpoint on the test split, filling each summary's
    ``test_predicted``; returns the true labels and the dialogue of each test utterance."""
    true = dialogues = None
    for summary in summaries:
        predicted = []
        for run in summary.runs:
            splits, labels, labels_predicted, probabilities = predict_test_split(
                Path(run["run_dir"]), config.features, device=config.device, allow_partial=config.allow_partial)
            if true is None:
                true = labels
                rows = prediction_rows(splits, labels, labels_predicted, probabilities)
                dialogues = np.array([row["dialogue_id"] for row in rows])
            elif not np.array_equal(labels, true):
                raise RuntimeError("the runs of one comparison saw different test utterances")  # a bug, not bad input
            predicted.append(labels_predicted)
        summary.test_predicted = np.stack(predicted)
    return true, dialogues


def spread_differences(summaries: list[RunSummary], metric: str = "weighted_f1") -> list[tuple[str, str, float, bool]]:
    """(a, b, mean_a - mean_b, |Δ| > std_a + std_b) for every pair of specs."""
    return [
        (a.spec.label, b.spec.label, a.mean(metric) - b.mean(metric),
         abs(a.mean(metric) - b.mean(metric)) > a.std(metric) + b.std(metric))
        for a, b in combinations(summaries, 2)
    ]


def comparison_markdown(
    summaries: list[RunSummary], seeds: int, intervals: dict[tuple[str, str], tuple[float, float, float]] | None = None,
) -> str:
    """The comparison table; ``intervals[a, b]`` is ``dialogue_bootstrap_difference`` of a against b."""
    pct = lambda s, metric: f"{100 * s.mean(metric):.2f} ± {100 * s.std(metric):.2f}"  # noqa: E731
    lines = [
        f"# Model comparison ({seeds} seed{'s' if seeds > 1 else ''} each, test split, mean ± std in %)", "",
        "| run | model | weighted F1 | accuracy | parameters | s / epoch |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(f"| {s.spec.label} | {s.spec.model} | {pct(s, 'weighted_f1')} | {pct(s, 'accuracy')} | "
                     f"{s.parameters:,} | {s.seconds_per_epoch():.2f} |")
    names = list(summaries[0].per_class_mean())
    lines += ["", "## Per-class F1 (mean over seeds, %)", "", "| run | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for s in summaries:
        per_class = s.per_class_mean()
        lines.append(f"| {s.spec.label} | " + " | ".join(f"{100 * per_class[n]:.2f}" for n in names) + " |")
    lines += ["", "## Differences in weighted F1 against the seed spread and the test set", ""]
    if len(summaries) < 2:
        lines.append("Only one run: nothing to compare.")
    else:
        lines.append(
            "A difference counts as larger than the seed spread when |Δ mean| > std_a + std_b (with one seed "
            "there is no spread and nothing is claimed). The interval is a paired bootstrap over the test "
            "dialogues (95%): the test set resolves the difference only where it excludes 0."
        )
        lines.append("")
        for a, b, delta, beyond in spread_differences(summaries):
            verdict = ("one seed: no spread" if seeds < 2
                       else "larger than the seed spread" if beyond else "within the seed spread")
            line = f"- {a} vs {b}: Δ = {100 * delta:+.2f} points, {verdict}"
            if intervals is not None and (a, b) in intervals:
                _, low, high = intervals[a, b]
                resolved = "resolved by" if low > 0 or high < 0 else "not resolved by"
                line += f"; test-dialogue interval [{low:+.2f}, {high:+.2f}], {resolved} the test set"
            lines.append(line)
    return "\n".join(lines) + "\n"


def plot_comparison(summaries: list[RunSummary], path: Path) -> None:
    """Grouped bars of test weighted F1 and accuracy per run, seed std as error bars."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(summaries) + 2), 4.5))
    width = 0.38
    positions = range(len(summaries))
    for k, metric in enumerate(METRICS):
        ax.bar([p + (k - 0.5) * width for p in positions], [s.mean(metric) for s in summaries], width,
               yerr=[s.std(metric) for s in summaries], capsize=4, label=metric.replace("_", " "))
    ax.set_xticks(list(positions), [s.spec.label for s in summaries], rotation=20, ha="right")
    ax.set(ylabel="test score", ylim=(0, 1), title="Model comparison (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
