"""`erc predict`: the emotions of a new conversation, from a trained run.

The conversation (a manifest CSV; ``label`` and ``split`` columns optional) goes through the very
extractors that produced the run's training shards: their configuration and weight checksums are
read from the run's copy of ``index.json``, and prediction refuses to start when a weight file is
missing or differs from the recorded one (random face weights are rebuilt from the recorded seed).
Only the modalities the model uses are extracted. Each utterance gets the predicted emotion and the
probability of every class.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erc.errors import ConfigError, IncompleteShardSetError
from erc.pipeline.corpus import Dialogue, read_manifest
from erc.pipeline.data import collate_dialogues
from erc.pipeline.evaluate import (
    CHECKPOINT, check_predictions_file, load_checkpoint, load_model, resolve_device, write_predictions,
)
from erc.pipeline.extract import ExtractConfig, ShardPayload, collect_weights, extract_dialogues
from erc.pipeline.shards import UtteranceRecord

WEIGHT_KEYS = {"text": ("text",), "audio": (), "visual": ("face", "mtcnn")}


def recorded_extract_config(index: dict[str, Any], modalities: list[str], manifest: Path) -> ExtractConfig:
    """An ExtractConfig for ``manifest`` with the feature settings recorded in a shard index."""
    config = index.get("config") or {}
    try:
        settings: dict[str, Any] = {}
        if "text" in modalities:
            text = config["text"]
            settings.update(text_model=text["model"], text_max_length=text["max_length"], text_context=text["context"],
                            text_pooling=text.get("pooling", "first"), text_precision=text.get("precision", "fp32"))
        if "visual" in modalities:
            visual = config["visual"]
            face = (index.get("weights") or {}).get("face") or {}
            settings.update(face_weights=Path(face["file"]) if face.get("file") else None, random_face_weights=not face.get("file"),
                            faces=visual["faces"], num_frames=visual["num_frames"], precision=visual["precision"],
                            seed=visual["seed"], detect_max_side=visual.get("detect_max_side", 640))
        return ExtractConfig(dataset="manifest", root=manifest.parent, out=manifest.parent, manifest=manifest,
                             label_set=config["label_set"], modalities=tuple(modalities), **settings)
    except KeyError as missing:
        raise ConfigError(f"the run's index.json records no extractor setting {missing}") from None


def check_weights(recorded: dict[str, Any], current: dict[str, Any], modalities: list[str]) -> None:
    """Refuse when a weight file the features depend on is not the recorded one (an unavailable hub
    model already fails in :func:`collect_weights`)."""
    for modality in modalities:
        for key in WEIGHT_KEYS[modality]:
            wanted, found = recorded.get(key), current.get(key)
            if isinstance(wanted, dict) and isinstance(found, dict):  # fields recorded since (e.g. revision) aside
                found = {name: found.get(name) for name in wanted}
            if wanted != found:
                raise ConfigError(f"{key} weights differ from those the run was trained on: "
                                  f"recorded {recorded.get(key)}, found {current.get(key)}")


def extract_conversation(
    run_dir: Path, manifest: Path, device: str = "cpu", *, allow_partial: bool = False
) -> tuple[list[Dialogue], ShardPayload, dict, ExtractConfig]:
    """(dialogues, features, checkpoint, extractor config) of a manifest, extracted as the run's shards were.

    A run trained on an incomplete shard set (``erc train --allow-partial``) is refused unless
    ``allow_partial``.
    """
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    index_path = run_dir / "index.json"
    if not index_path.is_file():
        raise ConfigError(f"{run_dir}: no index.json (not a run directory written by `erc train`)")
    index = json.loads(index_path.read_text())
    if index.get("complete") is False and not allow_partial:
        raise IncompleteShardSetError(
            f"{run_dir}: the run was trained on an incomplete shard set (missing "
            f"{', '.join(index.get('missing_shards') or []) or 'shards'}); pass --allow-partial to predict with it anyway"
        )
    modalities = list(checkpoint["modalities"])
    config = recorded_extract_config(index, modalities, Path(manifest))
    local = Path(config.text_model).expanduser()
    if "text" in modalities and (local.is_absolute() or config.text_model.startswith(".")) and not local.is_dir():
        raise ConfigError(f"text encoder directory {config.text_model!r} that the run was extracted with: not found")
    weights = collect_weights(config)
    check_weights(index.get("weights") or {}, weights, modalities)
    corpus = read_manifest(Path(manifest), allow_unlabeled=True)
    unlabeled = [dataclasses.replace(d, utterances=[dataclasses.replace(u, label=None) for u in d.utterances])
                 for d in corpus.dialogues]  # the run's label names, not the manifest's, index the classes
    settings = config.worker_settings(device, torch.get_num_threads(), weights)
    payload = extract_dialogues(unlabeled, checkpoint["label_names"], settings)
    for modality in modalities:
        if payload.dims[modality] != checkpoint["input_dims"][modality]:
            raise ConfigError(f"{modality} features have {payload.dims[modality]} dimensions here but "
                              f"{checkpoint['input_dims'][modality]} in the run")
    return corpus.dialogues, payload, checkpoint, config


@torch.no_grad()
def predict_conversation(
    run_dir: Path, manifest: Path, out: Path | None = None, device: str = "auto", *, allow_partial: bool = False
) -> list[dict]:
    """Predicted emotion and class probabilities of every utterance of ``manifest``, in dialogue order.

    Writes them to ``out`` (``.csv`` or ``.json``) when given. A media file that cannot be read
    leaves that modality missing for the utterance (as in extraction) and is listed under ``failures``
    of the row.
    """
    if out is not None:
        check_predictions_file(Path(out), "--out")
    torch_device = resolve_device(device)
    dialogues, payload, checkpoint, config = extract_conversation(run_dir, manifest, torch_device.type,
                                                                  allow_partial=allow_partial)
    model = load_model(checkpoint, torch_device).eval()
    modalities, label_names = checkpoint["modalities"], checkpoint["label_names"]
    failures: dict[str, list[str]] = {}
    for failure in payload.failures:
        failures.setdefault(failure["item"], []).append(f"{failure['modality']}: {failure['error']}")
    rows, records = [], iter(payload.records)
    for dialogue in dialogues:
        dialogue_records = [next(records) for _ in dialogue.utterances]
        item = model_inputs(dialogue_records, checkpoint, config.num_frames)
        batch = {k: v.to(torch_device) for k, v in collate_dialogues([item], modalities, frames=checkpoint["frames"]).items()}
        probabilities = model(batch).logits[0].softmax(-1).cpu()
        for utterance, p in zip(dialogue.utterances, probabilities):
            row = {
                "utterance_id": utterance.utterance_id, "dialogue_id": utterance.dialogue_id,
                "utterance_index": utterance.index,
                "speaker": utterance.speaker, "text": utterance.text,
                "predicted": label_names[int(p.argmax())],
                **{f"p_{name}": round(float(value), 6) for name, value in zip(label_names, p)},
            }
            if utterance.label is not None:
                row["label"] = utterance.label
            if utterance.utterance_id in failures:
                row["failures"] = "; ".join(failures[utterance.utterance_id])
            rows.append(row)
    if out is not None:
        write_predictions(Path(out), rows)
    return rows


def model_inputs(records: list[UtteranceRecord], checkpoint: dict, num_frames: int) -> dict[str, np.ndarray]:
    """One dialogue's extracted records as a :class:`~erc.pipeline.data.DialogueDataset` item
    (a missing or failed modality is a zero row with its mask False, as in a shard)."""
    item: dict[str, np.ndarray] = {
        "speaker": np.array([r.speaker_index for r in records]), "label": np.full(len(records), -1),
    }
    for m in checkpoint["modalities"]:
        dim = checkpoint["input_dims"][m]
        item[m] = np.stack([r.features.get(m) if r.features.get(m) is not None else np.zeros(dim, np.float32)
                            for r in records])
        item[f"{m}_mask"] = np.array([r.features.get(m) is not None for r in records])
    if checkpoint["frames"]:
        dim, present = checkpoint["input_dims"]["visual"], [r.visual_frames is not None for r in records]
        item["visual_frames"] = np.stack([r.visual_frames if ok else np.zeros((num_frames, dim), np.float32)
                                          for r, ok in zip(records, present)])
        item["visual_frame_mask"] = np.stack([r.visual_frame_mask if ok else np.zeros(num_frames, bool)
                                              for r, ok in zip(records, present)])
    return item
