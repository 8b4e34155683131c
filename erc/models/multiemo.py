"""MultiEMO (Shi & Huang, ACL 2023): DialogueRNN context + MultiAttn fusion + SWFC/Soft-HGR/CE.

§3.3  each modality is mapped by a linear layer (text 768->256, audio 6373->512; the 1000-d
      visual vector enters its DialogueRNN directly) and contextualised by a DialogueRNN into the
      256-d c^m. Text skips DialogueRNN where the preset says so (MELD); the authors' code adds it
      on IEMOCAP, where they found it better.
§3.4  MultiAttn: T layers per modality branch of cross-attention to the two other modalities
      and a feed-forward, each with add & norm (eqs 2-12).
      ``fusion="lmam"`` replaces MultiAttn by LMAM (low-rank matching attention, erc.models.lmam).
§3.5  f = f^t ⊕ f^a ⊕ f^v; z = FC(f); logits = MLP(z) (eqs 13-17).
§3.6  SWFC on z, Soft-HGR on the f^m, cross-entropy, combined by eq 22 (see erc.models.losses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from erc.errors import ConfigError
from erc.models.blocks import (
    MODALITIES,
    EmotionClassifier,
    ModelOutput,
    MultiAttn,
    TokenIndex,
    check_modalities,
    classify_fused,
    modality_projections,
    check_speakers,
    modality_inputs,
)
from erc.models.context import DialogueRNN, run_dialogue_rnns
from erc.models.lmam import LMAMFusion
from erc.models.losses import FusionLossConfig, fusion_loss


@dataclass
class MultiEMOConfig(FusionLossConfig):
    """MultiEMO hyperparameters; defaults are the paper's IEMOCAP setting (§4.3).

    ``projection_dims[m]`` is the width of modality m's linear map (None = no map). Modalities in
    ``context_modalities`` go through a DialogueRNN (hidden ``dialoguernn_hidden_dim``) to
    ``model_dim``; the others must be projected to ``model_dim`` directly. ``multiattn=False`` is
    the paper's "w/o MultiAttn" (the contextual features are concatenated); a single modality is
    never fused. ``fusion="lmam"`` fuses with LMAM (rank ``lmam_rank``) instead of MultiAttn.
    ``gradient_checkpointing`` recomputes MultiAttn activations in the backward pass
    instead of storing them: identical results, much less memory, some more time.
    """

    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768, "audio": 6373, "visual": 1000})
    num_classes: int = 6
    num_speakers: int = 2
    modalities: tuple[str, ...] = MODALITIES
    projection_dims: dict[str, int | None] = field(default_factory=lambda: {"text": 256, "audio": 512, "visual": None})
    context_modalities: tuple[str, ...] = MODALITIES
    dialoguernn_hidden_dim: int = 256
    dialoguernn_bidirectional: bool = True
    model_dim: int = 256
    num_heads: int = 4
    ffn_dim: int = 1024
    num_layers: int = 6
    classifier_hidden_dim: int = 256
    dropout: float = 0.1
    multiattn: bool = True
    fusion: str = "multiattn"
    lmam_rank: int = 45
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.context_modalities = tuple(m for m in self.context_modalities if m in self.modalities)
        check_modalities(self.modalities, self.input_dims)
        if self.fusion not in ("multiattn", "lmam"):
            raise ConfigError(f"fusion must be 'multiattn' or 'lmam', got {self.fusion!r}")
        for m in self.modalities:
            if m not in self.context_modalities and self.projected_dim(m) != self.model_dim:
                raise ConfigError(
                    f"{m} has no context encoder, so its projection must be model_dim={self.model_dim}, "
                    f"got {self.projected_dim(m)}"
                )
        self._check_loss()

    def projected_dim(self, modality: str) -> int:
        return self.projection_dims.get(modality) or self.input_dims[modality]


class MultiEMO(nn.Module):
    """``forward(batch) -> ModelOutput``; ``loss(output, batch, class_counts)`` -> eq 22 terms."""

    def __init__(self, config: MultiEMOConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.projections = modality_projections(c.modalities, c.input_dims, c.projection_dims)
        self.context_encoders = nn.ModuleDict(
            {
                m: DialogueRNN(
                    c.projected_dim(m), c.dialoguernn_hidden_dim, c.model_dim, c.num_speakers,
                    c.dialoguernn_bidirectional, c.dropout,
                )
                for m in c.context_modalities
            }
        )
        fuse = c.multiattn and len(c.modalities) > 1
        if not fuse:
            self.multiattn = None
        elif c.fusion == "lmam":
            self.multiattn = LMAMFusion(c.modalities, c.model_dim, c.lmam_rank)
        else:
            self.multiattn = MultiAttn(
                c.modalities, c.model_dim, c.num_heads, c.ffn_dim, c.num_layers, c.dropout, c.gradient_checkpointing
            )
        self.classifier = EmotionClassifier(
            len(c.modalities) * c.model_dim, c.model_dim, c.classifier_hidden_dim, c.num_classes, c.dropout
        )

    def forward(self, batch: Mapping[str, Tensor]) -> ModelOutput:
        c = self.config
        check_speakers(batch["speaker"], batch["mask"], c.num_speakers)
        tokens = TokenIndex(batch["mask"])
        features, valid = modality_inputs(batch, c.modalities, tokens)
        contextual = {m: self.projections[m](features[m]) for m in c.modalities}
        with_context = list(self.context_encoders)  # all DialogueRNNs run in one time loop
        encoded = run_dialogue_rnns(
            [self.context_encoders[m] for m in with_context], [tokens.unpack(contextual[m]) for m in with_context],
            batch["speaker"], [valid[m] for m in with_context],
        )
        contextual |= {m: tokens.pack(x) for m, x in zip(with_context, encoded)}
        fused = self.multiattn(contextual, valid, tokens) if self.multiattn is not None else contextual
        return classify_fused(self.classifier, fused, c.modalities, tokens, valid)

    def loss(self, output: ModelOutput, batch: Mapping[str, Tensor], class_counts: Tensor | None = None) -> dict[str, Tensor]:
        return fusion_loss(output, batch, class_counts, self.config)
