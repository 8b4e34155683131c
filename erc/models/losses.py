"""Training objectives of MultiEMO (§3.6) shared by the fusion models.

``sample_weighted_focal_contrastive_loss`` (SWFC, eqs 18-19), ``soft_hgr_loss`` (eq 20) and
``fusion_loss``, which combines them with cross-entropy as in eq 22. Both SWFC and Soft-HGR are
vectorised over the whole batch: no Python loop over samples.

Scale. μ1 = 0.4 and μ2 = 0.3 were tuned by the authors with the losses as their released code
computes them (Loss/SampleWeightedFocalContrastiveLoss.py and Loss/SoftHGRLoss.py of the public
MultiEMO repository), not as eqs 19-20 read literally: the class weights (N/n_c)^α are counted on
the training set and L1-normalised over the classes, and Soft-HGR's covariance term and total are
divided by N. Those are the defaults here, so the paper's μ mean what they meant there; the literal
equations stay available (``swfc_class_weights="batch"``, ``hgr_scale="centred"``). At the literal
eq 19 scale the SWFC term is 10-30x larger and outweighs cross-entropy twenty times over.
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

SWFC_CLASS_WEIGHTS = ("normalized", "batch", "corpus")
HGR_SCALES = ("authors", "centred")


@dataclass
class FusionLossConfig:
    """Hyperparameters of the MultiEMO objective (eq 22); model configs inherit these fields.

    ``swfc_weight`` is μ1, ``hgr_weight`` μ2; cross-entropy gets 1 - μ1 - μ2 (switching a term off,
    as the paper's ablations do, leaves the other coefficients unchanged). ``temperature`` is τ,
    ``sample_weight_power`` α and ``focusing`` γ of SWFC.

    ``swfc_class_weights`` (the weight of an anchor of class c):
      - "normalized" (default, the authors' code): (N/n_c)^α from the TRAINING-SET class counts,
        L1-normalised over the classes so that the weights sum to 1;
      - "batch": eq 19 as written, (N/n_c)^α with N and n_c counted in the batch, not normalised;
      - "corpus": eq 19's (N/n_c)^α with training-set counts, not normalised.
    ``swfc_normalize`` L2-normalises z before the dot products of eq 18 (as the authors' code and
    the focal contrastive loss it builds on do; eq 18 itself writes the raw dot product).
    ``hgr_scale``: "authors" (default) scales Soft-HGR as the authors' code does (see
    ``soft_hgr_loss``); "centred" is eq 20 with centred features and feature covariances,
    divided by N in eq 22.
    The L2 term λ‖θ‖² of eq 22 is the optimizer's weight decay (see the training preset).
    """

    temperature: float = 0.8
    sample_weight_power: float = 0.8
    focusing: float = 2.0
    swfc_weight: float = 0.4
    hgr_weight: float = 0.3
    use_swfc: bool = True
    use_hgr: bool = True
    swfc_class_weights: Literal["normalized", "batch", "corpus"] = "normalized"
    swfc_normalize: bool = True
    hgr_scale: Literal["authors", "centred"] = "authors"

    def _check_loss(self) -> None:
        if not (0.0 <= self.swfc_weight <= 1 and 0.0 <= self.hgr_weight <= 1 and self.swfc_weight + self.hgr_weight <= 1):
            raise ConfigError(f"need 0 <= μ1, μ2 and μ1 + μ2 <= 1, got {self.swfc_weight}, {self.hgr_weight}")
        if self.swfc_class_weights not in SWFC_CLASS_WEIGHTS:
            raise ConfigError(f"swfc_class_weights must be one of {SWFC_CLASS_WEIGHTS}, got {self.swfc_class_weights!r}")
        if self.hgr_scale not in HGR_SCALES:
            raise ConfigError(f"hgr_scale must be one of {HGR_SCALES}, got {self.hgr_scale!r}")
        if self.temperature <= 0:
            raise ConfigError(f"SWFC temperature must be positive, got {self.temperature}")


def swfc_class_weights(
    labels: Tensor, power: float, class_counts: Tensor | None = None, normalize: bool = False
) -> Tensor:
    """The weight of each class, (N / n_c)^α (eq 19), indexed by class.

    Counts come from ``class_counts`` (C,) when given (the training set), else from ``labels``
    (the batch). With ``normalize`` the weights are divided by their sum over the classes (L1
    normalisation, as the authors' code does). A class without any count gets weight 0 (with
    training-set counts it cannot occur in a training batch).
    """
    counts = (torch.bincount(labels) if class_counts is None else class_counts.to(labels.device)).double()
    weights = (counts.sum() / counts.clamp_min(1.0)).pow(power) * (counts > 0)
    return weights / weights.sum() if normalize else weights


def sample_weighted_focal_contrastive_loss(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    focusing: float,
    sample_weight_power: float,
    class_counts: Tensor | None = None,
    normalize_class_weights: bool = True,
    normalize: bool = True,
) -> Tensor:
    """SWFC loss (MultiEMO eqs 18-19) divided by N, i.e. its share of eq 22.

    features (N, d) are the FC outputs z, labels (N,) class indices. For anchor j, s_{j:g} is the
    softmax over all other samples of z_j·z_g/τ; the loss sums -(1 - s)^γ log s over its positives
    (same label), averaged over them, weighted by the anchor's class weight, summed over anchors
    and divided by N (as the authors' code does). Anchors without a positive contribute nothing.
    Class weights: see ``swfc_class_weights`` (``class_counts`` = training-set counts, or None for
    the batch's; ``normalize_class_weights`` = L1-normalised over the classes).
    """
    n = labels.numel()
    if n < 2:
        return features.sum() * 0.0
    if normalize:
        features = F.normalize(features, dim=-1)
    class_weight = swfc_class_weights(labels, sample_weight_power, class_counts, normalize_class_weights)
    positive = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive.fill_diagonal_(False)
    # flat indices j·N + g of the positive pairs (on a GPU, reading their count is one host synchronisation)
    pairs = positive.view(-1).nonzero().squeeze(1)
    # anchor weight w_{y_j} / |R_j| of each positive pair
    anchor_weight = class_weight.to(features.dtype)[labels] / positive.sum(dim=1).clamp_min(1)
    pair_weight = anchor_weight[pairs // n]

    similarity = (features / temperature) @ features.T
    # exclude z_j itself from A_j (a finite minimum keeps every value and gradient finite)
    similarity = similarity.fill_diagonal_(torch.finfo(similarity.dtype).min)
    # log s_{j:g} (eq 18) of the positive pairs only: the focal terms keep no (N, N) tensors
    log_s = similarity.log_softmax(dim=1).view(-1).index_select(0, pairs)
    focal = (-torch.expm1(log_s)).pow(focusing)  # (1 - s)^γ
    return -(pair_weight * focal * log_s).sum() / n


def soft_hgr_loss(
    features: Sequence[Tensor], valid: Sequence[Tensor] | None = None, *, scale: str = "authors"
) -> Tensor:
    """Soft-HGR loss (MultiEMO eq 20) over every unordered pair of feature sets.

    features: (N, d) tensors, one per modality, row i of each describing the same utterance.
    valid: optional (N,) bool masks; a pair uses only the n rows valid in both (pairs with fewer
    than two rows are skipped). Per pair, with f, g (n, d):

    - ``scale="authors"`` (the authors' Loss/SoftHGRLoss.py, for which μ2 = 0.3 was tuned):
      E[f·g] over the rows, uncentred; the covariance term tr(cov(f) cov(g)) / n with torch.cov
      of the (n, d) matrix, i.e. the (n, n) covariances between utterances over the feature
      dimensions (computed through the equal (d, d) form, so memory stays linear in n); the
      pair's value E[f·g] - ½·that, divided by n. This already carries eq 22's
      1/N, so ``fusion_loss`` adds it as is.
    - ``scale="centred"`` (eq 20 as written): features centred over the rows (E[f] = 0), unbiased
      (d, d) feature covariances, E[f·g] - ½ tr(cov(f) cov(g)), not divided by n.

    Returns minus the sum over pairs.
    """
    if scale not in HGR_SCALES:
        raise ConfigError(f"hgr_scale must be one of {HGR_SCALES}, got {scale!r}")
    if valid is None:
        valid = [torch.ones(f.shape[0], dtype=torch.bool, device=f.device) for f in features]
    total = features[0].new_zeros(())
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            rows = valid[i] & valid[j]
            n = int(rows.sum())
            if n < 2:
                continue
            f, g = features[i][rows], features[j][rows]
            if scale == "authors":
                inner = (f * g).sum(dim=1).mean()
                # tr(cov(f) cov(g)) of the (n, n) covariances = ||F^T G||_F^2 / (d - 1)^2 with F, G
                # each row centred over its d features: a (d, d) product instead of two (n, n) ones
                f_rows, g_rows = f - f.mean(dim=1, keepdim=True), g - g.mean(dim=1, keepdim=True)
                covariance_product = (f_rows.T @ g_rows).pow(2).sum() / (f.shape[1] - 1) ** 2 / n
                total = total + (inner - 0.5 * covariance_product) / n
            else:
                f, g = f - f.mean(dim=0), g - g.mean(dim=0)
                inner = (f * g).sum(dim=1).mean()
                covariance_product = (torch.cov(f.T) * torch.cov(g.T)).sum()
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
    is ``soft_hgr_loss`` over real utterances with both modalities present, entering the total as
    the authors' code adds it (``hgr_scale="authors"``) or divided by N as eq 22 writes it
    (``"centred"``). ``class_counts`` are the training-set counts the default SWFC class weights
    need; without them the batch's counts stand in. The terms are computed in float32 whatever
    the model's (autocast) precision.
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
            class_counts=None if config.swfc_class_weights == "batch" else class_counts,
            normalize_class_weights=config.swfc_class_weights == "normalized",
            normalize=config.swfc_normalize,
        )
        terms["swfc"] = swfc
        total = total + config.swfc_weight * swfc
    if config.use_hgr and len(output.fused) > 1:
        names = list(output.fused)
        hgr = soft_hgr_loss(
            [output.fused[m][batch["mask"]].float() for m in names], [output.valid[m][batch["mask"]] for m in names],
            scale=config.hgr_scale,
        )
        terms["soft_hgr"] = hgr
        total = total + config.hgr_weight * (hgr if config.hgr_scale == "authors" else hgr / n)
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
