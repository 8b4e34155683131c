"""MultiEMO and xLSTM-MultiEMO: gradients, padding invariance, missing modalities, checkpoints,
ablations, the registry, and the shared blocks they are built from (tiny widths, CPU)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from erc.errors import ConfigError
from erc.models import build_config, build_model, model_names, preset_names, train_hyperparameters
from erc.models.blocks import MultiheadAttention, TokenIndex
from erc.models.context import DialogueRNN, DialogueRNNDirection, GroupedPositions

DIMS = {"text": 12, "audio": 20, "visual": 10}
NUM_CLASSES, NUM_SPEAKERS = 4, 3
TINY = {
    "multiemo": dict(
        num_speakers=NUM_SPEAKERS, projection_dims={"text": 16, "audio": 12, "visual": None}, dialoguernn_hidden_dim=8,
        model_dim=16, num_heads=2, ffn_dim=32, num_layers=2, classifier_hidden_dim=16,
    ),
    "xlstm-multiemo": dict(
        num_speakers=NUM_SPEAKERS, projection_dims={"text": 16, "audio": 12, "visual": None}, context_hidden_dim=8,
        situation_steps=2, speaker_steps=2, xlstm_num_heads=2, model_dim=16, num_heads=2, ffn_dim=32, num_layers=2,
        encoder_layers=1, classifier_hidden_dim=16,
    ),
}
MODELS = list(TINY)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, input_dims=DIMS, num_classes=NUM_CLASSES, overrides={**TINY[name], **overrides})


def make_batch(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch_size, length = len(lengths), max(lengths)
    mask = torch.arange(length) < torch.tensor(lengths).unsqueeze(1)
    batch = {m: torch.randn(batch_size, length, d, generator=generator) * mask.unsqueeze(-1) for m, d in DIMS.items()}
    batch |= {f"{m}_mask": mask.clone() for m in DIMS}
    batch["mask"] = mask
    batch["speaker"] = torch.randint(0, NUM_SPEAKERS, (batch_size, length), generator=generator) * mask
    batch["label"] = torch.randint(0, NUM_CLASSES, (batch_size, length), generator=generator).masked_fill(~mask, -1)
    return batch


def dialogue(batch, index, length):
    """One dialogue of a batch, alone and unpadded."""
    return {k: v[index : index + 1, :length].clone() for k, v in batch.items()}


def remove_modality(batch, modality, dialogue_index, positions=None):
    """Mark a modality missing (mask False, features zeroed) as the data loader does."""
    where = slice(None) if positions is None else positions
    batch[f"{modality}_mask"][dialogue_index, where] = False
    batch[modality][dialogue_index, where] = 0.0


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name):
    model = tiny_model(name).train()
    batch = make_batch([6, 9, 4])
    terms = model.loss(model(batch), batch, torch.tensor([5.0, 3.0, 2.0, 1.0]))
    assert {"ce", "swfc", "soft_hgr", "total"} <= set(terms)
    terms["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad


@pytest.mark.parametrize(
    "name, overrides",
    [("multiemo", {}), ("multiemo", {"dialoguernn_bidirectional": False}), ("xlstm-multiemo", {}),
     ("xlstm-multiemo", {"xlstm_block": "slstm"}), ("xlstm-multiemo", {"xlstm_block": "mixed"}),
     ("xlstm-multiemo", {"xlstm_block": "slstm", "perception": "lstm"})],
)
def test_dialogue_outputs_do_not_depend_on_batch_padding(name, overrides):
    model = tiny_model(name, **overrides).eval()
    batch = make_batch([5, 11, 8], seed=1)
    with torch.no_grad():
        batched = model(batch)
        alone = model(dialogue(batch, 0, 5))
        reordered = model({k: v[[2, 0, 1]] for k, v in batch.items()})
    torch.testing.assert_close(batched.logits[0, :5], alone.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.fc_features[0, :5], alone.fc_features[0], rtol=1e-5, atol=1e-5)
    for m in DIMS:
        torch.testing.assert_close(batched.fused[m][0, :5], alone.fused[m][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.logits, reordered.logits[[1, 2, 0]], rtol=1e-5, atol=1e-5)
    assert torch.all(batched.logits[0, 5:] == 0)  # padding carries nothing


@pytest.mark.parametrize("name", MODELS)
def test_missing_modalities_are_masked_not_read(name):
    model = tiny_model(name).eval()
    full = make_batch([5, 7, 6], seed=2)
    missing = {k: v.clone() for k, v in full.items()}
    remove_modality(missing, "visual", 1, [1, 4])
    remove_modality(missing, "audio", 2)  # absent from a whole dialogue
    for m in DIMS:
        remove_modality(missing, m, 1, [2])  # an utterance with no modality at all
    with torch.no_grad():
        out_full, out_missing = model(full), model(missing)
        garbage = {k: v.clone() for k, v in missing.items()}
        for m in DIMS:
            absent = garbage["mask"] & ~garbage[f"{m}_mask"]
            garbage[m][absent] = 1e3 * torch.randn(int(absent.sum()), DIMS[m])
        out_garbage = model(garbage)
    for tensor in (out_missing.logits, out_missing.fc_features, *out_missing.fused.values()):
        assert torch.isfinite(tensor).all()
    torch.testing.assert_close(out_missing.logits[0], out_full.logits[0], rtol=1e-5, atol=1e-5)  # untouched dialogue
    assert not torch.allclose(out_missing.logits[1], out_full.logits[1], atol=1e-4)  # the masks do act
    torch.testing.assert_close(out_garbage.logits, out_missing.logits)  # absent features are never read

    model.train()
    terms = model.loss(model(missing), missing, None)
    terms["total"].backward()
    assert all(torch.isfinite(t) for t in terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_reproduces_outputs(name, tmp_path):
    model = tiny_model(name, seed=0).eval()
    path = tmp_path / "model.pt"
    torch.save({"config": dataclasses.asdict(model.config), "state": model.state_dict()}, path)
    saved = torch.load(path)
    restored = build_model(name, input_dims=DIMS, num_classes=NUM_CLASSES, overrides=saved["config"])
    batch = make_batch([4, 6], seed=3)
    with torch.no_grad():
        assert not torch.allclose(restored.eval()(batch).logits, model(batch).logits)  # fresh weights differ
        restored.load_state_dict(saved["state"])
        assert torch.equal(restored(batch).logits, model(batch).logits)


ABLATIONS = [
    ("multiemo", {"multiattn": False}, {"ce", "swfc", "soft_hgr"}),
    ("multiemo", {"use_swfc": False}, {"ce", "soft_hgr"}),
    ("multiemo", {"use_hgr": False}, {"ce", "swfc"}),
    ("multiemo", {"modalities": ["text", "audio"]}, {"ce", "swfc", "soft_hgr"}),
    ("multiemo", {"modalities": ["text"], "context_modalities": []}, {"ce", "swfc"}),
    ("multiemo", {"context_modalities": ["audio", "visual"]}, {"ce", "swfc", "soft_hgr"}),
    ("xlstm-multiemo", {"use_context": False}, {"ce", "swfc", "soft_hgr"}),
    ("xlstm-multiemo", {"use_simam": False}, {"ce", "swfc", "soft_hgr"}),
    ("xlstm-multiemo", {"use_modality_encoder": False}, {"ce", "swfc", "soft_hgr"}),
    ("xlstm-multiemo", {"multiattn": False, "use_swfc": False}, {"ce", "soft_hgr"}),
    ("xlstm-multiemo", {"modalities": ["text", "visual"], "speaker_steps": 0}, {"ce", "swfc", "soft_hgr"}),
]


@pytest.mark.parametrize("name, overrides, expected_terms", ABLATIONS)
def test_ablations_build_and_train(name, overrides, expected_terms):
    model = tiny_model(name, **overrides).train()
    batch = make_batch([5, 3], seed=4)
    output = model(batch)
    assert output.logits.shape == (2, 5, NUM_CLASSES)
    assert set(output.fused) == set(model.config.modalities)
    terms = model.loss(output, batch, None)
    assert set(terms) == expected_terms | {"total"}
    terms["total"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ablations_change_the_architecture():
    full = tiny_model("multiemo")
    assert tiny_model("multiemo", multiattn=False).multiattn is None and full.multiattn is not None
    text_audio = tiny_model("multiemo", modalities=["text", "audio"])
    assert set(text_audio.context_encoders) == {"text", "audio"}
    assert text_audio.classifier.fc.in_features == 2 * 16
    assert not hasattr(tiny_model("xlstm-multiemo", use_modality_encoder=False), "modality_encoder")
    assert len(tiny_model("xlstm-multiemo", use_context=False).contexts) == 0


@pytest.mark.parametrize("name", MODELS)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    batch = make_batch([5, 3], seed=6)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(name, dropout=0.0, gradient_checkpointing=checkpointing).train()
        model.loss(model(batch), batch, None)["total"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", MODELS)
def test_speaker_index_beyond_config_is_a_config_error(name):
    model = tiny_model(name)
    batch = make_batch([3, 2])
    batch["speaker"][0, 1] = NUM_SPEAKERS
    with pytest.raises(ConfigError, match="num_speakers"):
        model(batch)


# --------------------------------------------------------------------------- registry and presets


def test_registry_presets_carry_the_papers_hyperparameters():
    assert {"multiemo", "xlstm-multiemo"} <= set(model_names())
    iemocap_dims = {"text": 768, "audio": 6373, "visual": 1000}
    multiemo = build_config("multiemo", input_dims=iemocap_dims, num_classes=6, preset="iemocap")
    assert (multiemo.num_layers, multiemo.model_dim, multiemo.num_heads, multiemo.ffn_dim) == (6, 256, 4, 1024)
    assert (multiemo.temperature, multiemo.sample_weight_power, multiemo.focusing) == (0.8, 0.8, 2.0)
    assert (multiemo.swfc_weight, multiemo.hgr_weight, multiemo.dropout) == (0.4, 0.3, 0.1)
    assert multiemo.projection_dims == {"text": 256, "audio": 512, "visual": None}
    meld = build_config("multiemo", input_dims=iemocap_dims, num_classes=7, preset="meld")
    assert "text" not in meld.context_modalities and meld.num_speakers == 9
    xlstm_meld = build_config("xlstm-multiemo", input_dims=iemocap_dims, num_classes=7, preset="meld")
    assert (xlstm_meld.num_layers, xlstm_meld.temperature, xlstm_meld.focusing) == (2, 0.9, 3.0)
    xlstm_iemocap = build_config("xlstm-multiemo", input_dims=iemocap_dims, num_classes=6, preset="iemocap")
    assert (xlstm_meld.xlstm_block, xlstm_iemocap.xlstm_block) == ("slstm", "mlstm")  # measured choices, see the preset

    train = train_hyperparameters("multiemo", "iemocap")
    assert (train.epochs, train.batch_size, train.lr, train.weight_decay, train.betas) == (100, 64, 1e-4, 1e-5, (0.9, 0.99))
    assert (train.lr_decay_factor, train.lr_decay_every) == (0.95, 10)
    xlstm_train = train_hyperparameters("xlstm-multiemo", "meld", overrides={"epochs": 3})
    assert (xlstm_train.epochs, xlstm_train.batch_size, xlstm_train.lr) == (3, 100, 1e-5)


def test_registry_rejects_inconsistent_requests():
    for name in MODELS:
        assert preset_names(name) == ["iemocap", "meld"]
    with pytest.raises(ConfigError, match="classes"):
        build_config("multiemo", input_dims=DIMS, num_classes=6, preset="meld")
    with pytest.raises(ConfigError, match="unknown option"):
        build_config("multiemo", input_dims=DIMS, num_classes=4, overrides={"num_layer": 3})
    with pytest.raises(ConfigError, match="unknown model"):
        build_config("multiemo2", input_dims=DIMS, num_classes=4)
    with pytest.raises(ConfigError, match="no preset"):
        train_hyperparameters("multiemo", "semaine")
    with pytest.raises(ConfigError, match="input dimension"):
        build_config("multiemo", input_dims={"text": 12}, num_classes=4)
    with pytest.raises(ConfigError, match="μ1"):
        build_config("multiemo", input_dims=DIMS, num_classes=4, overrides={"swfc_weight": 0.8, "hgr_weight": 0.3})


# --------------------------------------------------------------------------- shared blocks


def dialoguernn_reference(direction: DialogueRNNDirection, x, speaker, valid):
    """One direction of DialogueRNN for one dialogue, step by step with the modules' own cells and
    a plain softmax over all previous global states; invalid steps are skipped."""
    hidden = direction.hidden_dim
    g, e = torch.zeros(1, hidden), torch.zeros(1, hidden)
    parties = [torch.zeros(1, hidden) for _ in range(direction.num_speakers)]
    history, out = [], torch.zeros(x.shape[0], hidden)
    for t in range(x.shape[0]):
        if not valid[t]:
            continue
        s, u = int(speaker[t]), x[t : t + 1]
        g_new = direction.global_gru(torch.cat([u, parties[s]], dim=1), g)
        if history:
            alpha = torch.softmax(torch.cat([direction.attention_score(h) for h in history]).squeeze(1), dim=0)
            context = sum(a * h for a, h in zip(alpha, history))
        else:
            context = torch.zeros(1, hidden)
        parties[s] = direction.party_gru(torch.cat([u, context], dim=1), parties[s])
        e = direction.emotion_gru(parties[s], e)
        g = g_new
        history.append(g_new)
        out[t] = e[0]
    return out


@pytest.mark.parametrize("bidirectional", [True, False])
def test_batched_dialoguernn_matches_step_by_step_reference(bidirectional):
    torch.manual_seed(7)
    rnn = DialogueRNN(6, 5, 4, num_speakers=3, bidirectional=bidirectional).eval()
    lengths = [7, 3, 5]
    batch = make_batch(lengths, seed=7)
    x = torch.randn(3, 7, 6)
    valid = batch["mask"].clone()
    valid[0, [2, 6]] = False  # holes, including at the end
    with torch.no_grad():
        got = rnn(x, batch["speaker"], valid)
        for b, length in enumerate(lengths):
            v, s, u = valid[b, :length], batch["speaker"][b, :length], x[b, :length]
            states = [dialoguernn_reference(rnn.directions[0], u, s, v)]
            if bidirectional:
                states.append(dialoguernn_reference(rnn.directions[1], u.flip(0), s.flip(0), v.flip(0)).flip(0))
            expected = F.relu(rnn.output(torch.cat(states, dim=-1))) * v.unsqueeze(-1)
            torch.testing.assert_close(got[b, :length], expected, rtol=1e-5, atol=1e-6)
    assert torch.all(got[~valid] == 0)


def test_grouped_positions_pack_each_speakers_utterances_in_order():
    speaker = torch.tensor([[0, 1, 0, 2, 1, 0], [1, 1, 0, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    grouped = GroupedPositions.build(valid, speaker, num_groups=3)
    x = torch.arange(12.0).view(2, 6, 1)
    sequences = {
        (int(r), tuple(x[int(r), p[v], 0].tolist())) for r, p, v in zip(grouped.rows, grouped.positions, grouped.steps_valid)
    }
    assert sequences == {(0, (0.0, 2.0, 5.0)), (0, (1.0,)), (0, (3.0,)), (1, (6.0, 7.0)), (1, (8.0,))}
    torch.testing.assert_close(grouped.unpack(grouped.pack(x)), x * valid.unsqueeze(-1))


def test_attention_ignores_masked_keys_and_survives_no_keys():
    torch.manual_seed(8)
    attention = MultiheadAttention(8, num_heads=2)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    tokens = TokenIndex(mask)
    query, keys = torch.randn(len(tokens), 8), torch.randn(len(tokens), 8)
    key_valid = mask.clone()
    key_valid[0, 1] = False  # e.g. a missing modality
    out = attention(query, keys, tokens, key_valid)
    poked = keys.clone()
    poked[1] = 1e3  # token (0, 1): masked key
    torch.testing.assert_close(attention(query, poked, tokens, key_valid), out)
    no_keys = key_valid.clone()
    no_keys[1] = False
    out = attention(query, keys, tokens, no_keys)
    assert torch.isfinite(out).all() and torch.all(out[tokens.dialogue == 1] == 0)


def test_numbers_written_without_a_dot_are_read_as_numbers():
    """YAML 1.1 loads ``1e-3`` as a string; the options still become numbers, or a clear error."""
    import yaml

    values = yaml.safe_load("weight_decay: 1e-3\nepochs: '7'")
    assert values["weight_decay"] == "1e-3"
    hparams = train_hyperparameters("concat", overrides=values)
    assert hparams.weight_decay == 1e-3 and hparams.epochs == 7
    config = build_config("concat", input_dims={"text": 4}, num_classes=2, overrides={"dropout": "5e-1"})
    assert config.dropout == 0.5
    with pytest.raises(ConfigError, match="lr must be a number"):
        train_hyperparameters("concat", overrides={"lr": "fast"})
