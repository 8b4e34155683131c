"""The uniform in-memory description of a conversation corpus.

Every reader (IEMOCAP, MELD, manifest, demo) produces a :class:`Corpus`: dialogues, each an ordered
list of :class:`Utterance` records carrying split, speaker name and per-dialogue speaker index, text,
label, media paths and time span. Extraction, fine-tuning and prediction only ever see this.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from erc.errors import ConfigError, CorpusEncodingError, CorpusError, ErcWarning

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Utterance:
    """One utterance of a dialogue.

    ``utterance_id`` is unique across the corpus. ``label`` is ``None`` only for unlabeled data
    (prediction). ``video``/``audio`` are ``None`` when the corpus has no such media for this
    utterance; ``start``/``end`` (seconds) cut the utterance out of the longer ``video`` file and
    ``audio_start``/``audio_end`` out of the ``audio`` file, ``None`` meaning the whole file (IEMOCAP:
    the video span is set, the audio is the whole per-sentence wav).
    """

    utterance_id: str
    dialogue_id: str
    index: int
    split: str
    speaker: str
    speaker_index: int
    text: str
    label: str | None
    video: Path | None = None
    audio: Path | None = None
    start: float | None = None
    end: float | None = None
    audio_start: float | None = None
    audio_end: float | None = None


@dataclass
class Dialogue:
    """An ordered conversation; all its utterances share one split."""

    dialogue_id: str
    split: str
    utterances: list[Utterance] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.utterances)


@dataclass
class Corpus:
    """A whole corpus: its name, the label names in a stable order, and its dialogues.

    ``excluded`` counts the utterances a reader dropped because their raw label is outside the
    label set (e.g. IEMOCAP ``xxx``), keyed by that raw label.
    """

    name: str
    label_names: list[str]
    dialogues: list[Dialogue]
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def num_utterances(self) -> int:
        return sum(len(d) for d in self.dialogues)

    def split(self, name: str) -> list[Dialogue]:
        return [d for d in self.dialogues if d.split == name]


def speaker_indices(speakers: list[str]) -> list[int]:
    """Per-dialogue speaker index: 0 for the first speaker to talk, 1 for the next new one, ..."""
    order: dict[str, int] = {}
    return [order.setdefault(s, len(order)) for s in speakers]


# --------------------------------------------------------------------------------------------------
# Readers. Every reader returns utterances in dialogue order with ``index`` = 0-based position in the
# dialogue, and never checks that media files exist: extraction reports missing media per utterance.
# --------------------------------------------------------------------------------------------------

IEMOCAP_LABEL_SETS: dict[str, dict[str, str]] = {
    # raw code -> label name; label_names keep this order (the ERC literature's class order).
    "6class": {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited",
               "fru": "frustrated"},
    "4class": {"hap": "happy", "exc": "happy", "sad": "sad", "neu": "neutral", "ang": "angry"},
}
IEMOCAP_CODES = frozenset({"neu", "hap", "sad", "ang", "exc", "fru", "xxx", "oth", "sur", "fea", "dis"})
IEMOCAP_TEST_SESSION = 5

_SESSION_DIR = re.compile(r"Session(\d+)")
_TRANSCRIPT_LINE = re.compile(r"(\S+)\s+\[([^\]]*)\]:?\s*(.*)")
_TIME_SPAN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*")
_LABEL_LINE = re.compile(r"\[\s*([^\]\s]+)\s+-\s+([^\]\s]+)\s*\]\s+(\S+)\s+(\S+)\s+\[[^\]]*\]\s*")
_SPEAKER_PART = re.compile(r"([FM])\d+")


def read_iemocap(root: Path, label_set: str = "6class") -> Corpus:
    """Read IEMOCAP_full_release: Sessions 1-4 are ``train``, Session 5 is ``test``.

    ``label_set`` is ``"6class"`` (happy, sad, neutral, angry, excited, frustrated) or ``"4class"``
    (happy with excited merged in, sad, neutral, angry). Utterances whose label is outside the set
    (xxx, oth, sur, fea, dis; fru too for 4class) are dropped and counted in ``Corpus.excluded``.
    ``video`` is the dialogue .avi cut to ``[start, end]``; ``audio`` is the whole sentence wav.
    """
    if label_set not in IEMOCAP_LABEL_SETS:
        raise ConfigError(f"unknown IEMOCAP label set {label_set!r}; use one of {sorted(IEMOCAP_LABEL_SETS)}")
    label_map = IEMOCAP_LABEL_SETS[label_set]
    root = Path(root)
    sessions = []
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir() and (m := _SESSION_DIR.fullmatch(folder.name)):
                sessions.append((int(m.group(1)), folder))
    if not sessions:
        raise CorpusError(f"{root}: no Session1..Session5 folders (expected the IEMOCAP_full_release folder)")
    dialogues: list[Dialogue] = []
    excluded: Counter[str] = Counter()
    for number, session in sorted(sessions):
        split = "test" if number == IEMOCAP_TEST_SESSION else "train"
        label_files = _dialogue_files(session / "dialog" / "EmoEvaluation")
        transcript_files = _dialogue_files(session / "dialog" / "transcriptions")
        if unmatched := sorted(label_files.keys() - transcript_files.keys()):
            raise CorpusError(f"{label_files[unmatched[0]]}: no transcription file {unmatched[0]}.txt beside it")
        if unmatched := sorted(transcript_files.keys() - label_files.keys()):
            raise CorpusError(f"{transcript_files[unmatched[0]]}: no EmoEvaluation file {unmatched[0]}.txt beside it")
        for name in sorted(label_files):
            dialogue = _read_iemocap_dialogue(
                session, name, split, label_files[name], transcript_files[name], label_map, excluded
            )
            if dialogue.utterances:
                dialogues.append(dialogue)
    return Corpus("iemocap", list(dict.fromkeys(label_map.values())), dialogues, dict(sorted(excluded.items())))


def _dialogue_files(folder: Path) -> dict[str, Path]:
    """The top-level ``*.txt`` files of an IEMOCAP folder by dialogue name (sub-folders ignored)."""
    if not folder.is_dir():
        raise CorpusError(f"{folder}: missing folder")
    return {p.stem: p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith(".")}


def _read_iemocap_labels(path: Path, dialogue: str) -> dict[str, tuple[float, float, str, int]]:
    """EmoEvaluation summary lines -> {utterance id: (start, end, code, line number)}."""
    labels: dict[str, tuple[float, float, str, int]] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.startswith("["):
            continue  # header, annotator and blank lines
        m = _LABEL_LINE.fullmatch(line)
        if m is None:
            raise CorpusError(f"{path}: line {line_no}: malformed label line {line.strip()!r}")
        start, end = _parse_span(path, line_no, m.group(1), m.group(2))
        utterance_id, code = m.group(3), m.group(4)
        _check_iemocap_id(path, line_no, utterance_id, dialogue)
        if code not in IEMOCAP_CODES:
            raise CorpusError(f"{path}: line {line_no}: unknown emotion code {code!r} for {utterance_id}")
        if utterance_id in labels:
            raise CorpusError(f"{path}: line {line_no}: {utterance_id} labelled twice")
        labels[utterance_id] = (start, end, code, line_no)
    return labels


def _read_iemocap_transcripts(path: Path, dialogue: str) -> dict[str, str]:
    """Transcription lines -> {utterance id: text}; lines that are not utterances are skipped."""
    texts: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        m = _TRANSCRIPT_LINE.fullmatch(line.strip())
        if m is None or _SPEAKER_PART.fullmatch(m.group(1).rsplit("_", 1)[-1]) is None:
            continue  # no bracketed time, or an id such as ..._MXX0
        utterance_id = m.group(1)
        _check_iemocap_id(path, line_no, utterance_id, dialogue)
        if _TIME_SPAN.fullmatch(m.group(2)) is None:
            raise CorpusError(f"{path}: line {line_no}: malformed time span [{m.group(2)}] for {utterance_id}")
        if utterance_id in texts:
            raise CorpusError(f"{path}: line {line_no}: {utterance_id} transcribed twice")
        texts[utterance_id] = m.group(3).strip()
    return texts


def _check_iemocap_id(path: Path, line_no: int, utterance_id: str, dialogue: str) -> None:
    prefix, _, part = utterance_id.rpartition("_")
    if prefix != dialogue or _SPEAKER_PART.fullmatch(part) is None:
        raise CorpusError(f"{path}: line {line_no}: utterance id {utterance_id!r} is not {dialogue}_F000-style")


def _parse_span(path: Path, line_no: int, start_text: str, end_text: str) -> tuple[float, float]:
    try:
        start, end = float(start_text), float(end_text)
    except ValueError:
        raise CorpusError(f"{path}: line {line_no}: malformed time span {start_text} - {end_text}") from None
    if not 0 <= start < end:
        raise CorpusError(f"{path}: line {line_no}: time span {start_text} - {end_text} is empty or negative")
    return start, end


def _read_iemocap_dialogue(
    session: Path,
    name: str,
    split: str,
    label_path: Path,
    transcript_path: Path,
    label_map: dict[str, str],
    excluded: Counter[str],
) -> Dialogue:
    labels = _read_iemocap_labels(label_path, name)
    texts = _read_iemocap_transcripts(transcript_path, name)
    if unmatched := sorted(labels.keys() - texts.keys()):
        raise CorpusError(f"{unmatched[0]}: labelled in {label_path} but missing from {transcript_path}")
    if unmatched := sorted(texts.keys() - labels.keys()):
        raise CorpusError(f"{unmatched[0]}: transcribed in {transcript_path} but not labelled in {label_path}")
    kept = []
    for utterance_id, (start, end, code, _) in sorted(labels.items(), key=lambda item: (item[1][0], item[0])):
        if code in label_map:
            kept.append((utterance_id, start, end, label_map[code]))
        else:
            excluded[code] += 1
    speakers = [utterance_id.rsplit("_", 1)[1][0] for utterance_id, *_ in kept]  # _F000 -> F
    speaker_index = speaker_indices(speakers)
    video = session / "dialog" / "avi" / "DivX" / f"{name}.avi"
    utterances = [
        Utterance(
            utterance_id=utterance_id,
            dialogue_id=name,
            index=index,
            split=split,
            speaker=speakers[index],
            speaker_index=speaker_index[index],
            text=texts[utterance_id],
            label=label,
            video=video,
            audio=session / "sentences" / "wav" / name / f"{utterance_id}.wav",
            start=start,
            end=end,
        )
        for index, (utterance_id, start, end, label) in enumerate(kept)
    ]
    return Dialogue(name, split, utterances)


MELD_LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
MELD_SPLITS = {  # split -> (csv file, video folder)
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
MELD_ALT_TEST_PREFIX = "final_videos_test"
MELD_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
_CP1252_C1 = {c: bytes([c]).decode("cp1252", errors="ignore") for c in range(0x80, 0xA0)}


def clean_meld_text(text: str) -> str:
    """Undo the encoding accidents found in copies of the MELD CSVs; keep real typography.

    Text that was UTF-8 read as cp1252 (``â€™``) is decoded back; stray C1 control characters
    (``\\x92`` = a cp1252 apostrophe read as Latin-1) become their cp1252 characters (``’``);
    runs of whitespace (double spaces, no-break spaces) become one space. Curly quotes, dashes and
    ellipses are kept as they are.
    """
    if "â€" in text or "Ã" in text or "Â" in text:
        try:
            text = text.encode("cp1252").decode("utf-8")
        except UnicodeError:
            pass
    return " ".join(text.translate(_CP1252_C1).split())


def read_meld(root: Path) -> Corpus:
    """Read MELD.Raw: the three ``*_sent_emo.csv`` files and the per-utterance mp4 files.

    Dialogue ids are ``{split}/dia{D}`` and utterance ids ``{split}/dia{D}_utt{U}``. The mp4 is the
    whole utterance and also its audio (``audio == video``); a test mp4 named
    ``final_videos_testdia{D}_utt{U}.mp4`` is used when the plain name is absent. The CSVs are read as
    UTF-8, or as Windows-1252 when they are not valid UTF-8; text is cleaned with :func:`clean_meld_text`.
    """
    root = Path(root)
    dialogues: list[Dialogue] = []
    for split, (csv_name, video_dir) in MELD_SPLITS.items():
        rows = _read_meld_csv(root / csv_name)
        for dialogue_number in sorted(rows):
            turns = sorted(rows[dialogue_number].items())
            dialogue_id = f"{split}/dia{dialogue_number}"
            utterances = []
            speaker_index = speaker_indices([speaker for _, (_, speaker, _) in turns])
            for index, (number, (text, speaker, label)) in enumerate(turns):
                video = _meld_video(root / video_dir, dialogue_number, number)
                utterances.append(
                    Utterance(
                        utterance_id=f"{dialogue_id}_utt{number}",
                        dialogue_id=dialogue_id,
                        index=index,
                        split=split,
                        speaker=speaker,
                        speaker_index=speaker_index[index],
                        text=text,
                        label=label,
                        video=video,
                        audio=video,
                    )
                )
            dialogues.append(Dialogue(dialogue_id, split, utterances))
    return Corpus("meld", list(MELD_LABELS), dialogues)


def _read_meld_csv(path: Path) -> dict[int, dict[int, tuple[str, str, str]]]:
    """One MELD CSV -> {Dialogue_ID: {Utterance_ID: (text, speaker, emotion)}}."""
    if not path.is_file():
        raise CorpusError(f"{path}: missing MELD CSV (expected MELD.Raw with train/dev/test_sent_emo.csv)")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # a copy re-saved as Windows-1252
        content = raw.decode("cp1252", errors="replace")
    rows: dict[int, dict[int, tuple[str, str, str]]] = {}
    reader = csv.DictReader(io.StringIO(content, newline=""))
    missing = [c for c in MELD_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise CorpusError(f"{path}: missing column(s) {', '.join(missing)}")
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        emotion = (row["Emotion"] or "").strip().lower()
        if emotion not in MELD_LABELS:
            raise CorpusError(f"{where}: unknown emotion {row['Emotion']!r}")
        try:
            dialogue, number = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except (TypeError, ValueError):
            raise CorpusError(f"{where}: non-integer Dialogue_ID/Utterance_ID") from None
        turns = rows.setdefault(dialogue, {})
        if number in turns:
            raise CorpusError(f"{where}: duplicate dia{dialogue}_utt{number}")
        turns[number] = (clean_meld_text(row["Utterance"] or ""), clean_meld_text(row["Speaker"] or ""), emotion)
    return rows


def _meld_video(folder: Path, dialogue: int, number: int) -> Path:
    path = folder / f"dia{dialogue}_utt{number}.mp4"
    alternative = folder / f"{MELD_ALT_TEST_PREFIX}dia{dialogue}_utt{number}.mp4"
    return alternative if not path.exists() and alternative.exists() else path


MANIFEST_COLUMNS = ("dialogue_id", "utterance_index", "speaker", "text")
MANIFEST_LABELLED_COLUMNS = ("label", "split")


def read_utf8_text(path: Path, what: str = "manifest") -> str:
    """The text of a UTF-8 file (a leading BOM is dropped). Bytes that are not UTF-8 raise
    :class:`CorpusEncodingError` naming the line, column and byte, never a raw UnicodeDecodeError."""
    raw = Path(path).read_bytes()
    offset = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[offset:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
        line = raw.count(b"\n", 0, at) + 1
        column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
        raise CorpusEncodingError(
            f"{path}: line {line}: byte 0x{raw[at]:02x} at column {column} is not UTF-8; save the {what} as UTF-8 "
            f"(e.g. `iconv -f cp1252 -t utf-8`)"
        ) from None


def read_manifest(path: Path, allow_unlabeled: bool = False, labels: Sequence[str] | None = None) -> Corpus:
    """Read erc's manifest CSV (see FORMATS.md); media paths are relative to the manifest's folder.

    ``label_names`` are the labels found, sorted, or ``labels`` when given: that vocabulary, in that
    order, each manifest label matched to it ignoring case (a label outside it is an error naming the
    line). Without ``labels``, labels that differ only in case ("Joy"/"joy") are an error naming their
    lines rather than two classes. A class without any training utterance gives an
    :class:`~erc.errors.ErcWarning`. The file must be UTF-8 (:func:`read_utf8_text`). With
    ``allow_unlabeled`` (prediction) the ``label`` and ``split`` columns may be absent or empty: label
    ``None``, split ``test``. Without an ``audio`` path the utterance's audio is the video's track
    (``audio == video``); ``start``/``end`` cut both.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: manifest not found")
    vocabulary = _label_vocabulary(labels)
    required = MANIFEST_COLUMNS + (() if allow_unlabeled else MANIFEST_LABELLED_COLUMNS)
    turns: dict[str, list[tuple[int, Utterance]]] = {}
    dialogue_lines: dict[str, tuple[str, int]] = {}
    label_lines: dict[str, list[int]] = {}
    train_labels: Counter[str] = Counter()
    with io.StringIO(read_utf8_text(path), newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in required if c not in reader.fieldnames]
        if missing:
            raise CorpusError(f"{path}: missing required column(s) {', '.join(missing)}")
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            value = {k: (v or "").strip() for k, v in row.items() if k is not None}
            dialogue_id, speaker = value["dialogue_id"], value["speaker"]
            if not dialogue_id or not speaker:
                raise CorpusError(f"{where}: empty dialogue_id or speaker")
            try:
                order = int(value["utterance_index"])
            except ValueError:
                raise CorpusError(f"{where}: utterance_index {value['utterance_index']!r} is not an integer") from None
            split = value.get("split", "") or ("test" if allow_unlabeled else "")
            if split not in SPLITS:
                raise CorpusError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            label = value.get("label", "") or None
            if label is None and not allow_unlabeled:
                raise CorpusError(f"{where}: empty label")
            if label is not None and vocabulary is not None:
                if label.casefold() not in vocabulary:
                    raise CorpusError(f"{where}: label {label!r} is not one of --labels {','.join(vocabulary.values())}")
                label = vocabulary[label.casefold()]
            if label is not None:
                label_lines.setdefault(label, []).append(reader.line_num)
                if split == "train":
                    train_labels[label] += 1
            first_split, first_line = dialogue_lines.setdefault(dialogue_id, (split, reader.line_num))
            if split != first_split:
                raise CorpusError(
                    f"{where}: dialogue {dialogue_id!r} is in split {split} here but {first_split} on line {first_line}"
                )
            if any(order == seen for seen, _ in turns.get(dialogue_id, [])):
                raise CorpusError(f"{where}: duplicate utterance_index {order} in dialogue {dialogue_id!r}")
            start, end = _manifest_time(where, value, "start"), _manifest_time(where, value, "end")
            if start is not None and end is not None and end <= start:
                raise CorpusError(f"{where}: end {end} is not after start {start}")
            video = _manifest_media(path, value.get("video", ""))
            audio = _manifest_media(path, value.get("audio", "")) or video
            utterance = Utterance(
                utterance_id=f"{dialogue_id}_{order}",
                dialogue_id=dialogue_id,
                index=-1,
                split=split,
                speaker=speaker,
                speaker_index=-1,
                text=value["text"],
                label=label,
                video=video,
                audio=audio,
                start=start if video else None,
                end=end if video else None,
                audio_start=start if audio else None,
                audio_end=end if audio else None,
            )
            turns.setdefault(dialogue_id, []).append((order, utterance))
    if not turns:
        raise CorpusError(f"{path}: manifest has no rows")
    dialogues = []
    for dialogue_id, rows in turns.items():
        ordered = [u for _, u in sorted(rows, key=lambda item: item[0])]
        indices = speaker_indices([u.speaker for u in ordered])
        utterances = [replace(u, index=i, speaker_index=s) for i, (u, s) in enumerate(zip(ordered, indices))]
        dialogues.append(Dialogue(dialogue_id, utterances[0].split, utterances))
    if vocabulary is not None:
        label_names = list(vocabulary.values())
    else:
        label_names = sorted(label_lines)
        if not allow_unlabeled:
            _check_label_case(path, label_lines)
    if not allow_unlabeled:
        untrained = [name for name in label_names if not train_labels[name]]
        if untrained:
            where = "; ".join(f"{name!r}: " + (f"lines {_lines(label_lines[name])}" if name in label_lines else "no row")
                              for name in untrained)
            warnings.warn(f"{path}: class(es) with no training example, the model cannot learn them: {where}",
                          ErcWarning, stacklevel=2)
    return Corpus("manifest", label_names, dialogues)


def _label_vocabulary(labels: Sequence[str] | None) -> dict[str, str] | None:
    """``--labels``: casefolded name -> name, in the given order; None when not given."""
    if labels is None:
        return None
    names = [str(name).strip() for name in labels]
    if not names or any(not name for name in names):
        raise ConfigError(f"--labels needs a comma-separated list of class names, got {','.join(names)!r}")
    vocabulary: dict[str, str] = {}
    for name in names:
        if name.casefold() in vocabulary:
            raise ConfigError(f"--labels names {vocabulary[name.casefold()]!r} and {name!r}: the same class twice")
        vocabulary[name.casefold()] = name
    return vocabulary


def _lines(numbers: list[int], shown: int = 3) -> str:
    return ", ".join(map(str, numbers[:shown])) + (f" (+{len(numbers) - shown} more)" if len(numbers) > shown else "")


def _check_label_case(path: Path, label_lines: dict[str, list[int]]) -> None:
    """Refuse labels that differ only in case: they would silently become separate classes."""
    by_fold: dict[str, list[str]] = {}
    for name in label_lines:
        by_fold.setdefault(name.casefold(), []).append(name)
    clashes = [names for names in by_fold.values() if len(names) > 1]
    if clashes:
        described = " and ".join(f"{name!r} (line {_lines(label_lines[name])})" for name in clashes[0])
        raise CorpusError(
            f"{path}: labels differing only in case would become separate classes: {described}; make them "
            "identical, or pass --labels to fix the class names and their order"
        )


def _manifest_time(where: str, value: dict[str, str], column: str) -> float | None:
    text = value.get(column, "")
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise CorpusError(f"{where}: {column} {text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise CorpusError(f"{where}: {column} {text!r} must be a non-negative number of seconds")
    return seconds


def _manifest_media(manifest: Path, text: str) -> Path | None:
    return (manifest.parent / text) if text else None


DATASETS = ("iemocap", "meld", "manifest")


def load_corpus(
    dataset: str,
    root: Path,
    manifest: Path | None = None,
    label_set: str = "6class",
    allow_unlabeled: bool = False,
    labels: Sequence[str] | None = None,
) -> Corpus:
    """Read ``dataset`` (iemocap | meld | manifest) from ``root``.

    ``label_set`` applies to IEMOCAP, ``allow_unlabeled`` and ``labels`` (a fixed class vocabulary,
    see :func:`read_manifest`) to manifests; ``labels`` with another dataset is a ConfigError.
    For ``manifest`` the CSV is ``manifest`` if given, else ``root`` itself when it is a file, else
    ``root/manifest.csv``.
    """
    root = Path(root)
    if labels is not None and dataset != "manifest":
        raise ConfigError("--labels applies to manifest corpora (IEMOCAP's classes come from --label-set, MELD's are fixed)")
    if dataset == "iemocap":
        return read_iemocap(root, label_set)
    if dataset == "meld":
        return read_meld(root)
    if dataset == "manifest":
        csv_path = Path(manifest) if manifest is not None else root if root.is_file() else root / "manifest.csv"
        return read_manifest(csv_path, allow_unlabeled, labels)
    raise ConfigError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def limit_dialogues(corpus: Corpus, n: int) -> Corpus:
    """The first ``n`` dialogues of each split, in corpus order (``--limit N``); ``excluded`` is kept as is."""
    if n < 1:
        raise ConfigError(f"--limit must be at least 1, got {n}")
    taken: Counter[str] = Counter()
    kept = []
    for dialogue in corpus.dialogues:
        if taken[dialogue.split] < n:
            taken[dialogue.split] += 1
            kept.append(dialogue)
    return Corpus(corpus.name, list(corpus.label_names), kept, dict(corpus.excluded))
