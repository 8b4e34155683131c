"""Model registry: a name -> model class, config class and YAML presets.

A preset file (erc/models/presets/<file>.yaml) maps preset names (e.g. "iemocap", "meld") to a
``model`` section (config field overrides) and a ``train`` section (``TrainHyperparameters``).
Registering a model is one ``MODELS`` entry::

    MODELS["lmam"] = ModelSpec(LMAM, LMAMConfig, "lmam.yaml")

The model class takes its config as the only argument; the config dataclass must have
``input_dims`` and ``num_classes`` fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from torch import nn

from erc.errors import ConfigError
from erc.models.baselines import ConcatConfig, ConcatFusion, TextOnlyConfig, TextOnlyGRU
from erc.models.lmam import LMAM, LMAMConfig
from erc.models.mcn_cl import MCNCL, MCNCLConfig
from erc.models.multiemo import MultiEMO, MultiEMOConfig
from erc.models.pairwise import PairwiseConfig, PairwiseFusion
from erc.models.xlstm_multiemo import XLSTMMultiEMO, XLSTMMultiEMOConfig


@dataclass(frozen=True)
class TrainHyperparameters:
    """What the trainer needs from a preset. The learning rate is multiplied by
    ``lr_decay_factor`` every ``lr_decay_every`` epochs (0 = constant); ``weight_decay`` is the
    L2 weight λ, applied by the optimizer. ``ema_decay`` > 0 evaluates and keeps an exponential
    moving average of the weights, updated after every optimizer step (0 = the weights as trained;
    no paper uses it)."""

    epochs: int = 100
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_decay_factor: float = 1.0
    lr_decay_every: int = 0
    ema_decay: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    model: type[nn.Module]
    config: type
    presets: str | None = None  # YAML file name under erc/models/presets


MODELS: dict[str, ModelSpec] = {
    "multiemo": ModelSpec(MultiEMO, MultiEMOConfig, "multiemo.yaml"),
    "xlstm-multiemo": ModelSpec(XLSTMMultiEMO, XLSTMMultiEMOConfig, "xlstm-multiemo.yaml"),
    "lmam": ModelSpec(LMAM, LMAMConfig, "lmam.yaml"),
    "pairwise": ModelSpec(PairwiseFusion, PairwiseConfig, "pairwise.yaml"),
    "mcn-cl": ModelSpec(MCNCL, MCNCLConfig, "mcn-cl.yaml"),
    "text-only": ModelSpec(TextOnlyGRU, TextOnlyConfig, "text-only.yaml"),
    "concat": ModelSpec(ConcatFusion, ConcatConfig, "concat.yaml"),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return MODELS[name]


def _presets(name: str) -> dict[str, dict[str, Any]]:
    spec = _spec(name)
    if spec.presets is None:
        return {}
    text = resources.files("erc.models").joinpath("presets", spec.presets).read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def preset_names(name: str) -> list[str]:
    return sorted(_presets(name))


def _preset(name: str, preset: str | None) -> dict[str, Any]:
    if preset is None:
        return {}
    presets = _presets(name)
    if preset not in presets:
        raise ConfigError(f"model {name!r} has no preset {preset!r}; known: {', '.join(sorted(presets)) or 'none'}")
    return presets[preset]


def _typed(cls: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """Check field names, turn YAML lists into tuples where the field is a tuple, and read numbers
    written as strings (YAML 1.1 loads ``1e-3``, without a dot, as the string "1e-3")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)}")
    typed = {}
    for key, value in values.items():
        kind = str(fields[key].type)
        if isinstance(value, list) and "tuple" in kind:
            value = tuple(value)
        elif kind in ("float", "int", "float | None", "int | None") and isinstance(value, str):
            try:
                value = float(value) if kind.startswith("float") else int(value)
            except ValueError:
                raise ConfigError(f"{what}: {key} must be a number, got {value!r}") from None
        typed[key] = value
    return typed


def build_config(
    name: str,
    *,
    input_dims: dict[str, int],
    num_classes: int,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
):
    """The model's config: class defaults < preset ``model`` section < ``overrides``; the data's
    ``input_dims`` and ``num_classes`` must agree with whatever the preset or overrides say."""
    spec = _spec(name)
    values = {**_preset(name, preset).get("model", {}), **(overrides or {})}
    if values.get("num_classes", num_classes) != num_classes:
        raise ConfigError(f"{name}: the configuration is for {values['num_classes']} classes, the data has {num_classes}")
    stated_dims = values.get("input_dims", {})
    conflicts = {m: (stated_dims[m], d) for m, d in input_dims.items() if stated_dims.get(m, d) != d}
    if conflicts:
        raise ConfigError(f"{name}: input dimensions differ between configuration and data (config, data): {conflicts}")
    values.update(num_classes=num_classes, input_dims=dict(input_dims))
    return spec.config(**_typed(spec.config, values, f"{name} config"))


def build_model(
    name: str,
    *,
    input_dims: dict[str, int],
    num_classes: int,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """Instantiate a registered model; ``dataclasses.asdict(model.config)`` rebuilds it as overrides."""
    config = build_config(name, input_dims=input_dims, num_classes=num_classes, preset=preset, overrides=overrides)
    return _spec(name).model(config)


def train_hyperparameters(name: str, preset: str | None = None, overrides: dict[str, Any] | None = None) -> TrainHyperparameters:
    """The preset's ``train`` section (defaults where it says nothing), with ``overrides`` on top."""
    values = {**_preset(name, preset).get("train", {}), **(overrides or {})}
    return TrainHyperparameters(**_typed(TrainHyperparameters, values, f"{name} training hyperparameters"))
