"""Pairwise modality fusion with density loss: edge weights, graphs (eq 5), padding, gradients, the two-stage
schedule of §3.1.3, learnability."""

import math

import pytest
import torch
import yaml
from model_checks import assert_padding_and_missing_inputs_do_not_matter, parameters_without_gradient, random_batch
from test_train import BATCH, DIMS, LR, features  # noqa: F401  (shared synthetic shard set fixture)
from typer.testing import CliRunner

from erc.cli.main import app
from erc.errors import ConfigError
from erc.models.blocks import angular_similarity, normalized_adjacency
from erc.models.losses import density_loss
from erc.models.pairwise import PMF_MODULES, GraphFusion, stream_graph
from erc.models.registry import TrainHyperparameters, build_model
from erc.pipeline.train import TrainConfig, plan_stages, train

TINY = {"lstm_hidden_dim": 8, "gcn_dim": 16, "gcn_layers": 2, "gru_hidden_dim": 16, "model_dim": 16,
        "attention_heads": 2, "attention_layers": 2, "classifier_hidden_dim": 32, "dropout": 0.0, "pmf_dropout": 0.0,
        "num_speakers": 2}


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
# without them the dialogue-level encoders memorise the ~500 training utterances. λ = 1e-3 (50x the
# paper's): at 1e-2 Adam's coupled L2 outweighs the loss gradient of every layer but the first after
# the encoders, and decays them to zero within a few epochs. One GCN / attention layer and 32-wide
# MFF / MAL keep the run short; 40 epochs because MAL learns on PMF's features.
LEARNABLE = TINY | {"gcn_layers": 1, "attention_layers": 1, "gru_hidden_dim": 32, "model_dim": 32}


def test_pairwise_fusion_beats_every_single_pair(features, tmp_path):  # noqa: F811
    """The pairwise model needs two modalities, so the single-input reference is each modality pair
    that lacks one of the label's two sources (text+visual, audio+visual)."""
    config_file = tmp_path / "l2.yaml"
    config_file.write_text("train: {weight_decay: 1.0e-3}\n")
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


def test_pmf_output_is_the_gcn_output_of_eq_5():
    """E(m1m2) = GCN_p(V_p, E_p): each node's GCN output, the input node not concatenated (eq 5)."""
    torch.manual_seed(0)
    graph = GraphFusion(4, 6, 1, num_speakers=2, inter_weight=0.7, dropout=0.0)
    streams, valid = [torch.randn(1, 3, 4), torch.randn(1, 3, 4)], [torch.ones(1, 3, dtype=torch.bool)] * 2
    speaker = torch.tensor([[0, 1, 0]])
    out = graph(streams, valid, speaker)
    assert graph.output_dim == 6 and out.shape == (1, 3, 2 * 6)
    nodes = torch.stack(streams, dim=1) + graph.speaker(speaker).unsqueeze(1)
    adjacency = stream_graph(nodes, torch.stack(valid, dim=1), 0.7)[0]
    layer, flat = graph.layers[0], nodes.reshape(6, 4)
    expected = layer.own(flat) + adjacency @ layer.neighbours(flat)  # H Θ₀ + Â H Θ₁
    torch.testing.assert_close(out[0].reshape(3, 2, 6).transpose(0, 1).reshape(6, 6), expected)
    assert GraphFusion(4, 6, 1, 2, 0.7, 0.0, keep_nodes=True).output_dim == 4 + 6


def test_each_stage_has_its_own_objective_and_stage_mff_runs_pmf_frozen():
    """§3.1.3: stage pmf optimises eq 7 (per pair), stage mff eq 15 on the fused features PMF gives:
    PMF gets no gradient and runs in eval mode (its dropout off), so E(pair) is fixed."""
    torch.manual_seed(0)
    net = build_model("pairwise", input_dims=DIMS, num_classes=3, overrides=TINY | {"pmf_dropout": 0.5, "dropout": 0.5})
    batch = random_batch([5, 3])
    net.begin_stage("pmf")
    pair_terms = {f"{k}_{p}" for k in ("ce", "density") for p in ("TA", "TV", "AV")}
    assert set(net.loss(net.train()(batch), batch)) == pair_terms | {"total"}
    net.begin_stage("mff")
    net.train()
    assert not any(m.training for name in PMF_MODULES for m in net.get_submodule(name).modules())
    assert net.attention.training and net.classifier.training
    first, second = net(batch), net(batch)
    for name in first.fused:
        torch.testing.assert_close(first.fused[name], second.fused[name])
    assert not torch.allclose(first.logits, second.logits)  # MFF / MAL dropout still acts
    terms = net.loss(first, batch)
    assert set(terms) == {"ce", "density", "total"}
    terms["total"].backward()
    assert all(p.grad is None for name in PMF_MODULES for p in net.get_submodule(name).parameters())
    net.begin_stage(None)
    assert net.train().pair_graphs.training


def test_stage_plan_follows_the_papers_order_and_splits_the_epochs():
    net = build_model("pairwise", input_dims=DIMS, num_classes=3, overrides=TINY | {"pmf_epochs": 0.25})
    hparams = TrainHyperparameters(epochs=40, lr=1e-3, weight_decay=1e-5)
    (pmf, pmf_hp), (mff, mff_hp) = plan_stages(net, ["pmf", "mff"], hparams)
    assert (pmf.name, pmf_hp.epochs, pmf_hp.lr, pmf_hp.weight_decay) == ("pmf", 10, 2e-4, 4e-5)
    assert (mff.name, mff_hp.epochs, mff_hp.lr, mff_hp.weight_decay) == ("mff", 30, 1e-3, 1e-5)
    assert set(pmf.modules) | set(mff.modules) == {name for name, _ in net.named_children()}
    assert not set(pmf.modules) & set(mff.modules)
    assert plan_stages(net, ["mff"], hparams)[0][1].epochs == 40
    for bad in (["mff", "pmf"], ["pmf"], ["pmf", "pmf", "mff"], ["gcn"]):
        with pytest.raises(ConfigError):
            plan_stages(net, bad, hparams)
    with pytest.raises(ConfigError, match="no training stages"):
        plan_stages(build_model("concat", input_dims=DIMS, num_classes=3), ["pmf"], hparams)


def test_two_stage_schedule_freezes_pmf_in_stage_mff_and_learns(features, tmp_path):  # noqa: F811
    """`--stages pmf,mff` (§3.1.3): stage pmf changes PMF and leaves MFF / MAL as initialised; stage
    mff starts from PMF's best-dev weights and leaves them untouched; the run learns the task."""
    snapshots = {}

    def on_epoch(record):
        snapshots[record["stage"]] = torch.load(tmp_path / "run" / "best.pt")["state_dict"]  # the last is the stage's best

    config_file = tmp_path / "l2.yaml"
    config_file.write_text("train: {weight_decay: 1.0e-3}\n")
    result = train(TrainConfig(
        model="pairwise", features=features, out=tmp_path / "run", epochs=40, batch_size=BATCH, lr=LR, device="cpu",
        model_overrides=LEARNABLE | {"pmf_lr": LR, "pmf_weight_decay": 1e-3}, config_file=config_file,
        stages=["pmf", "mff"]), on_epoch=on_epoch)
    checkpoint = torch.load(tmp_path / "run" / "best.pt")
    torch.manual_seed(0)
    initial = build_model("pairwise", input_dims=checkpoint["input_dims"], num_classes=3,
                          overrides=checkpoint["model_config"]).state_dict()
    after_pmf, final = snapshots["pmf"], checkpoint["state_dict"]
    is_pmf = lambda key: key.startswith(PMF_MODULES)  # noqa: E731
    assert all(torch.equal(after_pmf[k], initial[k]) for k in initial if not is_pmf(k))
    assert any(not torch.equal(after_pmf[k], initial[k]) for k in initial if is_pmf(k))
    assert all(torch.equal(final[k], after_pmf[k]) for k in final if is_pmf(k))
    assert any(not torch.equal(final[k], after_pmf[k]) for k in final if not is_pmf(k))
    stages = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["stages"]
    assert [(s["name"], s["epochs"], s["lr"]) for s in stages] == [("pmf", 20, LR), ("mff", 20, LR)]
    assert [r["stage"] for r in result.history] == ["pmf"] * 20 + ["mff"] * 20
    assert [r["epoch"] for r in result.history] == list(range(1, 41)) and result.best_epoch > 20
    assert result.test["accuracy"] > 0.75, result.test


def test_cli_passes_stages_to_the_trainer(features, tmp_path):  # noqa: F811
    result = CliRunner().invoke(app, [
        "train", "--model", "pairwise", "--features", str(features), "--out", str(tmp_path / "run"), "--epochs", "2",
        "--device", "cpu", "--stages", "mff,pmf",
    ])
    assert result.exit_code != 0 and "stages must follow the order pmf, mff" in " ".join(result.output.split())
