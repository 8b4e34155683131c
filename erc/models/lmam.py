"""LMAM: low-rank matching attention fusion (Shou et al., §IV) and its bc-LSTM host model.

§IV-A  each modality's features get a constant-1 column (eq 3). For a query modality i and a
       matching modality j: Q_i = ξ_i W̃_i + b (eq 4), α = softmax(tanh(Q_i ξ_jᵀ / √d)) over the
       dialogue's utterances (eq 5), A = α ξ_j (eq 6), E = Norm(A + ξ_i), O = ReLU(Linear(E)) (eq 7).
       Keys and values are the matching modality's features themselves: W̃_i is the only
       attention weight ("matching attention"). The paper's √d_k divides by "the sequence
       length"; we use the usual feature width, which does not change with the dialogue.
§IV-B  W̃_i = Σ_{k=1}^{r} u_k v_kᵀ: one query projection per modality, a sum of r rank-one
       modality-specific factors (eqs 8-9), r = 45 by default.
Fig. 4b  early fusion with residual connections: each modality's features plus the LMAM outputs
       of its pairs enter the backbone. The backbone here is bc-LSTM: a bidirectional LSTM over
       each modality's dialogue, the contextual features concatenated and classified (CE loss).

``LMAMFusion`` has MultiAttn's interface (packed tokens in and out), so MultiEMO can use it in
place of MultiAttn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erc.errors import ConfigError
from erc.models.baselines import cross_entropy_loss
from erc.models.blocks import MODALITIES, ModelOutput, TokenIndex, check_modalities, masked_softmax, modality_inputs
from erc.models.context import RecurrentEncoder, encode_groups


class LowRankLinear(nn.Module):
    """x W̃ + b with W̃ = Σ_{k=1}^{rank} u_k v_kᵀ (in_dim x out_dim): rank·(in + out) + out parameters."""

    def __init__(self, in_dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LMAM rank must be at least 1, got {rank}")
        self.in_factors = nn.Parameter(torch.empty(rank, in_dim))  # u_k
        self.out_factors = nn.Parameter(torch.empty(rank, out_dim))  # v_k
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.normal_(self.in_factors, std=1.0 / math.sqrt(in_dim))
        nn.init.normal_(self.out_factors, std=1.0 / math.sqrt(rank))

    @property
    def weight(self) -> Tensor:
        """The full (in_dim, out_dim) matrix Σ_k u_k v_kᵀ."""
        return self.in_factors.T @ self.out_factors

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.in_factors.T) @ self.out_factors + self.bias


class MatchingAttention(nn.Module):
    """Eqs 5-7 for one (query modality, matching modality) pair, given the query Q_i."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim + 1)
        self.out = nn.Linear(dim + 1, dim)

    def forward(self, query: Tensor, query_features: Tensor, matching: Tensor, matching_valid: Tensor) -> Tensor:
        """query, query_features, matching (B, L, dim + 1); matching_valid (B, L) -> (B, L, dim)."""
        scores = torch.tanh(query @ matching.transpose(1, 2) / math.sqrt(matching.shape[-1]))
        weights = masked_softmax(scores, matching_valid.unsqueeze(1))
        return F.relu(self.out(self.norm(weights @ matching + query_features)))


class LMAMFusion(nn.Module):
    """Low-rank matching attention over every ordered modality pair, with residual connections.

    Modality i's output is x_i + Σ_{j≠i} O_{i←j}. Padding and absent modalities are never matched.
    """

    def __init__(self, modalities: Sequence[str], dim: int, rank: int = 45) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError("LMAM fusion needs at least two modalities")
        self.modalities = tuple(modalities)
        self.queries = nn.ModuleDict({m: LowRankLinear(dim + 1, dim + 1, rank) for m in self.modalities})
        self.pairs = nn.ModuleDict(
            {f"{m}_from_{n}": MatchingAttention(dim) for m in self.modalities for n in self.modalities if n != m}
        )

    def forward(self, features: Mapping[str, Tensor], valid: Mapping[str, Tensor], tokens: TokenIndex) -> dict[str, Tensor]:
        """features: (N, dim) packed tokens per modality; valid: (B, L) per modality."""
        xi = {m: tokens.unpack(F.pad(features[m], (0, 1), value=1.0)) for m in self.modalities}  # eq 3
        fused = {}
        for m in self.modalities:
            query = self.queries[m](xi[m])
            matched = [self.pairs[f"{m}_from_{n}"](query, xi[m], xi[n], valid[n]) for n in self.modalities if n != m]
            fused[m] = features[m] + tokens.pack(torch.stack(matched).sum(0))
        return fused


@dataclass
class LMAMConfig:
    """bc-LSTM + LMAM. ``lmam=False`` is the backbone alone (the "w/o LMAM" ablation)."""

    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768, "audio": 6373, "visual": 1000})
    num_classes: int = 6
    modalities: tuple[str, ...] = MODALITIES
    model_dim: int = 256
    rank: int = 45
    lstm_hidden_dim: int = 128
    classifier_hidden_dim: int = 256
    dropout: float = 0.1
    lmam: bool = True

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        check_modalities(self.modalities, self.input_dims)


class LMAM(nn.Module):
    """``forward(batch) -> ModelOutput``; cross-entropy loss."""

    def __init__(self, config: LMAMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.projections = nn.ModuleDict({m: nn.Linear(c.input_dims[m], c.model_dim) for m in c.modalities})
        self.fusion = LMAMFusion(c.modalities, c.model_dim, c.rank) if c.lmam and len(c.modalities) > 1 else None
        self.contexts = nn.ModuleDict({m: RecurrentEncoder(c.model_dim, c.lstm_hidden_dim) for m in c.modalities})
        self.classifier = nn.Sequential(
            nn.Dropout(c.dropout), nn.Linear(len(c.modalities) * 2 * c.lstm_hidden_dim, c.classifier_hidden_dim),
            nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(c.classifier_hidden_dim, c.num_classes),
        )

    def forward(self, batch: Mapping[str, Tensor]) -> ModelOutput:
        c = self.config
        tokens = TokenIndex(batch["mask"])
        features, valid = modality_inputs(batch, c.modalities, tokens)
        projected = {m: self.projections[m](features[m]) for m in c.modalities}
        fused = self.fusion(projected, valid, tokens) if self.fusion is not None else projected
        contextual = {m: encode_groups(self.contexts[m], tokens.unpack(fused[m]), valid[m]) for m in c.modalities}
        logits = self.classifier(torch.cat([contextual[m] for m in c.modalities], dim=-1))
        return ModelOutput(logits=logits, fused=contextual, valid=valid)

    loss = staticmethod(cross_entropy_loss)
