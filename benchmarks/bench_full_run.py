"""Wall time of a whole training run on an IEMOCAP-sized shard set of random features.

    python benchmarks/bench_full_run.py [--work DIR] [--models multiemo,xlstm-multiemo] [--epochs 100]
                                        [--device cuda] [--precision fp32|bf16|auto] [--seed 0]

The shard set has the shape of the real corpus as `erc extract --dataset iemocap` writes it: 151
dialogues of 20-110 utterances (120 training, of which the trainer holds some out for dev, and 31
test; 9,589 utterances with the default seed, more than the real corpus's 7.4k, as the lengths
are drawn uniformly), text 768, audio 6373 and visual 1000 features per utterance, 6
classes, two speakers. The features are random with a small class-dependent shift, so the runs do
real work on real shapes but their scores mean nothing. Each model trains ``--epochs`` epochs with
its IEMOCAP preset otherwise (batch size, lr, layers) through `erc.pipeline.train.train`, which
evaluates dev every epoch and test at the end as `erc train` does. Prints one row per model: total
wall seconds, seconds per epoch, the xLSTM backend and precision the run recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import IEMOCAP_DIMS  # noqa: E402

DIALOGUES, TRAIN_DIALOGUES, LABELS = 151, 120, ["neu", "hap", "sad", "ang", "exc", "fru"]


def iemocap_shaped_shard_set(root: Path, seed: int = 0) -> Path:
    """Write (once) a random shard set of IEMOCAP's shape under ``root``; returns ``root``."""
    from erc.pipeline.shards import UtteranceRecord, write_shard_set

    if (root / "index.json").exists():
        return root
    rng = np.random.default_rng(seed)
    directions = {m: rng.normal(size=(len(LABELS), d)).astype(np.float32) for m, d in IEMOCAP_DIMS.items()}
    records = []
    for k in range(DIALOGUES):
        for i in range(int(rng.integers(20, 111))):
            label = int(rng.integers(len(LABELS)))
            features = {m: (rng.normal(size=d) + 0.3 * directions[m][label]).astype(np.float32)
                        for m, d in IEMOCAP_DIMS.items()}
            records.append(UtteranceRecord(
                utterance_id=f"d{k:03d}_{i:03d}", dialogue_id=f"d{k:03d}", utterance_index=i,
                split="train" if k < TRAIN_DIALOGUES else "test", speaker="MF"[i % 2], speaker_index=i % 2,
                text="", label=label, features=features,
            ))
    write_shard_set(root, records, dataset="iemocap", label_names=LABELS, dims=IEMOCAP_DIMS, num_frames=1,
                    config={"dataset": "iemocap", "random_features": True, "seed": seed})
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/erc-full-run"))
    parser.add_argument("--models", default="multiemo,xlstm-multiemo")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from erc.pipeline.train import TrainConfig, train

    started = time.perf_counter()
    features = iemocap_shaped_shard_set(args.work / "features")
    print(f"random IEMOCAP-shaped shard set ready in {time.perf_counter() - started:.0f} s: {features}", flush=True)
    rows = []
    for model in args.models.split(","):
        out = args.work / "runs" / f"{model}-{args.precision}-{args.epochs}ep"
        run_started = time.perf_counter()

        def progress(record: dict, model: str = model, run_started: float = run_started) -> None:
            # one line per epoch, so a run cut short still shows how far it got and at what pace
            print(f"{model} epoch {record['epoch']}: {record['seconds']:.2f} s, "
                  f"{time.perf_counter() - run_started:.0f} s so far", flush=True)

        result = train(TrainConfig(model=model, features=features, out=out, preset="iemocap", epochs=args.epochs,
                                   seed=args.seed, device=args.device, precision=args.precision), on_epoch=progress)
        run = json.loads((out / "run.json").read_text())
        rows.append((model, run.get("device"), run.get("precision"), run.get("xlstm_backend"), args.epochs,
                     result.seconds, result.seconds / args.epochs))
        print(f"{model}: {result.seconds:.0f} s for {args.epochs} epochs", flush=True)
    print("\n| model | device | precision | xLSTM backend | epochs | wall s | s / epoch |\n|---|---|---|---|---|---|---|")
    for model, device, precision, backend, epochs, seconds, per_epoch in rows:
        print(f"| {model} | {device} | {precision} | {backend or '—'} | {epochs} | {seconds:.0f} | {per_epoch:.2f} |")


if __name__ == "__main__":
    main()
