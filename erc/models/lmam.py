"""LMAM: low-rank matching attention fusion (Shou et al., §IV, Algorithm 1) and its bc-LSTM host model.

§IV-A  each modality's features get a constant-1 column: ξ_n = [x_n, 1] (eq 3).
§IV-B  the query weight of query modality i is ONE weight over all modalities, decomposed into
       modality-specific factors as LMF does (Liu et al. 2018, the paper's ref [26]; Fig. 2, eqs
       8-9): W̃_i = Σ_{k=1}^{r} ω_{1,i}^{(k)} ⊗ … ⊗ ω_{N,i}^{(k)} ⊗ v_i^{(k)}, ω_{n,i}^{(k)} ∈ R^{d+1}.
       Applied to the outer product of the padded features it is computed without forming either
       tensor: Q_i = (Π_n ξ_n Ω_{n,i}) V_i + b_i (products elementwise over the rank). The padding 1
       keeps every unimodal and bimodal term of the product ("intra-modal semantic information is
       preserved during inter-modal feature fusion", Fig. 2). r = 45 (§V-H).
§IV-A  matching (eqs 5-7) of every query modality i against every matching modality j, j = i
       included ("intra-modal and inter-modal similarities computed simultaneously", abstract):
       α = softmax(tanh(Q_i ξ_jᵀ / √d)) over j's valid utterances (eq 5), A = α ξ_j (eq 6),
       O_{i→j} = ReLU(Linear_j(Norm_j(A + ξ_j))) (eq 7; I, the residual, is the matching features,
       Fig. 4d). Keys and values are the matching features themselves: the query weight is the
       only attention weight ("matching attention").
Alg. 1 Ψ_j = Σ_i O_{i→j} + GELU(x_j) (line 13: the attention outputs plus GELU of the modality).
Fig. 4b early fusion with residual connections: x_j + Ψ_j enters the backbone, bc-LSTM: a
       bidirectional LSTM over each modality's dialogue, the contextual features concatenated and
       classified (CE loss).

Ours, where the paper is silent or loose: eq 5 divides by √d_k with d_k "the sequence length";
we use the padded feature width d + 1, which does not change with the dialogue. The eq 7 Norm /
Linear is one per matching modality (shared by its N queries), which keeps LMAM under a third of
a cross-attention block's parameters (§I, Table XII). Initialisation: the factors' constant-1 rows
start at 1, so Q_i starts as 1 + a sum of unimodal linear terms. Padding and absent modalities are
never matched and enter the query as ξ = [0, 1] (their constant only).

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


class LowRankQuery(nn.Module):
    """Q = (Π_n ξ_n Ω_n) V + b: one (N+1)-order weight in rank-r modality-specific factors (eqs 8-9).

    ``factors[n]`` is Ω_n = [ω_n^{(1)} … ω_n^{(r)}] ((d+1) x r), ``out_factors`` V = [v^{(1)} … v^{(r)}]ᵀ
    (r x out_dim): r·(N·(d+1) + out_dim) + out_dim parameters for a weight of (d+1)^N·out_dim entries.
    """

    def __init__(self, num_modalities: int, dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LMAM rank must be at least 1, got {rank}")
        self.factors = nn.Parameter(torch.empty(num_modalities, dim + 1, rank))
        self.out_factors = nn.Parameter(torch.empty(rank, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.normal_(self.factors, std=1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.factors[:, dim] = 1.0  # the rows read by the constant 1: each factor starts at 1 + ⟨x_n, ω⟩
        nn.init.normal_(self.out_factors, std=1.0 / math.sqrt(rank))

    def forward(self, xi: Tensor) -> Tensor:
        """xi (N, ..., d + 1): the padded features of every modality -> (..., out_dim)."""
        per_modality = torch.einsum("n...d,ndr->n...r", xi, self.factors)  # ξ_n Ω_n
        return per_modality.prod(dim=0) @ self.out_factors + self.bias


class MatchingAttention(nn.Module):
    """Eqs 5-7 for one matching modality j, given a query Q_i: O = ReLU(Linear(Norm(α ξ_j + ξ_j)))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim + 1)
        self.out = nn.Linear(dim + 1, dim)

    def forward(self, query: Tensor, matching: Tensor, matching_valid: Tensor) -> Tensor:
        """query, matching (B, L, dim + 1); matching_valid (B, L) -> (B, L, dim)."""
        scores = torch.tanh(query @ matching.transpose(1, 2) / math.sqrt(matching.shape[-1]))  # eq 5
        attended = masked_softmax(scores, matching_valid.unsqueeze(1)) @ matching  # eq 6
        return F.relu(self.out(self.norm(attended + matching)))  # eq 7


class LMAMFusion(nn.Module):
    """Low-rank matching attention (Algorithm 1): Ψ_j = Σ_i O_{i→j} + GELU(x_j), i and j over all modalities.

    Padding and absent modalities are never matched, and their features are read as zeros.
    """

    def __init__(self, modalities: Sequence[str], dim: int, rank: int = 45) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError("LMAM fusion needs at least two modalities")
        self.modalities = tuple(modalities)
        n = len(self.modalities)
        self.queries = nn.ModuleDict({m: LowRankQuery(n, dim, dim + 1, rank) for m in self.modalities})  # W̃_i
        self.matching = nn.ModuleDict({m: MatchingAttention(dim) for m in self.modalities})

    def forward(self, features: Mapping[str, Tensor], valid: Mapping[str, Tensor], tokens: TokenIndex) -> dict[str, Tensor]:
        """features: (N, dim) packed tokens per modality; valid: (B, L) per modality -> Ψ per modality."""
        x = {m: features[m] * tokens.pack(valid[m]).unsqueeze(-1) for m in self.modalities}
        xi = {m: tokens.unpack(F.pad(x[m], (0, 1), value=1.0)) for m in self.modalities}  # eq 3
        stacked = torch.stack([xi[m] for m in self.modalities])
        queries = {i: self.queries[i](stacked) for i in self.modalities}  # eqs 4, 8-9
        psi = {}
        for j in self.modalities:
            matched = sum(self.matching[j](queries[i], xi[j], valid[j]) for i in self.modalities)
            psi[j] = tokens.pack(matched) + F.gelu(x[j])  # Algorithm 1, line 13
        return psi


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
        if self.fusion is not None:  # Fig. 4b: the features plus LMAM's output
            psi = self.fusion(projected, valid, tokens)
            projected = {m: projected[m] + psi[m] for m in c.modalities}
        contextual = {m: encode_groups(self.contexts[m], tokens.unpack(projected[m]), valid[m]) for m in c.modalities}
        logits = self.classifier(torch.cat([contextual[m] for m in c.modalities], dim=-1))
        return ModelOutput(logits=logits, fused=contextual, valid=valid)

    loss = staticmethod(cross_entropy_loss)
