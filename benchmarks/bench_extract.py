"""Extraction throughput: where one utterance's time goes, and utterances/second of whole runs.

    python benchmarks/bench_extract.py [--copies N] [--skip-runs] [--compile-only] [--size 640x360]
        [--read-ahead N] [--detect-max-side N] [--device cuda | --batching-runs]

Builds the `erc demo` corpus (real face video, real audio, the real MiniLM text encoder, random
face weights; 320×180 video unless ``--size`` says otherwise, e.g. MELD-like 640×360) with
``--copies`` copies of its dialogues, then

1. times each stage of one utterance through the library API (median of 3 after a warm-up):
   decoding 20 frames, MTCNN on them, ResNet-101 on the face crops in fp32, bf16 and bf16 compiled
   (``--compile``), openSMILE, and
   the text encoder on its dialogue in fp32 and bf16;
2. extracts the whole corpus from scratch with 1 worker of 1 thread (the baseline), 2 workers of 1
   thread in fp32, and 2 workers of 1 thread with ``--precision auto --text-precision auto`` (bf16
   where the CPU computes it natively), the same with ``--compile``, and prints utterances/second
   (``--compile-only``: only the last two, the bf16 run without ``--compile`` as the baseline). "steady" leaves out the cluster start and model
   loading: utterances after the first finished shard over the time after it.
3. with ``--device cuda`` (or ``--batching-runs`` on the CPU), instead of 1 and 2: one worker with the networks
   called once per utterance against erc's cross-utterance batching (``--detect-batch``,
   ``--crop-batch``) and read-ahead: what a GPU worker gains from them (see ``batching_runs``).

Target (issue 10): >= 1.0 utt/s steady state on 2 cores with all modalities.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erc.pipeline.demo import bundled_text_encoder
from erc.pipeline.extract import ExtractConfig, extract


def stage_times(manifest: Path, threads: int) -> list[tuple[str, float]]:
    """Seconds per stage for the first utterance of the corpus (median of 3 after a warm-up)."""
    from erc.features.audio import AudioExtractor
    from erc.features.text import TextConfig, TextExtractor
    from erc.features.video import read_frames
    from erc.features.visual import VisualConfig, VisualExtractor, _crop

    torch.set_num_threads(threads)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    dialogue = [r for r in rows if r["dialogue_id"] == first["dialogue_id"]]
    video = manifest.parent / first["video"]
    fp32 = VisualExtractor(VisualConfig(random_face_weights=True, seed=0))
    bf16 = VisualExtractor(VisualConfig(random_face_weights=True, seed=0, precision="bf16"))
    compiled = VisualExtractor(VisualConfig(random_face_weights=True, seed=0, precision="bf16", compile=True))
    audio = AudioExtractor()
    text = TextExtractor(TextConfig(model=str(bundled_text_encoder()), pooling="utterance"))
    text_bf16 = TextExtractor(TextConfig(model=str(bundled_text_encoder()), pooling="utterance", precision="bf16"))
    frames, _ = read_frames(video, None, None, 20)
    boxes = fp32.detect_faces(frames)
    crops = np.stack([_crop(frame, box) for frame, frame_boxes in zip(frames, boxes) for box in frame_boxes])

    def timed(fn) -> float:
        fn()
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    return [
        ("decode 20 frames (PyAV)", timed(lambda: read_frames(video, None, None, 20))),
        ("MTCNN on 20 frames", timed(lambda: fp32.detect_faces(frames))),
        (f"ResNet-101 on {len(crops)} face crops, fp32", timed(lambda: fp32.embed_faces(crops))),
        (f"ResNet-101 on {len(crops)} face crops, bf16", timed(lambda: bf16.embed_faces(crops))),
        (f"ResNet-101 on {len(crops)} face crops, bf16 compiled", timed(lambda: compiled.embed_faces(crops))),
        ("openSMILE ComParE_2016 functionals", timed(lambda: audio.extract(manifest.parent / first["audio"] if first.get("audio") else video))),
        *((f"text encoder, one dialogue of {len(dialogue)} (per utterance), {name}",
           timed(lambda: encoder.extract_dialogue([r["speaker"] for r in dialogue], [r["text"] for r in dialogue]))
           / len(dialogue))
          for name, encoder in (("fp32", text), ("bf16", text_bf16))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2, help="copies of the demo corpus to extract")
    parser.add_argument("--skip-runs", action="store_true", help="only the per-stage times")
    parser.add_argument("--compile-only", action="store_true", help="whole runs: only bf16 without and with --compile")
    parser.add_argument("--size", default="320x180", help="video frame size WIDTHxHEIGHT (even numbers)")
    parser.add_argument("--read-ahead", type=int, default=2, help="erc extract --read-ahead of the whole runs")
    parser.add_argument("--detect-max-side", type=int, default=640, help="erc extract --detect-max-side of the whole runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the batching runs (below) on one GPU worker instead of the CPU table")
    parser.add_argument("--batching-runs", action="store_true",
                        help="one worker: networks called per utterance against the defaults (implied by --device cuda)")
    args = parser.parse_args()
    size = tuple(int(side) for side in args.size.lower().split("x"))
    from erc.pipeline.evaluate import cpu_has_native_bf16
    from erc.pipeline.synthetic import make_demo_corpus

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_demo_corpus(Path(tmp) / "corpus", size=size)
        if args.copies > 1:  # the same media, more dialogues: enough tasks to keep two workers busy
            with manifest.open(newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames, list(reader)
            copies = [{**r, "dialogue_id": f"copy{k}-{r['dialogue_id']}"} for k in range(1, args.copies) for r in rows]
            with manifest.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows + copies)
        print(f"torch {torch.__version__}; native bf16 on this CPU: {cpu_has_native_bf16()}; "
              f"video {size[0]}×{size[1]}; --read-ahead {args.read_ahead}; --detect-max-side {args.detect_max_side}\n")
        if args.device == "cuda" or args.batching_runs:
            batching_runs(manifest, Path(tmp), args)
            return
        print("| stage (one utterance, 1 thread) | seconds |\n|---|---|")
        for name, seconds in stage_times(manifest, threads=1):
            print(f"| {name} | {seconds:.3f} |", flush=True)
        if args.skip_runs:
            return
        rows = []
        runs = ((1, 1, "fp32", False), (2, 1, "fp32", False), (2, 1, "auto", False), (2, 1, "auto", True))
        for workers, threads, precision, compile in runs[2:] if args.compile_only else runs:
            out = Path(tmp) / f"out{workers}x{threads}{precision}{compile}"
            config = ExtractConfig(dataset="manifest", root=manifest.parent, manifest=manifest, out=out,
                                   text_model=str(bundled_text_encoder()), random_face_weights=True, workers=workers,
                                   threads_per_worker=threads, dialogues_per_shard=1, precision=precision,
                                   text_precision=precision, compile=compile, read_ahead=args.read_ahead,
                                   detect_max_side=args.detect_max_side)
            result, steady = timed_extract(config)
            label = config.precision + (", --compile" if compile else "")
            rows.append((workers, threads, label, result.utterances, result.seconds,
                         result.utterances_per_second, steady, len(result.failures)))
        base = rows[0][5]
        print(f"\n| workers × threads | precision | utterances | seconds | utt/s | steady utt/s | speed-up | failed items |\n|---|---|---|---|---|---|---|---|")
        for workers, threads, precision, n, seconds, rate, steady, failed in rows:
            print(f"| {workers} × {threads} | {precision} | {n} | {seconds:.1f} | {rate:.2f} | {steady:.2f} | {rate / base:.2f}× | {failed} |")
        print("\ntarget: >= 1.0 utt/s steady state on 2 cores, all modalities")


def timed_extract(config: ExtractConfig) -> tuple[Any, float]:
    """``extract(config)`` from scratch, and its steady utterances/second: the utterances after the first
    finished shard over the time after it (leaving out the cluster start and model loading)."""
    finished: list[tuple[float, int]] = []
    started = time.perf_counter()
    result = extract(config, progress=lambda done, total: finished.append((time.perf_counter() - started, done)))
    first_seconds, first_done = finished[0]
    return result, (result.utterances - first_done) / max(result.seconds - first_seconds, 1e-9)


def batching_runs(manifest: Path, tmp: Path, args: argparse.Namespace) -> None:
    """One worker on ``--device`` (all CPU cores for its threads), ``--precision auto``: the networks
    called once per utterance (``--detect-batch 1 --crop-batch 1 --read-ahead 0``, the baseline)
    against the GPU defaults (MTCNN on 8 utterances' frames, the ResNet on up to 256 crops, media
    read ahead), and those with a deeper read-ahead. Made for a GPU worker (issue 10); on a CPU the
    batching is expected to gain nothing."""
    cores = os.cpu_count() or 1
    runs = (("per utterance, in line (baseline)", {"detect_batch": 1, "crop_batch": 1, "read_ahead": 0}),
            ("--detect-batch 8 --crop-batch 256 --read-ahead 2 (the CUDA defaults)", {"detect_batch": 8, "crop_batch": 256}),
            ("the same, --read-ahead 16", {"detect_batch": 8, "crop_batch": 256, "read_ahead": 16}))
    rows = []
    for name, options in runs:
        config = ExtractConfig(dataset="manifest", root=manifest.parent, manifest=manifest, out=tmp / f"gpu{len(rows)}",
                               text_model=str(bundled_text_encoder()), random_face_weights=True, workers=1,
                               threads_per_worker=cores, device=args.device, precision="auto", text_precision="auto",
                               detect_max_side=args.detect_max_side, **{"read_ahead": args.read_ahead, **options})
        result, steady = timed_extract(config)
        rows.append((name, config.precision, result.utterances, result.seconds, steady, len(result.failures)))
        print(f"{name}: {result.utterances} utterances in {result.seconds:.1f} s, steady {steady:.2f} utt/s", flush=True)
    base = rows[0][4]
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{where}, {cores} CPU cores\n")
    print(f"| one {args.device} worker | precision | utterances | seconds | steady utt/s | vs baseline | failed items |\n|---|---|---|---|---|---|---|")
    for name, precision, n, seconds, steady, failed in rows:
        print(f"| {name} | {precision} | {n} | {seconds:.1f} | {steady:.2f} | {steady / base:.2f}× | {failed} |")


if __name__ == "__main__":
    main()
