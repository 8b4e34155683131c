"""LMAM (Shou et al. §IV, Algorithm 1): the LMF-style low-rank query weight, intra- and inter-modal
matching attention, Ψ = A + GELU(x), the bc-LSTM host model."""

import pytest
import torch
import torch.nn.functional as F
from model_checks import assert_padding_and_missing_inputs_do_not_matter, parameters_without_gradient, random_batch
from test_train import BATCH, DIMS, EPOCHS, LR, features  # noqa: F401  (shared synthetic shard set fixture)

from erc.errors import ConfigError
from erc.models.blocks import MultiAttn, TokenIndex
from erc.models.lmam import LMAMFusion, LowRankQuery
from erc.models.registry import build_model
from erc.pipeline.train import TrainConfig, train

TINY = {"model_dim": 16, "rank": 4, "lstm_hidden_dim": 32, "classifier_hidden_dim": 64, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_query_is_one_lmf_weight_over_all_modalities():
    """Eqs 8-9 / LMF: Q = W̃ contracted with ξ_1 ⊗ ξ_2 ⊗ ξ_3, W̃ = Σ_k ω_1^(k) ⊗ ω_2^(k) ⊗ ω_3^(k) ⊗ v^(k)."""
    torch.manual_seed(0)
    dim, rank, out = 4, 3, 6
    query = LowRankQuery(3, dim, out, rank)
    with torch.no_grad():
        query.factors.normal_()  # away from the initial constant rows, so every term counts
    f, v = query.factors.detach(), query.out_factors.detach()
    weight = torch.einsum("ak,bk,ck,ko->abco", f[0], f[1], f[2], v)  # the full (d+1)^3 x out tensor
    xi = torch.cat([torch.randn(3, 7, dim), torch.ones(3, 7, 1)], dim=-1)  # eq 3: padded with 1
    expected = torch.einsum("abco,na,nb,nc->no", weight, xi[0], xi[1], xi[2]) + query.bias
    torch.testing.assert_close(query(xi), expected, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in query.parameters()) == rank * (3 * (dim + 1) + out) + out
    assert torch.linalg.matrix_rank(weight.reshape(-1, out)) <= rank


def test_lmam_block_is_far_smaller_than_cross_attention():
    dim, rank, modalities = 256, 45, ("text", "audio", "visual")
    lmam = sum(p.numel() for p in LMAMFusion(modalities, dim, rank=rank).parameters())
    attention = sum(p.numel() for p in MultiAttn(modalities, dim, num_heads=4, ffn_dim=4 * dim, num_layers=1).parameters())
    assert lmam / attention < 0.2, (lmam, attention)  # paper, Table XII: 0.62 M vs 3.42 M (0.18)
    queries = 3 * (rank * (3 * (dim + 1) + dim + 1) + dim + 1)  # one low-rank W̃_i per query modality
    matching = 3 * (2 * (dim + 1) + (dim + 1) * dim + dim)  # eq 7's Norm and Linear per matching modality
    assert lmam == queries + matching


def _fusion_inputs(seed=0, dim=8):
    torch.manual_seed(seed)
    mask = torch.tensor([[True, True, True, True]])
    features = {"text": torch.randn(4, dim), "audio": torch.randn(4, dim)}
    valid = {"text": mask, "audio": torch.tensor([[True, False, True, True]])}
    return features, valid, TokenIndex(mask)


def test_fusion_adds_gelu_of_its_input_and_never_reads_absent_inputs():
    """Algorithm 1, line 13: Ψ = attention outputs + GELU(x); an absent modality is neither matched nor queried."""
    features, valid, tokens = _fusion_inputs()
    fusion = LMAMFusion(("text", "audio"), 8, rank=3)
    out = fusion(features, valid, tokens)
    changed = {**features, "audio": features["audio"].clone()}
    changed["audio"][1] += 50.0  # utterance 1 has no audio
    again = fusion(changed, valid, tokens)
    for m in out:
        torch.testing.assert_close(again[m], out[m])
    with torch.no_grad():
        for matching in fusion.matching.values():
            matching.out.weight.zero_()
            matching.out.bias.zero_()
    silent = fusion(features, valid, tokens)  # every O_{i→j} = ReLU(0) = 0
    torch.testing.assert_close(silent["text"], F.gelu(features["text"]))
    torch.testing.assert_close(silent["audio"], F.gelu(features["audio"]) * valid["audio"][0].unsqueeze(-1))
    assert not torch.allclose(out["text"], silent["text"])


def test_each_modality_is_matched_against_itself_and_the_others():
    """Intra- and inter-modal matching together (abstract, Algorithm 1): text's output depends on the
    text query (the text→text path) and on the audio query (audio→text)."""
    features, valid, tokens = _fusion_inputs(seed=1)
    fusion = LMAMFusion(("text", "audio"), 8, rank=3)
    fusion(features, valid, tokens)["text"].square().sum().backward()
    for query in ("text", "audio"):
        grads = [p.grad for p in fusion.queries[query].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), query
    before = fusion(features, valid, tokens)["text"].detach()
    with torch.no_grad():
        fusion.queries["text"].out_factors.mul_(-3.0)  # change only the text query: only text→text reads it
    assert not torch.allclose(fusion(features, valid, tokens)["text"], before, atol=1e-4)


def test_every_query_reads_every_present_modality():
    """The LMF query of text changes with the audio features of an utterance, unless its audio is absent."""
    features, valid, tokens = _fusion_inputs(seed=2)
    fusion = LMAMFusion(("text", "audio"), 8, rank=3)
    def xi(f):
        return torch.stack([F.pad(f[m] * valid[m][0].unsqueeze(-1), (0, 1), value=1.0) for m in ("text", "audio")])

    query = fusion.queries["text"](xi(features))
    changed = {**features, "audio": features["audio"] + 1.0}
    moved = (fusion.queries["text"](xi(changed)) - query).abs().sum(-1)
    assert (moved[valid["audio"][0]] > 1e-4).all() and moved[1] == 0


def test_padding_and_missing_modalities_do_not_change_outputs():
    torch.manual_seed(0)
    assert_padding_and_missing_inputs_do_not_matter(build_model("lmam", input_dims=DIMS, num_classes=3, overrides=TINY).eval())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = build_model("lmam", input_dims=DIMS, num_classes=3, overrides=TINY)
    batch = random_batch([5, 3])
    net.loss(net(batch), batch)["total"].backward()
    assert not parameters_without_gradient(net)


def test_lmam_fusion_beats_every_single_modality(features, tmp_path):  # noqa: F811
    fused = _train_lmam(features, tmp_path / "fused", None).test
    assert fused["accuracy"] > 0.8, fused
    for m in DIMS:
        single = _train_lmam(features, tmp_path / m, [m]).test
        assert single["accuracy"] < 0.5 and fused["weighted_f1"] > single["weighted_f1"] + 0.3, (m, single)


def _train_lmam(features, out, modalities):  # noqa: F811
    return train(TrainConfig(model="lmam", features=features, out=out, epochs=EPOCHS, batch_size=BATCH, lr=LR,
                             device="cpu", modalities=modalities, model_overrides=TINY))


def test_multiemo_can_fuse_with_lmam():
    from test_train import TINY as TRAIN_TINY

    torch.manual_seed(0)
    overrides = TRAIN_TINY["multiemo"] | {"fusion": "lmam", "lmam_rank": 4}
    net = build_model("multiemo", input_dims=DIMS, num_classes=3, overrides=overrides)
    assert isinstance(net.multiattn, LMAMFusion)
    batch = random_batch([5, 3])
    net.loss(net(batch), batch)["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.multiattn.parameters())
    with pytest.raises(ConfigError, match="fusion must be"):
        build_model("multiemo", input_dims=DIMS, num_classes=3, overrides={"fusion": "sum"})
