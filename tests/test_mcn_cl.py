"""MCN-CL: PSA over frames, hard-negative supervised contrastive loss, padding, gradients, learnability."""

import pytest
import torch
from model_checks import assert_padding_and_missing_inputs_do_not_matter, parameters_without_gradient, random_batch
from test_train import BATCH, DIMS, EPOCHS, LR, features  # noqa: F401  (shared synthetic shard set fixture)

from erc.models.losses import hard_negative_mask, supervised_contrastive_loss
from erc.models.mcn_cl import PyramidSqueezeAttention
from erc.models.registry import build_model
from erc.pipeline.train import TrainConfig, train

FRAMES = 5
TINY = {"model_dim": 16, "num_heads": 2, "ffn_dim": 32, "num_layers": 1, "projection_dim": 8,
        "classifier_hidden_dim": 32, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def frame_batch(lengths, seed=0):
    batch = random_batch(lengths, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    b, n = batch["mask"].shape
    batch["visual_frames"] = torch.randn(b, n, FRAMES, DIMS["visual"], generator=g)
    batch["visual_frame_mask"] = (torch.rand(b, n, FRAMES, generator=g) > 0.3) & batch["mask"].unsqueeze(-1)
    batch["visual_frame_mask"][..., 0] = batch["mask"]
    return batch


def test_psa_shapes_and_frames_without_faces_do_not_matter():
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(12)
    assert [conv.kernel_size[0] for conv in psa.convs] == [3, 5, 7, 9] and psa.convs[0].in_channels == 3
    assert psa.fc1.out_features == 3 and psa.fc2.out_features == 12
    a, b, c = torch.randn(3, 12)
    with_gap = torch.stack([a, torch.randn(12) * 100, b, c, torch.randn(12)]).unsqueeze(0)
    gap_mask = torch.tensor([[True, False, True, True, False]])
    compact = torch.stack([a, b, c, torch.zeros(12), torch.zeros(12)]).unsqueeze(0)
    compact_mask = torch.tensor([[True, True, True, False, False]])
    out = psa(with_gap, gap_mask)
    assert out.shape == (1, 12)
    torch.testing.assert_close(out, psa(compact, compact_mask))
    assert not torch.allclose(out, psa(with_gap, torch.ones_like(gap_mask)))
    torch.testing.assert_close(psa(with_gap, torch.zeros_like(gap_mask)), torch.zeros(1, 12))


def test_hard_negative_mining_keeps_exactly_the_top_30_percent():
    torch.manual_seed(0)
    n = 23
    similarity = torch.randn(n, n)
    labels = torch.randint(0, 3, (n,))
    negative = labels.unsqueeze(0) != labels.unsqueeze(1)
    hard = hard_negative_mask(similarity, negative, 0.3)
    for i in range(n):
        negatives = negative[i].nonzero().flatten()
        k = -(-3 * len(negatives) // 10)  # ceil(0.3 * count)
        expected = negatives[similarity[i, negatives].argsort(descending=True)[:k]]
        assert set(hard[i].nonzero().flatten().tolist()) == set(expected.tolist())
    assert not (hard & ~negative).any()


def test_contrastive_loss_matches_equation_26():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    tau = 0.5
    loss = supervised_contrastive_loss(z, labels, temperature=tau, hard_negative_fraction=0.5)
    sim = z @ z.T
    total = 0.0
    for i in range(6):
        positives = [j for j in range(6) if j != i and labels[j] == labels[i]]
        negatives = [j for j in range(6) if labels[j] != labels[i]]
        hard = sorted(negatives, key=lambda j: -sim[i, j])[:2]
        denominator = sum(torch.exp(sim[i, j] / tau) for j in hard + positives)
        total += -sum(torch.log(torch.exp(sim[i, p] / tau) / denominator) for p in positives) / len(positives)
    torch.testing.assert_close(loss, total / 6)
    all_negatives = supervised_contrastive_loss(z, labels, temperature=tau, hard_negative_fraction=1.0)
    assert all_negatives > loss  # more negatives in the denominator


def test_padding_and_missing_frames_do_not_change_outputs():
    torch.manual_seed(0)
    net = build_model("mcn-cl", input_dims=DIMS, num_classes=3, overrides=TINY).eval()
    assert net.needs_frames

    def spoil_faceless_frames(padded):
        padded["visual_frames"][0, 1][~padded["visual_frame_mask"][0, 1]] = 100.0

    assert_padding_and_missing_inputs_do_not_matter(net, frame_batch, garbage=spoil_faceless_frames)


def test_loss_terms_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = build_model("mcn-cl", input_dims=DIMS, num_classes=3, overrides=TINY)
    batch = frame_batch([7, 5])
    terms = net.loss(net(batch), batch)
    assert {"ce", "contrast_text", "contrast_audio", "contrast_visual", "total"} == set(terms)
    expected = terms["ce"] + 0.1 * (terms["contrast_text"] + terms["contrast_audio"] + terms["contrast_visual"])
    torch.testing.assert_close(terms["total"], expected)
    terms["total"].backward()
    assert not parameters_without_gradient(net)


def test_mcn_cl_fusion_beats_every_single_modality(features, tmp_path):  # noqa: F811
    """The shard set has no face frames, so PSA is off here (the visual vector is pure noise anyway).
    The contrastive weights are small: each modality alone says nothing about the label, so pulling
    same-label utterances together within one modality fights the task (see tests/test_train.py)."""
    tiny = TINY | {"psa": False, "contrast_weights": {"text": 0.01, "audio": 0.01, "visual": 0.01}}
    run = lambda name, modalities: train(TrainConfig(  # noqa: E731
        model="mcn-cl", features=features, out=tmp_path / name, epochs=EPOCHS, batch_size=BATCH, lr=LR,
        device="cpu", modalities=modalities, model_overrides=tiny)).test
    fused = run("fused", None)
    assert fused["accuracy"] > 0.8, fused
    for m in DIMS:
        single = run(m, [m])
        assert single["accuracy"] < 0.5 and fused["weighted_f1"] > single["weighted_f1"] + 0.3, (m, single)
