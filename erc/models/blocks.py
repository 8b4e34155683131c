"""Building blocks shared by the fusion models.

The fusion blocks work on *packed tokens*: the real utterances of a padded (B, L) batch stacked
into (N, D) by a ``TokenIndex``, so position-wise layers (projections, feed-forwards, the attention
in/out maps) never spend time on padding. Attention unpacks its queries, keys and values to
(B, L, ...) and takes a boolean *valid* mask over the keys (True = a real utterance whose modality
is present): padding and missing modalities are never attended to, and a query whose keys are all
invalid (e.g. a modality absent from a whole dialogue) gets a zero attention output, not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from erc.errors import ConfigError

MODALITIES = ("text", "audio", "visual")


@dataclass
class ModelOutput:
    """What a fusion model returns.

    ``logits`` (B, L, C); ``fc_features`` the FC output z (B, L, d) that SWFC contrasts;
    ``fused`` the per-modality multimodal-fused features f^m (B, L, d) that Soft-HGR correlates;
    ``valid`` per modality, True where that modality is present in a real utterance (B, L).
    """

    logits: Tensor
    fc_features: Tensor | None = None
    fused: dict[str, Tensor] = field(default_factory=dict)
    valid: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingStage:
    """One stage of a model's staged schedule (``model.training_stages()``, ``erc train --stages``).

    ``modules``: the model's top-level submodules this stage trains; the trainer freezes every other
    parameter. ``lr`` / ``weight_decay``: None = the run's. ``epochs``: the fraction of the run's
    epochs the stage takes; None = an equal share of what the other stages leave. ``dropout`` is
    the dropout of the modules the stage trains (a record: the model builds them with it). The
    trainer calls ``model.begin_stage(name)`` before the stage (the model picks the stage's
    objective) and ``model.begin_stage(None)`` after the last.
    """

    name: str
    modules: tuple[str, ...]
    lr: float | None = None
    weight_decay: float | None = None
    epochs: float | None = None
    dropout: float | None = None


def index_put(target: Tensor, indices: tuple[Tensor, ...], values: Tensor) -> Tensor:
    """``target.index_put(indices, values)`` in the wider dtype of the two, with autocast off.

    Under CUDA autocast in bfloat16, index_put's type-promotion rule raises for bfloat16 inputs
    ("Unexpected floating ScalarType in at::autocast::prioritize", pytorch issue 132715); the op
    needs no casting, so it runs outside autocast and promotes as that rule would have.
    """
    dtype = torch.promote_types(target.dtype, values.dtype)
    with torch.autocast(target.device.type, enabled=False):
        return target.to(dtype).index_put(indices, values.to(dtype))


class TokenIndex:
    """The real utterances of a padded batch: packs (B, L, ...) into (N, ...) and back.

    Tokens are ordered dialogue by dialogue, so each dialogue is the contiguous token range
    ``spans[b]`` (computed on first use: it reads the lengths back to the host).
    """

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask
        self.index = mask.nonzero(as_tuple=True)  # (dialogue, position) of each token
        self.dialogue, self.position = self.index

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        ends = self.mask.sum(dim=1).cumsum(dim=0).tolist()
        return list(zip([0, *ends[:-1]], ends))

    def __len__(self) -> int:
        return self.dialogue.numel()

    def pack(self, x: Tensor) -> Tensor:
        return x[self.index]

    def unpack(self, x: Tensor) -> Tensor:
        """(N, ...) -> (B, L, ...) with zeros at padding."""
        return index_put(x.new_zeros(*self.mask.shape, *x.shape[1:]), self.index, x)


def modality_inputs(
    batch: Mapping[str, Tensor], modalities: Sequence[str], tokens: TokenIndex
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-modality packed features (N, D) and validity masks (B, L) from a batch.

    A modality counts as present where ``batch["mask"]`` and ``batch[f"{m}_mask"]`` (if given) are
    both True. Features of absent modalities are zeroed, so whatever a loader left there is never
    read as data.
    """
    mask = batch["mask"]
    features, valid = {}, {}
    for m in modalities:
        present = mask & batch[f"{m}_mask"] if f"{m}_mask" in batch else mask
        features[m] = tokens.pack(batch[m]).masked_fill_(~tokens.pack(present).unsqueeze(-1), 0.0)  # own copy
        valid[m] = present
    return features, valid


def check_modalities(modalities: tuple[str, ...], input_dims: Mapping[str, int]) -> None:
    """Raise ConfigError unless ``modalities`` is a non-empty subset of text/audio/visual with dims."""
    if not modalities or any(m not in MODALITIES for m in modalities) or len(set(modalities)) != len(modalities):
        raise ConfigError(f"modalities must be distinct names from {MODALITIES}, got {modalities}")
    missing = [m for m in modalities if m not in input_dims]
    if missing:
        raise ConfigError(f"no input dimension given for modalities {missing}")


def check_speakers(speaker: Tensor, mask: Tensor, num_speakers: int) -> None:
    """Raise ConfigError if a real utterance's speaker index is outside [0, num_speakers)."""
    real = speaker[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= num_speakers):
        raise ConfigError(
            f"speaker index {int(real.max())} outside [0, {num_speakers}): raise num_speakers in the model config"
        )


def modality_projections(
    modalities: tuple[str, ...], input_dims: Mapping[str, int], projection_dims: Mapping[str, int]
) -> nn.ModuleDict:
    """A linear map per modality to its ``projection_dims`` width; identity where none is given."""
    return nn.ModuleDict(
        {m: nn.Linear(input_dims[m], projection_dims[m]) if projection_dims.get(m) else nn.Identity() for m in modalities}
    )


def masked_softmax(scores: Tensor, valid: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` ignoring invalid entries; all-invalid slices give all-zero weights."""
    valid = valid.expand_as(scores)
    weights = scores.masked_fill(~valid, torch.finfo(scores.dtype).min).softmax(dim)
    return weights * valid.any(dim, keepdim=True)


class PositionalEncoding(nn.Module):
    """Sinusoidal positional encoding (Vaswani et al. 2017): x + PE[position of each utterance]."""

    def __init__(self, dim: int, max_len: int = 512) -> None:
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        inv_freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (..., D), positions (...) long utterance indices within their dialogue."""
        if positions.numel() and int(positions.max()) >= self.table.shape[0]:
            raise ConfigError(
                f"utterance position {int(positions.max())} exceeds the positional table ({self.table.shape[0]}): "
                "raise max_dialogue_length"
            )
        return x + self.table[positions]


class FeedForward(nn.Module):
    """Two fully-connected layers with a ReLU between them (MultiEMO eqs 10-11)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class MultiheadAttention(nn.Module):
    """Multi-head scaled dot-product attention (MultiEMO eqs 2-4) with a key validity mask.

    Queries come from one modality, keys and values from another (or the same), all as packed
    tokens of the same dialogues; each dialogue attends within itself, over its whole length
    ("bidirectional": no causal mask). The projections run on packed tokens; the attention itself
    runs on the padded batch, where padding and invalid keys are masked out.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key_value: Tensor, tokens: TokenIndex, key_valid: Tensor) -> Tensor:
        """query, key_value (N, D) packed tokens; key_valid (B, L) bool -> (N, D).

        One SDPA call over the padded (B, H, L, d) batch; the key mask is (B, 1, 1, L).
        """
        batch, length = tokens.mask.shape
        key_valid = key_valid & tokens.mask
        has_key = key_valid.any(dim=1)
        # a dialogue with no valid key attends everywhere (finite numbers); its output is zeroed below
        attn_mask = (key_valid | ~has_key.unsqueeze(1)).view(batch, 1, 1, length)
        heads = lambda x: tokens.unpack(x).view(batch, length, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key_value)), heads(self.v_proj(key_value))
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # under CPU autocast: the CPU flash kernel's bf16 backward is ~6x slower than its fp32 one
            # (benchmarks/results/train_step_cpu.md), so this product runs in fp32
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask)  # (B, H, L, d)
        out = self.out_proj(tokens.pack(out.transpose(1, 2).reshape(batch, length, -1)))
        return out * has_key[tokens.dialogue].unsqueeze(-1)


class CrossAttentionLayer(nn.Module):
    """Attend to each source sequence in turn, then a feed-forward; each sub-layer with add & norm.

    With two sources this is one MultiAttn layer (MultiEMO eqs 2-12): the query modality attends
    to the first other modality, the result attends to the second, then the FFN. With the query's
    own sequence as the single source it is a (post-norm) transformer encoder layer.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_sources: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(MultiheadAttention(dim, num_heads) for _ in range(num_sources))
        self.attention_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_sources))
        self.feed_forward = FeedForward(dim, ffn_dim)  # dropout acts on each sub-layer's output
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, sources: Sequence[tuple[Tensor, Tensor]], tokens: TokenIndex) -> Tensor:
        """x (N, D) packed tokens; sources: (key_value (N, D), key_valid (B, L)) per attention sub-layer."""
        for attention, norm, (source, source_valid) in zip(self.attentions, self.attention_norms, sources, strict=True):
            x = norm(x + self.dropout(attention(x, source, tokens, source_valid)))
        return self.ffn_norm(x + self.dropout(self.feed_forward(x)))


def run_layers(
    layers: nn.ModuleList,
    x: Tensor,
    sources: Sequence[tuple[Tensor | None, Tensor]],
    tokens: TokenIndex,
    gradient_checkpointing: bool = False,
) -> Tensor:
    """Apply stacked ``CrossAttentionLayer``s. A source whose sequence is None is the layer's own
    input (self-attention). With ``gradient_checkpointing`` (training only) each layer's
    activations are recomputed in the backward pass instead of stored: same result, far less
    memory, about a third more compute for these layers."""
    for layer in layers:
        layer_sources = [(x if source is None else source, valid) for source, valid in sources]
        if gradient_checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer, x, layer_sources, tokens, use_reentrant=False)
        else:
            x = layer(x, layer_sources, tokens)
    return x


class MultiAttn(nn.Module):
    """MultiAttn (MultiEMO §3.4): one branch per modality, T stacked cross-attention layers each.

    Branch m takes its own features as the query and, in every layer, attends to the contextual
    features of the other modalities in canonical order (text, audio, visual minus m) as keys and
    values; each layer's output is the next layer's query. ``gradient_checkpointing``: see
    ``run_layers``.
    """

    def __init__(
        self, modalities: Sequence[str], dim: int, num_heads: int, ffn_dim: int, num_layers: int, dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError("MultiAttn needs at least two modalities")
        self.modalities = tuple(modalities)
        self.gradient_checkpointing = gradient_checkpointing
        self.branches = nn.ModuleDict(
            {
                m: nn.ModuleList(
                    CrossAttentionLayer(dim, num_heads, ffn_dim, len(modalities) - 1, dropout) for _ in range(num_layers)
                )
                for m in self.modalities
            }
        )

    def forward(
        self, features: Mapping[str, Tensor], valid: Mapping[str, Tensor], tokens: TokenIndex
    ) -> dict[str, Tensor]:
        """features: (N, D) packed tokens per modality; valid: (B, L) per modality."""
        return {
            m: run_layers(
                self.branches[m], features[m], [(features[n], valid[n]) for n in self.modalities if n != m], tokens,
                self.gradient_checkpointing,
            )
            for m in self.modalities
        }


class ModalityEncoder(nn.Module):
    """Intra- and inter-modal transformers (xLSTM-MultiEMO §3.3, eqs 4-5).

    For each target modality m: H_{m->m} = Transformer(H_m, H_m, H_m) and, for every other
    modality n, H_{n->m} = Transformer(H_m, H_n, H_n). All of them are concatenated and mapped
    back to the model width by a linear layer, so every cross-modal view reaches the output.
    """

    def __init__(
        self, modalities: Sequence[str], dim: int, num_heads: int, ffn_dim: int, num_layers: int, dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.gradient_checkpointing = gradient_checkpointing
        layers = lambda: nn.ModuleList(  # noqa: E731
            CrossAttentionLayer(dim, num_heads, ffn_dim, 1, dropout) for _ in range(num_layers)
        )
        self.transformers = nn.ModuleDict({f"{n}_to_{m}": layers() for m in self.modalities for n in self.modalities})
        self.combine = nn.ModuleDict({m: nn.Linear(len(self.modalities) * dim, dim) for m in self.modalities})

    def forward(
        self, features: Mapping[str, Tensor], valid: Mapping[str, Tensor], tokens: TokenIndex
    ) -> dict[str, Tensor]:
        """features: (N, D) packed tokens per modality; valid: (B, L) per modality."""
        encoded = {}
        for m in self.modalities:
            views = [
                run_layers(
                    self.transformers[f"{n}_to_{m}"], features[m], [(None if n == m else features[n], valid[n])],
                    tokens, self.gradient_checkpointing,
                )
                for n in self.modalities
            ]
            encoded[m] = self.combine[m](torch.cat(views, dim=-1))
        return encoded


class EmotionClassifier(nn.Module):
    """MultiEMO eqs 13-17: concatenated fused features -> FC (z) -> ReLU MLP -> class logits."""

    def __init__(self, in_dim: int, fc_dim: int, hidden_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, fc_dim)
        self.hidden = nn.Linear(fc_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, fused: Tensor) -> tuple[Tensor, Tensor]:
        """Return (z, logits): z = W_z f + b_z (eq 14), logits before the softmax of eq 16."""
        z = self.fc(fused)
        return z, self.out(self.dropout(F.relu(self.hidden(z))))


# --------------------------------------------------------------------------- graph blocks (pairwise fusion)

ARCCOS_EPS = 1e-6  # cosine similarities are clamped into (-1, 1) so arccos keeps a finite gradient


def classify_fused(
    classifier: EmotionClassifier, fused: dict[str, Tensor], modalities: tuple[str, ...], tokens: TokenIndex,
    valid: dict[str, Tensor],
) -> ModelOutput:
    """Concatenate the fused per-modality tokens, classify them (MultiEMO eqs 13-17) and unpack to (B, L, ...)."""
    z, logits = classifier(torch.cat([fused[m] for m in modalities], dim=-1))
    return ModelOutput(
        logits=tokens.unpack(logits),
        fc_features=tokens.unpack(z),
        fused={m: tokens.unpack(f) for m, f in fused.items()},
        valid=valid,
    )


def angular_similarity(a: Tensor, b: Tensor) -> Tensor:
    """1 - arccos(cos(a_i, b_j)) / π for every pair of rows: (..., N, D), (..., M, D) -> (..., N, M) in [0, 1]."""
    cosine = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)
    return 1.0 - torch.arccos(cosine.clamp(-1.0 + ARCCOS_EPS, 1.0 - ARCCOS_EPS)) / math.pi


def normalized_adjacency(adjacency: Tensor, node_valid: Tensor) -> Tensor:
    """Renormalised adjacency D^-1/2 (A + I) D^-1/2 (Kipf & Welling) of a dense batched graph.

    adjacency (B, N, N) without self-loops; node_valid (B, N): edges touching an invalid node
    (padding, a missing modality) are removed and invalid nodes get no self-loop, so their rows
    and columns are all zero.
    """
    edge_valid = node_valid.unsqueeze(-1) & node_valid.unsqueeze(-2)
    eye = torch.eye(adjacency.shape[-1], dtype=torch.bool, device=adjacency.device)
    adjacency = adjacency.masked_fill(~edge_valid | eye, 0.0) + (edge_valid & eye).to(adjacency.dtype)
    inv_sqrt_degree = adjacency.sum(-1).clamp_min(1e-12).rsqrt() * node_valid
    return inv_sqrt_degree.unsqueeze(-1) * adjacency * inv_sqrt_degree.unsqueeze(-2)


class DenseGCNLayer(nn.Module):
    """One graph convolution H' = Â H W + b on a dense batched normalised adjacency Â (B, N, N)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        return adjacency @ self.linear(x)
