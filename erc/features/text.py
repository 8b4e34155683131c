"""Utterance text in its dialogue context → first-token state of a pretrained encoder (MultiEMO §3.3.1).

Following Kim and Vossen (2021), utterance *i* is written ``"Speaker: text"`` and fed together with its
context as three segments — preceding utterances, the utterance itself, following utterances — joined
the way the tokenizer joins a sentence pair: ``[CLS] past [SEP] current [SEP] future [SEP]`` for BERT,
``<s> past </s></s> current </s></s> future </s>`` for RoBERTa. When the input is too long, context is
cut at its far ends (earliest past tokens, latest future tokens) and the current utterance is kept whole.
The last layer's first-token state is the utterance's vector. The same inputs serve fine-tuning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from erc.errors import ConfigError
from erc.provenance import sha256_file

WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class SegmentTemplate:
    """Special-token ids a tokenizer puts around one segment and around / between a pair of segments."""

    single_prefix: tuple[int, ...]
    single_suffix: tuple[int, ...]
    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]


def _special_runs(tokenizer: PreTrainedTokenizerBase, *texts: str) -> list[tuple[int, ...]]:
    """Ids of the special-token runs before, between and after the content of ``texts``."""
    encoding = tokenizer(*texts, return_special_tokens_mask=True)
    tokens = zip(encoding["input_ids"], encoding["special_tokens_mask"])
    runs: list[tuple[int, ...]] = [()]
    for special, group in groupby(tokens, key=lambda token: token[1]):
        if special:
            runs[-1] = tuple(token_id for token_id, _ in group)
        else:
            runs.append(())
    return runs


def segment_template(tokenizer: PreTrainedTokenizerBase) -> SegmentTemplate:
    """Read the tokenizer's own single / pair templates; fall back to CLS/BOS + SEP/EOS if it has none."""
    single, pair = _special_runs(tokenizer, "a"), _special_runs(tokenizer, "a", "b")
    if len(pair) == 3 and pair[1]:
        return SegmentTemplate(single[0], single[-1], pair[0], pair[1], pair[2])
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or separator is None:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has neither a pair template nor CLS/BOS and SEP/EOS")
    return SegmentTemplate((start,), (separator,), (start,), (separator,), (separator,))


def tokenize_utterances(
    tokenizer: PreTrainedTokenizerBase, speakers: list[str], texts: list[str]
) -> list[list[int]]:
    """Token ids (no special tokens) of each ``"Speaker: text"`` of a dialogue.

    Each line is tokenized as it reads inside running text, after a space (``ĠSpeaker`` for byte-level
    BPE; no change for WordPiece), so it has the same ids in any segment and lines join cleanly.
    """
    if len(speakers) != len(texts):
        raise ValueError(f"{len(speakers)} speakers for {len(texts)} utterances")
    if not texts:
        return []
    lines = [f" {speaker}: {text}" if speaker else f" {text}" for speaker, text in zip(speakers, texts)]
    return tokenizer(lines, add_special_tokens=False)["input_ids"]


def assemble_context_input(
    template: SegmentTemplate, utterances: list[list[int]], index: int, max_length: int, context: bool = True
) -> list[int]:
    """Input ids for utterance ``index`` from a dialogue's tokenized utterances, at most ``max_length`` long.

    Without ``context`` that is the tokenizer's single-segment input of the utterance. With it, the
    room left by the current utterance is shared evenly between past and future (what one side does
    not need goes to the other), filled outwards from the current utterance. Only an utterance longer
    than the whole budget is itself cut, at its tail.
    """
    if context:
        budget = max_length - len(template.prefix) - 2 * len(template.middle) - len(template.suffix)
    else:
        budget = max_length - len(template.single_prefix) - len(template.single_suffix)
    if budget <= 0:
        raise ConfigError(f"max_length {max_length} leaves no room for text between the special tokens")
    if not context:
        return [*template.single_prefix, *utterances[index][:budget], *template.single_suffix]
    current = utterances[index][:budget]
    past = [token for utterance in utterances[:index] for token in utterance]
    future = [token for utterance in utterances[index + 1 :] for token in utterance]
    room = budget - len(current)
    past_kept = min(len(past), max(room // 2, room - len(future)))
    future_kept = min(len(future), room - past_kept)
    return [
        *template.prefix, *past[len(past) - past_kept :], *template.middle,
        *current, *template.middle, *future[:future_kept], *template.suffix,
    ]  # fmt: skip


def build_context_input(
    tokenizer: PreTrainedTokenizerBase,
    speakers: list[str],
    texts: list[str],
    index: int,
    max_length: int,
    context: bool = True,
) -> list[int]:
    """Input ids for utterance ``index`` of a dialogue: past / current / future segments, or it alone."""
    if not 0 <= index < len(texts):
        raise IndexError(f"utterance index {index} outside a dialogue of {len(texts)}")
    utterances = tokenize_utterances(tokenizer, speakers, texts)
    return assemble_context_input(segment_template(tokenizer), utterances, index, max_length, context)


def context_inputs(
    tokenizer: PreTrainedTokenizerBase, speakers: list[str], texts: list[str], max_length: int, context: bool = True
) -> list[list[int]]:
    """Input ids of every utterance of a dialogue (tokenizing it once)."""
    utterances = tokenize_utterances(tokenizer, speakers, texts)
    template = segment_template(tokenizer)
    return [assemble_context_input(template, utterances, i, max_length, context) for i in range(len(utterances))]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way


def pad_sequences(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad id lists into ``input_ids`` and ``attention_mask`` (batch, longest) tensors."""
    longest = max((len(sequence) for sequence in sequences), default=0)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_dialogue_inputs(
    tokenizer: PreTrainedTokenizerBase, speakers: list[str], texts: list[str], max_length: int, context: bool = True
) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` for all utterances of a dialogue, in dialogue order."""
    return pad_sequences(context_inputs(tokenizer, speakers, texts, max_length, context), _pad_id(tokenizer))


@dataclass
class TextConfig:
    """Encoder (Hugging Face name or local directory) and how utterances are fed to it."""

    model: str = "roberta-base"
    max_length: int = 512
    batch_size: int = 16
    device: str = "cpu"
    context: bool = True


class TextExtractor:
    """A dialogue's utterances → one vector each: the encoder's last-layer first-token state."""

    def __init__(self, config: TextConfig | None = None) -> None:
        self.config = config = config or TextConfig()
        if config.batch_size < 1:
            raise ConfigError(f"text batch_size must be at least 1, got {config.batch_size}")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"text device {config.device!r} asked for but CUDA is not available")
        local = Path(config.model).expanduser()
        if (local.is_absolute() or config.model.startswith(".")) and not local.is_dir():
            raise ConfigError(f"text encoder directory {config.model!r} not found")
        source = str(local) if local.is_dir() else config.model
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load text encoder {config.model!r}: {error}") from error
        limit = self.tokenizer.model_max_length
        if limit < 1_000_000 and config.max_length > limit:
            raise ConfigError(f"max_length {config.max_length} exceeds {config.model!r}'s limit of {limit} tokens")
        self.model.to(config.device).eval()
        self._weights_sha256: dict[str, str] | None = None

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def extract_dialogue(self, speakers: list[str], texts: list[str]) -> np.ndarray:
        """Vectors ``(len(texts), dim)`` float32 for a dialogue's utterances, in dialogue order."""
        config = self.config
        sequences = context_inputs(self.tokenizer, speakers, texts, config.max_length, config.context)
        features = np.empty((len(sequences), self.dim), dtype=np.float32)
        by_length = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding per batch
        with torch.inference_mode():
            for first in range(0, len(by_length), config.batch_size):
                rows = by_length[first : first + config.batch_size]
                batch = pad_sequences([sequences[i] for i in rows], _pad_id(self.tokenizer))
                hidden = self.model(**{name: tensor.to(config.device) for name, tensor in batch.items()})
                features[rows] = hidden.last_hidden_state[:, 0].float().cpu().numpy()
        return features

    def info(self) -> dict:
        """What produced the features, for shard provenance (weight checksums computed once)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = encoder_weights_sha256(self.config.model)
        return {
            "extractor": "transformers",
            **asdict(self.config),
            "model_type": self.model.config.model_type,
            "hidden_size": self.dim,
            "pooling": "last layer, first token",
            "weights_sha256": self._weights_sha256,
            "transformers_version": transformers.__version__,
        }


def encoder_weights_sha256(name_or_dir: str) -> dict[str, str]:
    """sha256 of each weight file of a local model directory, or of a hub model's cached snapshot.

    Empty when a hub model is not in the local cache (nothing on disk to hash yet).
    """
    directory = Path(name_or_dir).expanduser()
    if not directory.is_dir():
        cached_config = try_to_load_from_cache(name_or_dir, "config.json")
        if not isinstance(cached_config, str):
            return {}
        directory = Path(cached_config).parent
    files = sorted({path for pattern in WEIGHT_FILE_PATTERNS for path in directory.glob(pattern)})
    return {path.name: sha256_file(path) for path in files}
