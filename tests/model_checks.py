"""Checks every fusion model's tests share: random dialogue batches, padding invariance, gradient flow."""

from collections.abc import Callable

import torch
from torch import nn

DIMS = {"text": 16, "audio": 24, "visual": 12}


def random_batch(lengths: list[int], dims: dict[str, int] = DIMS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Dialogues of the given lengths, every modality present, two alternating speakers, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    mask = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    batch = {m: torch.randn(b, n, d, generator=g) for m, d in dims.items()}
    batch |= {f"{m}_mask": mask.clone() for m in dims}
    return batch | {"mask": mask, "speaker": torch.arange(n).remainder(2).expand(b, n).clone(),
                    "label": torch.randint(0, 3, (b, n), generator=g).masked_fill(~mask, -1)}


def assert_padding_and_missing_inputs_do_not_matter(
    net: nn.Module,
    make_batch: Callable[..., dict[str, torch.Tensor]] = random_batch,
    missing: tuple[str, int] = ("audio", 2),
    garbage: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> None:
    """A 4-utterance dialogue with one modality ``missing`` (name, utterance) gets the same logits
    alone as in the first row of a batch padded to 6, where the missing input holds 100s and
    ``garbage(batch)`` may spoil more inputs the model must ignore."""
    modality, utterance = missing
    alone = make_batch([4])
    alone[f"{modality}_mask"][0, utterance] = False
    padded = make_batch([4, 6], seed=1)
    for key, value in alone.items():
        padded[key][:1, :4] = value
    padded["mask"][0, 4:] = False
    padded[modality][0, utterance] = 100.0
    if garbage is not None:
        garbage(padded)
    with torch.no_grad():
        torch.testing.assert_close(net(padded).logits[:1, :4], net(alone).logits, atol=1e-5, rtol=1e-4)


def parameters_without_gradient(net: nn.Module) -> list[str]:
    """Names of the parameters that the last backward pass left without a non-zero gradient."""
    return [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
