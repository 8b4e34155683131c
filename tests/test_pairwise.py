"""Pairwise modality fusion with density loss: edge weights, graphs, padding, gradients, learnability."""

import math

import pytest
import torch
from model_checks import assert_padding_and_missing_inputs_do_not_matter, parameters_without_gradient, random_batch
from test_train import BATCH, DIMS, LR, features  # noqa: F401  (shared synthetic shard set fixture)

from erc.models.blocks import angular_similarity, normalized_adjacency
from erc.models.losses import density_loss
from erc.models.pairwise import stream_graph
from erc.models.registry import build_model
from erc.pipeline.train import TrainConfig, train

TINY = {"lstm_hidden_dim": 8, "gcn_dim": 16, "gcn_layers": 2, "gru_hidden_dim": 16, "model_dim": 16,
        "attention_heads": 2, "attention_layers": 2, "classifier_hidden_dim": 32, "dropout": 0.0, "num_speakers": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_edge_weight_is_one_minus_angle_over_pi():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    weights = angular_similarity(a, a)
    expected = torch.tensor([
        [1.0, 0.5, 0.0, 0.75],
        [0.5, 1.0, 0.5, 0.75],
        [0.0, 0.5, 1.0, 0.25],
        [0.75, 0.75, 0.25, 1.0],
    ])
    torch.testing.assert_close(weights, expected, atol=1e-3, rtol=0)
    cosine = 0.3
    b = torch.tensor([[1.0, 0.0]]), torch.tensor([[cosine, math.sqrt(1 - cosine**2)]])
    torch.testing.assert_close(angular_similarity(*b), torch.tensor([[1 - math.acos(cosine) / math.pi]]))


def test_graph_has_intra_edges_and_gamma_weighted_inter_edges_only_between_valid_nodes():
    nodes = torch.randn(1, 2, 3, 4)  # two streams (modalities) over three utterances
    valid = torch.tensor([[[True, True, False], [True, True, True]]])
    gamma = 0.7
    adjacency = stream_graph(nodes, valid, gamma)[0]
    flat = nodes.reshape(6, 4)
    raw = angular_similarity(flat, flat)
    raw.fill_diagonal_(1.0)
    expected = torch.zeros(6, 6)
    for i in range(6):
        for j in range(6):
            same_stream, same_utterance = i // 3 == j // 3, i % 3 == j % 3
            if valid.flatten()[i] and valid.flatten()[j] and (same_stream or same_utterance):
                expected[i, j] = raw[i, j] * (1.0 if same_stream else gamma)
    degree = expected.sum(1)
    inv = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    torch.testing.assert_close(adjacency, inv[:, None] * expected * inv[None, :])
    assert adjacency[2].abs().sum() == 0 and adjacency[:, 2].abs().sum() == 0  # the invalid node is cut off


def test_normalized_adjacency_is_symmetric_with_unit_self_loops():
    adjacency = normalized_adjacency(torch.ones(1, 3, 3) * 0.5, torch.ones(1, 3, dtype=torch.bool))[0]
    torch.testing.assert_close(adjacency, adjacency.T)
    torch.testing.assert_close(adjacency.sum(1), torch.ones(3))  # (0.5 + 0.5 + 1) / 2 each


def test_density_loss_is_mean_l1_norm():
    torch.testing.assert_close(density_loss(torch.tensor([[1.0, -2.0], [0.0, 3.0]])), torch.tensor(3.0))


def test_padding_and_missing_modalities_do_not_change_outputs():
    torch.manual_seed(0)
    net = build_model("pairwise", input_dims=DIMS, num_classes=3, overrides=TINY).eval()
    assert_padding_and_missing_inputs_do_not_matter(net, missing=("visual", 1))


def test_loss_terms_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = build_model("pairwise", input_dims=DIMS, num_classes=3, overrides=TINY)
    batch = random_batch([5, 3])
    terms = net.loss(net(batch), batch)
    assert {"ce", "density", "ce_TA", "ce_TV", "ce_AV", "density_TA", "density_TV", "density_AV"} < set(terms)
    terms["total"].backward()
    assert not parameters_without_gradient(net)
    off = build_model("pairwise", input_dims=DIMS, num_classes=3, overrides=TINY | {"use_density": False, "use_pair_loss": False})
    assert set(off.loss(off(batch), batch)) == {"ce", "total"}


# The XOR task needs the PMF heads' FC layers (Fig. 2) and the L2 term of eqs 7 / 15 (weight decay):
# without them the dialogue-level encoders memorise the ~500 training utterances. One GCN / attention
# layer and 32-wide MFF / MAL keep the run short; 40 epochs because MAL learns on PMF's features.
LEARNABLE = TINY | {"gcn_layers": 1, "attention_layers": 1, "gru_hidden_dim": 32, "model_dim": 32}


def test_pairwise_fusion_beats_every_single_pair(features, tmp_path):  # noqa: F811
    """The pairwise model needs two modalities, so the single-input reference is each modality pair
    that lacks one of the label's two sources (text+visual, audio+visual)."""
    config_file = tmp_path / "l2.yaml"
    config_file.write_text("train: {weight_decay: 1.0e-2}\n")
    run = lambda name, modalities: train(TrainConfig(  # noqa: E731
        model="pairwise", features=features, out=tmp_path / name, epochs=40, batch_size=BATCH, lr=LR,
        device="cpu", modalities=modalities, model_overrides=LEARNABLE, config_file=config_file)).test
    fused = run("fused", None)
    assert fused["accuracy"] > 0.75, fused
    for pair in (["text", "visual"], ["audio", "visual"]):
        single = run("_".join(pair), pair)
        assert single["accuracy"] < 0.5 and fused["weighted_f1"] > single["weighted_f1"] + 0.3, (pair, single)


@pytest.mark.parametrize("joint", [False, True])
def test_mal_loss_reaches_pmf_only_when_joint(joint):
    """§3.1.3: PMF is trained on its own objective (eq 7); MAL's CE reaches it only with joint_pmf."""
    torch.manual_seed(0)
    net = build_model("pairwise", input_dims=DIMS, num_classes=3, overrides=TINY | {"joint_pmf": joint})
    batch = random_batch([5, 3])
    net.loss(net(batch), batch)["ce"].backward()
    pmf = [p for name, p in net.named_parameters() if name.startswith(("encoders.", "pair_graphs."))]
    reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in pmf]
    assert all(reached) if joint else not any(reached)
    assert net.stream_gru.rnn.weight_ih_l0.grad.abs().sum() > 0
