"""SWFC and Soft-HGR against straightforward per-sample implementations, and the eq 22 combination."""

import math

import pytest
import torch

from erc.errors import ConfigError
from erc.models.blocks import ModelOutput
from erc.models.losses import (
    FusionLossConfig,
    fusion_loss,
    sample_weighted_focal_contrastive_loss,
    soft_hgr_loss,
    swfc_class_weights,
)


def swfc_reference(z, labels, temperature, focusing, alpha, class_counts=None, normalize=True, weights="batch"):
    """SWFC written anchor by anchor, pair by pair, as the authors' code computes it.

    weights: "batch" = eq 19 literally, (N / n_y)^α counted in the batch; "corpus" = the same with
    ``class_counts``; "normalized" = the authors' code: (sum(counts) / counts)^α over the classes,
    divided by its sum over the classes. Divided by N as the authors' code (and eq 22) do.
    """
    n = len(labels)
    if normalize:
        z = z / z.norm(dim=1, keepdim=True)
    if weights == "batch":
        class_weight = {int(c): (n / sum(int(y == c) for y in labels)) ** alpha for c in labels}
    else:
        counts = [float(c) for c in class_counts]
        raw = [(sum(counts) / c) ** alpha if c > 0 else 0.0 for c in counts]
        class_weight = {c: w / (sum(raw) if weights == "normalized" else 1.0) for c, w in enumerate(raw)}
    total = z.new_zeros(())
    for j in range(n):
        others = [s for s in range(n) if s != j]
        denominator = sum(torch.exp(z[j] @ z[s] / temperature) for s in others)
        positives = [g for g in others if labels[g] == labels[j]]
        if not positives:
            continue
        inner = z.new_zeros(())
        for g in positives:
            s = torch.exp(z[j] @ z[g] / temperature) / denominator
            inner = inner + (1 - s) ** focusing * torch.log(s)
        total = total + class_weight[int(labels[j])] * inner / len(positives)
    return -total / n


def soft_hgr_authors_reference(features):
    """The authors' Soft-HGR, term by term: per pair, mean_i f_i·g_i minus half of
    tr(K_f K_g) / N, where K_f[r, s] is the covariance of utterances r and s over the feature
    dimensions (what torch.cov computes on an (N, d) matrix); the sum over pairs is divided by N."""
    def utterance_covariance(f):
        n, d = f.shape
        means = [sum(float(f[r, k]) for k in range(d)) / d for r in range(n)]
        return [[sum((float(f[r, k]) - means[r]) * (float(f[s, k]) - means[s]) for k in range(d)) / (d - 1)
                 for s in range(n)] for r in range(n)]
    total = 0.0
    n = features[0].shape[0]
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            f, g = features[i], features[j]
            inner = sum(float(f[r] @ g[r]) for r in range(n)) / n
            kf, kg = utterance_covariance(f), utterance_covariance(g)
            trace = sum(kf[r][s] * kg[s][r] for r in range(n) for s in range(n))
            total += inner - 0.5 * trace / n
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
@pytest.mark.parametrize("weights", ["normalized", "batch", "corpus"])
def test_swfc_matches_per_sample_reference(normalize, weights):
    torch.manual_seed(0)
    # classes 0..5 of which 2 and 5 are absent; class 4 appears once (an anchor without positives)
    labels = torch.tensor([0, 1, 3, 0, 1, 1, 3, 0, 4, 3, 0, 1, 3, 3])
    z = torch.randn(len(labels), 6, dtype=torch.float64) * (1.0 if normalize else 0.3)
    class_counts = None if weights == "batch" else torch.tensor([50.0, 20.0, 7.0, 13.0, 3.0, 0.0], dtype=torch.float64)
    kwargs = dict(temperature=0.8, focusing=2.0, sample_weight_power=0.8)

    z1 = z.clone().requires_grad_()
    fast = sample_weighted_focal_contrastive_loss(z1, labels, class_counts=class_counts, normalize=normalize,
                                                  normalize_class_weights=weights == "normalized", **kwargs)
    fast.backward()
    z2 = z.clone().requires_grad_()
    slow = swfc_reference(z2, labels, 0.8, 2.0, 0.8, class_counts, normalize, weights)
    slow.backward()

    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-9, atol=1e-12)


def test_default_swfc_class_weights_sum_to_one_over_the_training_classes():
    counts = torch.tensor([4710.0, 1205.0, 268.0, 683.0, 1743.0, 271.0, 1109.0])  # MELD train
    weights = swfc_class_weights(torch.tensor([0, 3]), 0.8, counts, normalize=True)
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights.argmin() == 0 and weights.argmax() == 2  # the majority class weighs least
    literal = swfc_class_weights(torch.tensor([0, 3]), 0.8, counts, normalize=False)
    torch.testing.assert_close(weights, literal / literal.sum())


def test_swfc_weights_minority_classes_more():
    torch.manual_seed(1)
    z = torch.randn(12, 4)
    labels = torch.tensor([0] * 10 + [1] * 2)
    common = dict(temperature=0.8, focusing=2.0, normalize=True, normalize_class_weights=False)  # eq 19 literally
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


def test_soft_hgr_matches_the_authors_formula():
    torch.manual_seed(2)
    features = [torch.randn(9, 5, dtype=torch.float64) + 0.3 for _ in range(3)]
    expected = soft_hgr_authors_reference(features)
    assert soft_hgr_loss(features).item() == pytest.approx(expected, rel=1e-10)
    assert soft_hgr_loss(features, scale="authors").item() == pytest.approx(expected, rel=1e-10)


def test_swfc_saves_one_pair_matrix_and_keeps_the_dense_gradient():
    """Only log_softmax's (N, N) output is saved in float; the focal terms of the positive pairs
    give the gradient of the dense eq 18-19 expression."""
    torch.manual_seed(4)
    n = 200
    z = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (n,))
    options = dict(temperature=0.8, focusing=2.0, sample_weight_power=0.8)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = sample_weighted_focal_contrastive_loss(z, labels, **options)
    assert len({t.untyped_storage().data_ptr() for t in saved if t.shape == (n, n) and t.is_floating_point()}) == 1
    (grad,) = torch.autograd.grad(loss, z)

    weights = swfc_class_weights(labels, 0.8, None, normalize=True)
    positive = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~torch.eye(n, dtype=torch.bool)
    pair_weight = positive * (weights[labels] / positive.sum(dim=1)).unsqueeze(1)
    unit = torch.nn.functional.normalize(z, dim=-1)
    log_s = ((unit / 0.8) @ unit.T).fill_diagonal_(torch.finfo(torch.float64).min).log_softmax(dim=1)
    dense = -(pair_weight * (-torch.expm1(log_s)).pow(2.0) * log_s).sum() / n
    torch.testing.assert_close(loss, dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(dense, z)[0], rtol=1e-9, atol=1e-12)


def test_authors_soft_hgr_keeps_no_utterance_by_utterance_matrix_and_its_gradient():
    """The (d, d) form gives the gradient of the literal torch.cov (n, n) form and saves nothing
    n x n for the backward pass, so its memory stays linear in the number of utterances."""
    torch.manual_seed(3)
    n = 300
    features = [torch.randn(n, 6, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = soft_hgr_loss(features, scale="authors")
    assert saved_shapes and (n, n) not in saved_shapes
    grads = torch.autograd.grad(loss, features)
    literal = 0.0
    for i in range(3):
        for j in range(i + 1, 3):
            f, g = features[i], features[j]
            literal = literal + ((f * g).sum(dim=1).mean() - 0.5 * (torch.cov(f) * torch.cov(g)).sum() / n) / n
    for grad, expected in zip(grads, torch.autograd.grad(-literal, features)):
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)


def test_centred_soft_hgr_matches_eq_20():
    torch.manual_seed(2)
    features = [torch.randn(9, 3, dtype=torch.float64) for _ in range(3)]
    assert soft_hgr_loss(features, scale="centred").item() == pytest.approx(soft_hgr_reference(features), rel=1e-10)


@pytest.mark.parametrize("scale", ["authors", "centred"])
def test_soft_hgr_uses_rows_valid_in_both_features(scale):
    torch.manual_seed(3)
    features = [torch.randn(10, 3, dtype=torch.float64) for _ in range(3)]
    valid = [torch.rand(10) > 0.2 for _ in range(3)]
    valid[2][:] = False
    valid[2][:1] = True  # pairs with the third feature have < 2 rows and are skipped
    rows = valid[0] & valid[1]
    expected = (soft_hgr_authors_reference([f[rows] for f in features[:2]]) if scale == "authors"
                else soft_hgr_reference(features[:2], valid[:2]))
    assert soft_hgr_loss(features, valid, scale=scale).item() == pytest.approx(expected, rel=1e-10)
    # values at rows excluded by the masks are never read
    poked = [f.clone() for f in features]
    poked[0][~rows] = 1e6
    assert soft_hgr_loss(poked, valid, scale=scale).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("scale", ["authors", "centred"])
def test_soft_hgr_rewards_correlated_features(scale):
    torch.manual_seed(4)
    base = torch.randn(64, 8)
    correlated = soft_hgr_loss([base, base + 0.05 * torch.randn(64, 8)], scale=scale)
    independent = soft_hgr_loss([base, torch.randn(64, 8)], scale=scale)
    assert correlated < independent


def test_authors_soft_hgr_is_unbounded_along_a_shared_offset_and_centred_is_bounded():
    """The authors' scale (uncentred E[f·g], covariances centred per utterance) does not penalise
    adding one constant to every feature of an utterance, so its reward grows without limit along
    that direction; eq 20 centred stays within its bound, min(d, n - 1) / 2 per pair, whatever the
    offset. (The README's small-batch note rests on this.)"""
    torch.manual_seed(6)
    n, d = 12, 16
    f, g = torch.randn(n, d), torch.randn(n, d)
    offset = torch.randn(n, 1)  # one constant per utterance, shared by f and g
    authors = [soft_hgr_loss([f + c * offset, g + c * offset]).item() for c in (0.0, 10.0, 100.0)]
    assert authors[0] > authors[1] > authors[2] and authors[2] < authors[0] - 1e3
    for c in (0.0, 10.0, 100.0):
        centred = soft_hgr_loss([f + c * offset, f + c * offset], scale="centred").item()
        assert centred >= -min(d, n - 1) / 2 - 1e-3


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
    config = FusionLossConfig(swfc_weight=0.4, hgr_weight=0.3, hgr_scale="centred")
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


def test_fusion_loss_default_is_the_authors_scale():
    output, batch = _output_and_batch()
    counts = torch.tensor([10.0, 5.0, 3.0, 1.0])
    terms = fusion_loss(output, batch, counts, FusionLossConfig())
    expected = 0.3 * terms["ce"] + 0.4 * terms["swfc"] + 0.3 * terms["soft_hgr"]  # the 1/N is inside Soft-HGR
    assert terms["total"].item() == pytest.approx(expected.item())
    mask = batch["mask"]
    hgr = soft_hgr_authors_reference([output.fused[m][mask].detach().double() for m in ("text", "audio")])
    assert terms["soft_hgr"].item() == pytest.approx(hgr, rel=1e-5)


def test_fusion_loss_switches_and_class_weightings():
    output, batch = _output_and_batch()
    terms = fusion_loss(output, batch, None, FusionLossConfig(use_swfc=False, use_hgr=False))
    assert set(terms) == {"ce", "total"}
    assert terms["total"].item() == pytest.approx(0.3 * terms["ce"].item())
    with pytest.raises(ConfigError):
        fusion_loss(output, batch, None, FusionLossConfig(swfc_class_weights="corpus"))
    with pytest.raises(ConfigError):
        FusionLossConfig(hgr_scale="raw")._check_loss()
    counts = torch.tensor([10.0, 5.0, 3.0, 1.0])
    corpus = fusion_loss(output, batch, counts, FusionLossConfig(swfc_class_weights="corpus"))
    normalized = fusion_loss(output, batch, counts, FusionLossConfig())
    in_batch = fusion_loss(output, batch, counts, FusionLossConfig(swfc_class_weights="batch"))
    # L1 normalisation divides every class weight by the same sum
    raw_sum = ((counts.sum() / counts) ** 0.8).sum().item()
    assert corpus["swfc"].item() == pytest.approx(normalized["swfc"].item() * raw_sum, rel=1e-5)
    assert in_batch["swfc"].item() != pytest.approx(corpus["swfc"].item())


@pytest.mark.parametrize("name", ["multiemo", "xlstm-multiemo"])
def test_no_weighted_term_dominates_cross_entropy_at_initialisation(name):
    """A realistic batch at the papers' widths: 16 MELD-like dialogues of 5-20 utterances, 7 classes
    drawn with MELD's training distribution, RoBERTa/openSMILE/ResNet feature sizes. With the
    defaults (the authors' scale) neither μ1·SWFC nor μ2·Soft-HGR exceeds 3x (1 - μ1 - μ2)·CE."""
    from erc.models.registry import build_model

    torch.manual_seed(0)
    counts = torch.tensor([4710.0, 1205.0, 268.0, 683.0, 1743.0, 271.0, 1109.0])
    lengths = torch.randint(5, 21, (16,))
    length = int(lengths.max())
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    dims = {"text": 768, "audio": 6373, "visual": 1000}
    batch = {m: torch.randn(16, length, d) for m, d in dims.items()}
    batch |= {"mask": mask, "speaker": torch.randint(0, 2, (16, length)) * mask,
              "label": torch.multinomial(counts / counts.sum(), 16 * length, replacement=True).view(16, length).masked_fill(~mask, -1)}
    model = build_model(name, input_dims=dims, num_classes=7, overrides={"num_speakers": 2})
    config = model.config
    with torch.no_grad():
        terms = model.loss(model.train()(batch), batch, counts)
    ce = (1 - config.swfc_weight - config.hgr_weight) * terms["ce"].item()
    assert config.swfc_weight * abs(terms["swfc"].item()) < 3 * ce, terms
    assert config.hgr_weight * abs(terms["soft_hgr"].item()) < 3 * ce, terms
    literal = FusionLossConfig(swfc_class_weights="batch", hgr_scale="centred")
    with torch.no_grad():
        literal_terms = fusion_loss(model(batch), batch, counts, literal)
    assert 0.4 * literal_terms["swfc"].item() > 3 * ce  # the literal eq 19 scale is the one that dominates
