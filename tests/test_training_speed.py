"""Training at hardware speed: precision, in-memory data, xLSTM backend choice, and the CUDA path.

The GPU test is marked ``gpu`` and skipped where torch sees no CUDA device.
"""

import json

import numpy as np
import pytest
import torch
import yaml
from model_checks import random_batch
from typer.testing import CliRunner

from erc.cli.main import app
from erc.errors import ConfigError
from erc.models.context import cuda_slstm_cell, use_xlstm_backend, xlstm_stack
from erc.models.blocks import index_put
from erc.models.registry import MODELS, build_model
from erc.pipeline import data as data_module
from erc.pipeline import evaluate as evaluate_module
from erc.pipeline.data import DialogueDataset, load_splits, make_loader
from erc.pipeline.evaluate import autocast, evaluate_run, float32, resolve_precision
from erc.pipeline.shards import UtteranceRecord, write_shard_set
from erc.pipeline.train import TrainConfig, train

DIMS = {"text": 8, "audio": 10, "visual": 8}
FRAMES = 3
LABELS = ["a", "b", "c"]
TINY_MULTIEMO = {
    "projection_dims": {"text": 8, "audio": 8, "visual": 8}, "model_dim": 8, "dialoguernn_hidden_dim": 8,
    "num_heads": 2, "ffn_dim": 16, "num_layers": 1, "classifier_hidden_dim": 8, "dropout": 0.1,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """30 dialogues of 2-8 utterances (24 train, 6 test) over three shards, with per-frame visual
    features; some audio missing."""
    root = tmp_path_factory.mktemp("speed_shards")
    rng = np.random.default_rng(0)
    records = []
    for k in range(30):
        for i in range(2 + k % 7):
            label = int(rng.integers(3))
            features = {m: (rng.normal(size=d) + label).astype(np.float32) for m, d in DIMS.items()}
            if i % 5 == 3:
                features["audio"] = None
            records.append(UtteranceRecord(
                utterance_id=f"d{k}_u{i}", dialogue_id=f"d{k:02d}", utterance_index=i,
                split="train" if k < 24 else "test", speaker=f"s{i % 2}", speaker_index=i % 2, text="", label=label,
                features=features, visual_frames=rng.normal(size=(FRAMES, DIMS["visual"])).astype(np.float32),
                visual_frame_mask=np.array([True, i % 2 == 0, k % 3 == 0]),
            ))
    write_shard_set(root, records, dataset="speed", label_names=LABELS, dims=DIMS, num_frames=FRAMES,
                    dialogues_per_shard=10)
    return root


# --------------------------------------------------------------------------- precision


def test_precision_auto_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(evaluate_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(evaluate_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", cuda) == "fp32"  # emulated bf16 is not worth it
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp16", cpu)


def _step(model, batch, precision, device=torch.device("cpu")):
    """One training step's loss terms and gradients under ``precision`` on ``device``."""
    model.zero_grad(set_to_none=True)
    with autocast(device, precision):
        output = model(batch)
    terms = model.loss(float32(output), batch, None)
    terms["total"].backward()
    return output, terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fp32_is_exactly_the_plain_step_and_bf16_computes_in_bf16():
    torch.manual_seed(0)
    model = build_model("multiemo", input_dims=DIMS, num_classes=3, overrides={**TINY_MULTIEMO, "dropout": 0.0})
    batch = random_batch([5, 3, 4], dims=DIMS)
    batch["audio_mask"][1] = False
    model.zero_grad(set_to_none=True)
    plain_terms = model.loss(model(batch), batch, None)
    plain_terms["total"].backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    output, terms, grads = _step(model, batch, "fp32")
    assert output.logits.dtype == torch.float32
    assert all(torch.equal(terms[k], plain_terms[k]) for k in plain_terms)
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)

    output, terms, grads = _step(model, batch, "bf16")
    assert output.logits.dtype == torch.bfloat16  # autocast is on in the forward ...
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())  # ... the losses are float32
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(terms["ce"], plain_terms["ce"], atol=0.05, rtol=0.05)


def test_index_put_promotes_like_autocast_and_keeps_gradients():
    """erc's index_put (run outside autocast, see its docstring) gives the wider dtype of its inputs,
    under autocast as well, and passes gradients to the values."""
    values = torch.randn(3, 4, requires_grad=True)
    index = (torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = index_put(torch.zeros(2, 3, 4, dtype=torch.bfloat16), index, values)
        low = index_put(torch.zeros(2, 3, 4, dtype=torch.bfloat16), index, values.bfloat16())
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert torch.equal(out[1, 0], values[1]) and not out[0, 0].any()
    out.sum().backward()
    assert torch.equal(values.grad, torch.ones(3, 4))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_run_records_precision_and_backend(shard_set, tmp_path, precision):
    result = train(TrainConfig(
        model="multiemo", features=shard_set, out=tmp_path / "run", epochs=2, batch_size=8, lr=1e-3, device="cpu",
        precision=precision, model_overrides=TINY_MULTIEMO,
    ))
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    run = json.loads((result.run_dir / "run.json").read_text())
    assert config["precision"] == run["precision"] == precision
    assert config["xlstm_backend"] is None and run["device"] == "cpu"
    assert all(np.isfinite(v) for record in result.history for v in record["train"].values())
    assert {"ce", "swfc", "soft_hgr", "total"} <= set(result.history[0]["train"])
    # evaluation runs in float32 whatever the training precision: `erc evaluate` reproduces the run
    assert evaluate_run(result.run_dir, device="cpu")["weighted_f1"] == pytest.approx(result.test["weighted_f1"], abs=1e-9)


# --------------------------------------------------------------------------- data in memory


def _batches(dataset: DialogueDataset) -> list[dict[str, torch.Tensor]]:
    return list(make_loader(dataset, 4, shuffle=True, seed=3))


def test_in_memory_batches_equal_lazy_batches(shard_set, monkeypatch):
    splits = load_splits(shard_set, seed=0)
    refs = splits.train[::2] + splits.train[1::2]  # not in shard order: runs of adjacent dialogues get split
    lazy = DialogueDataset(splits.shards, refs, splits.modalities, frames=True, in_memory=False)
    memory = DialogueDataset(splits.shards, refs, splits.modalities, frames=True, in_memory=True)
    assert memory.in_memory and not lazy.in_memory
    lazy_batches = _batches(lazy)

    def no_reads(*args, **kwargs):
        raise AssertionError("an in-memory dataset read the shards again")

    monkeypatch.setattr(splits.shards, "load", no_reads)
    for _ in range(2):  # two epochs: frames too are served from memory
        memory_batches = _batches(memory)
        assert len(memory_batches) == len(lazy_batches)
        for got, expected in zip(memory_batches, lazy_batches):
            assert got.keys() == expected.keys() and "visual_frames" in got
            assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got if not torch.equal(got[k], expected[k])]


def test_memory_check_decides(shard_set, monkeypatch):
    splits = load_splits(shard_set, seed=0)
    dataset = DialogueDataset(splits.shards, splits.train, splits.modalities, frames=True, in_memory=False)
    utterances = sum(len(r) for r in splits.train)
    assert dataset.nbytes() >= utterances * (4 * sum(DIMS.values()) + FRAMES * 4 * DIMS["visual"])
    monkeypatch.setattr(data_module, "available_memory", lambda: 2 * dataset.nbytes() + 1)
    assert DialogueDataset(splits.shards, splits.train, splits.modalities, frames=True).in_memory
    monkeypatch.setattr(data_module, "available_memory", lambda: dataset.nbytes())
    assert not DialogueDataset(splits.shards, splits.train, splits.modalities, frames=True).in_memory
    monkeypatch.setattr(data_module, "available_memory", lambda: None)
    assert not DialogueDataset(splits.shards, splits.train, splits.modalities).in_memory


# --------------------------------------------------------------------------- xLSTM backend


def test_xlstm_backend_choice_on_cpu():
    cpu = torch.device("cpu")
    assert use_xlstm_backend(build_model("multiemo", input_dims=DIMS, num_classes=3, overrides=TINY_MULTIEMO), cpu) is None
    stack = xlstm_stack(8, "slstm", num_heads=2)
    assert use_xlstm_backend(stack, cpu) == "vanilla"
    with pytest.raises(ConfigError, match="CUDA"):
        use_xlstm_backend(stack, cpu, "cuda")
    with pytest.raises(ConfigError, match="backend"):
        use_xlstm_backend(stack, cpu, "triton")


def test_cuda_slstm_cell_shares_parameters_in_the_vanilla_layout():
    """The CUDA twin of a vanilla sLSTM cell hands its kernel exactly what a CUDA cell holding the
    same (external-form) weights would, and keeps the vanilla state dict."""
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda
    from xlstm.blocks.slstm.layer import sLSTMLayer

    torch.manual_seed(0)
    layer = next(m for m in xlstm_stack(16, "slstm", num_heads=4).modules() if isinstance(m, sLSTMLayer))
    cell = layer.slstm_cell
    with torch.no_grad():
        cell._recurrent_kernel_.normal_()
        cell._bias_.normal_()
    twin = cuda_slstm_cell(cell, build=False)
    reference = sLSTMCell_cuda(twin.config, skip_backend_init=True)
    with torch.no_grad():
        reference._recurrent_kernel_.copy_(reference._recurrent_kernel_ext2int(cell._recurrent_kernel_int2ext(cell._recurrent_kernel_)))
        reference._bias_.copy_(reference._bias_ext2int(cell._bias_int2ext(cell._bias_)))
    assert torch.equal(twin._recurrent_kernel, reference._recurrent_kernel) and torch.equal(twin._bias, reference._bias)
    x = torch.randn(2, 5, 4 * 16)
    assert torch.equal(twin._permute_input(x), reference._permute_input(x))
    assert twin._recurrent_kernel_ is cell._recurrent_kernel_ and twin._bias_ is cell._bias_
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in cell.state_dict().items()}


def test_vanilla_slstm_cells_compute_what_the_package_cell_computes():
    """``xlstm_stack``'s sLSTM cells loop differently from the package's vanilla cell (no quadratic
    buffer copies in the backward pass) but hold the same parameters and give the same outputs,
    final states and gradients, from a zero or a given initial state."""
    from xlstm.blocks.slstm.cell import sLSTMCell_vanilla

    torch.manual_seed(0)
    stack = xlstm_stack(16, "slstm", num_heads=4)
    cells = [m for m in stack.modules() if isinstance(m, sLSTMCell_vanilla)]
    assert cells and all(type(c) is not sLSTMCell_vanilla for c in cells)
    fast_class, cell = type(cells[0]), cells[0]
    with torch.no_grad():
        cell._recurrent_kernel_.normal_(std=0.5)
        cell._bias_.normal_()
    gates = torch.randn(3, 7, 4 * 16)  # (B, S, 4·H): the gate pre-activations the layer passes
    start = torch.cat([torch.randn(1, 3, 16), torch.rand(1, 3, 16) + 0.5, torch.rand(2, 3, 16)])  # y, c, n > 0, m
    results = []
    for cls in (fast_class, sLSTMCell_vanilla):
        cell.__class__ = cls
        for state in (None, start):
            cell.zero_grad()
            x = gates.clone().requires_grad_(True)
            output, final = cell(x, state)
            (output.square().sum() + final.sum()).backward()
            results.append((output, final, x.grad, cell._recurrent_kernel_.grad, cell._bias_.grad))
    cell.__class__ = fast_class
    for ours, package in zip(results[:2], results[2:]):
        assert torch.equal(ours[0], package[0]) and torch.equal(ours[1], package[1])
        for a, b in zip(ours[2:], package[2:]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0][0], results[1][0])  # the initial state is used


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_is_reproduced_by_cpu_evaluate(shard_set, tmp_path):
    """Two epochs on the GPU (bf16 where it is native), then `erc evaluate --device cpu`."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({"model": TINY_MULTIEMO}))
    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, [
        "train", "--model", "multiemo", "--features", str(shard_set), "--out", str(run_dir), "--config",
        str(config_file), "--epochs", "2", "--batch-size", "8", "--device", "cuda", "--precision", "auto",
    ])
    assert result.exit_code == 0, result.output
    run = json.loads((run_dir / "run.json").read_text())
    assert run["device"].startswith("cuda") and run["precision"] in ("bf16", "fp32")
    reported = json.loads((run_dir / "metrics.json").read_text())["test"]
    result = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recomputed = evaluate_run(run_dir, device="cpu")
    for key in ("weighted_f1", "accuracy", "macro_f1"):
        assert recomputed[key] == pytest.approx(reported[key], abs=1e-3), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_a_step_in_bf16_on_cuda(name):
    """CUDA autocast has rules of its own (index_put raised there in bf16 while CPU autocast passed)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(name, input_dims=DIMS, num_classes=3).to(device)
    batch = {k: v.to(device) for k, v in random_batch([5, 3, 4], dims=DIMS).items()}
    if getattr(model, "needs_frames", False):
        batch["visual_frames"] = torch.randn(3, 5, FRAMES, DIMS["visual"], device=device)
        batch["visual_frame_mask"] = batch["mask"].unsqueeze(-1).expand(-1, -1, FRAMES).clone()
    _, terms, grads = _step(model, batch, "bf16", device)
    assert torch.isfinite(terms["total"])
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_attention_under_cpu_bf16_autocast_takes_its_product_in_fp32():
    """Under CPU autocast the attention's projections run in bf16 but its SDPA product in fp32 (the
    CPU flash kernel's bf16 backward is several times slower): the output stays bf16, agrees with
    the same product computed from the bf16 projections in fp32, and gradients flow."""
    from erc.models.blocks import MultiheadAttention, TokenIndex

    torch.manual_seed(0)
    attention = MultiheadAttention(16, 2)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    tokens = TokenIndex(mask)
    query, key_value = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16)
    key_valid = mask.clone()
    key_valid[0, 1] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(query, key_value, tokens, key_valid)
        heads = lambda x: tokens.unpack(x).view(2, 4, 2, 8).transpose(1, 2)  # noqa: E731
        q, k, v = (heads(p(x)) for p, x in ((attention.q_proj, query), (attention.k_proj, key_value), (attention.v_proj, key_value)))
    assert out.dtype == torch.bfloat16 and q.dtype == torch.bfloat16
    product = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), key_valid.view(2, 1, 1, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attention.out_proj(tokens.pack(product.to(torch.bfloat16).transpose(1, 2).reshape(2, 4, 16)))
    torch.testing.assert_close(out.float(), expected.float(), atol=0, rtol=0)
    out.float().sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0
