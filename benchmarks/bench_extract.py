"""Extraction throughput: utterances/second of a full extraction with 1 and 2 local Dask workers.

    python benchmarks/bench_extract.py [--dialogues N]

Builds a synthetic manifest corpus (real face video, real audio, real MiniLM text encoder, random
face weights), extracts it from scratch with 1 worker of 1 thread (the baseline), 1 worker of 2
threads (torch's own intra-op parallelism) and 2 workers of 1 thread, and prints a table. Target:
2 workers >= 1.8x the utterances/second of 1 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from erc.pipeline.demo import bundled_text_encoder
from erc.pipeline.extract import ExtractConfig, extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, help="copies of the demo corpus to extract")
    args = parser.parse_args()
    from erc.pipeline.synthetic import make_demo_corpus

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_demo_corpus(Path(tmp) / "corpus")
        if args.copies > 1:  # the same media, more dialogues: enough tasks to keep two workers busy
            with manifest.open(newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames, list(reader)
            copies = [{**r, "dialogue_id": f"copy{k}-{r['dialogue_id']}"} for k in range(1, args.copies) for r in rows]
            with manifest.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows + copies)
        rows = []
        for workers, threads in ((1, 1), (1, 2), (2, 1)):
            config = ExtractConfig(dataset="manifest", root=manifest.parent, manifest=manifest,
                                   out=Path(tmp) / f"out{workers}x{threads}", text_model=str(bundled_text_encoder()),
                                   random_face_weights=True, workers=workers, threads_per_worker=threads,
                                   dialogues_per_shard=1)
            result = extract(config)
            rows.append((workers, threads, result.utterances, result.seconds, result.utterances_per_second))
    base = rows[0][4]
    print(f"{'workers':>7} {'threads':>7} {'utterances':>10} {'seconds':>8} {'utt/s':>7} {'speed-up':>8}")
    for workers, threads, n, seconds, rate in rows:
        print(f"{workers:>7} {threads:>7} {n:>10} {seconds:>8.1f} {rate:>7.2f} {rate / base:>7.2f}x")
    print("target: 2 workers >= 1.8x (wall time includes cluster start and model loading)")


if __name__ == "__main__":
    main()
