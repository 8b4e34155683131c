"""One SDPA call per attention over the padded batch == the per-dialogue loop it replaced.

``per_dialogue_attention`` is the previous ``MultiheadAttention.forward``, kept here as the
reference: one ``scaled_dot_product_attention`` call per dialogue on its own packed tokens.
"""

import pytest
import torch
import torch.nn.functional as F
from model_checks import DIMS, random_batch

from erc.models.blocks import MultiheadAttention, TokenIndex
from erc.models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def per_dialogue_attention(
    self: MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor, tokens: TokenIndex, key_valid: torch.Tensor
) -> torch.Tensor:
    q, k, v = self.q_proj(query), self.k_proj(key_value), self.v_proj(key_value)
    has_key = key_valid.any(dim=1)
    all_keys = (key_valid | ~tokens.mask).all(dim=1).tolist()
    token_mask = tokens.pack(key_valid | ~has_key.unsqueeze(1))
    heads = lambda x, start, end: x[start:end].view(1, end - start, self.num_heads, -1).transpose(1, 2)  # noqa: E731
    outputs = []
    for (start, end), unmasked in zip(tokens.spans, all_keys):
        if start == end:
            continue
        attn_mask = None if unmasked else token_mask[start:end].view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(heads(q, start, end), heads(k, start, end), heads(v, start, end), attn_mask)
        outputs.append(out.transpose(1, 2).reshape(end - start, -1))
    out = self.out_proj(torch.cat(outputs) if outputs else q)
    return out * has_key[tokens.dialogue].unsqueeze(-1)


def ragged_case(seed: int = 0) -> tuple[TokenIndex, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five dialogues of 7, 1, 5, 3 and 6 utterances; keys missing at random, all of dialogue 2's
    missing, none of dialogue 4's."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 5, 3, 6])
    mask = torch.arange(7) < lengths.unsqueeze(1)
    key_valid = mask & (torch.rand(mask.shape, generator=g) > 0.4)
    key_valid[2] = False
    key_valid[4] = mask[4]
    key_valid[0, 0] = True
    tokens = TokenIndex(mask)
    query = torch.randn(len(tokens), 16, generator=g, requires_grad=True)
    key_value = torch.randn(len(tokens), 16, generator=g, requires_grad=True)
    return tokens, query, key_value, key_valid


def test_one_call_equals_per_dialogue_forward_and_gradients():
    torch.manual_seed(0)
    attention = MultiheadAttention(16, num_heads=4)
    tokens, query, key_value, key_valid = ragged_case()
    results = []
    for forward in (MultiheadAttention.forward, per_dialogue_attention):
        attention.zero_grad()
        query.grad = key_value.grad = None
        out = forward(attention, query, key_value, tokens, key_valid)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [query.grad.clone(), key_value.grad.clone(), *(p.grad.clone() for p in attention.parameters())]
        results.append((out.detach(), grads))
    (out, grads), (reference, reference_grads) = results
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad, atol=1e-6, rtol=1e-5)
    no_keys = tokens.dialogue == 2
    assert out[no_keys].abs().max() == 0 and out[~no_keys].abs().amin(dim=1).gt(0).any()


def test_keys_at_padding_are_never_read():
    """A key_valid mask that is True at padding (and padded key values) changes nothing."""
    torch.manual_seed(0)
    attention = MultiheadAttention(16, num_heads=2)
    tokens, query, key_value, key_valid = ragged_case(seed=1)
    with torch.no_grad():
        clean = attention(query, key_value, tokens, key_valid)
        spoiled = attention(query, key_value, tokens, key_valid | ~tokens.mask)
    torch.testing.assert_close(spoiled, clean)


def test_one_sdpa_call_per_layer_and_branch(monkeypatch):
    """MultiEMO with 2 MultiAttn layers over 3 modalities: 3 branches x 2 layers x 2 sources = 12 calls,
    whatever the number of dialogues."""
    model = build_model("multiemo", input_dims=DIMS, num_classes=3, overrides={
        "projection_dims": {"text": 8, "audio": 8, "visual": 8}, "context_modalities": [], "model_dim": 8,
        "num_heads": 2, "ffn_dim": 16, "num_layers": 2, "classifier_hidden_dim": 8,
    })
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for lengths in ([3], [5, 2, 7, 4, 1, 6]):
        calls.clear()
        with torch.no_grad():
            model(random_batch(lengths))
        assert len(calls) == 12, lengths


@pytest.mark.parametrize("name, overrides", [
    ("multiemo", {"projection_dims": {"text": 16, "audio": 16, "visual": 16}, "model_dim": 16, "num_heads": 4,
                  "ffn_dim": 32, "num_layers": 2, "dialoguernn_hidden_dim": 8, "classifier_hidden_dim": 16, "dropout": 0.0}),
    ("xlstm-multiemo", {"projection_dims": {"text": 16, "audio": 16, "visual": 16}, "use_context": False,
                        "model_dim": 16, "num_heads": 4, "ffn_dim": 32, "encoder_layers": 1, "num_layers": 1,
                        "classifier_hidden_dim": 16, "dropout": 0.0, "max_dialogue_length": 16}),
])
def test_models_match_the_per_dialogue_path(name, overrides, monkeypatch):
    """Whole models on a ragged batch with missing modalities (audio absent from one whole
    dialogue): logits, loss and every parameter gradient equal with either attention."""
    batch = random_batch([6, 2, 5, 3])
    batch["audio_mask"][1] = False
    batch["visual_mask"][0, 1:4] = False
    batch["text_mask"][2, 0] = False
    results = []
    for forward in (MultiheadAttention.forward, per_dialogue_attention):
        monkeypatch.setattr(MultiheadAttention, "forward", forward)
        torch.manual_seed(0)
        model = build_model(name, input_dims=DIMS, num_classes=3, overrides=overrides)
        output = model(batch)
        loss = model.loss(output, batch)["total"]
        loss.backward()
        results.append((output.logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits, loss, grads), (reference_logits, reference_loss, reference_grads) = results
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-4)
    assert grads.keys() == reference_grads.keys()
    for n, grad in grads.items():
        if reference_grads[n] is None:
            assert grad is None or grad.abs().max() == 0, n
        else:
            torch.testing.assert_close(grad, reference_grads[n], atol=1e-5, rtol=1e-4, msg=n)
