"""Audio decoding (PyAV) and openSMILE features on real signals written into real containers."""

from pathlib import Path

import av
import numpy as np
import pytest

from erc.errors import ConfigError, MediaError, SilentAudioError
from erc.features.audio import AudioConfig, AudioExtractor, load_audio


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def voiced(seconds: float, rate: int = 16000, f0: float = 140.0) -> np.ndarray:
    """Harmonic 'voice': a gliding f0 with decaying harmonics, amplitude-modulated at syllable rate."""
    t = np.arange(round(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t))) / rate
    signal = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2 / 4
    return (0.3 * signal * envelope).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """16-bit PCM wav; ``samples`` is (n,) mono or (channels, n)."""
    samples = np.atleast_2d(samples)
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    return path


def write_mp4(path: Path, stereo: np.ndarray | None, rate: int = 48000, seconds: float = 2.0) -> Path:
    """An mp4 with a small MPEG-4 video stream and, if ``stereo`` (2, n) is given, an AAC audio track."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        if stereo is not None:
            audio = container.add_stream("aac", rate=rate, layout="stereo")
            for i in range(0, stereo.shape[1], 1024):
                chunk = np.ascontiguousarray(stereo[:, i : i + 1024])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = rate, i
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode(None):
                container.mux(packet)
        for k in range(round(seconds * 25)):
            image = np.full((48, 64, 3), (k * 9) % 256, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
    return path


def spectrum(signal: np.ndarray, rate: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(np.fft.rfft(signal * np.hanning(len(signal)))) / (np.hanning(len(signal)).sum() / 2)
    return np.fft.rfftfreq(len(signal), 1 / rate), magnitude


def amplitude_at(signal: np.ndarray, freq: float, rate: int = 16000) -> float:
    freqs, magnitude = spectrum(signal, rate)
    return float(magnitude[np.abs(freqs - freq) < 15].max())


def dominant_frequency(signal: np.ndarray, rate: int = 16000) -> float:
    freqs, magnitude = spectrum(signal, rate)
    return float(freqs[magnitude.argmax()])


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    two_tones = np.concatenate([tone(300, 1.0, 16000), tone(1200, 1.0, 16000)])
    long_tones = np.concatenate([tone(200 + 100 * (s % 5), 1.0, 16000) for s in range(20)])
    # mp4: first second left 500 Hz / right 1500 Hz, second second 1000 Hz on both channels
    first = np.stack([tone(500, 1.0, 48000, 0.8), tone(1500, 1.0, 48000, 0.8)])
    second = np.stack([tone(1000, 1.0, 48000, 0.6)] * 2)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    return {
        "two_tones": write_wav(root / "two_tones.wav", two_tones),
        "long": write_wav(root / "long.wav", long_tones),
        "voiced": write_wav(root / "voiced.wav", voiced(2.0)),
        "noise": write_wav(root / "noise.wav", np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)),
        "silent": write_wav(root / "silent.wav", np.zeros(32000, np.float32)),
        "mp4": write_mp4(root / "dia1_utt0.mp4", np.concatenate([first, second], axis=1)),
        "video_only": write_mp4(root / "video_only.mp4", None),
        "corrupt": root / "corrupt.wav",
    }


@pytest.fixture(scope="module")
def extractor() -> AudioExtractor:
    return AudioExtractor(AudioConfig())


def test_wav_decodes_to_16k_float_mono(media):
    audio = load_audio(media["two_tones"])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 32000
    assert 0.45 < np.abs(audio).max() <= 0.51


def test_span_picks_the_right_part(media):
    first = load_audio(media["two_tones"], 0.2, 0.8)
    second = load_audio(media["two_tones"], 1.2, 1.8)
    assert len(first) == len(second) == 9600
    assert dominant_frequency(first) == pytest.approx(300, abs=5)
    assert dominant_frequency(second) == pytest.approx(1200, abs=5)


def test_span_late_in_long_file_is_found_by_seeking(media):
    for second in (13, 17, 19):
        clip = load_audio(media["long"], second + 0.1, second + 0.9)
        assert len(clip) == 12800
        assert dominant_frequency(clip) == pytest.approx(200 + 100 * (second % 5), abs=5)


def test_mp4_aac_track_is_resampled_and_downmixed(media):
    audio = load_audio(media["mp4"])
    assert abs(len(audio) / 16000 - 2.0) < 0.03
    stereo_part = load_audio(media["mp4"], 0.1, 0.9)
    assert len(stereo_part) == 12800
    # channels are averaged: each 0.8 tone of one channel comes out at 0.4, nothing clips
    assert amplitude_at(stereo_part, 500) == pytest.approx(0.4, rel=0.1)
    assert amplitude_at(stereo_part, 1500) == pytest.approx(0.4, rel=0.1)
    assert np.abs(stereo_part).max() < 0.85
    mono_part = load_audio(media["mp4"], 1.2, 1.9)
    assert dominant_frequency(mono_part) == pytest.approx(1000, abs=5)
    assert amplitude_at(mono_part, 500) < 0.01


def test_extractor_gives_finite_distinct_features(media, extractor):
    voice = extractor.extract(media["voiced"])
    noise = extractor.extract(media["noise"])
    clip = extractor.extract(media["mp4"], 0.1, 0.9)
    for features in (voice, noise, clip):
        assert features.shape == (6373,) and features.dtype == np.float32
        assert np.isfinite(features).all()
    assert extractor.dim == 6373
    assert np.linalg.norm(voice - noise) > 1e-3 * np.linalg.norm(voice)
    np.testing.assert_array_equal(voice, extractor.extract(media["voiced"]))


def test_silent_audio_raises(media, extractor):
    with pytest.raises(SilentAudioError, match="silent.wav"):
        extractor.extract(media["silent"])
    with pytest.raises(SilentAudioError, match="silent.wav"):
        load_audio(media["silent"], 0.5, 1.0)


@pytest.mark.parametrize(
    ("name", "span", "message"),
    [
        ("corrupt", (None, None), "corrupt.wav: cannot decode"),
        ("video_only", (None, None), "video_only.mp4: no audio stream"),
        ("two_tones", (3.0, 4.0), r"two_tones.wav \[3.000s-4.000s\]: no audio samples"),
        ("two_tones", (1.0, 0.5), r"two_tones.wav \[1.000s-0.500s\]: empty"),
    ],
)
def test_bad_media_raise_media_error(media, name, span, message):
    with pytest.raises(MediaError, match=message):
        load_audio(media[name], *span)


def test_missing_file_raises(tmp_path, extractor):
    with pytest.raises(MediaError, match="nowhere.mp4: audio source not found"):
        extractor.extract(tmp_path / "nowhere.mp4")


def test_too_short_clip_raises_instead_of_nan(media, extractor):
    with pytest.raises(MediaError, match="non-finite"):
        extractor.extract(media["voiced"], 0.50, 0.53)


def test_config_and_info():
    with pytest.raises(ConfigError, match="NoSuchSet"):
        AudioExtractor(AudioConfig(feature_set="NoSuchSet"))
    small = AudioExtractor(AudioConfig(feature_set="eGeMAPSv02"))
    assert small.dim == 88
    info = small.info()
    assert info["feature_set"] == "eGeMAPSv02" and info["sample_rate"] == 16000 and info["dim"] == 88
    assert info["opensmile_version"]
