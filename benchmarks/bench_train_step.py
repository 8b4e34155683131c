"""CPU cost of a MultiEMO training step, and of the vectorised SWFC loss against a per-sample loop.

    python benchmarks/bench_train_step.py [--threads N] [--repeats R]

Each configuration runs in a fresh subprocess so its peak RSS is its own. A training step is what
the trainer does per batch: forward, the three losses of eq 22, backward and an Adam update, on
IEMOCAP-shaped random dialogues (text 768, audio 6373, visual 1000; 20-110 utterances each) with
the IEMOCAP preset (which recomputes attention activations in the backward pass to save memory;
one row shows the step without that). Times are means over ``--repeats`` steps after a warm-up
step: wall-clock seconds and the process's CPU seconds. On a shared machine the wall time
includes waiting for the CPU (see the load average printed); with one thread the CPU time is
close to what the step takes on an idle core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

IEMOCAP_DIMS = {"text": 768, "audio": 6373, "visual": 1000}
CASES = {  # name: (model, dialogues, overrides, target seconds, target GB)
    "multiemo-32": ("multiemo", 32, {}, 3.5, 3.0),
    "multiemo-64": ("multiemo", 64, {}, None, 4.0),
    "multiemo-32-store": ("multiemo", 32, {"gradient_checkpointing": False}, None, None),
    "xlstm-multiemo-32": ("xlstm-multiemo", 32, {}, None, None),
}
SWFC_UTTERANCES = 1000
SWFC_TARGET_SPEEDUP = 50.0


def iemocap_batch(num_dialogues: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 111, (num_dialogues,), generator=generator)
    length = int(lengths.max())
    mask = torch.arange(length) < lengths.unsqueeze(1)
    batch = {m: torch.randn(num_dialogues, length, d, generator=generator) * mask.unsqueeze(-1) for m, d in IEMOCAP_DIMS.items()}
    batch |= {f"{m}_mask": mask.clone() for m in IEMOCAP_DIMS}
    batch["mask"] = mask
    batch["speaker"] = torch.randint(0, 2, mask.shape, generator=generator) * mask
    batch["label"] = torch.randint(0, 6, mask.shape, generator=generator).masked_fill(~mask, -1)
    return batch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def train_step_case(case: str, repeats: int) -> dict[str, float]:
    from erc.models.registry import build_model, train_hyperparameters

    name, num_dialogues, overrides, _, _ = CASES[case]
    model = build_model(name, input_dims=IEMOCAP_DIMS, num_classes=6, preset="iemocap", overrides=overrides)
    hp = train_hyperparameters(name, "iemocap")
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
    batch = iemocap_batch(num_dialogues)
    class_counts = torch.bincount(batch["label"][batch["mask"]], minlength=6).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output = model(batch)
        model.loss(output, batch, class_counts)["total"].backward()
        optimizer.step()

    step()  # warm-up: allocator, Adam state
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        step()
    return {
        "seconds": (time.perf_counter() - wall) / repeats,
        "cpu_seconds": (time.process_time() - cpu) / repeats,
        "peak_rss_gb": peak_rss_gb(),
        "utterances": int(batch["mask"].sum()),
        "parameters": sum(p.numel() for p in model.parameters()),
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
        start = time.process_time()
        for _ in range(repeats):
            features.grad = None
            value = fn()
            value.backward()
        return (time.process_time() - start) / repeats, value.item()

    vectorised, v_value = timed(lambda: sample_weighted_focal_contrastive_loss(features, labels, **kwargs))
    looped, l_value = timed(lambda: swfc_per_sample_loop(features, labels, **kwargs))
    return {"vectorised_s": vectorised, "loop_s": looped, "speedup": looped / vectorised, "abs_diff": abs(v_value - l_value)}


def run_child(case: str, threads: int, repeats: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", case, "--threads", str(threads), "--repeats", str(repeats)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        result = swfc_case(args.repeats) if args.child == "swfc" else train_step_case(args.child, args.repeats)
        print(json.dumps(result))
        return

    print(
        f"torch {torch.__version__}, {args.threads} thread(s) on {os.cpu_count()} CPU(s), "
        f"load average {os.getloadavg()[0]:.1f}; mean of {args.repeats} step(s) after a warm-up\n"
    )
    print(f"{'case':<20}{'utterances':>11}{'params':>12}{'wall s':>8}{'CPU s':>7}{'target':>8}{'peak GB':>9}{'target':>8}")
    for case, (_, _, _, max_s, max_gb) in CASES.items():
        r = run_child(case, args.threads, args.repeats)
        print(
            f"{case:<20}{r['utterances']:>11}{r['parameters']:>12,}{r['seconds']:>8.2f}{r['cpu_seconds']:>7.2f}"
            f"{'<= ' + str(max_s) if max_s else '':>8}{r['peak_rss_gb']:>9.2f}{'<= ' + str(max_gb) if max_gb else '':>8}"
        )
    r = run_child("swfc", args.threads, args.repeats)
    print(
        f"\nSWFC forward+backward on {SWFC_UTTERANCES} utterances (CPU time): vectorised {r['vectorised_s'] * 1e3:.1f} ms, "
        f"per-sample loop (public code's) {r['loop_s'] * 1e3:.0f} ms: {r['speedup']:.0f}x faster (target >= {SWFC_TARGET_SPEEDUP:.0f}x); "
        f"|difference| {r['abs_diff']:.1e}"
    )


if __name__ == "__main__":
    main()
