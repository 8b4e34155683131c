"""Read a few evenly spread frames of an utterance out of a video, without decoding the rest.

MultiEMO (Shi & Huang, 2023, §3.3.3) looks at 20 frames per utterance. Decoding every frame of the
clip to keep 20 of them costs time linear in the clip's length and memory linear in it too; here
only the sampled frames are decoded: OpenCV seeks to a sampled frame when it is far ahead and
grabs (decodes without converting) the few frames in between when it is close.

The frame count and duration a container's header gives are estimates. When they are wrong (a
truncated download whose index still lists every frame, a header that under-counts, a stream that
declares no count), the frames are sampled again by timestamp among the frames that actually decode
(PyAV, :func:`_read_frames_by_timestamp`), so a header that over-counts never costs the utterance its
visual modality.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
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
    start_s = 0.0 if start is None else float(start)
    if start_s < 0 or (end is not None and float(end) <= start_s):
        raise MediaError(f"{path}: span [{start_s:.3f}, {end}] s is empty or outside the video (negative or reversed)")
    capture = cv2.VideoCapture(str(path))
    header_duration = None
    try:
        if not capture.isOpened():
            raise MediaError(f"{path}: cannot open video (unreadable or corrupt file)")
        frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = capture.get(cv2.CAP_PROP_FPS)
        decoded = None
        if frame_count > 0 and fps > 0:
            header_duration = frame_count / fps
            try:
                first, last = _span_to_frames(path, start, end, fps, frame_count)
                indices = sample_frame_indices(first, last, num_frames)
                decoded = _decode(capture, path, sorted(set(indices)))
            except _HeaderMismatch:  # the header promised frames that do not decode, or a span it may under-count
                decoded = None
    finally:
        capture.release()
    if decoded is None:
        frames, indices = _read_frames_by_timestamp(path, start, end, num_frames, header_duration)
    else:
        frames = [decoded[index] for index in indices]
    if len({frame.shape for frame in frames}) > 1:
        raise MediaError(f"{path}: the frame size changes within the video")
    return np.stack(frames), indices


class _HeaderMismatch(MediaError):
    """The header's frame count or duration disagrees with what decodes (internal: triggers the
    timestamp path, which raises a plain MediaError if the frames really are not there)."""


def _read_frames_by_timestamp(
    path: Path, start: float | None, end: float | None, num_frames: int, header_duration: float | None
) -> tuple[list[np.ndarray], list[int]]:
    """Sample by timestamp among the frames that decode (PyAV): one pass records the timestamps of the
    decodable frames overlapping [start, end), a second converts the sampled ones to RGB."""
    start_s = 0.0 if start is None else float(start)
    end_s = math.inf if end is None else float(end)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            times = [t for t, _ in _decoded_frames(container, stream, start_s, end_s, convert=())]
            if not times and start_s > 0:  # nothing decodes from the keyframe before start on: where do frames end?
                everything = _decoded_frames(container, stream, 0.0, math.inf, convert=())
                if everything:
                    shown_end = "end" if end is None else f"{end_s:.3f}"
                    raise MediaError(f"{path}: span [{start_s:.3f}, {shown_end}] s is empty or outside the video (its "
                                     f"frames that decode end at {everything[-1][0]:.3f} s)")
            if not times:
                raise MediaError(f"{path}: video has no frames that decode")
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            durations = np.diff(times + [times[-1] + (1.0 / rate if rate else 0.0)])
            decodable_end = times[-1] + float(durations[-1])
            limit = max(decodable_end, header_duration or 0.0) + SPAN_TOLERANCE_S
            overlapping = [t for t, d in zip(times, durations) if t < end_s and t + max(float(d), 1e-9) > start_s]
            if not overlapping or (end is not None and end_s > limit):
                shown_end = "end" if end is None else f"{end_s:.3f}"
                raise MediaError(
                    f"{path}: span [{start_s:.3f}, {shown_end}] s is empty or outside the video (its frames that "
                    f"decode end at {decodable_end:.3f} s)"
                )
            positions = sample_frame_indices(0, len(overlapping) - 1, num_frames)
            wanted = {overlapping[i] for i in positions}
            frames = dict(_decoded_frames(container, stream, start_s, end_s, convert=wanted))
    except av.FFmpegError as error:
        raise MediaError(f"{path}: cannot decode video ({error})") from error
    missing = wanted - frames.keys()
    if missing:
        raise MediaError(f"{path}: the frame at {min(missing):.3f} s decoded once but not twice")
    chosen = [overlapping[i] for i in positions]
    indices = [round(t * rate) if rate else i for i, t in zip(positions, chosen)]  # frame numbers at the nominal rate
    return [frames[t] for t in chosen], indices


def _decoded_frames(container, stream, start_s: float, end_s: float, convert):
    """(time in seconds from the stream's start, RGB array or None) of the frames that decode from the
    keyframe before ``start_s`` up to the first frame at or after ``end_s``; stops at the first
    decoding error (what follows a truncation or corruption does not exist for sampling)."""
    time_base = stream.time_base
    if time_base is None:
        raise MediaError(f"{container.name}: the video stream has no time base")
    origin = stream.start_time or 0
    try:
        container.seek(origin + int(start_s / time_base), stream=stream, backward=True)
    except av.FFmpegError:  # not seekable: decode from the start
        container.seek(0)
    out = []
    previous = -math.inf
    try:
        for frame in container.decode(stream):
            pts = frame.pts if frame.pts is not None else frame.dts
            if pts is None:
                continue
            t = float((pts - origin) * time_base)
            if t <= previous:  # a repeated or out-of-order timestamp: not a new frame in display order
                continue
            previous = t
            if t >= end_s:
                break
            out.append((t, frame.to_ndarray(format="rgb24") if t in convert else None))
    except av.FFmpegError:
        pass
    return out


def _span_to_frames(
    path: Path, start: float | None, end: float | None, fps: float, frame_count: int
) -> tuple[int, int]:
    """First and last frame index (inclusive) whose display interval overlaps [start, end)."""
    duration = frame_count / fps
    start_s = 0.0 if start is None else float(start)
    end_s = duration if end is None else float(end)
    if not (0.0 <= start_s < duration and start_s < end_s <= duration + SPAN_TOLERANCE_S):
        raise _HeaderMismatch(
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
            raise _HeaderMismatch(f"{path}: cannot decode frame {index}")
        position += 1
        frames[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return frames
