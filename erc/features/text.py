"""Utterance text in its dialogue context → a vector from a pretrained encoder (MultiEMO §3.3.1).

Following Kim and Vossen (2021), utterance *i* is written ``"Speaker: text"`` and fed together with its
context as three segments — preceding utterances, the utterance itself, following utterances — joined
the way the tokenizer joins a sentence pair: ``[CLS] past [SEP] current [SEP] future [SEP]`` for BERT,
``<s> past </s></s> current </s></s> future </s>`` for RoBERTa. When the input is too long, context is
cut at its far ends (earliest past tokens, latest future tokens) and the current utterance is kept whole.
The utterance's vector is pooled from the last layer (``pooling``): the first-token state, as the
papers do with a fine-tuned RoBERTa (``first``); the mean over all tokens, as sentence encoders are
trained (``mean``); or the mean over the current utterance's tokens only, contextualised by the
segments around it (``utterance``). The same inputs and pooling serve fine-tuning. Without context
(``context=False``, the default for a frozen sentence-transformers checkpoint: ``context_choice``) the
input is the utterance's own single segment.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from erc.errors import ConfigError
from erc.provenance import sha256_file

WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
POOLINGS = ("first", "mean", "utterance")
FINETUNE_INFO_FILE = "finetune.json"  # written by erc finetune-text beside the encoder (records its pooling)


class ContextInput(NamedTuple):
    """Encoder input ids of one utterance; ``ids[start:end]`` are the current utterance's tokens."""

    ids: list[int]
    start: int
    end: int


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
) -> ContextInput:
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
    current = utterances[index][:budget]
    if not context:
        start = len(template.single_prefix)
        return ContextInput([*template.single_prefix, *current, *template.single_suffix], start, start + len(current))
    past = [token for utterance in utterances[:index] for token in utterance]
    future = [token for utterance in utterances[index + 1 :] for token in utterance]
    room = budget - len(current)
    past_kept = min(len(past), max(room // 2, room - len(future)))
    future_kept = min(len(future), room - past_kept)
    ids = [
        *template.prefix, *past[len(past) - past_kept :], *template.middle,
        *current, *template.middle, *future[:future_kept], *template.suffix,
    ]  # fmt: skip
    start = len(template.prefix) + past_kept + len(template.middle)
    return ContextInput(ids, start, start + len(current))


def build_context_input(
    tokenizer: PreTrainedTokenizerBase,
    speakers: list[str],
    texts: list[str],
    index: int,
    max_length: int,
    context: bool = True,
) -> ContextInput:
    """Input ids for utterance ``index`` of a dialogue: past / current / future segments, or it alone."""
    if not 0 <= index < len(texts):
        raise IndexError(f"utterance index {index} outside a dialogue of {len(texts)}")
    utterances = tokenize_utterances(tokenizer, speakers, texts)
    return assemble_context_input(segment_template(tokenizer), utterances, index, max_length, context)


def context_inputs(
    tokenizer: PreTrainedTokenizerBase, speakers: list[str], texts: list[str], max_length: int, context: bool = True
) -> list[ContextInput]:
    """Inputs of every utterance of a dialogue (tokenizing it once)."""
    utterances = tokenize_utterances(tokenizer, speakers, texts)
    template = segment_template(tokenizer)
    return [assemble_context_input(template, utterances, i, max_length, context) for i in range(len(utterances))]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's padding id, or 0 when it has none (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_inputs(inputs: list[ContextInput], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad inputs into ``input_ids``, ``attention_mask`` and ``utterance_mask`` (batch, longest)."""
    longest = max((len(item.ids) for item in inputs), default=0)
    input_ids = torch.full((len(inputs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(inputs), longest), dtype=torch.long)
    utterance_mask = torch.zeros((len(inputs), longest), dtype=torch.long)
    for row, item in enumerate(inputs):
        input_ids[row, : len(item.ids)] = torch.tensor(item.ids, dtype=torch.long)
        attention_mask[row, : len(item.ids)] = 1
        utterance_mask[row, item.start : item.end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "utterance_mask": utterance_mask}


def encode_dialogue_inputs(
    tokenizer: PreTrainedTokenizerBase, speakers: list[str], texts: list[str], max_length: int, context: bool = True
) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` / ``utterance_mask`` for a dialogue, in dialogue order."""
    return pad_inputs(context_inputs(tokenizer, speakers, texts, max_length, context), pad_token_id(tokenizer))


def check_pooling(pooling: str) -> str:
    """``pooling`` if it is one of :data:`POOLINGS`, else a ConfigError naming them."""
    if pooling not in POOLINGS:
        raise ConfigError(f"text pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def pool_states(hidden: torch.Tensor, batch: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """(B, T, D) last-layer states → (B, D): first token, mean of all tokens, or mean of the utterance's."""
    if check_pooling(pooling) == "first":
        return hidden[:, 0]
    attention = batch["attention_mask"].to(hidden).unsqueeze(-1)
    mask = attention if pooling == "mean" else batch["utterance_mask"].to(hidden).unsqueeze(-1)
    mask = torch.where(mask.sum(1, keepdim=True) > 0, mask, attention)  # an empty utterance: all its tokens
    return (hidden * mask).sum(1) / mask.sum(1)


def encoder_inputs(batch: dict[str, torch.Tensor], device: str | torch.device) -> dict[str, torch.Tensor]:
    """What the encoder itself takes from a padded batch, on ``device``."""
    return {name: batch[name].to(device) for name in ("input_ids", "attention_mask")}


def finetuned_config(name_or_dir: str) -> dict | None:
    """The config a directory written by ``erc finetune-text`` records in its ``finetune.json`` (its
    pooling and context input among it); None for any other checkpoint."""
    info = Path(name_or_dir).expanduser() / FINETUNE_INFO_FILE
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("config", {})


def _checkpoint_file(name_or_dir: str, filename: str) -> Path | None:
    """``filename`` of a local checkpoint directory, or of a hub checkpoint already in the local
    cache (never downloads); None when there is none."""
    local = Path(name_or_dir).expanduser()
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    try:
        cached = try_to_load_from_cache(name_or_dir, filename)
    except ValueError:  # not a valid hub name either
        return None
    return Path(cached) if isinstance(cached, str) else None


def sentence_transformers_pooling(name_or_dir: str) -> str | None:
    """The pooling a sentence-transformers checkpoint declares (``modules.json`` naming a Pooling
    module whose ``config.json`` sets a ``pooling_mode_*`` flag): "mean", "cls", "max", … or None."""
    modules_file = _checkpoint_file(name_or_dir, "modules.json")
    if modules_file is None:
        return None
    try:
        modules = json.loads(modules_file.read_text())
        pooling_path = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling"))
        pooling_file = _checkpoint_file(name_or_dir, f"{pooling_path}/config.json")
        flags = json.loads(pooling_file.read_text()) if pooling_file else {}
    except (StopIteration, OSError, ValueError, AttributeError):
        return None
    modes = [key.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
             for key, on in flags.items() if key.startswith("pooling_mode_") and on is True]
    return modes[0] if modes else None


def pooling_choice(pooling: str | None, name_or_dir: str) -> tuple[str, str]:
    """(pooling, why) for an encoder: the explicit ``pooling``; else the one ``erc finetune-text``
    trained the directory with; else ``utterance`` for a checkpoint whose sentence-transformers
    config says mean pooling (it was trained to be read as a mean of token states: the current
    utterance's tokens are that mean for an utterance read in context); else ``first``, the first-token
    state, as the papers read a (fine-tuned) RoBERTa."""
    if pooling is not None:
        return check_pooling(pooling), "asked for"
    finetuned = finetuned_config(name_or_dir)
    if finetuned is not None:
        return check_pooling(finetuned.get("pooling", "first")), f"the pooling {FINETUNE_INFO_FILE} records for this fine-tuned encoder"
    declared = sentence_transformers_pooling(name_or_dir)
    if declared == "mean":
        return "utterance", "a sentence-transformers checkpoint trained with mean pooling (modules.json)"
    if declared is not None:
        return "first", f"a sentence-transformers checkpoint declaring {declared} pooling"
    return "first", "the first-token state, as the papers read RoBERTa"


def resolve_pooling(pooling: str | None, name_or_dir: str) -> str:
    """The pooling ``pooling_choice`` picks."""
    return pooling_choice(pooling, name_or_dir)[0]


def context_choice(context: bool | None, name_or_dir: str) -> tuple[bool, str]:
    """(context, why) for an encoder: the explicit ``context``; else what ``erc finetune-text`` trained
    the directory on; else no context for a sentence-transformers checkpoint (trained to embed one text
    on its own: frozen all-MiniLM-L6-v2 on MELD, logistic regression on the vectors, dev / test weighted
    F1 52.31 / 56.58 alone against 50.16 / 54.01 with the 512-token context input); else the context
    input, as the papers read a (fine-tuned) RoBERTa."""
    if context is not None:
        return bool(context), "asked for"
    finetuned = finetuned_config(name_or_dir)
    if finetuned is not None:
        return bool(finetuned.get("context", True)), f"what {FINETUNE_INFO_FILE} records this fine-tuned encoder was trained on"
    if sentence_transformers_pooling(name_or_dir) is not None:
        return False, "a sentence-transformers checkpoint embeds each text on its own (modules.json)"
    return True, "the utterance in its speaker-prefixed dialogue context, as the papers read RoBERTa"


def resolve_context(context: bool | None, name_or_dir: str) -> bool:
    """The context ``context_choice`` picks."""
    return context_choice(context, name_or_dir)[0]


@dataclass
class TextConfig:
    """Encoder (Hugging Face name or local directory), how utterances are fed to it and pooled.
    ``pooling`` / ``context`` None: chosen from the checkpoint by ``pooling_choice`` / ``context_choice``."""

    model: str = "roberta-base"
    max_length: int = 512
    batch_size: int = 16
    device: str = "cpu"
    context: bool | None = None
    pooling: str | None = None
    revision: str | None = None  # a hub model's snapshot commit (branch or tag) to load; ignored for a directory
    precision: str = "fp32"  # "fp32" | "bf16": the encoder's forward under bf16 autocast (pooling in fp32)


class TextExtractor:
    """A dialogue's utterances → one vector each, pooled from the encoder's last layer."""

    def __init__(self, config: TextConfig | None = None) -> None:
        config = config or TextConfig()
        self.config = config = dataclasses.replace(config, pooling=resolve_pooling(config.pooling, config.model),
                                                   context=resolve_context(config.context, config.model))
        if config.batch_size < 1:
            raise ConfigError(f"text batch_size must be at least 1, got {config.batch_size}")
        if config.precision not in ("fp32", "bf16"):
            raise ConfigError(f"text precision must be 'fp32' or 'bf16', got {config.precision!r}")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"text device {config.device!r} asked for but CUDA is not available")
        local = Path(config.model).expanduser()
        if (local.is_absolute() or config.model.startswith(".")) and not local.is_dir():
            raise ConfigError(f"text encoder directory {config.model!r} not found")
        source = str(local) if local.is_dir() else config.model
        try:
            revision = None if local.is_dir() else config.revision
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
            self.model = AutoModel.from_pretrained(source, revision=revision, dtype=torch.float32)
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
        inputs = context_inputs(self.tokenizer, speakers, texts, config.max_length, config.context)
        features = np.empty((len(inputs), self.dim), dtype=np.float32)
        by_length = sorted(range(len(inputs)), key=lambda i: len(inputs[i].ids))  # less padding per batch
        autocast = torch.autocast(torch.device(config.device).type, torch.bfloat16, enabled=config.precision == "bf16")
        with torch.inference_mode():
            for first in range(0, len(by_length), config.batch_size):
                rows = by_length[first : first + config.batch_size]
                batch = pad_inputs([inputs[i] for i in rows], pad_token_id(self.tokenizer))
                with autocast:
                    hidden = self.model(**encoder_inputs(batch, config.device)).last_hidden_state
                features[rows] = pool_states(hidden.float(), batch, config.pooling).cpu().numpy()
        return features

    def info(self) -> dict:
        """What produced the features, for shard provenance (weight checksums computed once)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = encoder_weights_sha256(self.config.model, self.config.revision)
        return {
            "extractor": "transformers",
            **asdict(self.config),
            "model_type": self.model.config.model_type,
            "hidden_size": self.dim,
            "weights_sha256": self._weights_sha256,
            "transformers_version": transformers.__version__,
        }


def encoder_weights_sha256(name_or_dir: str, revision: str | None = None) -> dict[str, str]:
    """sha256 of each weight file of a local model directory, or of a hub model's snapshot (at
    ``revision``, default the cached or latest one).

    A hub model that is not in the local cache is fetched first (its config and weights, as loading
    it would), so that the checksum is of the weights the features come from; where the hub cannot
    be reached that is a ConfigError naming the model, before any extraction starts.
    """
    directory = Path(name_or_dir).expanduser()
    if not directory.is_dir():
        directory = hub_snapshot(name_or_dir, revision)
    files = sorted({path for pattern in WEIGHT_FILE_PATTERNS for path in directory.glob(pattern)})
    return {path.name: sha256_file(path) for path in files}


def hub_snapshot(name: str, revision: str | None = None) -> Path:
    """The local snapshot of hub model ``name`` with its weights (safetensors, else PyTorch .bin),
    at ``revision`` if given; the directory's name is the snapshot's commit."""
    from huggingface_hub import snapshot_download

    cached_config = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached_config, str) and any(Path(cached_config).parent.glob("*.safetensors")):
        return Path(cached_config).parent
    try:
        directory = Path(snapshot_download(name, revision=revision, allow_patterns=["config.json", "*.safetensors"]))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(name, revision=revision, allow_patterns=["config.json", "pytorch_model*.bin"]))
    except Exception as error:  # offline, unknown repository, no access: all end the same way
        raise ConfigError(f"text model {name!r}: not a local directory, not in the Hugging Face cache, and "
                          f"the hub did not provide it ({type(error).__name__})") from error
    return directory
