"""xLSTM-MultiEMO (Qi, Ibrayim & Tohti): xLSTM DialogueCRN context, modality encoder, MultiAttn.

§3.1  linear maps as in MultiEMO (text 768->256, audio 6373->512, visual 1000 as is).
§3.2  per modality, a DialogueCRN whose perception and reasoning recurrences are xLSTMs (eq 1);
      each turn matches the xLSTM output with the dialogue's memory "through a linear layer and
      the simAM attention mechanism" (eq 2: probe SimAM(W q̃ + b), retrieval r), q = [q̃; r] (eq 3);
      see erc.models.context.DialogueCRN / ReasoningModule.
§3.3  modality encoder: a kernel-1 Conv1d into the shared width, sinusoidal positions added, then
      intra-modal H_{m->m} and inter-modal H_{n->m} transformers (eqs 4-5); all views of modality
      m are concatenated and mapped back to the width (the public code kept only H_{m->m} and
      never added its positional encoding).
§3.4  MultiAttn (T = 6 on IEMOCAP, 2 on MELD); §3.5 MultiEMO's classifier and loss (eqs 6-15).

Ablations (Table 4): ``use_context`` (w/o DialogueCRN), ``use_simam``, ``use_modality_encoder``
(the Conv1d stays as the map into the shared width; positions and transformers go),
``multiattn``, ``use_swfc``, ``use_hgr``; and ``modalities`` subsets.
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
    ModalityEncoder,
    ModelOutput,
    MultiAttn,
    PositionalEncoding,
    TokenIndex,
    check_modalities,
    classify_fused,
    modality_projections,
    check_speakers,
    modality_inputs,
)
from erc.models.context import PERCEPTIONS, XLSTM_BLOCKS, DialogueCRN, Perception, XLSTMBlock
from erc.models.losses import FusionLossConfig, fusion_loss


@dataclass
class XLSTMMultiEMOConfig(FusionLossConfig):
    """xLSTM-MultiEMO hyperparameters; defaults are the paper's IEMOCAP setting (§4.2).

    ``context_hidden_dim`` is DialogueCRN's per-direction width d_u (its output is 8·d_u);
    ``situation_steps`` / ``speaker_steps`` its reasoning turns (not given by the paper; IEMOCAP
    uses DialogueCRN's published 3 / 4). ``max_dialogue_length`` bounds the positional table and
    the xLSTM context. ``xlstm_block`` names the xLSTM cells of every recurrence: mLSTM (matrix
    memory, parallel form), sLSTM (scalar memory, recurrent) or ``mixed`` (mLSTM then sLSTM
    blocks); the paper names the properties of both and not the blocks (the MELD preset uses
    sLSTM, measured better there). ``perception``: the perception encoders are bi-xLSTMs, or
    DialogueCRN's own bi-LSTMs (``lstm``; the paper describes only the reasoning module, whose core
    is the xLSTM). ``gradient_checkpointing`` recomputes the activations of the xLSTMs, the
    modality encoder and MultiAttn in the backward pass instead of storing them (same results,
    much less memory, more time).
    """

    temperature: float = 0.9
    focusing: float = 3.0
    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768, "audio": 6373, "visual": 1000})
    num_classes: int = 6
    num_speakers: int = 2
    modalities: tuple[str, ...] = MODALITIES
    projection_dims: dict[str, int | None] = field(default_factory=lambda: {"text": 256, "audio": 512, "visual": None})
    use_context: bool = True
    context_hidden_dim: int = 128
    situation_steps: int = 3
    speaker_steps: int = 4
    perception: Perception = "xlstm"
    xlstm_block: XLSTMBlock = "mlstm"
    xlstm_num_blocks: int = 1
    xlstm_num_heads: int = 4
    use_simam: bool = True
    model_dim: int = 256
    use_modality_encoder: bool = True
    encoder_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 1024
    multiattn: bool = True
    num_layers: int = 6
    classifier_hidden_dim: int = 256
    dropout: float = 0.1
    max_dialogue_length: int = 512
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        check_modalities(self.modalities, self.input_dims)
        if self.xlstm_block not in XLSTM_BLOCKS:
            raise ConfigError(f"xlstm_block must be one of {', '.join(XLSTM_BLOCKS)}, got {self.xlstm_block!r}")
        if self.perception not in PERCEPTIONS:
            raise ConfigError(f"perception must be one of {', '.join(PERCEPTIONS)}, got {self.perception!r}")
        self._check_loss()

    def projected_dim(self, modality: str) -> int:
        return self.projection_dims.get(modality) or self.input_dims[modality]


class XLSTMMultiEMO(nn.Module):
    """``forward(batch) -> ModelOutput``; ``loss(output, batch, class_counts)`` -> eq 15 terms."""

    def __init__(self, config: XLSTMMultiEMOConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.projections = modality_projections(c.modalities, c.input_dims, c.projection_dims)
        self.contexts = nn.ModuleDict(
            {
                m: DialogueCRN(
                    c.projected_dim(m), c.context_hidden_dim, c.num_speakers, c.situation_steps, c.speaker_steps,
                    c.xlstm_block, c.xlstm_num_blocks, c.xlstm_num_heads, c.use_simam, c.max_dialogue_length, c.dropout,
                    c.gradient_checkpointing, c.perception,
                )
                for m in c.modalities
            }
            if c.use_context
            else {}
        )
        context_dim = lambda m: self.contexts[m].output_dim if c.use_context else c.projected_dim(m)  # noqa: E731
        self.convs = nn.ModuleDict({m: nn.Conv1d(context_dim(m), c.model_dim, kernel_size=1, bias=False) for m in c.modalities})
        if c.use_modality_encoder:
            self.positions = PositionalEncoding(c.model_dim, c.max_dialogue_length)
            self.position_dropout = nn.Dropout(c.dropout)
            self.modality_encoder = ModalityEncoder(
                c.modalities, c.model_dim, c.num_heads, c.ffn_dim, c.encoder_layers, c.dropout, c.gradient_checkpointing
            )
        fuse = c.multiattn and len(c.modalities) > 1
        self.multiattn = MultiAttn(
            c.modalities, c.model_dim, c.num_heads, c.ffn_dim, c.num_layers, c.dropout, c.gradient_checkpointing
        ) if fuse else None
        self.classifier = EmotionClassifier(
            len(c.modalities) * c.model_dim, c.model_dim, c.classifier_hidden_dim, c.num_classes, c.dropout
        )

    def forward(self, batch: Mapping[str, Tensor]) -> ModelOutput:
        c = self.config
        check_speakers(batch["speaker"], batch["mask"], c.num_speakers)
        tokens = TokenIndex(batch["mask"])
        features, valid = modality_inputs(batch, c.modalities, tokens)
        encoded = {}
        for m in c.modalities:
            x = self.projections[m](features[m])
            if c.use_context:
                x = tokens.pack(self.contexts[m](tokens.unpack(x), batch["speaker"], valid[m], batch["mask"]))
            x = self.convs[m](x.T).T  # kernel 1: a position-wise map into the shared width
            if c.use_modality_encoder:
                x = self.position_dropout(self.positions(x, tokens.position))
            encoded[m] = x
        if c.use_modality_encoder:
            encoded = self.modality_encoder(encoded, valid, tokens)
        fused = self.multiattn(encoded, valid, tokens) if self.multiattn is not None else encoded
        return classify_fused(self.classifier, fused, c.modalities, tokens, valid)

    def loss(self, output: ModelOutput, batch: Mapping[str, Tensor], class_counts: Tensor | None = None) -> dict[str, Tensor]:
        return fusion_loss(output, batch, class_counts, self.config)
