"""Synthetic media and miniature corpora in the real on-disk layouts (tests, ``erc demo``, benchmarks).

The media are real files that real decoders read: mpeg4 video of a real face (NASA's public-domain
portrait of Eileen Collins, shipped in ``erc/demo_data/face.png``) moving and scaling over a textured
background, and voiced audio (harmonics of a pitch contour with vibrato, formants and a syllable
envelope) whose pitch and loudness follow the utterance's emotion, so features differ between classes.
The tree builders copy exactly the IEMOCAP, MELD and manifest layouts described in FORMATS.md.
"""

from __future__ import annotations

import csv
import functools
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from erc.pipeline.corpus import MELD_ALT_TEST_PREFIX, MELD_SPLITS

if TYPE_CHECKING:  # PyAV is imported where videos are written, so that importing this module needs no PyAV
    import av

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"
FACE_IMAGE = DEMO_DATA / "face.png"
DEMO_DIALOGUES = DEMO_DATA / "demo_dialogues.csv"

# Emotion -> (f0 in Hz, peak amplitude): aroused emotions are higher and louder, sad ones low and quiet.
VOICES: dict[str, tuple[float, float]] = {
    "neutral": (125.0, 0.12), "neu": (125.0, 0.12),
    "happy": (205.0, 0.30), "hap": (205.0, 0.30), "joy": (205.0, 0.30),
    "excited": (230.0, 0.40), "exc": (230.0, 0.40),
    "sad": (95.0, 0.05), "sadness": (95.0, 0.05),
    "angry": (250.0, 0.60), "ang": (250.0, 0.60), "anger": (250.0, 0.60),
    "frustrated": (170.0, 0.35), "fru": (170.0, 0.35),
    "surprise": (270.0, 0.35), "sur": (270.0, 0.35),
    "fear": (235.0, 0.15), "fea": (235.0, 0.15),
    "disgust": (140.0, 0.25), "dis": (140.0, 0.25),
}
_FORMANTS_HZ = (700.0, 1220.0, 2600.0)


def emotion_voice(label: str | None) -> tuple[float, float]:
    """(f0, amplitude) of the synthetic voice for an emotion; unknown labels sound neutral."""
    return VOICES.get((label or "neutral").lower(), VOICES["neutral"])


@functools.cache
def _face() -> np.ndarray:
    image = cv2.imread(str(FACE_IMAGE), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{FACE_IMAGE}: demo face image missing from the installation")
    return image


def face_image() -> np.ndarray:
    """The 160x160 BGR face crop of ``skimage.data.astronaut()`` (public domain, NASA)."""
    return _face().copy()


def voiced_signal(
    duration_s: float, rate: int = 16000, f0: float = 140.0, seed: int = 0, amplitude: float = 0.3
) -> np.ndarray:
    """A speech-like mono float32 signal peaking at ``amplitude``.

    Harmonics of a pitch contour (slow intonation plus 5.5 Hz vibrato around ``f0``) shaped by three
    formants, cut into ~4 syllables a second, with a little breath noise.
    """
    rng = np.random.default_rng(seed)
    n = max(1, round(duration_s * rate))
    t = np.arange(n) / rate
    contour = f0 * (1 + 0.12 * np.sin(2 * np.pi * 0.8 * t + rng.uniform(0, 2 * np.pi))
                    + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(contour) / rate
    harmonics = np.arange(1, int(min(5000.0, 0.45 * rate) / (1.15 * f0)) + 1)
    weights = sum(np.exp(-(((harmonics * f0) - formant) / 250.0) ** 2) for formant in _FORMANTS_HZ)
    weights = weights + 1.0 / harmonics
    offsets = rng.uniform(0, 2 * np.pi, len(harmonics))
    voice = np.zeros(n)
    for k, weight, offset in zip(harmonics, weights, offsets):
        voice += weight * np.sin(k * phase + offset)
    syllable_rate = rng.uniform(3.5, 4.5)
    envelope = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * syllable_rate * t))
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)
    voice = voice * envelope * fade
    voice /= max(np.abs(voice).max(), 1e-9)
    signal = amplitude * (voice + 0.03 * envelope * rng.standard_normal(n)) + 1e-4 * rng.standard_normal(n)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def emotion_signal(
    label: str | None, duration_s: float, rate: int = 16000, seed: int = 0, pitch_scale: float = 1.0
) -> np.ndarray:
    """:func:`voiced_signal` with the pitch (times ``pitch_scale``) and loudness of ``label``'s voice."""
    f0, amplitude = emotion_voice(label)
    return voiced_signal(duration_s, rate, f0 * pitch_scale, seed, amplitude)


def write_wav(path: Path, signal: np.ndarray, rate: int) -> Path:
    """Write float samples in [-1, 1], shape (n,) or (n, channels), as 16-bit PCM wav."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(signal, dtype=np.float32)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return path


def _textured_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field with fine grain, as float32 BGR."""
    coarse = rng.uniform(60, 200, (4, 6, 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return field + rng.normal(0, 6, (height, width, 3)).astype(np.float32)


def _paste(frame: np.ndarray, image: np.ndarray, center_x: float, center_y: float) -> None:
    """Paste ``image`` centred at (x, y), clipped to the frame."""
    h, w = image.shape[:2]
    x0, y0 = round(center_x - w / 2), round(center_y - h / 2)
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + w, frame.shape[1]), min(y0 + h, frame.shape[0])
    if fx1 > fx0 and fy1 > fy0:
        frame[fy0:fy1, fx0:fx1] = image[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0]


def render_face_frames(
    num_frames: int, fps: float, size: tuple[int, int], faces: int = 1, seed: int = 0
) -> list[np.ndarray]:
    """BGR frames of ``faces`` faces side by side (0: an empty scene), each drifting and scaling, over a
    noisy texture."""
    width, height = size
    rng = np.random.default_rng(seed)
    background = _textured_background(width, height, rng)
    base = min(0.8 * height, 0.9 * width / max(faces, 1))
    phases = rng.uniform(0, 2 * np.pi, (faces, 3))
    face = _face()
    frames = []
    for i in range(num_frames):
        t = i / fps
        frame = np.clip(background + rng.normal(0, 3, background.shape), 0, 255).astype(np.uint8)
        for j in range(faces):
            side = round(base * (0.9 + 0.1 * np.sin(2 * np.pi * 0.4 * t + phases[j, 0])))
            image = cv2.resize(face if j % 2 == 0 else face[:, ::-1], (side, side), interpolation=cv2.INTER_AREA)
            center_x = (j + 0.5) * width / faces + 0.05 * width / faces * np.sin(2 * np.pi * 0.3 * t + phases[j, 1])
            center_y = height / 2 + 0.05 * height * np.sin(2 * np.pi * 0.5 * t + phases[j, 2])
            _paste(frame, image, center_x, center_y)
        frames.append(frame)
    return frames


def write_face_video(
    path: Path,
    duration_s: float,
    fps: int = 24,
    size: tuple[int, int] = (640, 360),
    seed: int = 0,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    faces: int = 1,
    faststart: bool = False,
) -> Path:
    """Write ``round(duration_s * fps)`` frames of moving faces as mpeg4 in .mp4 or .avi.

    ``audio`` (float in [-1, 1], shape (n,) or (n, channels)) is muxed as AAC in .mp4 and as
    16-bit PCM in .avi. Width and height must be even (yuv420p). ``faststart`` puts an mp4's index
    (moov) before the media data, as streaming encodes do: cut short, such a file still opens and its
    header still counts every frame (see :func:`truncate_file`).
    """
    path = Path(path)
    container_kind = path.suffix.lower()
    if container_kind not in (".mp4", ".avi"):
        raise ValueError(f"{path}: write_face_video writes .mp4 or .avi")
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"{path}: frame size {size} must be even")
    path.parent.mkdir(parents=True, exist_ok=True)
    num_frames = max(1, round(duration_s * fps))
    options = {"movflags": "faststart"} if faststart and container_kind == ".mp4" else {}
    import av

    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.bit_rate = max(200_000, width * height * fps // 6)
        if container_kind == ".avi":
            video.codec_tag = "DIVX"
        if audio is not None:
            for packet in _encode_audio(container, container_kind, np.asarray(audio, np.float32), audio_rate):
                container.mux(packet)
        for i, image in enumerate(render_face_frames(num_frames, fps, size, faces, seed)):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return path


def truncate_file(path: Path, keep: float) -> Path:
    """Cut ``path`` to the first ``keep`` fraction of its bytes, as an interrupted download or copy does."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _encode_audio(container: av.container.OutputContainer, kind: str, samples: np.ndarray, rate: int) -> list:
    import av

    channels = 1 if samples.ndim == 1 else samples.shape[1]
    layout = "mono" if channels == 1 else "stereo"
    samples = np.clip(samples.reshape(len(samples), channels), -1.0, 1.0)
    if kind == ".mp4":
        stream = container.add_stream("aac", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
    else:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        pcm = (samples * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    return stream.encode(frame) + stream.encode(None)


# --------------------------------------------------------------------------------------------------
# Miniature corpora
# --------------------------------------------------------------------------------------------------

_LINES = {
    "neu": ["The meeting is on Tuesday.", "I left the keys on the table.", "It says here the form is due."],
    "hap": ["That is wonderful news!", "I love it, thank you!", "We did it, this is great!"],
    "exc": ["Oh wow, we actually won!", "I can't wait to go!", "This is amazing!"],
    "sad": ["I miss her so much.", "Nothing ever works out for me.", "I'm sorry, I just feel empty."],
    "ang": ["Don't you dare talk to me like that!", "This is completely unacceptable!", "Get out!"],
    "fru": ["I've asked you three times already.", "Why is this line never moving?", "Forget it."],
    "xxx": ["Well, I mean, you know.", "Hmm."],
    "sur": ["Wait, what? Since when?", "You're kidding!"],
}
_IEMOCAP_CYCLE = ("neu", "hap", "sad", "ang", "exc", "fru")


def make_iemocap_tree(
    root: Path,
    sessions: Sequence[int] = (1, 2, 3, 4, 5),
    dialogues_per_session: int = 1,
    utterances_per_dialogue: int = 4,
    include_excluded_labels: bool = True,
    seed: int = 0,
    fps: int = 12,
    size: tuple[int, int] = (320, 180),
    faces: int = 1,
) -> Path:
    """Write a miniature IEMOCAP_full_release under ``root`` and return ``root``.

    Dialogue k of session s is ``Ses0sF_impro0{k+1}`` when s + k is odd, else ``Ses0sM_script0{k+1}_1``;
    impro dialogues start with speaker F, script ones with M. Labels cycle through neu hap sad ang exc
    fru across the tree; with ``include_excluded_labels`` the third utterance of every dialogue is
    ``xxx`` and, in sessions 1 and 5, the fourth is ``sur``. Speakers go first, other, first, first,
    other, ... Each dialogue gets an .avi with its audio showing ``faces`` faces (the real videos show
    both actors; one keeps face-encoder tests cheap), a dialogue wav, per-sentence 16 kHz wavs, a
    transcription with two non-utterance lines, an EmoEvaluation file (summary lines grouped by
    speaker, not by time, plus annotator lines) and decoy per-annotator files in its Categorical/ and
    Attribute/ sub-folders.
    """
    root = Path(root)
    cycle = 0
    for session in sessions:
        session_dir = root / f"Session{session}"
        dialog = session_dir / "dialog"
        for k in range(dialogues_per_session):
            impro = (session + k) % 2 == 1
            name = f"Ses{session:02d}F_impro{k + 1:02d}" if impro else f"Ses{session:02d}M_script{k + 1:02d}_1"
            first, other = ("F", "M") if impro else ("M", "F")
            rng = np.random.default_rng([seed, session, k])
            turns, time, counts = [], 0.8, {"F": 0, "M": 0}
            for i in range(utterances_per_dialogue):
                speaker = other if i % 3 == 1 else first
                if include_excluded_labels and i == 2:
                    code = "xxx"
                elif include_excluded_labels and i == 3 and session % 4 == 1:
                    code = "sur"
                else:
                    code, cycle = _IEMOCAP_CYCLE[cycle % len(_IEMOCAP_CYCLE)], cycle + 1
                duration = round(float(rng.uniform(0.9, 1.4)), 4)
                utterance_id = f"{name}_{speaker}{counts[speaker]:03d}"
                counts[speaker] += 1
                text = _LINES[code][i % len(_LINES[code])]
                turns.append((utterance_id, speaker, round(time, 4), round(time + duration, 4), code, text))
                time += duration + float(rng.uniform(0.2, 0.5))
            total = time + 0.4
            dialogue_audio = np.zeros(round(total * 16000), np.float32)
            for utterance_id, speaker, start, end, code, _ in turns:
                pitch_scale = 1.3 if speaker == "F" else 1.0
                signal = emotion_signal(code, end - start, 16000, int(rng.integers(1 << 31)), pitch_scale)
                write_wav(session_dir / "sentences" / "wav" / name / f"{utterance_id}.wav", signal, 16000)
                offset = round(start * 16000)
                dialogue_audio[offset:offset + len(signal)] += signal
            write_wav(dialog / "wav" / f"{name}.wav", dialogue_audio, 16000)
            write_face_video(dialog / "avi" / "DivX" / f"{name}.avi", total, fps, size, int(rng.integers(1 << 31)),
                             dialogue_audio, 16000, faces)
            _write_iemocap_text(dialog, name, turns, first)
    return root


def _write_iemocap_text(dialog: Path, name: str, turns: list[tuple], first: str) -> None:
    transcript = []
    for i, (utterance_id, _, start, end, _, text) in enumerate(turns):
        transcript.append(f"{utterance_id} [{start:08.4f}-{end:08.4f}]: {text}")
        if i == 0:
            transcript.append(f"{name}_{first}XX0 [{end:08.4f}-{end + 0.2:08.4f}]: [LAUGHTER]")
    transcript.append(f"{first}: [BREATHING]")
    (dialog / "transcriptions").mkdir(parents=True, exist_ok=True)
    (dialog / "transcriptions" / f"{name}.txt").write_text("\n".join(transcript) + "\n", encoding="utf-8")

    labels = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
    for utterance_id, _, start, end, code, _ in sorted(turns, key=lambda turn: turn[0]):  # by speaker
        labels += [
            f"[{start:.4f} - {end:.4f}]\t{utterance_id}\t{code}\t[2.5000, 3.0000, 2.5000]",
            "C-E1:\tNeutral state;\t()",
            "C-E2:\tFrustration; Anger;\t(annoyed)",
            "A-E1:\tval 3; act 2; dom  3;\t()",
            "",
        ]
    evaluation = dialog / "EmoEvaluation"
    for folder in ("Categorical", "Attribute", "Self-evaluation"):
        (evaluation / folder).mkdir(parents=True, exist_ok=True)
    (evaluation / f"{name}.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    decoy = "\n".join(f"{turn[0]} :Neutral state; ()" for turn in turns) + "\n"
    (evaluation / "Categorical" / f"{name}_e1_cat.txt").write_text(decoy, encoding="utf-8")
    (evaluation / "Attribute" / f"{name}_e1_atr.txt").write_text(decoy, encoding="utf-8")


def _meld_seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def make_meld_tree(
    root: Path,
    csv_dir: Path,
    dialogues_per_split: int = 2,
    max_utterances: int = 5,
    missing: Sequence[str] = (),
    seed: int = 0,
    fps: int = 12,
    size: tuple[int, int] = (320, 180),
) -> Path:
    """Write a miniature MELD.Raw under ``root`` from the real CSVs in ``csv_dir``; return ``root``.

    Keeps the first ``dialogues_per_split`` dialogues of each CSV and their first ``max_utterances``
    rows, verbatim. Every kept row gets a ~1 s mp4 with 48 kHz stereo AAC (odd utterance numbers show
    two faces at a larger frame size), except the ids listed in ``missing`` (``"train/dia1_utt2"``);
    the last test file is named ``final_videos_testdia{D}_utt{U}.mp4`` as in the real release.
    """
    root, csv_dir = Path(root), Path(csv_dir)
    root.mkdir(parents=True, exist_ok=True)
    missing = set(missing)
    for split, (csv_name, video_dir) in MELD_SPLITS.items():
        with (csv_dir / csv_name).open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fieldnames, rows, dialogues = reader.fieldnames, [], []
            for row in reader:
                if row["Dialogue_ID"] not in dialogues:
                    if len(dialogues) == dialogues_per_split:
                        break
                    dialogues.append(row["Dialogue_ID"])
                if sum(r["Dialogue_ID"] == row["Dialogue_ID"] for r in rows) < max_utterances:
                    rows.append(row)
        with (root / csv_name).open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        for i, row in enumerate(rows):
            dialogue, number = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            if f"{split}/dia{dialogue}_utt{number}" in missing:
                continue
            prefix = MELD_ALT_TEST_PREFIX if split == "test" and i == len(rows) - 1 else ""
            span = _meld_seconds(row["EndTime"]) - _meld_seconds(row["StartTime"])
            duration = float(np.clip(span, 0.6, 1.2))
            voice = emotion_signal(row["Emotion"], duration, 48000, seed + 7919 * i + dialogue)
            stereo = np.stack([voice, 0.8 * voice], axis=1)
            two_faces = number % 2 == 1
            frame_size = (size[0] + 64, size[1] + 36) if two_faces else size
            write_face_video(root / video_dir / f"{prefix}dia{dialogue}_utt{number}.mp4", duration, fps, frame_size,
                             seed + i, stereo, 48000, faces=2 if two_faces else 1)
    return root


_MANIFEST_FIELDS = ["dialogue_id", "utterance_index", "speaker", "text", "label", "split", "video", "audio",
                    "start", "end"]


_MANIFEST_SCRIPT = [  # dialogue, split, turns (speaker, text, label)
    ("chat", "train", [("Ann", "Hi, did you get my message?", "neutral"), ("Ben", "Yes! And it made my day!", "happy"),
                       ("Ann", "Why didn't you answer then?!", "angry"), ("Ben", "My phone died. I'm sorry.", "sad")]),
    ("call", "train", [("Gus", "Hello, is this the bakery?", "neutral"), ("Hal", "It is! Best bread in town!", "happy"),
                       ("Gus", "You sold me stale bread yesterday!", "angry")]),
    ("visit", "dev", [("Cat", "The doctor will see you now.", "neutral"), ("Dan", "Finally! Great!", "happy"),
                      ("Cat", "He says the results are not good.", "sad"), ("Dan", "That's absurd!", "angry")]),
    ("trip", "test", [("Eve", "The train leaves at six.", "neutral"),
                      ("Fay", "We missed it again! Unbelievable!", "angry"),
                      ("Eve", "Let's just get breakfast. I love this café!", "happy")]),
]


def make_manifest_corpus(root: Path, seed: int = 0, fps: int = 12, size: tuple[int, int] = (320, 180)) -> Path:
    """Write a small manifest corpus under ``root``; return the path of ``root/manifest.csv``.

    ``chat`` (train): one mp4 with AAC audio per utterance, no audio column. ``call`` (train): one long
    silent video and one long wav for the dialogue, cut by start/end. ``visit`` (dev): silent mp4 plus a
    wav, then one audio-only utterance and one without media. ``trip`` (test): mp4 per utterance,
    utterance_index 10, 12, 14. Labels: angry, happy, neutral, sad; every clip lasts 1 s.
    """
    root = Path(root)
    media = root / "media"
    rows = []
    for dialogue, split, turns in _MANIFEST_SCRIPT:
        voices = [emotion_signal(label, 1.0, 16000, seed + len(rows) + i) for i, (_, _, label) in enumerate(turns)]
        for i, ((speaker, text, label), voice) in enumerate(zip(turns, voices)):
            name = f"{dialogue}_{i}"
            row = {"dialogue_id": dialogue, "utterance_index": 10 + 2 * i if dialogue == "trip" else i,
                   "speaker": speaker, "text": text, "label": label, "split": split}
            if dialogue == "call":
                start = round(0.3 + 1.3 * i, 3)
                row |= {"video": "media/call.mp4", "audio": "media/call.wav",
                        "start": start, "end": round(start + 1.0, 3)}
            elif dialogue == "visit" and i < 3:
                if i < 2:
                    write_face_video(media / f"{name}.mp4", 1.0, fps, size, seed + len(rows))
                    row["video"] = f"media/{name}.mp4"
                write_wav(media / f"{name}.wav", voice, 16000)
                row["audio"] = f"media/{name}.wav"
            elif dialogue != "visit":
                write_face_video(media / f"{name}.mp4", 1.0, fps, size, seed + len(rows), voice, 16000)
                row["video"] = f"media/{name}.mp4"
            rows.append(row)
        if dialogue == "call":
            duration = 0.3 + 1.3 * len(turns)
            long_audio = np.zeros(round(duration * 16000), np.float32)
            for i, voice in enumerate(voices):
                offset = round((0.3 + 1.3 * i) * 16000)
                long_audio[offset:offset + len(voice)] = voice
            write_face_video(media / "call.mp4", duration, fps, size, seed + len(rows))
            write_wav(media / "call.wav", long_audio, 16000)
    return _write_manifest(root / "manifest.csv", rows)


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_demo_corpus(root: Path, seed: int = 0, fps: int = 12, size: tuple[int, int] = (320, 180)) -> Path:
    """Write the ``erc demo`` corpus (10 train, 3 dev, 3 test dialogues) under ``root``; return its manifest.

    Lines and labels (angry, happy, neutral, sad) come from ``erc/demo_data/demo_dialogues.csv``; each
    utterance gets an mp4 (1-2 s, one face, 16 kHz AAC) whose voice pitch and loudness follow its label.
    """
    root = Path(root)
    with DEMO_DIALOGUES.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    speakers = sorted({row["speaker"] for row in rows})
    for i, row in enumerate(rows):
        name = f"{row['dialogue_id']}_{row['utterance_index']}"
        duration = min(2.0, 1.0 + 0.05 * len(row["text"].split()))
        pitch_scale = 0.85 + 0.1 * (speakers.index(row["speaker"]) % 4)
        voice = emotion_signal(row["label"], duration, 16000, seed + i, pitch_scale)
        write_face_video(root / "media" / f"{name}.mp4", duration, fps, size, seed + i, voice, 16000)
        row["video"] = f"media/{name}.mp4"
    return _write_manifest(root / "manifest.csv", rows)
