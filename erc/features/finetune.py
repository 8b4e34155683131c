"""Fine-tune a text encoder as an utterance emotion classifier (MultiEMO §3.3.1; xLSTM-MultiEMO §4.2).

The classifier is the encoder's pooled last-layer state (first token by default, as the papers;
``pooling`` as in extraction) followed by dropout and a linear head,
fed the very inputs that extraction builds (:func:`erc.features.text.context_inputs`): the utterance
with its past and future context. Training follows the papers: AdamW, lr 2e-5, batch 16, 128 tokens,
linear warm-up over the first 10% of steps then linear decay, 3 epochs, early stopping on the dev
loss (a corpus without a dev split, like IEMOCAP, holds out 10% of its training dialogues, chosen by
the seed). The best encoder is saved with ``save_pretrained`` beside its tokenizer, so that
``erc extract --text-model DIR`` loads it like any checkpoint; the head, label names, configuration
and metrics go to ``classifier.pt`` and ``finetune.json`` in the same directory.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, get_linear_schedule_with_warmup

from erc.errors import ConfigError
from erc.features.text import (
    FINETUNE_INFO_FILE,
    ContextInput,
    resolve_pooling,
    context_inputs,
    encoder_inputs,
    pad_inputs,
    pad_token_id,
    pool_states,
)
from erc.pipeline.corpus import Corpus, Dialogue, load_corpus

HEAD_FILE = "classifier.pt"
INFO_FILE = FINETUNE_INFO_FILE
DEV_FRACTION = 0.1


@dataclass
class FinetuneConfig:
    """Options of ``erc finetune-text``. ``train_layers`` = train only the top N encoder layers (and
    the head); ``None`` trains everything, embeddings included. ``max_steps`` caps the optimizer steps;
    ``eval_steps`` evaluates the dev loss every that many steps instead of once per epoch."""

    dataset: str
    root: Path
    text_model: str
    out: Path
    manifest: Path | None = None
    label_set: str = "6class"
    epochs: int = 3
    lr: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    max_length: int = 128
    context: bool = True
    pooling: str | None = None  # None: chosen from the checkpoint (erc.features.text.pooling_choice)
    warmup_fraction: float = 0.1
    patience: int = 1
    train_layers: int | None = None
    max_steps: int | None = None
    eval_steps: int | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root), Path(self.out)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"epochs and batch size must be at least 1 and lr positive, got "
                              f"{self.epochs}, {self.batch_size}, {self.lr}")
        if self.train_layers is not None and self.train_layers < 0:
            raise ConfigError(f"--train-layers must be at least 0, got {self.train_layers}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for but CUDA is not available")
        self.pooling = resolve_pooling(self.pooling, self.text_model)


@dataclass
class FinetuneResult:
    out: Path
    best_step: int
    steps: int
    dev: dict[str, float]
    test: dict[str, float] | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    train_utterances_per_second: float = 0.0


class UtteranceClassifier(nn.Module):
    """Encoder → pooled last-layer state → dropout → linear head over the emotion classes."""

    def __init__(self, encoder: PreTrainedModel, num_classes: int, pooling: str = "first") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch`` as :func:`erc.features.text.pad_inputs` makes it → logits (B, classes)."""
        device = self.head.weight.device
        hidden = self.encoder(**encoder_inputs(batch, device)).last_hidden_state
        return self.head(self.dropout(pool_states(hidden, batch, self.pooling)))


def encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    """The encoder's stack of transformer layers (BERT / RoBERTa / ELECTRA-style ``encoder.layer``)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"--train-layers needs a BERT/RoBERTa-style encoder with encoder.layer; "
                          f"{encoder.config.model_type!r} has none")
    return layers


def freeze_below(encoder: PreTrainedModel, train_layers: int) -> None:
    """Freeze the embeddings and every layer but the top ``train_layers``."""
    layers = encoder_layers(encoder)
    if train_layers > len(layers):
        raise ConfigError(f"--train-layers {train_layers} exceeds the encoder's {len(layers)} layers")
    encoder.requires_grad_(False)
    for layer in layers[len(layers) - train_layers :]:
        layer.requires_grad_(True)


@dataclass
class Examples:
    """Utterance inputs (token ids with context) and their label indices."""

    inputs: list[ContextInput]
    labels: list[int]


def build_examples(tokenizer, dialogues: list[Dialogue], label_names: list[str], max_length: int,
                   context: bool) -> Examples:
    """The labelled utterances of ``dialogues`` as extraction feeds them to the encoder."""
    label_index = {name: i for i, name in enumerate(label_names)}
    inputs, labels = [], []
    for dialogue in dialogues:
        sequences = context_inputs(tokenizer, [u.speaker for u in dialogue.utterances],
                                   [u.text for u in dialogue.utterances], max_length, context)
        for utterance, sequence in zip(dialogue.utterances, sequences):
            if utterance.label is not None:
                inputs.append(sequence)
                labels.append(label_index[utterance.label])
    return Examples(inputs, labels)


def split_dialogues(corpus: Corpus, seed: int) -> tuple[list[Dialogue], list[Dialogue], list[Dialogue]]:
    """(train, dev, test) dialogues; without a dev split, 10% of the training dialogues chosen by ``seed``."""
    train, dev, test = corpus.split("train"), corpus.split("dev"), corpus.split("test")
    if not train:
        raise ConfigError(f"{corpus.name}: no training dialogues to fine-tune on")
    if not dev:
        if len(train) < 2:
            raise ConfigError(f"cannot hold out a dev set from {len(train)} training dialogue(s)")
        ids = sorted(d.dialogue_id for d in train)
        random.Random(seed).shuffle(ids)
        dev_ids = set(ids[: max(1, round(DEV_FRACTION * len(ids)))])
        train, dev = [d for d in train if d.dialogue_id not in dev_ids], [d for d in train if d.dialogue_id in dev_ids]
    return train, dev, test


def _batches(examples: Examples, batch_size: int, pad_id: int, order: list[int]):
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        batch = pad_inputs([examples.inputs[i] for i in rows], pad_id)
        yield batch, torch.tensor([examples.labels[i] for i in rows])


@torch.no_grad()
def evaluate_classifier(model: UtteranceClassifier, examples: Examples, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean cross-entropy, weighted F1 and accuracy over ``examples`` (batched by length: less padding)."""
    model.eval()
    order = sorted(range(len(examples.labels)), key=lambda i: len(examples.inputs[i].ids))
    loss_sum, predicted = 0.0, np.empty(len(order), dtype=np.int64)
    for first, (batch, labels) in zip(range(0, len(order), batch_size), _batches(examples, batch_size, pad_id, order)):
        logits = model(batch).float().cpu()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predicted[order[first : first + batch_size]] = logits.argmax(-1).numpy()
    true = np.asarray(examples.labels)
    return {
        "loss": loss_sum / len(true),
        "weighted_f1": float(f1_score(true, predicted, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(true, predicted)),
        "utterances": int(len(true)),
    }


def finetune(config: FinetuneConfig, on_step: Callable[[int, int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune, keep the encoder with the lowest dev loss, save it and report dev / test metrics.

    ``on_step(step, total_steps, loss)`` reports progress. Seeded: the same config gives the same weights.
    """
    started = time.perf_counter()
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    corpus = load_corpus(config.dataset, config.root, manifest=config.manifest, label_set=config.label_set)
    train_dialogues, dev_dialogues, test_dialogues = split_dialogues(corpus, config.seed)
    local = Path(config.text_model).expanduser()
    source = str(local) if local.is_dir() else config.text_model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load text encoder {config.text_model!r}: {error}") from error
    if config.train_layers is not None:
        freeze_below(encoder, config.train_layers)
    model = UtteranceClassifier(encoder, len(corpus.label_names), config.pooling).to(config.device)
    pad_id = pad_token_id(tokenizer)
    train, dev = (build_examples(tokenizer, ds, corpus.label_names, config.max_length, config.context)
                  for ds in (train_dialogues, dev_dialogues))
    if not train.labels or not dev.labels:
        raise ConfigError(f"{corpus.name}: fine-tuning needs labelled train and dev utterances "
                          f"(got {len(train.labels)} and {len(dev.labels)})")

    steps_per_epoch = -(-len(train.labels) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    eval_steps = config.eval_steps or steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and LayerNorm weights
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_fraction * total_steps), total_steps)
    generator = random.Random(config.seed)

    best = evaluate_classifier(model, dev, config.batch_size, pad_id)
    history = [{"step": 0, **{f"dev_{k}": v for k, v in best.items() if k != "utterances"}}]
    best_state, best_step, step, bad_evals, train_seconds, seen = copy.deepcopy(model.state_dict()), 0, 0, 0, 0.0, 0
    running = 0.0
    while step < total_steps and bad_evals < config.patience:
        order = list(range(len(train.labels)))
        generator.shuffle(order)
        for batch, labels in _batches(train, config.batch_size, pad_id, order):
            model.train()
            tick = time.perf_counter()
            logits = model(batch)
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            train_seconds += time.perf_counter() - tick
            step += 1
            seen += len(labels)
            running += loss.item()
            if on_step is not None:
                on_step(step, total_steps, loss.item())
            if step % eval_steps == 0 or step == total_steps:
                dev_metrics = evaluate_classifier(model, dev, config.batch_size, pad_id)
                history.append({"step": step, "train_loss": running / (step - history[-1]["step"]),
                                **{f"dev_{k}": v for k, v in dev_metrics.items() if k != "utterances"}})
                running = 0.0
                if dev_metrics["loss"] < best["loss"]:
                    best, best_step, bad_evals = dev_metrics, step, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_evals += 1
            if step >= total_steps or bad_evals >= config.patience:
                break

    model.load_state_dict(best_state)  # the untrained one if training never lowered the dev loss
    test = None
    if any(u.label is not None for d in test_dialogues for u in d.utterances):
        test_examples = build_examples(tokenizer, test_dialogues, corpus.label_names, config.max_length, config.context)
        test = evaluate_classifier(model, test_examples, config.batch_size, pad_id)
    result = FinetuneResult(
        out=config.out, best_step=best_step, steps=step, dev=best, test=test, history=history,
        seconds=time.perf_counter() - started,
        train_utterances_per_second=seen / train_seconds,
    )
    save_finetuned(config, model, tokenizer, corpus.label_names, result)
    return result


def save_finetuned(config: FinetuneConfig, model: UtteranceClassifier, tokenizer, label_names: list[str],
                   result: FinetuneResult) -> None:
    """Encoder + tokenizer (Hugging Face layout), the head (``classifier.pt``) and ``finetune.json``."""
    config.out.mkdir(parents=True, exist_ok=True)
    model.encoder.requires_grad_(True)  # frozen flags are not part of the checkpoint
    model.encoder.save_pretrained(config.out)
    tokenizer.save_pretrained(config.out)
    torch.save({"state_dict": model.head.state_dict(), "label_names": label_names}, config.out / HEAD_FILE)
    info: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "label_names": label_names,
        "best_step": result.best_step,
        "steps": result.steps,
        "dev": result.dev,
        "test": result.test,
        "history": result.history,
        "seconds": round(result.seconds, 2),
        "train_utterances_per_second": round(result.train_utterances_per_second, 2),
        "torch_threads": torch.get_num_threads(),
    }
    (config.out / INFO_FILE).write_text(json.dumps(info, indent=2))

