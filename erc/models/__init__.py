"""Fusion models for ERC: shared blocks, context encoders, losses and a registry of named models."""

from erc.models.blocks import MODALITIES, ModelOutput
from erc.models.registry import (
    MODELS,
    ModelSpec,
    TrainHyperparameters,
    build_config,
    build_model,
    model_names,
    preset_names,
    train_hyperparameters,
)

__all__ = [
    "MODALITIES",
    "MODELS",
    "ModelOutput",
    "ModelSpec",
    "TrainHyperparameters",
    "build_config",
    "build_model",
    "model_names",
    "preset_names",
    "train_hyperparameters",
]
