"""The uniform in-memory description of a conversation corpus.

Every reader (IEMOCAP, MELD, manifest, demo) produces a :class:`Corpus`: dialogues, each an ordered
list of :class:`Utterance` records carrying split, speaker name and per-dialogue speaker index, text,
label, media paths and time span. Extraction, fine-tuning and prediction only ever see this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Utterance:
    """One utterance of a dialogue.

    ``utterance_id`` is unique across the corpus. ``label`` is ``None`` only for unlabeled data
    (prediction). ``video``/``audio`` are ``None`` when the corpus has no such media for this
    utterance; ``start``/``end`` (seconds) cut the utterance out of a longer media file, ``None``
    meaning the whole file.
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
    """A whole corpus: its name, the label names in a stable order, and its dialogues."""

    name: str
    label_names: list[str]
    dialogues: list[Dialogue]

    @property
    def num_utterances(self) -> int:
        return sum(len(d) for d in self.dialogues)

    def split(self, name: str) -> list[Dialogue]:
        return [d for d in self.dialogues if d.split == name]


def speaker_indices(speakers: list[str]) -> list[int]:
    """Per-dialogue speaker index: 0 for the first speaker to talk, 1 for the next new one, ..."""
    order: dict[str, int] = {}
    return [order.setdefault(s, len(order)) for s in speakers]
