"""MCN-CL: PSA visual encoder, multimodal cross-attention network and contrastive learning (§2).

§2.2  PSA over the per-frame visual features X (F frames x C channels): the channels are split
      into four groups, each convolved over the frame axis with kernel 3, 5, 7 or 9 (eqs 1-2),
      SE channel weights W = σ(FC2(ReLU(FC1(GAP(Y))))) with C -> C/4 -> C (eqs 3-5), C^v = Y ⊙ W.
      Frames without a face are left out: the face frames are moved to the front in time order
      and every average counts only them, so C^v equals PSA over the face frames alone. C^v is
      averaged over the face frames and projected to the model width like text and audio.
§2.3  the multimodal cross-attention network is MultiEMO's MultiAttn (eqs 6-14).
§2.4  per modality a two-layer projection head (eqs 15-20), L2-normalised (eqs 21-23), and a
      supervised contrastive loss whose denominator holds the positives and only the hardest
      30% of the negatives (eqs 24-26); the three losses weighted by α, β, γ (eq 27).
§2.5  [f_t, f_a, f_v] -> FC -> two-layer ReLU MLP -> softmax layer (eqs 28-31), trained with CE.

The paper gives no values for T, τ, α, β, γ; the defaults below are ours (see the presets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erc.errors import ConfigError
from erc.models.blocks import MODALITIES, ModelOutput, MultiAttn, TokenIndex, check_modalities, modality_inputs
from erc.models.losses import supervised_contrastive_loss

PSA_KERNELS = (3, 5, 7, 9)


def masked_mean(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Mean of x over ``dim`` counting only valid entries (all-invalid slices give zeros)."""
    weights = valid.to(x.dtype).unsqueeze(-1) if valid.dim() < x.dim() else valid.to(x.dtype)
    return (x * weights).sum(dim) / weights.sum(dim).clamp_min(1.0)


class PyramidSqueezeAttention(nn.Module):
    """1-D PSA over frames (eqs 1-5) followed by masked average pooling: (N, F, C) -> (N, C)."""

    def __init__(self, channels: int, kernel_sizes: tuple[int, ...] = PSA_KERNELS, reduction: int = 4) -> None:
        super().__init__()
        if channels % len(kernel_sizes) or channels < reduction:
            raise ConfigError(f"PSA needs a channel count divisible by {len(kernel_sizes)} and >= {reduction}, got {channels}")
        group = channels // len(kernel_sizes)
        self.convs = nn.ModuleList(nn.Conv1d(group, group, k, padding=k // 2) for k in kernel_sizes)
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, frames: Tensor, frame_valid: Tensor) -> Tensor:
        """frames (N, F, C), frame_valid (N, F) bool -> pooled C^v (N, C); zeros where no frame is valid."""
        order = (~frame_valid).to(torch.uint8).argsort(dim=1, stable=True)  # face frames first, in time order
        frame_valid = frame_valid.gather(1, order)
        x = frames.gather(1, order.unsqueeze(-1).expand_as(frames)) * frame_valid.unsqueeze(-1)
        groups = x.transpose(1, 2).chunk(len(self.convs), dim=1)
        y = torch.cat([conv(g) for conv, g in zip(self.convs, groups)], dim=1).transpose(1, 2)  # eqs 1-2, (N, F, C)
        z = masked_mean(y, frame_valid, dim=1)  # eq 3
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(z))))  # eq 4
        return masked_mean(y * weights.unsqueeze(1), frame_valid, dim=1)  # eq 5, then pooled


class ProjectionHead(nn.Module):
    """z = W2 ReLU(W1 f + b1) + b2 (eqs 15-20); L2-normalised inside the contrastive loss."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


@dataclass
class MCNOutput(ModelOutput):
    """``ModelOutput`` plus the per-modality contrastive projections z^m (B, L, projection_dim)."""

    projections: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class MCNCLConfig:
    """MCN-CL hyperparameters. ``psa=False`` uses the utterance-level visual vector instead of
    PSA over frames; ``multiattn=False`` concatenates without cross-attention; ``use_contrast=False``
    trains with CE alone. ``contrast_weights`` are α, β, γ of eq 27."""

    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768, "audio": 6373, "visual": 1000})
    num_classes: int = 6
    modalities: tuple[str, ...] = MODALITIES
    model_dim: int = 256
    num_heads: int = 4
    ffn_dim: int = 1024
    num_layers: int = 2
    projection_dim: int = 128
    classifier_hidden_dim: int = 256
    dropout: float = 0.1
    psa: bool = True
    multiattn: bool = True
    use_contrast: bool = True
    temperature: float = 0.1
    hard_negative_fraction: float = 0.3
    contrast_weights: dict[str, float] = field(default_factory=lambda: {"text": 0.1, "audio": 0.1, "visual": 0.1})

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        check_modalities(self.modalities, self.input_dims)
        if not 0.0 < self.hard_negative_fraction <= 1.0:
            raise ConfigError(f"hard_negative_fraction must be in (0, 1], got {self.hard_negative_fraction}")
        if self.temperature <= 0:
            raise ConfigError(f"contrastive temperature must be positive, got {self.temperature}")


class MCNCL(nn.Module):
    """``forward(batch) -> MCNOutput``; ``loss`` = CE + Σ_m weight_m · L_contrast^m (eqs 26-27)."""

    def __init__(self, config: MCNCLConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.needs_frames = c.psa and "visual" in c.modalities  # the trainer loads per-frame features
        self.psa = PyramidSqueezeAttention(c.input_dims["visual"]) if self.needs_frames else None
        self.projections = nn.ModuleDict({m: nn.Linear(c.input_dims[m], c.model_dim) for m in c.modalities})
        fuse = c.multiattn and len(c.modalities) > 1
        self.mcn = MultiAttn(c.modalities, c.model_dim, c.num_heads, c.ffn_dim, c.num_layers, c.dropout) if fuse else None
        self.heads = nn.ModuleDict({m: ProjectionHead(c.model_dim, c.projection_dim) for m in c.modalities})
        self.fc = nn.Linear(len(c.modalities) * c.model_dim, c.model_dim)
        self.mlp = nn.Sequential(
            nn.Linear(c.model_dim, c.classifier_hidden_dim), nn.ReLU(), nn.Dropout(c.dropout),
            nn.Linear(c.classifier_hidden_dim, c.classifier_hidden_dim), nn.ReLU(), nn.Dropout(c.dropout),
        )
        self.out = nn.Linear(c.classifier_hidden_dim, c.num_classes)

    def _visual_from_frames(self, batch: Mapping[str, Tensor], tokens: TokenIndex) -> tuple[Tensor, Tensor]:
        if "visual_frames" not in batch:
            raise ConfigError("MCN-CL with PSA needs per-frame visual features (batch['visual_frames'])")
        frame_valid = batch["visual_frame_mask"] & batch["mask"].unsqueeze(-1)
        if "visual_mask" in batch:
            frame_valid = frame_valid & batch["visual_mask"].unsqueeze(-1)
        return self.psa(tokens.pack(batch["visual_frames"]), tokens.pack(frame_valid)), frame_valid.any(-1)

    def forward(self, batch: Mapping[str, Tensor]) -> MCNOutput:
        c = self.config
        tokens = TokenIndex(batch["mask"])
        features, valid = modality_inputs(batch, c.modalities, tokens)
        if self.psa is not None:
            features["visual"], valid["visual"] = self._visual_from_frames(batch, tokens)
        projected = {m: self.projections[m](features[m]) for m in c.modalities}
        fused = self.mcn(projected, valid, tokens) if self.mcn is not None else projected
        h = self.fc(torch.cat([fused[m] for m in c.modalities], dim=-1))  # eqs 28-29
        logits = self.out(self.mlp(h))  # eqs 30-31 (before the softmax)
        return MCNOutput(
            logits=tokens.unpack(logits),
            fc_features=tokens.unpack(h),
            fused={m: tokens.unpack(f) for m, f in fused.items()},
            valid=valid,
            projections={m: tokens.unpack(self.heads[m](fused[m])) for m in c.modalities},
        )

    def loss(self, output: MCNOutput, batch: Mapping[str, Tensor], class_counts: Tensor | None = None) -> dict[str, Tensor]:
        c = self.config
        labeled = batch["mask"] & (batch["label"] >= 0)
        if not labeled.any():
            zero = output.logits.sum() * 0.0
            return {"ce": zero, "total": zero}
        terms = {"ce": F.cross_entropy(output.logits[labeled], batch["label"][labeled])}
        total = terms["ce"]
        if c.use_contrast:
            for m in c.modalities:
                rows = labeled & output.valid[m]
                terms[f"contrast_{m}"] = supervised_contrastive_loss(
                    output.projections[m][rows], batch["label"][rows],
                    temperature=c.temperature, hard_negative_fraction=c.hard_negative_fraction,
                )
                total = total + c.contrast_weights.get(m, 0.0) * terms[f"contrast_{m}"]
        terms["total"] = total
        return terms
