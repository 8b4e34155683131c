"""Conversational context encoders: DialogueRNN, bi-LSTM/GRU, bi-xLSTM and xLSTM DialogueCRN.

All of them take a ``valid`` mask (B, L): True for a real utterance whose modality is present.
Invalid positions (padding or a missing modality) never feed a recurrent state or an attention.
The sequence encoders run on subsequences built by ``GroupedPositions`` (the valid utterances of
each dialogue, or of each speaker of each dialogue, gathered in time order), so padding is never
inside a sequence and the backward direction reverses each sequence within its own length;
DialogueRNN leaves its states untouched at invalid steps. Outputs at invalid positions are zeros
(DialogueCRN: at padding), and a dialogue's outputs do not depend on what it is batched with.

xLSTM backends: the ``xlstm`` package's mLSTM block has only a pure-PyTorch parallel form, which
runs anywhere; its sLSTM block has a "vanilla" (PyTorch) backend and a "cuda" one that compiles a
CUDA kernel. ``xlstm_stack`` builds the vanilla sLSTM (float32) so that every model builds and
loads on CPU, with the package's per-step loop replaced by one that computes the same (its backward
pass was quadratic in the sequence length; 3-4x faster at MELD's lengths). ``use_xlstm_backend``
switches a model's sLSTM cells to the CUDA kernel on a GPU when it builds, keeping the parameters
(and so checkpoints) in the vanilla layout.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from erc.errors import ConfigError
from erc.models.blocks import index_put, masked_softmax

XLSTMBlock = Literal["mlstm", "slstm", "mixed"]
XLSTMBackend = Literal["auto", "cuda", "vanilla"]
Perception = Literal["xlstm", "lstm"]
XLSTM_BLOCKS: tuple[str, ...] = get_args(XLSTMBlock)
PERCEPTIONS: tuple[str, ...] = get_args(Perception)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- packing


def _broadcastable(index: Tensor, like: Tensor) -> Tensor:
    """View an (R, T) tensor with trailing singleton dims so it broadcasts against ``like``."""
    return index.view(*index.shape, *[1] * (like.dim() - index.dim()))


@dataclass(frozen=True)
class GroupedPositions:
    """Where each packed subsequence's steps sit in the (B, L) batch.

    ``rows`` (R,) dialogue of each subsequence, ``positions`` (R, T) utterance index of each step,
    ``steps_valid`` (R, T) True for real steps, ``lengths`` (R,).
    """

    batch_size: int
    length: int
    rows: Tensor
    positions: Tensor
    steps_valid: Tensor
    lengths: Tensor

    @classmethod
    def build(cls, valid: Tensor, group: Tensor | None = None, num_groups: int = 1) -> GroupedPositions:
        """One subsequence per (dialogue, group) with at least one valid utterance.

        ``group`` (B, L) long in [0, num_groups), e.g. the speaker index; None = one per dialogue.
        """
        batch_size, length = valid.shape
        if group is None:
            group = torch.zeros_like(valid, dtype=torch.long)
        group = group.masked_fill(~valid, num_groups)  # invalid positions sort last
        time = torch.arange(length, device=valid.device)
        order = (group * length + time).argsort(dim=1)
        counts = F.one_hot(group, num_groups + 1).sum(dim=1)[:, :num_groups]
        starts = counts.cumsum(dim=1) - counts
        rows, groups = counts.nonzero(as_tuple=True)
        lengths = counts[rows, groups]
        steps = torch.arange(int(lengths.max()) if rows.numel() else 0, device=valid.device)
        steps_valid = steps < lengths.unsqueeze(1)
        slots = (starts[rows, groups].unsqueeze(1) + steps).clamp(max=length - 1)
        positions = order[rows.unsqueeze(1), slots]
        return cls(batch_size, length, rows, positions, steps_valid, lengths)

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, ...) -> (R, T, ...), zeros at padded steps."""
        packed = x[self.rows.unsqueeze(1), self.positions]
        return packed.masked_fill(~_broadcastable(self.steps_valid, packed), 0)

    def unpack(self, y: Tensor) -> Tensor:
        """(R, T, D) -> (B, L, D), zeros where no subsequence step lands."""
        out = y.new_zeros(self.batch_size, self.length, y.shape[-1])
        rows = self.rows.unsqueeze(1).expand_as(self.positions)
        index = (rows[self.steps_valid], self.positions[self.steps_valid])
        return index_put(out, index, y[self.steps_valid])


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each (R, T, ...) sequence within its length; padded steps stay where they are."""
    steps = torch.arange(x.shape[1], device=x.device)
    index = torch.where(steps < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - steps, steps)
    return x.gather(1, _broadcastable(index, x).expand_as(x))


def encode_groups(
    encoder: RecurrentEncoder | XLSTMEncoder, x: Tensor, valid: Tensor, group: Tensor | None = None, num_groups: int = 1
) -> Tensor:
    """Run a sequence encoder over the valid utterances of each (dialogue, group); back to (B, L, D')."""
    grouped = GroupedPositions.build(valid, group, num_groups)
    if grouped.rows.numel() == 0:
        return x.new_zeros(*valid.shape, encoder.output_dim)
    return grouped.unpack(encoder(grouped.pack(x), grouped.lengths))


# --------------------------------------------------------------------------- sequence encoders


class RecurrentEncoder(nn.Module):
    """(Bi-)LSTM or GRU over packed sequences (bc-LSTM style context)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        num_layers: int = 1,
        bidirectional: bool = True,
        cell: Literal["lstm", "gru"] = "lstm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(
            input_dim, hidden_dim, num_layers, batch_first=True, bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.output_dim = hidden_dim * (2 if bidirectional else 1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x (R, T, D) with real steps first, lengths (R,) >= 1 -> (R, T, output_dim)."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


def xlstm_stack(
    dim: int, block: XLSTMBlock = "mlstm", num_blocks: int = 1, num_heads: int = 4, context_length: int = 512,
    dropout: float = 0.0,
) -> nn.Module:
    """A causal xLSTM block stack (``xlstm.xLSTMBlockStack``) of width ``dim`` that runs on CPU as
    well as GPU. ``xlstm`` is imported here: importing it logs a CUDA notice, irrelevant to the
    models that do not use it."""
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMBlockStack,
        xLSTMBlockStackConfig,
    )

    if block not in XLSTM_BLOCKS:
        raise ConfigError(f"unknown xLSTM block {block!r} (choose one of {', '.join(XLSTM_BLOCKS)})")
    mlstm = mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=num_heads))
    slstm = sLSTMBlockConfig(
        slstm=sLSTMLayerConfig(backend="vanilla", dtype="float32", num_heads=num_heads, conv1d_kernel_size=4),
        feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu"),
    )
    if block == "mixed":
        num_blocks = max(num_blocks, 2)
    config = xLSTMBlockStackConfig(
        mlstm_block=mlstm if block != "slstm" else None,
        slstm_block=slstm if block != "mlstm" else None,
        slstm_at={"mlstm": [], "slstm": "all", "mixed": list(range(1, num_blocks, 2))}[block],
        context_length=context_length, num_blocks=num_blocks, embedding_dim=dim, dropout=dropout,
    )
    stack = xLSTMBlockStack(config)
    for cell in [m for m in stack.modules() if type(m).__name__ == "sLSTMCell_vanilla"]:
        cell.__class__ = _recurrence_slstm_cell_class()  # same parameters and state: only the loop differs
    return stack


@cache
def _cuda_slstm_cell_class() -> type[nn.Module]:
    """``sLSTMCell_cuda`` whose parameters keep the vanilla cell's layout (converted on each call)."""
    from xlstm.blocks.slstm.cell import sLSTMCell_cuda, sLSTMCell_vanilla

    class VanillaLayoutCUDACell(sLSTMCell_cuda):
        @property
        def _recurrent_kernel(self) -> Tensor:
            external = sLSTMCell_vanilla._recurrent_kernel_int2ext(self, self._recurrent_kernel_)
            return self._recurrent_kernel_ext2int(external)

        @property
        def _bias(self) -> Tensor:
            return self._bias_ext2int(sLSTMCell_vanilla._bias_int2ext(self, self._bias_))

    return VanillaLayoutCUDACell


@cache
def _recurrence_slstm_cell_class() -> type[nn.Module]:
    """``sLSTMCell_vanilla`` with the same parameters and pointwise step, looped without the
    package's per-step writes into preallocated (S+1)-long buffers (under autograd each such write
    makes the backward pass copy the whole buffer again: quadratic in the sequence length) and with
    the recurrent product as one head-batched matmul, whose weight gradient needs no batch sum."""
    from xlstm.blocks.slstm.cell import sLSTMCell_vanilla

    class RecurrenceSLSTMCell(sLSTMCell_vanilla):
        def _impl(self, training: bool, input: Tensor, state: Tensor) -> Tensor:
            """input (S, B, 4·H) gate pre-activations, state (4, B, H) -> states (4, S+1, B, H)."""
            heads, head_dim = self.config.num_heads, self.config.head_dim
            batch = input.shape[1]
            recurrent = self._recurrent_kernel.transpose(1, 2)  # (heads, head_dim, gates·head_dim)
            states, steps = state, [state]
            for gates_x in input.unbind(0):
                y = states[0].view(batch, heads, head_dim).transpose(0, 1)  # (heads, B, head_dim)
                gates_r = torch.bmm(y, recurrent).view(heads, batch, -1, head_dim).permute(1, 2, 0, 3).reshape(batch, -1)
                states, _ = self.pointwise(gates_x, gates_r, self._bias, states, self.config.constants)
                states = states.to(state.dtype)
                steps.append(states)
            return torch.stack(steps, dim=1)

    return RecurrenceSLSTMCell


def cuda_slstm_cell(cell: nn.Module, *, build: bool = True) -> nn.Module:
    """The CUDA-kernel twin of a vanilla sLSTM cell, sharing its parameter objects (so an optimizer
    or a state dict sees no difference). ``build=False`` skips compiling the kernel (for tests)."""
    config = dataclasses.replace(cell.config, backend="cuda", internal_input_shape="SBNGH")
    twin = _cuda_slstm_cell_class()(config, skip_backend_init=not build)
    twin._recurrent_kernel_, twin._bias_ = cell._recurrent_kernel_, cell._bias_
    return twin


def use_xlstm_backend(model: nn.Module, device: torch.device, backend: XLSTMBackend = "auto") -> str | None:
    """Put a model's xLSTM blocks on ``backend`` and return the one they use: "cuda" (the sLSTM
    cells run the ``xlstm`` package's CUDA kernel), "vanilla" (PyTorch), or None (no xLSTM).

    ``auto``: the CUDA kernel on a CUDA device when the model has sLSTM cells and the kernel
    builds, else vanilla. ``cuda`` raises ConfigError where the kernel cannot be used. The mLSTM
    block has no kernel of its own in ``xlstm`` (its parallel form is batched matmuls).
    Call after moving the model to ``device`` and before building the optimizer.
    """
    if backend not in ("auto", "cuda", "vanilla"):
        raise ConfigError(f"xLSTM backend must be auto, cuda or vanilla, not {backend!r}")
    if not any(type(m).__name__ == "xLSTMBlockStack" for m in model.modules()):
        return None
    from xlstm.blocks.slstm.layer import sLSTMLayer

    layers = [m for m in model.modules() if isinstance(m, sLSTMLayer)]
    if backend == "vanilla" or (backend == "auto" and (device.type != "cuda" or not layers)):
        return "vanilla"
    if device.type != "cuda" or not layers:
        raise ConfigError("the xLSTM cuda backend needs a CUDA device and a model with sLSTM blocks")
    try:
        twins = [cuda_slstm_cell(layer.slstm_cell) for layer in layers]
    except Exception as exc:  # a missing toolkit or a failed compilation: nvcc, ninja, ...
        if backend == "cuda":
            raise ConfigError(f"the sLSTM CUDA kernel could not be built ({exc})") from exc
        logger.warning("sLSTM CUDA kernel unavailable (%s); using the vanilla backend", exc)
        return "vanilla"
    for layer, twin in zip(layers, twins):
        layer.slstm_cell = twin.to(device)
    return "cuda"


class XLSTMEncoder(nn.Module):
    """(Bi-)directional xLSTM over packed sequences: per direction a linear map to the width, then
    a causal xLSTM block stack; the backward direction reads each sequence reversed in its length.
    ``gradient_checkpointing`` recomputes the stacks' activations in the backward pass."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        bidirectional: bool = True,
        block: XLSTMBlock = "mlstm",
        num_blocks: int = 1,
        num_heads: int = 4,
        context_length: int = 512,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.context_length, self.gradient_checkpointing = context_length, gradient_checkpointing
        self.directions = nn.ModuleList(
            nn.Sequential(
                nn.Linear(input_dim, hidden_dim),
                xlstm_stack(hidden_dim, block, num_blocks, num_heads, context_length, dropout),
            )
            for _ in range(2 if bidirectional else 1)
        )
        self.output_dim = hidden_dim * len(self.directions)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x (R, T, D) with real steps first, lengths (R,) -> (R, T, output_dim)."""
        if x.shape[1] > self.context_length:
            raise ConfigError(f"sequence of {x.shape[1]} utterances exceeds the xLSTM context length {self.context_length}")
        run = lambda direction, y: (  # noqa: E731
            checkpoint(direction, y, use_reentrant=False)
            if self.gradient_checkpointing and torch.is_grad_enabled()
            else direction(y)
        )
        outputs = [run(self.directions[0], x)]
        if len(self.directions) == 2:
            outputs.append(reverse_padded(run(self.directions[1], reverse_padded(x, lengths)), lengths))
        return torch.cat(outputs, dim=-1)


# --------------------------------------------------------------------------- DialogueRNN


class DialogueRNNDirection(nn.Module):
    """Parameters of one direction of DialogueRNN (Majumder et al. 2019), without listener update.

    Per utterance u_t of speaker s: global state g_t = GRU_G(g_{t-1}, u_t ⊕ q_{s,t-1}); context
    c_t = attention over the previous global states g_<t; speaker state q_{s,t} = GRU_P(q_{s,t-1},
    u_t ⊕ c_t), other parties unchanged; emotion e_t = GRU_E(e_{t-1}, q_{s,t}). The attention is
    the "simple" one of the MultiEMO release: a learned score per global state. The recurrence
    itself is ``run_dialogue_rnns``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_speakers: int) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.num_speakers = input_dim, hidden_dim, num_speakers
        self.global_gru = nn.GRUCell(input_dim + hidden_dim, hidden_dim)
        self.party_gru = nn.GRUCell(input_dim + hidden_dim, hidden_dim)
        self.emotion_gru = nn.GRUCell(hidden_dim, hidden_dim)
        self.attention_score = nn.Linear(hidden_dim, 1, bias=False)


class DialogueRNN(nn.Module):
    """(Bi-)DialogueRNN context encoder: emotion states of both directions -> linear -> ReLU ->
    dropout. The backward direction reads each dialogue reversed within its length. Outputs at
    invalid positions are zeros. Several DialogueRNNs (one per modality) run faster together
    through ``run_dialogue_rnns``."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_speakers: int, bidirectional: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.directions = nn.ModuleList(
            DialogueRNNDirection(input_dim, hidden_dim, num_speakers) for _ in range(2 if bidirectional else 1)
        )
        self.output = nn.Linear(hidden_dim * len(self.directions), output_dim)
        self.dropout = nn.Dropout(dropout)
        self.output_dim = output_dim

    def forward(self, x: Tensor, speaker: Tensor, valid: Tensor) -> Tensor:
        """x (B, L, D), speaker (B, L) long, valid (B, L) bool -> (B, L, output_dim)."""
        return run_dialogue_rnns([self], [x], speaker, [valid])[0]


def _gru(gates_x: Tensor, gates_h: Tensor, h: Tensor) -> Tensor:
    """nn.GRUCell's update from its input gates W_ih x + b_ih and hidden gates W_hh h + b_hh,
    written to keep few tensors alive for the backward pass."""
    size = h.shape[-1]
    x_rz, x_n = gates_x.split([2 * size, size], dim=-1)
    h_rz, h_n = gates_h.split([2 * size, size], dim=-1)
    r, z = torch.sigmoid(x_rz + h_rz).chunk(2, dim=-1)
    n = torch.tanh(torch.addcmul(x_n, r, h_n.contiguous()))
    return torch.lerp(n, h, z)  # (1 - z) * n + z * h


def run_dialogue_rnns(
    encoders: Sequence[DialogueRNN], inputs: Sequence[Tensor], speaker: Tensor, valid: Sequence[Tensor]
) -> list[Tensor]:
    """Run DialogueRNNs (e.g. one per modality, each on its own (B, L, D_k) input and (B, L)
    validity) in a single time loop; returns each one's (B, L, output_dim) output.

    Every direction of every encoder is a *stream*; the streams' recurrences are batched
    (``bmm`` over stacked weights), so the Python loop runs once per utterance position, not once
    per position and stream. Dialogues are sorted by length and each step only touches those still
    running (a time-major packed layout, as in ``PackedSequence``); a stream's state is left
    untouched at its invalid steps (missing modality). The u_t parts of the global/party GRU gates
    are computed for all valid utterances at once, and the attention is a running (online)
    softmax, so memory stays linear in the dialogue length. The dialogue lengths are read back to
    the host once per call (the loop's bounds); the steps themselves never wait for the device.
    """
    if not encoders:
        return []
    any_valid = torch.stack(list(valid)).any(dim=0)
    batch, length = any_valid.shape
    lengths = torch.where(any_valid.any(dim=1), length - any_valid.flip(1).int().argmax(dim=1), 0)
    order = lengths.argsort(descending=True, stable=True)
    lengths = lengths[order]
    steps = torch.arange(length, device=lengths.device)
    active = [n for n in (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(dim=1).tolist() if n]  # the one host read
    if not active:
        return [x.new_zeros(batch, length, encoder.output_dim) for encoder, x in zip(encoders, inputs)]
    # time-major packed layout: step t holds the first active[t] (longest) dialogues
    rows = torch.cat([torch.arange(n) for n in active]).to(lengths.device, non_blocking=True)
    times = torch.repeat_interleave(torch.arange(len(active)), torch.tensor(active)).to(lengths.device, non_blocking=True)
    positions = [times, lengths[rows] - 1 - times]  # forward, backward (reversed within length)

    streams, stream_inputs, placements = [], [], []
    for encoder, x, v in zip(encoders, inputs, valid, strict=True):
        streams += encoder.directions
        stream_inputs += _stream_inputs(encoder, x[order], v[order], speaker[order], rows, positions)
        placements += positions[: len(encoder.directions)]
    gates, stream_valid, stream_speaker = (torch.stack(part) for part in zip(*stream_inputs))
    del stream_inputs
    with torch.autocast(gates.device.type, enabled=False):  # a long recurrence: keep it in float32
        emotions = _dialogue_rnn_streams(streams, gates.float(), stream_valid, stream_speaker, active, batch)

    outputs, k, unsort = [], 0, order.argsort()
    for encoder, v in zip(encoders, valid):
        states = [
            index_put(emotions.new_zeros(batch, length, emotions.shape[-1]), (rows, placements[k + d]), emotions[k + d])
            for d in range(len(encoder.directions))
        ]
        k += len(encoder.directions)
        out = encoder.dropout(F.relu(encoder.output(torch.cat(states, dim=-1))))[unsort]
        outputs.append(out.masked_fill(~v.unsqueeze(-1), 0.0))
    return outputs


def _stream_inputs(
    encoder: DialogueRNN, x: Tensor, valid: Tensor, speaker: Tensor, rows: Tensor, positions: list[Tensor]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per direction of one encoder, in the time-major packed layout (``rows``, ``positions``):
    the u_t parts W_u u_t + b of its global and party GRU gates, its validity and its speakers.
    The gates are computed once per valid utterance, for all directions in one product."""
    cells = encoder.directions
    weight = torch.cat([w for c in cells for w in (c.global_gru.weight_ih, c.party_gru.weight_ih)])
    weight = weight[:, : cells[0].input_dim]
    bias = torch.cat([b for c in cells for b in (c.global_gru.bias_ih, c.party_gru.bias_ih)])
    present = valid.nonzero(as_tuple=True)
    projected = F.linear(x[present], weight, bias)
    projected = torch.cat([projected, projected.new_zeros(1, projected.shape[1])])  # the row of invalid steps
    token = torch.full_like(speaker, len(present[0])).index_put(present, torch.arange(len(present[0]), device=x.device))
    return [
        (gates[token[rows, position]], valid[rows, position], speaker[rows, position])
        for gates, position in zip(projected.chunk(len(cells), dim=1), positions)
    ]


def _dialogue_rnn_streams(
    cells: list[DialogueRNNDirection], input_gates: Tensor, valid: Tensor, speaker: Tensor, active: list[int],
    batch: int,
) -> Tensor:
    """The batched recurrence of K streams over the time-major packed layout (N = sum(active)):
    input_gates (K, N, 6H) = W_u u_t + b of the global then party GRU; valid, speaker (K, N).
    Returns the emotion states e (K, N, H)."""
    num_streams = len(cells)
    hidden, num_speakers = cells[0].hidden_dim, cells[0].num_speakers
    stack = lambda get: torch.stack([get(c) for c in cells])  # noqa: E731
    # q_{s,t-1} feeds both the global GRU input and the party GRU hidden gates: one product
    w_speaker = stack(lambda c: torch.cat([c.global_gru.weight_ih[:, c.input_dim :], c.party_gru.weight_hh]).T)
    b_party_h = stack(lambda c: c.party_gru.bias_hh).unsqueeze(1)
    w_global_h, b_global_h = stack(lambda c: c.global_gru.weight_hh.T), stack(lambda c: c.global_gru.bias_hh).unsqueeze(1)
    w_party_c = stack(lambda c: c.party_gru.weight_ih[:, c.input_dim :].T)
    w_emotion_x, b_emotion_x = stack(lambda c: c.emotion_gru.weight_ih.T), stack(lambda c: c.emotion_gru.bias_ih).unsqueeze(1)
    w_emotion_h, b_emotion_h = stack(lambda c: c.emotion_gru.weight_hh.T), stack(lambda c: c.emotion_gru.bias_hh).unsqueeze(1)
    w_score = stack(lambda c: c.attention_score.weight.T)

    # per step; split (not sliced) so that the backward pass is one concatenation
    global_x, party_x = (g.split(active, dim=1) for g in input_gates.chunk(2, dim=-1))
    speaker = speaker.clamp(0, num_speakers - 1)  # padding may hold any index
    updates = (F.one_hot(speaker, num_speakers).bool() & valid.unsqueeze(-1)).unsqueeze(-1).split(active, dim=1)
    valid, speaker = valid.unsqueeze(-1).split(active, dim=1), speaker.split(active, dim=1)

    # states of the running dialogues only: finished ones (the tail rows) are simply dropped
    zeros = lambda *shape: input_gates.new_zeros(num_streams, batch, *shape)  # noqa: E731
    g, e, parties = zeros(hidden), zeros(hidden), zeros(num_speakers, hidden)
    # online softmax over past global states: running max, weighted sum, normaliser
    score_max, weighted, normaliser = zeros(1).fill_(-1e4), zeros(hidden), zeros(1)
    emotions = []
    for t, n in enumerate(active):
        g, e, parties = g[:, :n], e[:, :n], parties[:, :n]
        score_max, weighted, normaliser = score_max[:, :n], weighted[:, :n], normaliser[:, :n]
        step = valid[t]
        q_speaker = parties.gather(2, speaker[t].view(num_streams, n, 1, 1).expand(-1, -1, 1, hidden)).squeeze(2)
        from_global_x, from_party_h = torch.bmm(q_speaker, w_speaker).chunk(2, dim=-1)
        g_new = _gru(global_x[t] + from_global_x, torch.baddbmm(b_global_h, g, w_global_h), g)
        context = weighted / normaliser.clamp_min(1.0)  # normaliser is 0 (no history) or >= 1
        q_new = _gru(torch.baddbmm(party_x[t], context, w_party_c), from_party_h + b_party_h, q_speaker)
        e_new = _gru(torch.baddbmm(b_emotion_x, q_new, w_emotion_x), torch.baddbmm(b_emotion_h, e, w_emotion_h), e)

        score = torch.bmm(g_new, w_score)
        new_max = torch.maximum(score_max, score)
        decay, gain = torch.exp(score_max - new_max), torch.exp(score - new_max)
        weighted = torch.where(step, decay * weighted + gain * g_new, weighted)
        normaliser = torch.where(step, decay * normaliser + gain, normaliser)
        score_max = torch.where(step, new_max, score_max)
        g = torch.where(step, g_new, g)
        e = torch.where(step, e_new, e)
        parties = torch.where(updates[t], q_new.unsqueeze(2), parties)
        emotions.append(e)
    return torch.cat(emotions, dim=1)


# --------------------------------------------------------------------------- DialogueCRN with xLSTM


def simam(x: Tensor, e_lambda: float = 1e-4) -> Tensor:
    """Parameter-free SimAM attention (Yang et al. 2021) over the feature axis of each vector."""
    squared = (x - x.mean(dim=-1, keepdim=True)).pow(2)
    variance = squared.sum(dim=-1, keepdim=True) / (x.shape[-1] - 1)
    return x * torch.sigmoid(squared / (4 * (variance + e_lambda)) + 0.5)


class ReasoningModule(nn.Module):
    """Multi-turn reasoning (DialogueCRN; xLSTM-MultiEMO eqs 1-3) with an xLSTM working memory.

    Each turn: q̃^(t-1) = xLSTM over the query's turn history (its recurrent state is the working
    memory h^(t)); q̃ is matched with the dialogue's memory "through a linear layer and the simAM
    attention mechanism" (eq 2, §3.2): r = Σ_j softmax_j(SimAM(W q̃ + b)·c_j) c_j; q^(t) = [q̃; r]. The causal xLSTM reads the whole history [q^(0) .. q^(t-1)] each turn,
    which equals stepping its recurrent state one turn at a time (its parallel form never holds
    the mLSTM's matrix memory of every query). ``gradient_checkpointing`` recomputes the xLSTM's
    activations in the backward pass instead of storing them.
    """

    def __init__(
        self, memory_dim: int, steps: int, block: XLSTMBlock = "mlstm", num_blocks: int = 1, num_heads: int = 4,
        use_simam: bool = True, gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ConfigError("a reasoning module needs at least one turn")
        self.steps, self.use_simam, self.gradient_checkpointing = steps, use_simam, gradient_checkpointing
        self.input_proj = nn.Linear(2 * memory_dim, memory_dim)
        self.match = nn.Linear(memory_dim, memory_dim)  # eq 2's linear layer
        self.xlstm = xlstm_stack(memory_dim, block, num_blocks, num_heads, context_length=max(steps, 2))

    def forward(self, query: Tensor, memory: Tensor, memory_valid: Tensor, query_valid: Tensor) -> Tensor:
        """query (B, L, 2m) = q^(0), memory (B, L, m), masks (B, L) -> q^(steps) (B, L, 2m).

        Only valid queries are reasoned about; the others stay q^(0).
        """
        queries = query_valid.nonzero(as_tuple=True)  # read once: the turns never wait for the device
        if queries[0].numel() == 0:
            return query
        history: list[Tensor] = []
        q = query
        for _ in range(self.steps):
            history.append(self.input_proj(q[queries]))
            turns = torch.stack(history, dim=1)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                working_memory = checkpoint(self.xlstm, turns, use_reentrant=False)
            else:
                working_memory = self.xlstm(turns)
            q_tilde = query.new_zeros(*query_valid.shape, memory.shape[-1])
            q_tilde = index_put(q_tilde, queries, working_memory[:, -1])
            probe = self.match(q_tilde)
            probe = simam(probe) if self.use_simam else probe
            weights = masked_softmax(probe @ memory.transpose(1, 2), memory_valid.unsqueeze(1))
            q = torch.where(query_valid.unsqueeze(-1), torch.cat([q_tilde, weights @ memory], dim=-1), query)
        return q


class DialogueCRN(nn.Module):
    """Contextual reasoning network (Hu et al. 2021) whose LSTMs are xLSTMs (xLSTM-MultiEMO §3.2).

    Perception: a bi-xLSTM over the dialogue gives situation-level states c^s, a bi-xLSTM over each
    speaker's own utterances gives speaker-level states c^v (both 2·hidden wide). Cognition: q^(0)
    = W_q c + b_q (4·hidden), then ``situation_steps`` / ``speaker_steps`` reasoning turns against
    the c^s / c^v memories (0 turns = no reasoning at that level). Output: ReLU([q^s; q^v]) with
    dropout, 8·hidden wide, zero outside the utterances that get a query. ``perception="lstm"``
    makes the two perception encoders DialogueCRN's own bi-LSTMs (the reasoning stays xLSTM).
    ``gradient_checkpointing`` applies to all its xLSTMs.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        num_speakers: int,
        situation_steps: int = 3,
        speaker_steps: int = 3,
        block: XLSTMBlock = "mlstm",
        num_blocks: int = 1,
        num_heads: int = 4,
        use_simam: bool = True,
        context_length: int = 512,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        perception: Perception = "xlstm",
    ) -> None:
        super().__init__()
        if perception not in PERCEPTIONS:
            raise ConfigError(f"perception must be one of {', '.join(PERCEPTIONS)}, got {perception!r}")
        self.num_speakers = num_speakers
        memory_dim = 2 * hidden_dim
        encoder = lambda: (  # noqa: E731
            XLSTMEncoder(
                input_dim, hidden_dim, True, block, num_blocks, num_heads, context_length, dropout, gradient_checkpointing
            )
            if perception == "xlstm"
            else RecurrentEncoder(input_dim, hidden_dim, bidirectional=True, cell="lstm")
        )
        self.situation_encoder, self.speaker_encoder = encoder(), encoder()
        self.query_init = nn.Linear(memory_dim, 2 * memory_dim)
        reasoning = lambda steps: (  # noqa: E731
            ReasoningModule(memory_dim, steps, block, num_blocks, num_heads, use_simam, gradient_checkpointing)
            if steps > 0
            else None
        )
        self.situation_reasoning, self.speaker_reasoning = reasoning(situation_steps), reasoning(speaker_steps)
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 4 * memory_dim

    def forward(self, x: Tensor, speaker: Tensor, valid: Tensor, utterance_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D), speaker (B, L), valid (B, L) -> (B, L, 8·hidden).

        ``utterance_mask`` (B, L) marks the real utterances that get a reasoning query (default:
        ``valid``); an utterance whose modality is missing still reasons over its dialogue's memory.
        """
        situation = encode_groups(self.situation_encoder, x, valid)
        by_speaker = encode_groups(self.speaker_encoder, x, valid, speaker, self.num_speakers)
        queries = valid if utterance_mask is None else utterance_mask
        levels = []
        for memory, reasoning in ((situation, self.situation_reasoning), (by_speaker, self.speaker_reasoning)):
            q = self.query_init(memory)
            levels.append(q if reasoning is None else reasoning(q, memory, valid, queries))
        return self.dropout(F.relu(torch.cat(levels, dim=-1))).masked_fill(~queries.unsqueeze(-1), 0.0)
