"""LMAM (Shou et al. §IV): low-rank query weights, matching attention, bc-LSTM host model."""

import pytest
import torch
from model_checks import assert_padding_and_missing_inputs_do_not_matter, parameters_without_gradient, random_batch
from test_train import BATCH, DIMS, EPOCHS, LR, features  # noqa: F401  (shared synthetic shard set fixture)

from erc.errors import ConfigError
from erc.models.blocks import MultiAttn, TokenIndex
from erc.models.lmam import LMAMFusion, LowRankLinear
from erc.models.registry import build_model
from erc.pipeline.train import TrainConfig, train

TINY = {"model_dim": 16, "rank": 4, "lstm_hidden_dim": 32, "classifier_hidden_dim": 64, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_low_rank_weight_has_rank_r_and_few_parameters():
    layer = LowRankLinear(33, 33, rank=5)
    assert torch.linalg.matrix_rank(layer.weight.detach()) == 5
    assert sum(p.numel() for p in layer.parameters()) == 5 * (33 + 33) + 33
    x = torch.randn(7, 33)
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)


def test_lmam_block_is_far_smaller_than_cross_attention():
    dim, modalities = 256, ("text", "audio", "visual")
    lmam = sum(p.numel() for p in LMAMFusion(modalities, dim, rank=45).parameters())
    attention = sum(p.numel() for p in MultiAttn(modalities, dim, num_heads=4, ffn_dim=4 * dim, num_layers=1).parameters())
    assert lmam / attention < 0.2, (lmam, attention)  # paper, Table XII: 0.62 M vs 3.42 M (0.18)
    full_rank = sum(p.numel() for p in LMAMFusion(modalities, dim, rank=dim + 1).parameters())
    assert full_rank - lmam == 3 * 2 * (dim + 1) * (dim + 1 - 45)  # rank-r factors: r·(in + out) each


def test_fusion_uses_only_valid_keys_and_adds_a_residual():
    torch.manual_seed(0)
    fusion = LMAMFusion(("text", "audio"), 8, rank=3)
    mask = torch.tensor([[True, True, True]])
    tokens = TokenIndex(mask)
    features = {"text": torch.randn(3, 8), "audio": torch.randn(3, 8)}
    audio_valid = torch.tensor([[True, False, True]])
    valid = {"text": mask, "audio": audio_valid}
    out = fusion(features, valid, tokens)
    changed = {**features, "audio": features["audio"].clone()}
    changed["audio"][1] += 50.0  # the absent audio of utterance 1 is never matched by text
    again = fusion(changed, valid, tokens)
    torch.testing.assert_close(again["text"], out["text"])
    assert not torch.allclose(out["text"], features["text"])


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
