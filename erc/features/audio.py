"""Utterance audio → openSMILE ComParE 2016 functionals (MultiEMO §3.3.2, after Majumder et al. 2019).

:func:`load_audio` decodes the audio track of any container PyAV reads (IEMOCAP wavs, MELD mp4s with
a 48 kHz stereo AAC track, manifest files), averages the channels, cuts it to an utterance span and
resamples it to 16 kHz. :class:`AudioExtractor` turns that signal into one 6373-d vector.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import opensmile

from erc.errors import ConfigError, MediaError, SilentAudioError

SILENCE_PEAK = 1e-4
"""A clip whose absolute peak stays below this (about -80 dBFS, under 16-bit dither) has no signal."""


def _span_text(start: float | None, end: float | None) -> str:
    if start is None and end is None:
        return ""
    return f" [{start or 0.0:.3f}s-{'end' if end is None else f'{end:.3f}s'}]"


def _decode_mono(
    container: av.container.InputContainer, stream: av.AudioStream, start: float, end: float | None
) -> tuple[np.ndarray, int]:
    """Decode ``stream`` between ``start`` and ``end`` seconds at its native rate, channels averaged.

    A decoding error after some samples of the span decoded ends the span there (a truncated file whose
    header still lists the lost packets keeps the audio that exists); one before any sample propagates.
    """
    if start > 0 and stream.time_base is not None:
        try:  # jump to the last packet at or before `start` instead of decoding the whole file
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        except av.FFmpegError:
            container.seek(0)
    to_planar_float = av.AudioResampler(format="fltp")  # keeps layout and rate
    pieces: list[np.ndarray] = []
    rate = stream.rate
    clock = 0.0
    frames = container.decode(stream)
    while True:
        try:
            packet_frame = next(frames)
        except StopIteration:
            break
        except av.FFmpegError:
            if pieces:
                break
            raise
        if packet_frame.time is not None:
            clock = packet_frame.time
        if end is not None and clock >= end:
            break
        for frame in to_planar_float.resample(packet_frame):
            rate = frame.sample_rate
            mono = frame.to_ndarray().mean(axis=0, dtype=np.float32)
            first = max(0, round((start - clock) * rate))
            last = len(mono) if end is None else min(len(mono), round((end - clock) * rate))
            if last > first:
                pieces.append(mono[first:last])
            clock += len(mono) / rate
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), rate


def _resample(mono: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if rate == target_rate:
        return mono
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    frames = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray()[0] for f in frames])


def load_audio(
    path: Path, start: float | None = None, end: float | None = None, sample_rate: int = 16000
) -> np.ndarray:
    """Return the audio of ``path`` between ``start`` and ``end`` seconds as float32 mono in [-1, 1].

    ``None`` bounds mean the start / end of the file. Raises :class:`MediaError` for a missing or
    undecodable file, a file without audio stream or an empty span, :class:`SilentAudioError` for a
    clip without signal.
    """
    path = Path(path)
    span = _span_text(start, end)
    if not path.is_file():
        raise MediaError(f"{path}: audio source not found")
    if (start is not None and start < 0) or (end is not None and end <= (start or 0.0)):
        raise MediaError(f"{path}{span}: empty or negative audio span")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream")
            mono, rate = _decode_mono(container, container.streams.audio[0], start or 0.0, end)
    except av.FFmpegError as error:
        raise MediaError(f"{path}: cannot decode audio ({error})") from error
    if mono.size == 0:
        raise MediaError(f"{path}{span}: no audio samples in span")
    audio = np.clip(_resample(mono, rate, sample_rate), -1.0, 1.0)
    peak = float(np.abs(audio).max())
    if peak < SILENCE_PEAK:
        raise SilentAudioError(f"{path}{span}: audio carries no signal (peak {peak:.1e})")
    return audio.astype(np.float32, copy=False)


@dataclass
class AudioConfig:
    """openSMILE feature set (a name of :class:`opensmile.FeatureSet`) and the rate audio is fed at."""

    feature_set: str = "ComParE_2016"
    sample_rate: int = 16000


class AudioExtractor:
    """One utterance clip → openSMILE functionals (6373 values for ComParE 2016)."""

    dim: int = 6373

    def __init__(self, config: AudioConfig | None = None) -> None:
        self.config = config or AudioConfig()
        if self.config.feature_set not in opensmile.FeatureSet.__members__:
            choices = ", ".join(opensmile.FeatureSet.__members__)
            raise ConfigError(f"unknown openSMILE feature set {self.config.feature_set!r} (choose from {choices})")
        self.smile = opensmile.Smile(
            feature_set=opensmile.FeatureSet[self.config.feature_set],
            feature_level=opensmile.FeatureLevel.Functionals,
        )
        self.dim = len(self.smile.feature_names)

    def extract(self, path: Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        """Features of ``path`` cut to [start, end] seconds, shape ``(dim,)`` float32, all finite."""
        audio = load_audio(path, start, end, self.config.sample_rate)
        with warnings.catch_warnings():  # too-short clips come back as NaN; reported below
            warnings.simplefilter("ignore", UserWarning)
            features = self.smile.process_signal(audio, self.config.sample_rate).to_numpy(np.float32)[0]
        if not np.isfinite(features).all():
            seconds = len(audio) / self.config.sample_rate
            clip = f"{path}{_span_text(start, end)}"
            raise MediaError(f"{clip}: openSMILE gave non-finite features for a {seconds:.3f}s clip (too short?)")
        return features

    def info(self) -> dict:
        """What produced the features, for shard provenance."""
        return {
            "extractor": "opensmile",
            "feature_set": self.config.feature_set,
            "feature_level": "Functionals",
            "opensmile_version": opensmile.__version__,
            "sample_rate": self.config.sample_rate,
            "dim": self.dim,
        }
