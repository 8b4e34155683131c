"""xLSTM-MultiEMO's mechanisms as the paper writes them: the linear layer of eq 2's matching and the
positional encoding of §3.3 (LMAM's and pairwise fusion's are in test_lmam.py / test_pairwise.py)."""

import pytest
import torch
from test_models import make_batch, tiny_model

from erc.errors import ConfigError
from erc.models.blocks import masked_softmax
from erc.models.context import ReasoningModule, simam, xlstm_stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_positional_encoding_changes_xlstm_multiemo_outputs():
    """§3.3: positions are added before the modality encoder. Without the context encoders the rest
    of the model is blind to order (attention, position-wise maps), so reversing a dialogue merely
    reverses its outputs once the positional table is zeroed, and changes them with the sinusoids."""
    model = tiny_model("xlstm-multiemo", use_context=False, dropout=0.0).eval()
    batch = make_batch([7], seed=5)
    backwards = {key: value.flip(1) for key, value in batch.items()}
    with torch.no_grad():
        forward, reversed_back = model(batch).logits, model(backwards).logits.flip(1)
        assert not torch.allclose(forward, reversed_back, atol=1e-4)
        model.positions.table.zero_()
        without = model(batch).logits
        torch.testing.assert_close(model(backwards).logits.flip(1), without, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(forward, without, atol=1e-4)


def test_reasoning_matches_memory_through_a_linear_layer_and_simam():
    """Eq 2 / §3.2: the xLSTM output q̃ is "matched with globally relevant contextual information
    through a linear layer and the simAM attention mechanism": r = Σ_j softmax_j(SimAM(W q̃ + b)·c_j) c_j."""
    torch.manual_seed(0)
    module = ReasoningModule(16, steps=1, num_heads=2).eval()
    query, memory = torch.randn(2, 5, 32), torch.randn(2, 5, 16)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        out = module(query, memory, valid, valid)
        q_tilde = module.xlstm(module.input_proj(query[valid]).unsqueeze(1))[:, -1]
        dialogue = valid.nonzero()[:, 0]
        scores = (simam(module.match(q_tilde)).unsqueeze(1) @ memory[dialogue].transpose(1, 2)).squeeze(1)
        retrieved = (masked_softmax(scores, valid[dialogue]).unsqueeze(1) @ memory[dialogue]).squeeze(1)
        torch.testing.assert_close(out[valid], torch.cat([q_tilde, retrieved], dim=-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[~valid], query[~valid])
        module.match.weight.mul_(3.0)
        assert not torch.allclose(module(query, memory, valid, valid)[valid], out[valid], atol=1e-4)


def test_xlstm_cells_and_perception_are_what_the_config_names():
    """``xlstm_block`` picks the xLSTM cells of every recurrence (mixed: mLSTM then sLSTM blocks, as
    in the xLSTM paper's stacks); ``perception`` picks DialogueCRN's perception encoders: its own
    bi-LSTMs or bi-xLSTMs. The reasoning modules are xLSTMs either way (eq 1)."""
    from xlstm.blocks.mlstm.block import mLSTMBlock
    from xlstm.blocks.slstm.block import sLSTMBlock

    def blocks(module):
        return [type(m) for m in module.modules() if isinstance(m, (mLSTMBlock, sLSTMBlock))]

    assert blocks(xlstm_stack(8, "mixed", 1, 2, 16)) == [mLSTMBlock, sLSTMBlock]
    assert blocks(xlstm_stack(8, "mixed", 4, 2, 16)) == [mLSTMBlock, sLSTMBlock] * 2
    assert blocks(xlstm_stack(8, "slstm", 2, 2, 16)) == [sLSTMBlock] * 2
    with pytest.raises(ConfigError, match="xLSTM block"):
        xlstm_stack(8, "gru")

    model = tiny_model("xlstm-multiemo", xlstm_block="slstm", perception="lstm")
    crn = model.contexts["text"]
    assert isinstance(crn.situation_encoder.rnn, torch.nn.LSTM) and crn.situation_encoder.rnn.bidirectional
    assert blocks(crn.situation_encoder) == [] and blocks(crn.speaker_encoder) == []
    assert blocks(crn.situation_reasoning) == [sLSTMBlock] and blocks(crn.speaker_reasoning) == [sLSTMBlock]
    assert blocks(tiny_model("xlstm-multiemo").contexts["text"].situation_encoder) == [mLSTMBlock] * 2
    with pytest.raises(ConfigError, match="perception"):
        tiny_model("xlstm-multiemo", perception="gru")
