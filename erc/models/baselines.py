"""Reference points for the fusion models: a text-only context model and concatenation fusion.

``text-only``  layer norm of each text vector, a bidirectional GRU over the dialogue, and a linear
               classifier of the GRU state together with the utterance's own (normed) vector (bc-LSTM
               style; other modalities in the batch are ignored). The norm is there because pooled
               encoder vectors are small (MiniLM's: per-dimension std ~0.1), which left the GRU
               underfitting MELD at MultiEMO's schedule; the skip lets the model be at least the
               per-utterance linear classifier, which the GRU alone fell short of on MELD
               (``input_norm=False, utterance_skip=False`` give the plain GRU).
``concat``     per modality: linear map + bidirectional GRU over the dialogue; the contextual
               features are concatenated and classified by a ReLU MLP.

The GRUs run only over the utterances whose modality is present (``encode_groups`` packs them),
so padding and missing modalities are never read and contribute zeros to the output. Both are
trained with cross-entropy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erc.errors import ConfigError
from erc.models.blocks import ModelOutput
from erc.models.context import RecurrentEncoder, encode_groups


def present(batch: Mapping[str, Tensor], modality: str) -> Tensor:
    """(B, L) True where ``modality`` is present in a real utterance."""
    return batch["mask"] & batch.get(f"{modality}_mask", batch["mask"])


def cross_entropy_loss(output: ModelOutput, batch: Mapping[str, Tensor], class_counts: Tensor | None = None) -> dict[str, Tensor]:
    """Mean cross-entropy over the labeled real utterances (``class_counts`` is unused)."""
    labeled = batch["mask"] & (batch["label"] >= 0)
    ce = F.cross_entropy(output.logits[labeled], batch["label"][labeled]) if labeled.any() else output.logits.sum() * 0.0
    return {"ce": ce, "total": ce}


@dataclass
class TextOnlyConfig:
    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768})
    num_classes: int = 6
    hidden_dim: int = 128
    dropout: float = 0.1
    input_norm: bool = True
    utterance_skip: bool = True

    def __post_init__(self) -> None:
        if "text" not in self.input_dims:
            raise ConfigError(f"text-only needs text features; the data has {sorted(self.input_dims)}")


class TextOnlyGRU(nn.Module):
    def __init__(self, config: TextOnlyConfig) -> None:
        super().__init__()
        self.config = config
        self.input_norm = nn.LayerNorm(config.input_dims["text"]) if config.input_norm else nn.Identity()
        self.context = RecurrentEncoder(config.input_dims["text"], config.hidden_dim, cell="gru")
        self.dropout = nn.Dropout(config.dropout)
        width = self.context.output_dim + (config.input_dims["text"] if config.utterance_skip else 0)
        self.classifier = nn.Linear(width, config.num_classes)

    def forward(self, batch: Mapping[str, Tensor]) -> ModelOutput:
        valid = present(batch, "text")
        text = self.input_norm(batch["text"])
        features = encode_groups(self.context, text, valid)
        if self.config.utterance_skip:  # padding and absent text are zeroed, as the GRU's output is
            features = torch.cat([features, text * valid.unsqueeze(-1)], dim=-1)
        return ModelOutput(logits=self.classifier(self.dropout(features)), valid={"text": valid})

    loss = staticmethod(cross_entropy_loss)


@dataclass
class ConcatConfig:
    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768, "audio": 6373, "visual": 1000})
    num_classes: int = 6
    projection_dim: int = 256
    hidden_dim: int = 128
    classifier_hidden_dim: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not self.input_dims:
            raise ConfigError("concat needs at least one modality")


class ConcatFusion(nn.Module):
    def __init__(self, config: ConcatConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.modalities = tuple(c.input_dims)
        self.projections = nn.ModuleDict({m: nn.Linear(d, c.projection_dim) for m, d in c.input_dims.items()})
        self.contexts = nn.ModuleDict({m: RecurrentEncoder(c.projection_dim, c.hidden_dim, cell="gru") for m in self.modalities})
        width = sum(encoder.output_dim for encoder in self.contexts.values())
        self.classifier = nn.Sequential(
            nn.Dropout(c.dropout), nn.Linear(width, c.classifier_hidden_dim), nn.ReLU(),
            nn.Dropout(c.dropout), nn.Linear(c.classifier_hidden_dim, c.num_classes),
        )

    def forward(self, batch: Mapping[str, Tensor]) -> ModelOutput:
        valid = {m: present(batch, m) for m in self.modalities}
        contextual = {m: encode_groups(self.contexts[m], self.projections[m](batch[m]), valid[m]) for m in self.modalities}
        logits = self.classifier(torch.cat([contextual[m] for m in self.modalities], dim=-1))
        return ModelOutput(logits=logits, fused=contextual, valid=valid)

    loss = staticmethod(cross_entropy_loss)
