"""Read a few evenly spread frames of an utterance out of a video, without decoding the rest.

MultiEMO (Shi & Huang, 2023, §3.3.3) looks at 20 frames per utterance. Decoding every frame of the
clip to keep 20 of them costs time linear in the clip's length and memory linear in it too; here
only the sampled frames are decoded: OpenCV seeks to a sampled frame when it is far ahead and
grabs (decodes without converting) the few frames in between when it is close.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from erc.errors import MediaError

SPAN_TOLERANCE_S = 0.5
"""How far past the video's end an utterance's end time may lie (transcripts round times)."""

GRAB_LIMIT = 48
"""Up to this many frames ahead, decode forward with grab(); farther, seek.

A seek decodes from the keyframe before its target, up to a whole GOP (12 frames in MPEG-4 Part 2
encodes, 250 in x264's default); grabbing forward costs one decode per skipped frame.
"""


def sample_frame_indices(first_frame: int, last_frame: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over [first_frame, last_frame], both ends included.

    Spans shorter than `num_frames` frames repeat indices, so the result always has `num_frames` entries.
    """
    if num_frames < 1 or first_frame < 0 or last_frame < first_frame:
        raise ValueError(f"cannot sample {num_frames} frames from [{first_frame}, {last_frame}]")
    return np.linspace(first_frame, last_frame, num_frames).round().astype(int).tolist()


def read_frames(
    path: Path, start: float | None, end: float | None, num_frames: int = 20
) -> tuple[np.ndarray, list[int]]:
    """Decode `num_frames` frames spread evenly over [start, end] seconds (None: the video's start/end).

    Returns the frames as a (num_frames, H, W, 3) uint8 RGB array and their indices in the video.
    Raises MediaError for a missing or unreadable file, a video without frames, or a span outside it.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: video file not found")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MediaError(f"{path}: cannot open video (unreadable or corrupt file)")
        frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS)
        if frame_count <= 0 or not fps > 0:
            raise MediaError(f"{path}: video has no frames")
        first, last = _span_to_frames(path, start, end, fps, frame_count)
        indices = sample_frame_indices(first, last, num_frames)
        decoded = _decode(capture, path, sorted(set(indices)))
    finally:
        capture.release()
    if len({frame.shape for frame in decoded.values()}) > 1:
        raise MediaError(f"{path}: the frame size changes within the video")
    return np.stack([decoded[index] for index in indices]), indices


def _span_to_frames(
    path: Path, start: float | None, end: float | None, fps: float, frame_count: int
) -> tuple[int, int]:
    """First and last frame index (inclusive) whose display interval overlaps [start, end)."""
    duration = frame_count / fps
    start_s = 0.0 if start is None else float(start)
    end_s = duration if end is None else float(end)
    if not (0.0 <= start_s < duration and start_s < end_s <= duration + SPAN_TOLERANCE_S):
        raise MediaError(
            f"{path}: span [{start_s:.3f}, {end_s:.3f}] s is empty or outside the video (0 to {duration:.3f} s)"
        )
    first = math.floor(start_s * fps)
    last = min(frame_count, math.ceil(end_s * fps)) - 1
    return first, max(first, last)


def _decode(capture: cv2.VideoCapture, path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """Decode the frames at the sorted, distinct `indices`; RGB arrays keyed by index."""
    frames = {}
    position = 0  # index of the frame the next read() returns
    for index in indices:
        if index - position > GRAB_LIMIT:
            capture.set(cv2.CAP_PROP_POS_FRAMES, index)
            position = index
        while position < index and capture.grab():
            position += 1
        ok, frame = capture.read() if position == index else (False, None)
        if not ok:
            raise MediaError(f"{path}: cannot decode frame {index}")
        position += 1
        frames[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return frames
