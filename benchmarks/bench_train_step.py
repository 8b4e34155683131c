"""Cost of a training step of every fusion model, and of the vectorised SWFC loss against a per-sample loop.

    python benchmarks/bench_train_step.py [--threads N] [--repeats R] [--device cpu|cuda]
                                          [--baseline-tree DIR] [--cases NAME,...] [--precision fp32|bf16]

Each configuration runs in a fresh subprocess so its peak memory is its own. A training step is
what the trainer does per batch: forward (under the row's precision), the model's losses in
float32, backward and an Adam update, on IEMOCAP-shaped random dialogues (text 768, audio 6373,
visual 1000, 20 frames for MCN-CL's PSA; 20-110 utterances each) with each model's IEMOCAP preset
(MultiEMO's recomputes attention activations in the backward pass to save memory; two rows show
the step without that in each precision). Times are means over ``--repeats`` steps after a warm-up step: wall-clock
seconds and the process's CPU seconds; on CUDA the step ends with a synchronisation and the
memory column is the peak of allocated GPU memory, and xLSTM's sLSTM runs the kernel `erc train`
would pick there (the row says which). ``--precision`` runs every row in one precision.

``--baseline-tree DIR`` also runs every fp32 row on another checkout's ``erc`` package (e.g.
``git archive <rev> erc | tar -x -C DIR``), interleaved with the current one, and prints both
with the speed-up: a before/after comparison measured in the same run. The public MultiEMO code is
not part of this repository, so no row runs it. On a shared machine the wall time includes waiting
for the CPU (see the load average printed); with one thread the CPU time is close to what the step
takes on an idle core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

IEMOCAP_DIMS = {"text": 768, "audio": 6373, "visual": 1000}
CASES = {  # name: (model, dialogues, overrides, precision, target seconds, target GB)
    "multiemo-32": ("multiemo", 32, {}, "fp32", 3.5, 3.0),
    "multiemo-64": ("multiemo", 64, {}, "fp32", 7.0, 4.0),
    "multiemo-32-store": ("multiemo", 32, {"gradient_checkpointing": False}, "fp32", None, None),
    "multiemo-32-bf16": ("multiemo", 32, {}, "bf16", 3.5, 3.0),
    "multiemo-32-bf16-store": ("multiemo", 32, {"gradient_checkpointing": False}, "bf16", None, None),
    "multiemo-64-bf16": ("multiemo", 64, {}, "bf16", 7.0, 4.0),
    "xlstm-multiemo-32": ("xlstm-multiemo", 32, {}, "fp32", None, None),
    "xlstm-multiemo-32-slstm": ("xlstm-multiemo", 32, {"xlstm_block": "slstm"}, "fp32", None, None),  # MELD's cells
    "lmam-32": ("lmam", 32, {}, "fp32", None, None),
    "pairwise-32": ("pairwise", 32, {}, "fp32", None, None),
    "mcn-cl-32": ("mcn-cl", 32, {}, "fp32", None, None),
}
FRAMES = 20
SWFC_UTTERANCES = 1000
SWFC_TARGET_SPEEDUP = 50.0


def iemocap_batch(num_dialogues: int, seed: int = 0, frames: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 111, (num_dialogues,), generator=generator)
    length = int(lengths.max())
    mask = torch.arange(length) < lengths.unsqueeze(1)
    batch = {m: torch.randn(num_dialogues, length, d, generator=generator) * mask.unsqueeze(-1) for m, d in IEMOCAP_DIMS.items()}
    batch |= {f"{m}_mask": mask.clone() for m in IEMOCAP_DIMS}
    batch["mask"] = mask
    batch["speaker"] = torch.randint(0, 2, mask.shape, generator=generator) * mask
    batch["label"] = torch.randint(0, 6, mask.shape, generator=generator).masked_fill(~mask, -1)
    if frames:
        batch["visual_frames"] = torch.randn(*mask.shape, FRAMES, IEMOCAP_DIMS["visual"], generator=generator)
        batch["visual_frame_mask"] = (torch.rand(*mask.shape, FRAMES, generator=generator) > 0.2) & mask.unsqueeze(-1)
    return batch


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def train_step_case(case: str, repeats: int, device: torch.device, precision: str | None = None) -> dict[str, float]:
    from erc.models.registry import build_model, train_hyperparameters

    name, num_dialogues, overrides, case_precision, _, _ = CASES[case]
    precision = precision or case_precision
    model = build_model(name, input_dims=IEMOCAP_DIMS, num_classes=6, preset="iemocap", overrides=overrides).to(device)
    backend = None
    if device.type == "cuda":  # the sLSTM kernel `erc train` picks on a GPU (a baseline tree may predate the choice)
        with contextlib.suppress(ImportError):
            from erc.models.context import use_xlstm_backend

            backend = use_xlstm_backend(model, device, "auto")
    if precision == "fp32":  # runs on a baseline tree that may predate the precision helpers
        autocast, float32 = (lambda: contextlib.nullcontext()), (lambda output: output)
    else:
        from erc.pipeline.evaluate import autocast as precision_autocast, float32

        autocast = lambda: precision_autocast(device, precision)  # noqa: E731
    hp = train_hyperparameters(name, "iemocap")
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
    batch = iemocap_batch(num_dialogues, frames=bool(getattr(model, "needs_frames", False)))
    batch = {k: v.to(device) for k, v in batch.items()}
    class_counts = torch.bincount(batch["label"][batch["mask"]], minlength=6).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            output = model(batch)
        model.loss(float32(output), batch, class_counts)["total"].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: allocator, Adam state
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        step()
    return {
        "seconds": (time.perf_counter() - wall) / repeats,
        "cpu_seconds": (time.process_time() - cpu) / repeats,
        "peak_gb": peak_memory_gb(device),
        "utterances": int(batch["mask"].sum()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "precision": precision,
        "xlstm_backend": backend,
    }


def swfc_per_sample_loop(features, labels, temperature, focusing, sample_weight_power):
    """SWFC computed the way the public MultiEMO code does: a Python loop over anchors, each
    building its "all others" set, similarities, softmax and positive mask (weights as eq 19)."""
    n, dim = labels.numel(), features.shape[-1]
    features = torch.nn.functional.normalize(features, dim=-1)
    counts = torch.bincount(labels).float()
    weights = torch.tensor([float((n / counts[label]) ** sample_weight_power) for label in labels])
    total = 0.0
    for i in range(n):
        others = torch.cat((features[:i], features[i + 1 :]), dim=0)
        other_labels = torch.cat((labels[:i], labels[i + 1 :]), dim=0)
        similarity = torch.sum(features[i].expand(n - 1, dim) * others, dim=-1)
        probs = torch.softmax(similarity / temperature, dim=0)
        positives = probs[other_labels == labels[i]]
        if len(positives) > 0:
            total += torch.mean(torch.log(positives) * (1 - positives) ** focusing, dim=0) * weights[i]
    return -total / n


def swfc_case(repeats: int) -> dict[str, float]:
    from erc.models.losses import sample_weighted_focal_contrastive_loss

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SWFC_UTTERANCES, 256, generator=generator, requires_grad=True)
    labels = torch.randint(0, 6, (SWFC_UTTERANCES,), generator=generator)
    kwargs = dict(temperature=0.8, focusing=2.0, sample_weight_power=0.8)

    def timed(fn) -> tuple[float, float]:
        fn().backward()  # warm-up
        times = []
        for _ in range(max(repeats, 5)):  # the median of at least 5: one call is tens of milliseconds
            features.grad = None
            start = time.process_time()
            value = fn()
            value.backward()
            times.append(time.process_time() - start)
        return statistics.median(times), value.item()

    # the loop weighs anchors by (N / n_y)^α as eq 19 writes it: the same, unnormalised, class weights here
    vectorised, v_value = timed(
        lambda: sample_weighted_focal_contrastive_loss(features, labels, **kwargs, normalize_class_weights=False)
    )
    looped, l_value = timed(lambda: swfc_per_sample_loop(features, labels, **kwargs))
    return {"vectorised_s": vectorised, "loop_s": looped, "speedup": looped / vectorised, "abs_diff": abs(v_value - l_value)}


def run_child(case: str, args: argparse.Namespace, tree: str | None = None) -> dict[str, float]:
    """One case in a fresh process; ``tree`` puts another checkout's ``erc`` package first on the path."""
    command = [sys.executable, os.path.abspath(__file__), "--child", case, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--device", args.device]
    if args.precision:
        command += ["--precision", args.precision]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree or None)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"{case} failed: {lines[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--baseline-tree", help="directory holding another checkout's erc package (the 'before' columns)")
    parser.add_argument("--cases", help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="run every case in this precision (default: each case's own)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        device = torch.device(args.device)
        result = (swfc_case(args.repeats) if args.child == "swfc"
                  else train_step_case(args.child, args.repeats, device, args.precision))
        print(json.dumps(result))
        return

    cases = args.cases.split(",") if args.cases else list(CASES)
    baseline = os.path.abspath(args.baseline_tree) if args.baseline_tree else None
    print(
        f"torch {torch.__version__}, {args.device}, {args.threads} thread(s) on {os.cpu_count()} CPU(s), "
        f"load average {os.getloadavg()[0]:.1f}; mean of {args.repeats} step(s) after a warm-up"
        + (f"; before = {baseline}" if baseline else "") + "\n"
    )
    memory = "GPU GB" if args.device == "cuda" else "RSS GB"
    print(f"| case | utterances | parameters | before s | after s | speed-up | before CPU s | after CPU s | target s "
          f"| before {memory} | after {memory} | target GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        precision, max_s, max_gb = CASES[case][3:]
        precision = args.precision or precision
        try:
            before = run_child(case, args, baseline) if baseline and precision == "fp32" else None
            r = run_child(case, args)
        except RuntimeError as error:
            print(f"| {case} | {error} |" + " |" * 10, flush=True)
            continue
        speedup = before["seconds"] / r["seconds"] if before else None
        label = case if precision == CASES[case][3] else f"{case} ({precision})"
        if r.get("xlstm_backend"):
            label += f" [sLSTM {r['xlstm_backend']}]"
        print(
            f"| {label} | {r['utterances']} | {r['parameters']:,} | {fmt(before and before['seconds'], '.2f')} "
            f"| {r['seconds']:.2f} | {fmt(speedup, '.1f')}{'x' if speedup else ''} "
            f"| {fmt(before and before['cpu_seconds'], '.2f')} | {r['cpu_seconds']:.2f} "
            f"| {'<= ' + str(max_s) if max_s else ''} | {fmt(before and before['peak_gb'], '.2f')} | {r['peak_gb']:.2f} "
            f"| {'<= ' + str(max_gb) if max_gb else ''} |",
            flush=True,
        )
    print(f"\nload average after the steps: {os.getloadavg()[0]:.1f}")
    if args.device == "cuda":
        return  # the SWFC comparison is a CPU measurement
    r = run_child("swfc", args)
    print(
        f"\nSWFC forward+backward on {SWFC_UTTERANCES} utterances (CPU time): vectorised {r['vectorised_s'] * 1e3:.1f} ms, "
        f"per-sample loop (public code's) {r['loop_s'] * 1e3:.0f} ms: {r['speedup']:.0f}x faster (target >= {SWFC_TARGET_SPEEDUP:.0f}x); "
        f"|difference| {r['abs_diff']:.1e}"
    )


if __name__ == "__main__":
    main()
