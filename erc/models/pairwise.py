"""Pairwise modality fusion with density loss (Pairwise Modalities Fusion, PMF / MFF / MAL).

§3.1  PMF, for each modality pair (VA, TA, TV): a bidirectional LSTM per modality (eq 1), a
      learnable speaker embedding added to every node (eq 2), one graph per dialogue over the
      2L nodes with intra-modal edges 1 - arccos(cos sim)/π between any two utterances of a
      modality and inter-modal edges γ·(same) between the two modalities of one utterance
      (eqs 3-4), a GCN on the renormalised adjacency (eq 5). The pair's fused feature E(m1m2) of
      an utterance is its two nodes' GCN outputs concatenated (eq 5; ``keep_nodes=True``: each node
      output is [node, GCN(node)] as in DialogueGCN / MMGCN); a head of FC layers (Fig. 2:
      "multiple Fully Connected (FC) layers") is trained on it with CE + λp1·‖E(m1m2)‖₁ (eqs 6-7).
§3.2  MFF: a GRU over each fused stream (eq 8, one GRU shared by the streams as written), a
      second graph over the streams with speaker embeddings and the same edge rules and its GCN
      (eqs 9-10) -> E(VAT); the text features through a GRU and a transformer encoder (eq 11)
      -> E(Bt); E(MF) = [E(VAT), E(Bt)] (eq 12).
§3.3  MAL: C_1 = ATT_1(E(MF)), C_i = ATT_i([C_{i-1}, h(VA)]) with multi-head self-attention over
      the dialogue, E(MM) = [C_l, h(Bt)] (eq 13), FC layers -> logits; CE + λm1·‖E(MM)‖₁ (eqs 14-15).

Training. The paper trains PMF on its own objective first and feeds the fused features it then
produces to MFF (§3.1.3: "by optimising the designed PMF ... then obtaining the fused feature
E(m1m2)"), each stage with its own dropout and learning rate (§4.2). ``training_stages()`` offers
that schedule to the trainer (``erc train --stages pmf,mff``): stage ``pmf`` trains the encoders,
the pair graphs and their heads on eq 7 alone (the logits meanwhile are the heads' mean, so the
dev curve follows PMF); stage ``mff`` freezes them (no gradient, eval mode: no dropout) and trains
MFF / MAL on eq 15. Without stages both run in one loop with the same separation: MFF / MAL read
E(pair) through a stop-gradient, so PMF learns only from eq 7 and MAL only from eq 15
(``joint_pmf=True`` lets MAL's loss reach PMF too). The logits come from MAL. The density terms
(eqs 6 and 14) are the L1 norm of each utterance's fused feature, averaged over the utterances
like the cross-entropy; the L2 terms are the optimizer's weight decay.

Ours, where the paper says less: the GCN layers (eqs 5 and 10) give each node a weight of its own
beside the renormalised propagation, H' = H Θ₀ + Â H Θ₁ (see ``GraphConvolution``): with the
single shared weight of Kipf & Welling's layer, a GCN over a densely connected dialogue averages an
utterance's own features away (measured: chance level on the two-modality learnability task, with
or without an initial residual as in MMGCN's GCNII). Widths and the number of layers are not given.
All graphs are dense batched adjacency matrices; padding and missing modalities are nodes without
edges whose outputs are zeroed. With two modalities there is one pair; h(VA) stands for the first
pair without text (else the first pair); without text there is no E(Bt)/h(Bt) branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erc.errors import ConfigError
from erc.models.blocks import (
    MODALITIES,
    ModelOutput,
    TrainingStage,
    angular_similarity,
    check_modalities,
    check_speakers,
    normalized_adjacency,
)
from erc.models.context import RecurrentEncoder, encode_groups
from erc.models.losses import density_loss

SHORT_NAMES = {"text": "T", "audio": "A", "visual": "V"}
PMF_MODULES = ("encoders", "pair_graphs", "pair_heads")  # what stage "pmf" trains and stage "mff" freezes


@dataclass
class PairwiseOutput(ModelOutput):
    """``ModelOutput`` plus each pair's PMF head logits (B, L, C); ``fused`` holds E(pair) and
    ``fc_features`` E(MM)."""

    pair_logits: dict[str, Tensor] = field(default_factory=dict)


def stream_graph(nodes: Tensor, valid: Tensor, inter_weight: float) -> Tensor:
    """Renormalised adjacency of S streams over a dialogue (eqs 3-5).

    nodes (B, S, L, D), valid (B, S, L) -> (B, S·L, S·L) over the nodes flattened stream-major.
    Intra-stream edges join every two utterances of a stream, inter-stream edges the streams of
    one utterance; both weighted by angular similarity, the inter-stream ones times γ.
    """
    b, s, length, d = nodes.shape
    flat = nodes.reshape(b, s * length, d)
    stream = torch.arange(s, device=nodes.device).repeat_interleave(length)
    position = torch.arange(length, device=nodes.device).repeat(s)
    intra = stream.unsqueeze(0) == stream.unsqueeze(1)
    inter = ~intra & (position.unsqueeze(0) == position.unsqueeze(1))
    weights = angular_similarity(flat, flat) * (intra + inter_weight * inter)
    return normalized_adjacency(weights, valid.reshape(b, s * length))


class GraphConvolution(nn.Module):
    """H' = H Θ₀ + Â H Θ₁ + b on the renormalised adjacency Â (eq 5): a graph convolution whose node
    keeps a weight of its own (the first-order spectral filter θ₀x + θ₁L̂x of Kipf & Welling with
    its two parameters untied; R-GCN's self-connection)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.own = nn.Linear(in_dim, out_dim)
        self.neighbours = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        return self.own(x) + adjacency @ self.neighbours(x)


class GraphFusion(nn.Module):
    """Speaker embeddings + a graph over S streams + stacked graph convolutions (eqs 2-5 / 9-10).

    Returns (B, L, S·output_dim): each utterance's S node outputs concatenated, zeros where invalid.
    A node's output is its GCN output (eqs 5 / 10); with ``keep_nodes`` it is [its input node, its
    GCN output], as DialogueGCN and MMGCN do.
    """

    def __init__(
        self, dim: int, out_dim: int, num_layers: int, num_speakers: int, inter_weight: float, dropout: float,
        keep_nodes: bool = False,
    ) -> None:
        super().__init__()
        self.keep_nodes = keep_nodes
        self.output_dim = out_dim + (dim if keep_nodes else 0)
        self.speaker = nn.Embedding(num_speakers, dim)  # w s_i with s_i one-hot
        # small, like transformer embeddings: N(0, 1) rows would drown the (-1, 1) recurrent features
        nn.init.normal_(self.speaker.weight, std=0.02)
        dims = [dim] + [out_dim] * num_layers
        self.layers = nn.ModuleList(GraphConvolution(i, o) for i, o in zip(dims, dims[1:]))
        self.inter_weight = inter_weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, streams: list[Tensor], valid: list[Tensor], speaker: Tensor) -> Tensor:
        """streams: S tensors (B, L, dim); valid: S masks (B, L); speaker (B, L)."""
        b, length = speaker.shape
        node_valid = torch.stack(valid, dim=1)
        nodes = (torch.stack(streams, dim=1) + self.speaker(speaker).unsqueeze(1)) * node_valid.unsqueeze(-1)
        adjacency = stream_graph(nodes, node_valid, self.inter_weight)
        flat = nodes.reshape(b, -1, nodes.shape[-1])
        x = flat
        for i, layer in enumerate(self.layers):
            x = layer(self.dropout(x), adjacency)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        x = x * node_valid.reshape(b, -1, 1)
        if self.keep_nodes:
            x = torch.cat([flat, x], dim=-1)
        s = len(streams)
        return x.reshape(b, s, length, -1).permute(0, 2, 1, 3).reshape(b, length, -1)


class SelfAttentionLayer(nn.Module):
    """ATT_i of eq 13: a linear map of its input to the model width, multi-head self-attention over
    the dialogue, add & norm."""

    def __init__(self, in_dim: int, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.inp(x)
        attended, _ = self.attention(x, x, x, key_padding_mask=~mask, need_weights=False)
        return self.norm(x + attended)


@dataclass
class PairwiseConfig:
    """Pairwise fusion hyperparameters. Widths are not given by the paper; γ, dropout, λ, the
    learning rates and the transformer size are §4.2's (defaults: IEMOCAP; see the presets).
    ``dropout`` is MFF / MAL's, ``pmf_dropout`` PMF's. ``pmf_lr`` / ``pmf_weight_decay`` (2·λp2)
    / ``pmf_epochs`` (a fraction of the run's epochs) apply to the PMF stage of the staged
    schedule; the MFF stage uses the run's learning rate and weight decay and the remaining epochs.
    ``use_pair_loss`` / ``use_density`` switch the PMF objective and both density terms off for
    ablations."""

    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 768, "audio": 6373, "visual": 1000})
    num_classes: int = 6
    num_speakers: int = 2
    modalities: tuple[str, ...] = MODALITIES
    lstm_hidden_dim: int = 64  # per direction: the PMF nodes are 2x this wide
    gcn_dim: int = 128
    gcn_layers: int = 2
    gru_hidden_dim: int = 128
    model_dim: int = 128
    transformer_heads: int = 1
    transformer_layers: int = 1
    attention_heads: int = 4
    attention_layers: int = 2
    classifier_hidden_dim: int = 128
    inter_weight: float = 0.7  # γ
    keep_nodes: bool = False  # True: each GCN's output is [node, GCN(node)] (see GraphFusion); eq 5: False
    dropout: float = 0.25
    pmf_dropout: float = 0.15
    pmf_lr: float = 2e-4
    pmf_weight_decay: float = 4e-5
    pmf_epochs: float = 0.5
    pair_density_weight: float = 2e-5  # λp1
    density_weight: float = 2e-5  # λm1
    use_pair_loss: bool = True
    use_density: bool = True
    joint_pmf: bool = False  # let MAL's loss train PMF too (the paper trains PMF on eq 7 alone; implied
    # when use_pair_loss is off, since PMF then has no objective of its own)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        check_modalities(self.modalities, self.input_dims)
        if len(self.modalities) < 2:
            raise ConfigError(f"pairwise fusion needs at least two modalities, got {self.modalities}")
        if not 0.0 < self.pmf_epochs < 1.0:
            raise ConfigError(f"pmf_epochs is the PMF stage's fraction of the epochs, in (0, 1); got {self.pmf_epochs}")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        ordered = [m for m in MODALITIES if m in self.modalities]
        return list(combinations(ordered, 2))


def pair_name(pair: tuple[str, str]) -> str:
    return "".join(SHORT_NAMES[m] for m in pair)


class PairwiseFusion(nn.Module):
    """``forward(batch) -> PairwiseOutput``; ``loss`` = MAL CE + λm1‖E(MM)‖₁ + Σ_pairs (CE + λp1‖E(pair)‖₁),
    or one stage's part of it (``begin_stage``)."""

    def __init__(self, config: PairwiseConfig) -> None:
        super().__init__()
        self.config = config
        self.stage: str | None = None
        c = config
        self.pairs = c.pairs
        self.skip_pair = next((p for p in self.pairs if "text" not in p), self.pairs[0])
        self.encoders = nn.ModuleDict(
            {f"{pair_name(p)}_{m}": RecurrentEncoder(c.input_dims[m], c.lstm_hidden_dim) for p in self.pairs for m in p}
        )
        graph = lambda dim, dropout: GraphFusion(  # noqa: E731
            dim, c.gcn_dim, c.gcn_layers, c.num_speakers, c.inter_weight, dropout, c.keep_nodes
        )
        self.pair_graphs = nn.ModuleDict({pair_name(p): graph(2 * c.lstm_hidden_dim, c.pmf_dropout) for p in self.pairs})
        pair_width = 2 * self.pair_graphs[pair_name(self.pairs[0])].output_dim
        self.pair_heads = nn.ModuleDict({pair_name(p): self.fc_head(pair_width, c.pmf_dropout) for p in self.pairs})
        self.stream_gru = RecurrentEncoder(pair_width, c.gru_hidden_dim, bidirectional=False, cell="gru")
        self.stream_graph = graph(c.gru_hidden_dim, c.dropout)
        fused_width = len(self.pairs) * self.stream_graph.output_dim
        self.has_text = "text" in c.modalities
        if self.has_text:
            self.text_gru = RecurrentEncoder(c.input_dims["text"], c.gru_hidden_dim, bidirectional=False, cell="gru")
            layer = nn.TransformerEncoderLayer(
                c.gru_hidden_dim, c.transformer_heads, 4 * c.gru_hidden_dim, c.dropout, batch_first=True
            )
            self.text_transformer = nn.TransformerEncoder(layer, c.transformer_layers, enable_nested_tensor=False)
            fused_width += c.gru_hidden_dim
        in_dims = [fused_width] + [c.model_dim + c.gru_hidden_dim] * (c.attention_layers - 1)
        self.attention = nn.ModuleList(SelfAttentionLayer(d, c.model_dim, c.attention_heads, c.dropout) for d in in_dims)
        final_width = c.model_dim + (c.gru_hidden_dim if self.has_text else 0)
        self.classifier = self.fc_head(final_width, c.dropout)

    def fc_head(self, in_dim: int, dropout: float) -> nn.Sequential:
        """FC layers → class logits: the PMF heads (Fig. 2) and the MAL classifier (eq 14)."""
        c = self.config
        return nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_dim, c.classifier_hidden_dim), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(c.classifier_hidden_dim, c.num_classes),
        )

    def training_stages(self) -> list[TrainingStage]:
        """§3.1.3 / §4.2: PMF on eq 7 with its own lr, L2 and dropout, then MFF / MAL on eq 15."""
        c = self.config
        rest = tuple(name for name, _ in self.named_children() if name not in PMF_MODULES)
        return [
            TrainingStage("pmf", PMF_MODULES, lr=c.pmf_lr, weight_decay=c.pmf_weight_decay, epochs=c.pmf_epochs,
                          dropout=c.pmf_dropout),
            TrainingStage("mff", rest, dropout=c.dropout),
        ]

    def begin_stage(self, name: str | None) -> None:
        """Select a stage's forward and objective ("pmf", "mff"), or the whole model (None)."""
        if name not in (None, "pmf", "mff"):
            raise ConfigError(f"pairwise fusion has the training stages pmf and mff, not {name!r}")
        if name == "pmf" and not self.config.use_pair_loss:
            raise ConfigError("stage pmf trains PMF on eq 7, which use_pair_loss=False switches off")
        self.stage = name
        self.train(self.training)

    def train(self, mode: bool = True) -> PairwiseFusion:
        """In stage "mff" PMF is fixed (§3.1.3): its modules stay in eval mode (no dropout)."""
        super().train(mode)
        if self.stage == "mff":
            for name in PMF_MODULES:
                self.get_submodule(name).eval()
        return self

    def forward(self, batch: Mapping[str, Tensor]) -> ModelOutput:
        c = self.config
        mask, speaker = batch["mask"], batch["speaker"]
        check_speakers(speaker, mask, c.num_speakers)
        valid = {m: mask & batch.get(f"{m}_mask", mask) for m in c.modalities}
        inputs = {m: batch[m].masked_fill(~valid[m].unsqueeze(-1), 0.0) for m in c.modalities}
        pair_fused, pair_valid, pair_logits = {}, {}, {}
        with torch.no_grad() if self.stage == "mff" else nullcontext():  # PMF, frozen in stage "mff"
            for p in self.pairs:
                name = pair_name(p)
                encoded = [encode_groups(self.encoders[f"{name}_{m}"], inputs[m], valid[m]) for m in p]
                pair_fused[name] = self.pair_graphs[name](encoded, [valid[m] for m in p], speaker)
                pair_valid[name] = valid[p[0]] | valid[p[1]]
                pair_logits[name] = self.pair_heads[name](pair_fused[name])
        valid_all = {**valid, **{f"pair_{n}": v for n, v in pair_valid.items()}}
        if self.stage == "pmf":  # stage "pmf" trains PMF alone; its prediction is the heads' mean
            logits = torch.stack(list(pair_logits.values())).mean(dim=0)
            return PairwiseOutput(logits=logits, fused=pair_fused, valid=valid_all, pair_logits=pair_logits)
        names = list(pair_fused)  # MFF, on PMF's features as they stand (stop-gradient unless joint_pmf)
        separate = c.use_pair_loss and not c.joint_pmf  # without its own loss PMF must learn from MAL's
        streams = {n: f.detach() for n, f in pair_fused.items()} if separate else pair_fused
        hidden = {n: encode_groups(self.stream_gru, streams[n], pair_valid[n]) for n in names}
        parts = [self.stream_graph([hidden[n] for n in names], [pair_valid[n] for n in names], speaker)]
        if self.has_text:
            text_hidden = encode_groups(self.text_gru, inputs["text"], valid["text"])
            parts.append(self.text_transformer(text_hidden, src_key_padding_mask=~mask) * mask.unsqueeze(-1))
        x = torch.cat(parts, dim=-1)
        skip = hidden[pair_name(self.skip_pair)]
        for i, layer in enumerate(self.attention):  # MAL, eq 13
            x = layer(x if i == 0 else torch.cat([x, skip], dim=-1), mask)
        final = torch.cat([x, text_hidden], dim=-1) if self.has_text else x
        return PairwiseOutput(
            logits=self.classifier(final),
            fc_features=final,
            fused=pair_fused,
            valid=valid_all,
            pair_logits=pair_logits,
        )

    def loss(self, output: ModelOutput, batch: Mapping[str, Tensor], class_counts: Tensor | None = None) -> dict[str, Tensor]:
        """Eqs 7 and 15 without the L2 terms (weight decay), over the labeled real utterances: both
        (no stage), eq 7 summed over the pairs (stage "pmf") or eq 15 (stage "mff")."""
        c = self.config
        labeled = batch["mask"] & (batch["label"] >= 0)
        if not labeled.any():
            zero = output.logits.sum() * 0.0
            return {"ce": zero, "total": zero}
        terms: dict[str, Tensor] = {}
        if self.stage != "pmf":  # eq 15
            terms["ce"] = F.cross_entropy(output.logits[labeled], batch["label"][labeled])
            if c.use_density:
                terms["density"] = density_loss(output.fc_features[batch["mask"]])  # eq 14
        if self.stage != "mff" and c.use_pair_loss:  # eq 7, per pair
            for name, logits in output.pair_logits.items():
                real = batch["mask"] & output.valid[f"pair_{name}"]
                pair_labeled = labeled & real
                terms[f"ce_{name}"] = (
                    F.cross_entropy(logits[pair_labeled], batch["label"][pair_labeled])
                    if pair_labeled.any() else logits.sum() * 0.0
                )
                if c.use_density:
                    terms[f"density_{name}"] = density_loss(output.fused[name][real])  # eq 6
        weights = {"density": c.density_weight} | {f"density_{n}": c.pair_density_weight for n in output.pair_logits}
        terms["total"] = sum(weights.get(name, 1.0) * value for name, value in terms.items())
        return terms
