"""The extraction stage: a corpus on disk -> HDF5 feature shards, in parallel on a Dask cluster.

The client reads the corpus, plans shards of whole dialogues (``plan.json``), submits one task per
shard that is not on disk yet, and writes each shard atomically as its task returns. Workers keep
their models loaded between tasks (one load per worker process). A failed item (missing or corrupt
media, no audio track, no face) becomes a missing-modality mask plus a line in the shard's failure
list and in ``report.json``; the run stops with a clear message once more than ``max_failures``
utterances have failed.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from erc.errors import ConfigError, ErcError, MediaError, ShardError
from erc.pipeline.corpus import Corpus, Dialogue, limit_dialogues, load_corpus
from erc.pipeline.shards import (
    MODALITIES,
    UtteranceRecord,
    build_index,
    config_hash,
    summarize_shard,
    write_json_atomic,
    write_shard,
)

DEFAULT_TEXT_MODEL = "roberta-base"


@dataclass
class ExtractConfig:
    """Options of ``erc extract``. The fields in :meth:`feature_config` decide the features; the
    others only decide how the work runs."""

    dataset: str
    root: Path
    out: Path
    manifest: Path | None = None
    label_set: str = "6class"
    modalities: tuple[str, ...] = MODALITIES
    text_model: str = DEFAULT_TEXT_MODEL
    text_max_length: int = 512
    text_context: bool = True
    text_pooling: str | None = None
    face_weights: Path | None = None
    random_face_weights: bool = False
    faces: str = "all"
    num_frames: int = 20
    precision: str = "fp32"
    seed: int = 0
    device: str = "cpu"
    workers: int = 1
    threads_per_worker: int | None = None
    scheduler: str | None = None
    limit: int | None = None
    overwrite: bool = False
    max_failures: int | None = None
    dialogues_per_shard: int = 8

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root), Path(self.out)
        self.modalities = tuple(self.modalities)
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ConfigError(f"--modalities must be a subset of {','.join(MODALITIES)}, got {','.join(self.modalities)}")
        if "text" in self.modalities:
            from erc.features.text import resolve_pooling

            self.text_pooling = resolve_pooling(self.text_pooling, self.text_model)
        if self.faces not in ("all", "largest"):
            raise ConfigError(f"--faces must be 'all' or 'largest', got {self.faces!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"--precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if "visual" in self.modalities:
            if self.face_weights is None and not self.random_face_weights:
                raise ConfigError(
                    "visual features need face weights: pass --face-weights FILE (a ResNet-101 state dict), "
                    "or --random-face-weights to run with untrained weights (for testing only)"
                )
            if self.face_weights is not None:
                self.face_weights = Path(self.face_weights)
                if not self.face_weights.is_file():
                    raise ConfigError(f"--face-weights {self.face_weights}: no such file")

    def worker_settings(self, device: str, threads: int) -> WorkerSettings:
        """What a worker process needs to build the extractors of this configuration."""
        return WorkerSettings(
            modalities=self.modalities, text_model=self.text_model, text_max_length=self.text_max_length,
            text_context=self.text_context, text_pooling=self.text_pooling,
            face_weights=str(self.face_weights) if self.face_weights else None,
            random_face_weights=self.random_face_weights, faces=self.faces, num_frames=self.num_frames,
            precision=self.precision, seed=self.seed, device=device, threads=threads,
        )

    def feature_config(self, weights: dict[str, Any]) -> dict[str, Any]:
        """What the features depend on (hashed to decide whether a shard on disk can be reused)."""
        return {
            "dataset": self.dataset,
            "label_set": self.label_set,
            "modalities": list(self.modalities),
            "text": {"model": self.text_model, "max_length": self.text_max_length, "context": self.text_context,
                     "pooling": self.text_pooling},
            "audio": {"feature_set": "ComParE_2016", "level": "functionals", "sample_rate": 16000},
            "visual": {"faces": self.faces, "num_frames": self.num_frames, "precision": self.precision, "seed": self.seed},
            "limit": self.limit,
            "dialogues_per_shard": self.dialogues_per_shard,
            "weights": weights,
        }


@dataclass
class ExtractResult:
    out: Path
    shards_written: int
    shards_skipped: int
    utterances: int
    failures: list[dict[str, str]]
    seconds: float
    model_loads: dict[str, int] = field(default_factory=dict)

    @property
    def utterances_per_second(self) -> float:
        return self.utterances / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------------------------
# Worker side: models loaded once per process, one task = one shard's dialogues


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to build its extractors (picklable, hashable)."""

    modalities: tuple[str, ...]
    text_model: str
    text_max_length: int
    text_context: bool
    text_pooling: str | None
    face_weights: str | None
    random_face_weights: bool
    faces: str
    num_frames: int
    precision: str
    seed: int
    device: str
    threads: int


_EXTRACTORS: dict[WorkerSettings, dict[str, Any]] = {}
_EXTRACTORS_LOCK = threading.Lock()


def _extractors(settings: WorkerSettings) -> tuple[dict[str, Any], bool]:
    """The extractors of this process for ``settings``, built on first use. Returns (them, built_now)."""
    with _EXTRACTORS_LOCK:
        if settings in _EXTRACTORS:
            return _EXTRACTORS[settings], False
        import torch

        torch.set_num_threads(settings.threads)
        built: dict[str, Any] = {}
        if "text" in settings.modalities:
            from erc.features.text import TextConfig, TextExtractor

            built["text"] = TextExtractor(
                TextConfig(model=settings.text_model, max_length=settings.text_max_length,
                           context=settings.text_context, pooling=settings.text_pooling, device=settings.device)
            )
        if "audio" in settings.modalities:
            from erc.features.audio import AudioConfig, AudioExtractor

            built["audio"] = AudioExtractor(AudioConfig())
        if "visual" in settings.modalities:
            from erc.features.visual import VisualConfig, VisualExtractor

            built["visual"] = VisualExtractor(
                VisualConfig(num_frames=settings.num_frames, faces=settings.faces, face_weights=settings.face_weights,
                             random_face_weights=settings.random_face_weights, seed=settings.seed,
                             device=settings.device, precision=settings.precision)
            )
        _EXTRACTORS[settings] = built
        return built, True


@dataclass
class ShardPayload:
    """What a worker sends back for one shard."""

    records: list[UtteranceRecord]
    failures: list[dict[str, str]]
    dims: dict[str, int]
    worker: str
    loaded_models: bool


def extract_dialogues(dialogues: list[Dialogue], label_names: list[str], settings: WorkerSettings) -> ShardPayload:
    """Compute the features of whole dialogues (runs on a worker)."""
    extractors, loaded = _extractors(settings)
    label_index = {name: i for i, name in enumerate(label_names)}
    records: list[UtteranceRecord] = []
    failures: list[dict[str, str]] = []

    def fail(item: str, modality: str, exc: Exception) -> None:
        failures.append({"item": item, "modality": modality, "error": str(exc)})

    for dialogue in dialogues:
        texts = None
        if "text" in extractors:
            texts = extractors["text"].extract_dialogue([u.speaker for u in dialogue.utterances],
                                                        [u.text for u in dialogue.utterances])
        for i, u in enumerate(dialogue.utterances):
            record = UtteranceRecord(
                utterance_id=u.utterance_id, dialogue_id=u.dialogue_id, utterance_index=u.index, split=u.split,
                speaker=u.speaker, speaker_index=u.speaker_index, text=u.text,
                label=label_index[u.label] if u.label is not None else -1,
            )
            if texts is not None:
                record.features["text"] = texts[i]
            if "audio" in extractors:
                source = u.audio or u.video
                if source is not None:  # no media listed: a missing modality by design, not a failure
                    start, end = (u.audio_start, u.audio_end) if u.audio is not None else (u.start, u.end)
                    try:
                        record.features["audio"] = extractors["audio"].extract(Path(source), start, end)
                    except MediaError as exc:
                        fail(u.utterance_id, "audio", exc)
            if "visual" in extractors:
                if u.video is not None:
                    try:
                        visual = extractors["visual"].extract(Path(u.video), u.start, u.end)
                        record.features["visual"] = visual.utterance
                        record.visual_frames = visual.frames
                        record.visual_frame_mask = visual.frame_mask
                    except MediaError as exc:
                        fail(u.utterance_id, "visual", exc)
            records.append(record)
    dims = {m: extractors[m].dim for m in settings.modalities}
    return ShardPayload(records, failures, dims, worker=f"{os.uname().nodename}:{os.getpid()}", loaded_models=loaded)


# ----------------------------------------------------------------------------------------------
# Client side: plan, resume, schedule, write


def _plan(corpus: Corpus, dialogues_per_shard: int) -> dict[str, list[Dialogue]]:
    plan: dict[str, list[Dialogue]] = {}
    for start in range(0, len(corpus.dialogues), dialogues_per_shard):
        plan[f"{len(plan):05d}.h5"] = corpus.dialogues[start : start + dialogues_per_shard]
    return plan


def collect_weights(config: ExtractConfig) -> dict[str, Any]:
    """Provenance of every weight file the features depend on (sha256 where there is a file)."""
    from erc.features.text import encoder_weights_sha256
    from erc.features.visual import MTCNN_WEIGHTS
    from erc.provenance import sha256_file

    weights: dict[str, Any] = {}
    if "visual" in config.modalities:
        weights["face"] = (
            {"file": str(config.face_weights), "sha256": sha256_file(config.face_weights)}
            if config.face_weights is not None
            else {"file": None, "random_init_seed": config.seed}
        )
        weights["mtcnn"] = MTCNN_WEIGHTS
    if "text" in config.modalities:
        weights["text"] = {"model": config.text_model, "sha256": encoder_weights_sha256(config.text_model)}
    return weights


def _prepare_out(config: ExtractConfig, feature_config: dict[str, Any], plan: dict[str, list[Dialogue]]) -> None:
    """Create or validate the output directory so that a re-run resumes the same plan."""
    shards_dir = config.out / "shards"
    plan_path = config.out / "plan.json"
    new_plan = {
        "config": feature_config,
        "config_hash": config_hash(feature_config),
        "shards": {name: [d.dialogue_id for d in dialogues] for name, dialogues in plan.items()},
    }
    if plan_path.exists() and not config.overwrite:
        import json

        old = json.loads(plan_path.read_text())
        if old.get("config_hash") != new_plan["config_hash"] or old.get("shards") != new_plan["shards"]:
            raise ConfigError(
                f"{config.out} holds shards extracted with another configuration or corpus "
                f"(config {old.get('config_hash')} vs {new_plan['config_hash']}): pass --overwrite to replace them, "
                "or choose another --out"
            )
    if config.overwrite:
        for name in ("shards", "index.json", "report.json", "plan.json"):
            path = config.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    shards_dir.mkdir(parents=True, exist_ok=True)
    for leftover in shards_dir.glob(".*.tmp"):  # a killed run's unfinished shard
        leftover.unlink()
    write_json_atomic(plan_path, new_plan)


def _finished(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        summarize_shard(path)
        return True
    except ShardError:
        path.unlink()
        return False


def _client(config: ExtractConfig):
    from distributed import Client, LocalCluster

    if config.scheduler:
        return Client(config.scheduler), None
    cluster = LocalCluster(
        n_workers=config.workers, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=40,
    )
    return Client(cluster), cluster


def extract(config: ExtractConfig, progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Run the extraction stage. ``progress(done_utterances, total_utterances)`` is called as shards
    finish. Raises ErcError subclasses with one-line messages."""
    from distributed import as_completed

    from erc.provenance import package_versions

    started = time.perf_counter()
    corpus = load_corpus(config.dataset, config.root, manifest=config.manifest, label_set=config.label_set)
    if config.limit is not None:
        corpus = limit_dialogues(corpus, config.limit)
    weights = collect_weights(config)
    feature_config = config.feature_config(weights)
    plan = _plan(corpus, config.dialogues_per_shard)
    _prepare_out(config, feature_config, plan)
    shards_dir = config.out / "shards"
    todo = {name: ds for name, ds in plan.items() if not _finished(shards_dir / name)}
    total = corpus.num_utterances
    done = sum(len(d) for name, ds in plan.items() if name not in todo for d in ds)
    if progress:
        progress(done, total)

    attrs = {
        "dataset": corpus.name,
        "label_names": corpus.label_names,
        "config": feature_config,
        "config_hash": config_hash(feature_config),
        "versions": package_versions(),
        "weights": weights,
        "text_model": config.text_model if "text" in config.modalities else "",
        "excluded_labels": getattr(corpus, "excluded", {}),
    }
    model_loads: dict[str, int] = {}
    failed_items = {f["item"] for name in plan if name not in todo for f in summarize_shard(shards_dir / name).failures}
    max_failures = config.max_failures if config.max_failures is not None else max(1, total // 10)
    if todo:
        threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, config.workers))
        settings = config.worker_settings(config.device, threads)
        client, cluster = _client(config)
        try:
            futures = {
                client.submit(extract_dialogues, ds, corpus.label_names, settings, key=f"erc-shard-{name}-{attrs['config_hash']}", pure=False): name
                for name, ds in todo.items()
            }
            for future in as_completed(futures):
                name = futures[future]
                try:
                    payload: ShardPayload = future.result()
                except ErcError:
                    raise
                except Exception as exc:
                    raise ErcError(f"shard {name} (dialogues {', '.join(d.dialogue_id for d in todo[name])}) failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
                model_loads[payload.worker] = model_loads.get(payload.worker, 0) + int(payload.loaded_models)
                write_shard(shards_dir / name, payload.records, attrs=attrs, dims=payload.dims,
                            num_frames=config.num_frames, failures=payload.failures)
                done += len(payload.records)
                failed_items |= {f["item"] for f in payload.failures}
                if progress:
                    progress(done, total)
                if len(failed_items) > max_failures:
                    for other in futures:
                        other.cancel()
                    _write_report(config.out, model_loads, time.perf_counter() - started)
                    raise ErcError(
                        f"{len(failed_items)} utterances failed, more than --max-failures {max_failures}; "
                        f"see {config.out / 'report.json'} (finished shards are kept: fix the input and re-run to resume)"
                    )
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    failures = _write_report(config.out, model_loads, time.perf_counter() - started)
    return ExtractResult(
        out=config.out, shards_written=len(todo), shards_skipped=len(plan) - len(todo), utterances=total,
        failures=failures, seconds=time.perf_counter() - started, model_loads=model_loads,
    )


def _write_report(out: Path, model_loads: dict[str, int], seconds: float) -> list[dict[str, str]]:
    """Rebuild the index from the shards on disk and write the run report (failures of all shards)."""
    index = build_index(out)
    failures = [f for shard in index["shards"] for f in shard["failures"]]
    write_json_atomic(out / "report.json", {
        "failures": failures,
        "failed_utterances": len({f["item"] for f in failures}),
        "shards_on_disk": len(index["shards"]),
        "last_run": {"seconds": round(seconds, 2), "model_loads_per_worker": model_loads},
    })
    return failures


def config_summary(config: ExtractConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
