"""Per-clip time of erc's visual features against the public MultiEMO method.

MultiEMO's VisExtNet decodes every frame of a clip, runs MTCNN on every frame, then puts the faces
of 20 of the frames that had one through the ResNet-101. erc decodes and searches only the 20
sampled frames. Both use the same randomly initialised ResNet-101 (no face weights can be
downloaded here; weights do not change the cost). Clips are synthetic: a real face
(skimage's astronaut) moving and growing over a noisy background, 640×360 at 24 fps.

    python benchmarks/bench_visual.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch
from facenet_pytorch import MTCNN
from torchvision.models import resnet101

from erc.features.visual import VisualConfig, VisualExtractor

FACE = skimage.data.astronaut()[0:220, 120:330]


def write_face_clip(path: Path, seconds: float, size: tuple[int, int] = (640, 360), fps: int = 24) -> Path:
    """An mp4v clip of the astronaut's face sliding right and growing over a noisy grey background."""
    width, height = size
    zoom = height / 360
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    count = round(seconds * fps)
    for i in range(count):
        t = i / (count - 1)
        frame = rng.integers(80, 110, (height, width, 3), dtype=np.uint8)
        face = cv2.resize(FACE, None, fx=zoom * (0.8 + 0.4 * t), fy=zoom * (0.8 + 0.4 * t))
        x, y = int(zoom * (40 + 300 * t)), int(zoom * 30)
        frame[y : y + face.shape[0], x : x + face.shape[1]] = face
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


class MultiEmoBaseline:
    """The public MultiEMO VisExtNet: every frame decoded and searched, faces of 20 frames encoded."""

    def __init__(self, seed: int = 0):
        self.mtcnn = MTCNN(image_size=224, keep_all=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.resnet = resnet101().eval()

    def extract(self, video: Path) -> np.ndarray:
        capture = cv2.VideoCapture(str(video))
        frames = []
        while (frame := capture.read()[1]) is not None:
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
        with torch.no_grad():
            faces = [f for f in self.mtcnn(np.stack(frames)) if f is not None]
            step = max(1, len(faces) // 20)
            return self.resnet(torch.cat(faces[::step][:20])).mean(dim=0).numpy()


def seconds_per_clip(extract, clip: Path, repeats: int) -> tuple[float, float]:
    """Median wall and process CPU seconds of `repeats` calls, after one warm-up call."""
    extract(clip)
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        extract(clip)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} runs after a warm-up")
    print("load average before: {:.1f} {:.1f} {:.1f}\n".format(*os.getloadavg()))

    with tempfile.TemporaryDirectory() as tmp:
        clips = {f"{s} s 640x360": write_face_clip(Path(tmp) / f"clip{s}.mp4", s) for s in (3, 10)}
        methods = {
            "MultiEMO (every frame)": MultiEmoBaseline().extract,
            "erc fp32": VisualExtractor(VisualConfig(random_face_weights=True)).extract,
            "erc bf16": VisualExtractor(VisualConfig(random_face_weights=True, precision="bf16")).extract,
            "erc fp32 --compile": VisualExtractor(VisualConfig(random_face_weights=True, compile=True)).extract,
            "erc bf16 --compile": VisualExtractor(VisualConfig(random_face_weights=True, precision="bf16",
                                                               compile=True)).extract,
        }
        print(f"{'clip':<14} {'method':<24} {'seconds':>8} {'speed-up':>9} {'CPU s':>7}")
        for clip_name, clip in clips.items():
            baseline = None
            for method_name, extract in methods.items():
                seconds, cpu = seconds_per_clip(extract, clip, args.repeats)
                baseline = baseline or seconds
                print(f"{clip_name:<14} {method_name:<24} {seconds:>8.2f} {baseline / seconds:>8.1f}x {cpu:>7.2f}")

        hd_clip = write_face_clip(Path(tmp) / "clip3_hd.mp4", 3, size=(1280, 720))
        print("\nMTCNN input size on a 3 s 1280x720 clip (erc fp32):")
        for max_side in (None, 640):
            config = VisualConfig(random_face_weights=True, detect_max_side=max_side)
            seconds, cpu = seconds_per_clip(VisualExtractor(config).extract, hd_clip, args.repeats)
            print(f"  detect_max_side={max_side!s:<5} {seconds:>6.2f} s  ({cpu:.2f} CPU s)")
    print("\nload average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
