"""SWFC and Soft-HGR against straightforward per-sample implementations, and the eq 22 combination."""

import math

import pytest
import torch

from erc.errors import ConfigError
from erc.models.blocks import ModelOutput
from erc.models.losses import FusionLossConfig, fusion_loss, sample_weighted_focal_contrastive_loss, soft_hgr_loss


def swfc_reference(z, labels, temperature, focusing, alpha, class_counts=None, normalize=True):
    """MultiEMO eqs 18-19 written anchor by anchor, pair by pair; divided by N as in eq 22."""
    n = len(labels)
    if normalize:
        z = z / z.norm(dim=1, keepdim=True)
    total = z.new_zeros(())
    for j in range(n):
        others = [s for s in range(n) if s != j]
        denominator = sum(torch.exp(z[j] @ z[s] / temperature) for s in others)
        positives = [g for g in others if labels[g] == labels[j]]
        if not positives:
            continue
        if class_counts is None:
            weight = (n / sum(int(labels[g] == labels[j]) for g in range(n))) ** alpha
        else:
            weight = (float(class_counts.sum()) / float(class_counts[labels[j]])) ** alpha
        inner = z.new_zeros(())
        for g in positives:
            s = torch.exp(z[j] @ z[g] / temperature) / denominator
            inner = inner + (1 - s) ** focusing * torch.log(s)
        total = total + weight * inner / len(positives)
    return -total / n


def soft_hgr_reference(features, valid=None):
    """Eq 20 with explicit sums: centred features, sample means, unbiased covariances."""
    total = 0.0
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            rows = [r for r in range(features[i].shape[0]) if valid is None or (valid[i][r] and valid[j][r])]
            f, g = features[i][rows], features[j][rows]
            n, d = f.shape
            f = f - sum(f[r] for r in range(n)) / n
            g = g - sum(g[r] for r in range(n)) / n
            expectation = sum(float(f[r] @ g[r]) for r in range(n)) / n
            cov_f = [[sum(float(f[r, a] * f[r, b]) for r in range(n)) / (n - 1) for b in range(d)] for a in range(d)]
            cov_g = [[sum(float(g[r, a] * g[r, b]) for r in range(n)) / (n - 1) for b in range(d)] for a in range(d)]
            trace = sum(cov_f[a][b] * cov_g[b][a] for a in range(d) for b in range(d))
            total += expectation - 0.5 * trace
    return -total


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("use_corpus_counts", [False, True])
def test_swfc_matches_per_sample_reference(normalize, use_corpus_counts):
    torch.manual_seed(0)
    # classes 0..5 of which 2 and 5 are absent; class 4 appears once (an anchor without positives)
    labels = torch.tensor([0, 1, 3, 0, 1, 1, 3, 0, 4, 3, 0, 1, 3, 3])
    z = torch.randn(len(labels), 6, dtype=torch.float64) * (1.0 if normalize else 0.3)
    class_counts = torch.tensor([50.0, 20.0, 7.0, 13.0, 3.0, 0.0], dtype=torch.float64) if use_corpus_counts else None
    kwargs = dict(temperature=0.8, focusing=2.0, sample_weight_power=0.8)

    z1 = z.clone().requires_grad_()
    fast = sample_weighted_focal_contrastive_loss(z1, labels, class_counts=class_counts, normalize=normalize, **kwargs)
    fast.backward()
    z2 = z.clone().requires_grad_()
    slow = swfc_reference(z2, labels, 0.8, 2.0, 0.8, class_counts, normalize)
    slow.backward()

    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-9, atol=1e-12)


def test_swfc_weights_minority_classes_more():
    torch.manual_seed(1)
    z = torch.randn(12, 4)
    labels = torch.tensor([0] * 10 + [1] * 2)
    common = dict(temperature=0.8, focusing=2.0, normalize=True)
    flat = sample_weighted_focal_contrastive_loss(z, labels, sample_weight_power=0.0, **common)
    weighted = sample_weighted_focal_contrastive_loss(z, labels, sample_weight_power=1.0, **common)
    # with α = 1 every class-1 anchor counts 6x, every class-0 anchor 1.2x: the loss must grow
    assert weighted > flat * 1.2


def test_swfc_degenerate_batches_are_zero_and_differentiable():
    z = torch.randn(1, 4, requires_grad=True)
    loss = sample_weighted_focal_contrastive_loss(z, torch.tensor([2]), temperature=0.8, focusing=2.0, sample_weight_power=0.8)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    # no anchor has a positive: zero as well, and finite gradients
    z = torch.randn(3, 4, requires_grad=True)
    loss = sample_weighted_focal_contrastive_loss(z, torch.tensor([0, 1, 2]), temperature=0.8, focusing=2.0, sample_weight_power=0.8)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_soft_hgr_matches_reference():
    torch.manual_seed(2)
    features = [torch.randn(9, 3, dtype=torch.float64) for _ in range(3)]
    assert soft_hgr_loss(features).item() == pytest.approx(soft_hgr_reference(features), rel=1e-10)


def test_soft_hgr_uses_rows_valid_in_both_features():
    torch.manual_seed(3)
    features = [torch.randn(10, 3, dtype=torch.float64) for _ in range(3)]
    valid = [torch.rand(10) > 0.2 for _ in range(3)]
    valid[2][:] = False
    valid[2][:1] = True  # pairs with the third feature have < 2 rows and are skipped
    expected = soft_hgr_reference(features[:2], valid[:2])
    assert soft_hgr_loss(features, valid).item() == pytest.approx(expected, rel=1e-10)
    # values at rows excluded by the masks are never read
    poked = [f.clone() for f in features]
    poked[0][~(valid[0] & valid[1])] = 1e6
    assert soft_hgr_loss(poked, valid).item() == pytest.approx(expected, rel=1e-10)


def test_soft_hgr_rewards_correlated_features():
    torch.manual_seed(4)
    base = torch.randn(64, 8)
    correlated = soft_hgr_loss([base, base + 0.05 * torch.randn(64, 8)])
    independent = soft_hgr_loss([base, torch.randn(64, 8)])
    assert correlated < independent


def _output_and_batch(seed=5):
    torch.manual_seed(seed)
    batch, length, classes = 3, 5, 4
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    label = torch.randint(0, classes, (batch, length)).masked_fill(~mask, -1)
    label[0, 2] = -1  # a real but unlabeled utterance
    fused = {m: torch.randn(batch, length, 6, requires_grad=True) for m in ("text", "audio")}
    output = ModelOutput(
        logits=torch.randn(batch, length, classes, requires_grad=True),
        fc_features=torch.randn(batch, length, 6, requires_grad=True),
        fused=fused,
        valid={m: mask for m in fused},
    )
    return output, {"mask": mask, "label": label}


def test_fusion_loss_combines_terms_as_eq_22():
    output, batch = _output_and_batch()
    config = FusionLossConfig(swfc_weight=0.4, hgr_weight=0.3)
    terms = fusion_loss(output, batch, None, config)
    labeled = batch["mask"] & (batch["label"] >= 0)
    n = int(labeled.sum())
    ce = torch.nn.functional.cross_entropy(output.logits[labeled], batch["label"][labeled])
    assert terms["ce"].item() == pytest.approx(ce.item())
    expected = 0.3 * terms["ce"] + 0.4 * terms["swfc"] + 0.3 * terms["soft_hgr"] / n
    assert terms["total"].item() == pytest.approx(expected.item())
    terms["total"].backward()
    assert all(math.isfinite(v.item()) for v in terms.values())


def test_fusion_loss_ignores_padding_and_unlabeled_utterances():
    output, batch = _output_and_batch()
    config = FusionLossConfig()
    before = fusion_loss(output, batch, None, config)
    unlabeled = batch["label"] < 0
    with torch.no_grad():
        output.logits[unlabeled] = 1e4
        output.fc_features[unlabeled] = 1e4
    after = fusion_loss(output, batch, None, config)
    assert after["ce"].item() == pytest.approx(before["ce"].item())
    assert after["swfc"].item() == pytest.approx(before["swfc"].item())


def test_fusion_loss_switches_and_corpus_weighting():
    output, batch = _output_and_batch()
    terms = fusion_loss(output, batch, None, FusionLossConfig(use_swfc=False, use_hgr=False))
    assert set(terms) == {"ce", "total"}
    assert terms["total"].item() == pytest.approx(0.3 * terms["ce"].item())
    with pytest.raises(ConfigError):
        fusion_loss(output, batch, None, FusionLossConfig(swfc_class_weights="corpus"))
    counts = torch.tensor([10.0, 5.0, 3.0, 1.0])
    corpus = fusion_loss(output, batch, counts, FusionLossConfig(swfc_class_weights="corpus"))
    in_batch = fusion_loss(output, batch, counts, FusionLossConfig())
    assert corpus["swfc"].item() != pytest.approx(in_batch["swfc"].item())
