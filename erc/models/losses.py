"""Training objectives of MultiEMO (§3.6) shared by the fusion models.

``sample_weighted_focal_contrastive_loss`` (SWFC, eqs 18-19), ``soft_hgr_loss`` (eq 20) and
``fusion_loss``, which combines them with cross-entropy as in eq 22. Both SWFC and Soft-HGR are
vectorised over the whole batch: no Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from erc.errors import ConfigError
from erc.models.blocks import ModelOutput


@dataclass
class FusionLossConfig:
    """Hyperparameters of the MultiEMO objective (eq 22); model configs inherit these fields.

    ``swfc_weight`` is μ1, ``hgr_weight`` μ2; cross-entropy gets 1 - μ1 - μ2 (switching a term off,
    as the paper's ablations do, leaves the other coefficients unchanged). ``temperature`` is τ,
    ``sample_weight_power`` α and ``focusing`` γ of SWFC.

    ``swfc_class_weights``: "batch" weighs anchor j by (N / n_y)^α with n_y counted in the batch
    (eq 19); "corpus" uses the training-set class counts passed to ``loss`` instead.
    ``swfc_normalize`` L2-normalises z before the dot products of eq 18 (as the authors' code and
    the focal contrastive loss it builds on do; eq 18 itself writes the raw dot product).
    The L2 term λ‖θ‖² of eq 22 is the optimizer's weight decay (see the training preset).
    """

    temperature: float = 0.8
    sample_weight_power: float = 0.8
    focusing: float = 2.0
    swfc_weight: float = 0.4
    hgr_weight: float = 0.3
    use_swfc: bool = True
    use_hgr: bool = True
    swfc_class_weights: Literal["batch", "corpus"] = "batch"
    swfc_normalize: bool = True

    def _check_loss(self) -> None:
        if not (0.0 <= self.swfc_weight <= 1 and 0.0 <= self.hgr_weight <= 1 and self.swfc_weight + self.hgr_weight <= 1):
            raise ConfigError(f"need 0 <= μ1, μ2 and μ1 + μ2 <= 1, got {self.swfc_weight}, {self.hgr_weight}")
        if self.swfc_class_weights not in ("batch", "corpus"):
            raise ConfigError(f"swfc_class_weights must be 'batch' or 'corpus', got {self.swfc_class_weights!r}")
        if self.temperature <= 0:
            raise ConfigError(f"SWFC temperature must be positive, got {self.temperature}")


def sample_weighted_focal_contrastive_loss(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    focusing: float,
    sample_weight_power: float,
    class_counts: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """SWFC loss (MultiEMO eqs 18-19) divided by N, i.e. its share of eq 22.

    features (N, d) are the FC outputs z, labels (N,) class indices. For anchor j, s_{j:g} is the
    softmax over all other samples of z_j·z_g/τ; the loss sums -(1 - s)^γ log s over its positives
    (same label), averaged over them and weighted by (N / n_{y_j})^α. Anchors without a positive
    contribute nothing. ``class_counts`` (C,), if given, replaces the batch counts: the weight
    becomes (sum(counts) / counts[y_j])^α.
    """
    n = labels.numel()
    if n < 2:
        return features.sum() * 0.0
    if normalize:
        features = F.normalize(features, dim=-1)
    if class_counts is None:
        counts, total = torch.bincount(labels).to(features.dtype), float(n)
    else:
        counts = class_counts.to(device=features.device, dtype=features.dtype)
        total = counts.sum()
        counts = counts.clamp_min(1.0)  # a label absent from the corpus cannot occur anyway
    positive = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive.fill_diagonal_(False)
    # anchor weight (N / n_y)^α / |R_j| on each positive pair, zero elsewhere (eq 19)
    anchor_weight = (total / counts[labels]).pow(sample_weight_power) / positive.sum(dim=1).clamp_min(1)
    pair_weight = positive * anchor_weight.unsqueeze(1)

    similarity = (features / temperature) @ features.T
    # exclude z_j itself from A_j; finite, so that 0-weighted pairs stay 0 in value and gradient
    similarity = similarity.fill_diagonal_(torch.finfo(similarity.dtype).min)
    log_s = similarity.log_softmax(dim=1)  # log s_{j:g} (eq 18)
    focal = (-torch.expm1(log_s)).pow(focusing)  # (1 - s)^γ
    return -(pair_weight * focal * log_s).sum() / n


def soft_hgr_loss(features: Sequence[Tensor], valid: Sequence[Tensor] | None = None) -> Tensor:
    """Soft-HGR loss (MultiEMO eq 20) over every unordered pair of feature sets.

    features: (N, d) tensors, one per modality, row i of each describing the same utterance.
    valid: optional (N,) bool masks; a pair uses only rows valid in both. Features are centred per
    pair (the constraint E[f] = 0) and covariances are unbiased sample covariances. Returns
    -Σ_{pairs} (E[f·g] - ½ tr(cov(f) cov(g))). Pairs with fewer than two rows are skipped.
    """
    if valid is None:
        valid = [torch.ones(f.shape[0], dtype=torch.bool, device=f.device) for f in features]
    total = features[0].new_zeros(())
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            rows = valid[i] & valid[j]
            if int(rows.sum()) < 2:
                continue
            f = features[i][rows] - features[i][rows].mean(dim=0)
            g = features[j][rows] - features[j][rows].mean(dim=0)
            inner = (f * g).sum(dim=1).mean()
            covariance_product = (torch.cov(f.T) * torch.cov(g.T)).sum()  # tr(AB) for symmetric A, B
            total = total + inner - 0.5 * covariance_product
    return -total


def fusion_loss(
    output: ModelOutput,
    batch: Mapping[str, Tensor],
    class_counts: Tensor | None,
    config: FusionLossConfig,
) -> dict[str, Tensor]:
    """The full MultiEMO objective (eq 22) without the L2 term: each term and their "total".

    N is the number of labeled real utterances. "ce" and "swfc" are means over them; "soft_hgr"
    is eq 20 (over real utterances with both modalities present) and enters the total divided by
    N, exactly as eq 22 writes it. The terms are computed in float32 whatever the model's
    (autocast) precision.
    """
    labeled = batch["mask"] & (batch["label"] >= 0)
    labels = batch["label"][labeled]
    n = labels.numel()
    if n == 0:
        zero = output.logits.sum() * 0.0
        return {"ce": zero, "total": zero}
    ce = F.cross_entropy(output.logits[labeled].float(), labels)
    terms = {"ce": ce}
    total = (1.0 - config.swfc_weight - config.hgr_weight) * ce
    if config.use_swfc:
        if config.swfc_class_weights == "corpus" and class_counts is None:
            raise ConfigError("swfc_class_weights='corpus' needs the training-set class counts")
        swfc = sample_weighted_focal_contrastive_loss(
            output.fc_features[labeled].float(),
            labels,
            temperature=config.temperature,
            focusing=config.focusing,
            sample_weight_power=config.sample_weight_power,
            class_counts=class_counts if config.swfc_class_weights == "corpus" else None,
            normalize=config.swfc_normalize,
        )
        terms["swfc"] = swfc
        total = total + config.swfc_weight * swfc
    if config.use_hgr and len(output.fused) > 1:
        names = list(output.fused)
        hgr = soft_hgr_loss(
            [output.fused[m][batch["mask"]].float() for m in names], [output.valid[m][batch["mask"]] for m in names]
        )
        terms["soft_hgr"] = hgr
        total = total + config.hgr_weight * hgr / n
    terms["total"] = total
    return terms


def density_loss(features: Tensor) -> Tensor:
    """Density loss ‖E‖₁ (pairwise fusion eqs 6 and 14): the L1 norm of each row of ``features``
    (N, d), averaged over the N utterances so its weight does not depend on the batch size."""
    return features.abs().sum(dim=-1).mean() if features.numel() else features.sum() * 0.0


def hard_negative_mask(similarity: Tensor, negative: Tensor, fraction: float) -> Tensor:
    """For each anchor (row), its ⌈fraction · #negatives⌉ most similar negatives (MCN-CL eq 25).

    similarity (N, N), negative (N, N) bool. Ties are broken by index, so exactly that many are
    chosen per row.
    """
    count = (negative.sum(dim=1) * fraction).ceil().long()
    scores = similarity.masked_fill(~negative, float("-inf"))
    rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return negative & (rank < count.unsqueeze(1))


def supervised_contrastive_loss(
    features: Tensor, labels: Tensor, *, temperature: float, hard_negative_fraction: float = 1.0
) -> Tensor:
    """Supervised contrastive loss with hard-negative mining (MCN-CL eqs 24-26), mean over anchors.

    features (N, d) are L2-normalised here, so the similarity is the cosine. For anchor i the
    denominator holds its positives (same label, not i) and its hard negatives (see
    ``hard_negative_mask``; fraction 1.0 = all negatives, eq 24). Anchors without a positive
    contribute nothing.
    """
    n = labels.numel()
    if n < 2:
        return features.sum() * 0.0
    z = F.normalize(features, dim=-1)
    similarity = z @ z.T
    self_pair = torch.eye(n, dtype=torch.bool, device=z.device)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive, negative = same & ~self_pair, ~same
    hard = hard_negative_mask(similarity.detach(), negative, hard_negative_fraction)
    logits = (similarity / temperature).masked_fill(~(positive | hard), float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    has_positive = positive.any(dim=1)
    if not has_positive.any():
        return features.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
    return per_anchor[has_positive].mean()
