"""The extraction stage: a corpus on disk -> HDF5 feature shards, in parallel on a Dask cluster.

The client reads the corpus, plans shards of whole dialogues (``plan.json``; size-balanced, about
64 utterances each by default: see ``erc.pipeline.shards.plan_shards``), checks that every worker
sees the corpus, weights and output paths, and submits one task per shard that is not on disk yet,
largest first. Each worker extracts its shard's dialogues and writes the shard itself (fsync + atomic
rename into ``OUT/shards``, which must be on storage the client and the workers share), then
returns a small summary; the client releases each future as it finishes. Workers keep their models
loaded between tasks (one load per worker process). Within a task, a ``MediaReader`` thread decodes
the sampled frames and computes the openSMILE vectors of the next utterances while the networks work
(``read_ahead``).

Failures are per utterance and modality: ANY exception while extracting one modality of one
utterance (a foreseen :class:`MediaError`: missing or corrupt media, no audio track, no face; or
anything else: a ``cv2.error``, an openSMILE ``RuntimeError``, a NumPy ``ValueError``) masks that
modality, is recorded against the item (exception type, one-line message, and for unforeseen
exceptions the traceback) in the shard and in ``report.json``, and counts toward ``max_failures``;
``strict=True`` stops at the first unforeseen exception instead. A worker process that dies
(segfault in a decoder, killed for memory: Dask's ``KilledWorker``) does not end the run: every
media item of that shard is probed alone, the item whose probe kills its worker again is recorded as
failed and skipped, and the shard is extracted again (at most ``MAX_SHARD_ATTEMPTS`` times).

The run stops with a clear message once more than ``max_failures`` utterances have failed; the set
it leaves is marked incomplete (``index.json``: ``complete: false``) and readers refuse it unless
told to allow a partial set. Re-running resumes: finished shards of the same configuration are kept.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import erc
from erc.errors import ConfigError, ErcError, ExtractionError, MediaError, ShardError
from erc.pipeline.corpus import Corpus, Dialogue, Utterance, limit_dialogues, load_corpus
from erc.pipeline.shards import (
    MODALITIES,
    UtteranceRecord,
    build_index,
    config_hash,
    plan_shards,
    read_shard_attrs,
    summarize_shard,
    write_json_atomic,
    write_shard,
)

DEFAULT_TEXT_MODEL = "roberta-base"
MAX_SHARD_ATTEMPTS = 3
"""A shard whose worker process dies is isolated and extracted again at most this many times in all."""
MAX_MESSAGE = 500
"""Characters of an exception's first line kept as a failure's one-line message."""
MAX_TRACEBACK = 20_000


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
    text_context: bool | None = None  # None: chosen from the checkpoint (erc.features.text.context_choice)
    text_pooling: str | None = None
    face_weights: Path | None = None
    random_face_weights: bool = False
    faces: str = "all"
    num_frames: int = 20
    precision: str = "auto"  # the ResNet: bf16 where the hardware computes it natively (see resolve_precision)
    text_precision: str = "fp32"  # the text encoder: exact by default (it costs ~1% of an utterance)
    compile: bool = False
    seed: int = 0
    device: str = "cpu"
    workers: int = 1
    threads_per_worker: int | None = None
    scheduler: str | None = None
    limit: int | None = None
    overwrite: bool = False
    max_failures: int | None = None
    shard_utterances: int = 64  # size-balanced shards of whole dialogues (see plan_shards)
    dialogues_per_shard: int | None = None  # instead: this many dialogues per shard
    labels: tuple[str, ...] | None = None  # manifest: the class vocabulary, in this order (--labels)
    detect_max_side: int | None = 640  # MTCNN sees frames shrunk to this longest side (None: full size)
    crop_batch: int | None = None  # face crops per ResNet call across utterances (None: 256 on CUDA, one utterance on CPU)
    detect_batch: int | None = None  # utterances per MTCNN call (None: 8 on CUDA, one on CPU)
    read_ahead: int = 2  # media items each worker reads (decode, openSMILE) ahead of its networks; 0: in line
    strict: bool = False  # stop at the first unforeseen exception instead of recording it
    scheduler_timeout: float = 60.0  # seconds to reach --scheduler and for its first worker

    def __post_init__(self) -> None:
        # Workers may run elsewhere (another working directory, another machine with the same mounts):
        # every path they get is absolute.
        self.root, self.out = _absolute(self.root), _absolute(self.out)
        if self.manifest is not None:
            self.manifest = _absolute(self.manifest)
        local_text_model = Path(self.text_model).expanduser()
        if local_text_model.is_dir():
            self.text_model = str(local_text_model.absolute())
        if self.labels is not None:
            self.labels = tuple(self.labels)
        if self.detect_max_side is not None and self.detect_max_side < 64:
            raise ConfigError(f"--detect-max-side must be at least 64 pixels, got {self.detect_max_side}")
        for option, value in (("--crop-batch", self.crop_batch), ("--detect-batch", self.detect_batch)):
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be at least 1, got {value}")
        if self.read_ahead < 0:
            raise ConfigError(f"--read-ahead must be 0 or more, got {self.read_ahead}")
        if self.shard_utterances < 1 or (self.dialogues_per_shard is not None and self.dialogues_per_shard < 1):
            raise ConfigError("--shard-utterances and --dialogues-per-shard must be at least 1")
        if not self.scheduler_timeout > 0:
            raise ConfigError(f"--scheduler-timeout must be positive, got {self.scheduler_timeout}")
        self.modalities = tuple(self.modalities)
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ConfigError(f"--modalities must be a subset of {','.join(MODALITIES)}, got {','.join(self.modalities)}")
        if "text" in self.modalities:
            from erc.features.text import resolve_context, resolve_pooling

            self.text_pooling = resolve_pooling(self.text_pooling, self.text_model)
            self.text_context = resolve_context(self.text_context, self.text_model)
        if self.faces not in ("all", "largest"):
            raise ConfigError(f"--faces must be 'all' or 'largest', got {self.faces!r}")
        for option, value in (("--precision", self.precision), ("--text-precision", self.text_precision)):
            if value not in ("fp32", "bf16", "auto"):
                raise ConfigError(f"{option} must be 'fp32', 'bf16' or 'auto', got {value!r}")
        if "auto" in (self.precision, self.text_precision):  # resolved here, so the shards record what ran
            import torch  # (on the client's hardware)

            from erc.pipeline.evaluate import resolve_precision

            self.precision = resolve_precision(self.precision, torch.device(self.device))
            self.text_precision = resolve_precision(self.text_precision, torch.device(self.device))
        if "visual" in self.modalities:
            if self.face_weights is None and not self.random_face_weights:
                raise ConfigError(
                    "visual features need face weights: pass --face-weights FILE (a ResNet-101 state dict), "
                    "or --random-face-weights to run with untrained weights (for testing only)"
                )
            if self.face_weights is not None:
                self.face_weights = _absolute(self.face_weights)
                if not self.face_weights.is_file():
                    raise ConfigError(f"--face-weights {self.face_weights}: no such file")

    def worker_settings(self, device: str, threads: int, weights: Mapping[str, Any] | None = None) -> WorkerSettings:
        """What a worker process needs to build the extractors of this configuration. With the
        client's ``weights`` (``collect_weights``) workers load the text model's snapshot the client
        resolved and check that their weight files hash the same."""
        text_weights = (weights or {}).get("text") or {}
        return WorkerSettings(
            modalities=self.modalities, text_model=self.text_model, text_max_length=self.text_max_length,
            text_context=self.text_context, text_pooling=self.text_pooling,
            face_weights=str(self.face_weights) if self.face_weights else None,
            random_face_weights=self.random_face_weights, faces=self.faces, num_frames=self.num_frames,
            precision=self.precision, text_precision=self.text_precision, compile=self.compile, seed=self.seed,
            device=device, threads=threads,
            detect_max_side=self.detect_max_side, crop_batch=self.crop_batch, detect_batch=self.detect_batch,
            text_revision=text_weights.get("revision"),
            text_weights_sha256=tuple(sorted((text_weights.get("sha256") or {}).items())),
        )

    def feature_config(self, weights: dict[str, Any]) -> dict[str, Any]:
        """What the features depend on (hashed to decide whether a shard on disk can be reused): the
        code version, the corpus selection and labels, every extractor setting, the device, and the
        weights (checksums; the hub revision of a hub text model)."""
        return {
            "erc_version": erc.__version__,
            "dataset": self.dataset,
            "label_set": self.label_set,
            "labels": list(self.labels) if self.labels is not None else None,
            "modalities": list(self.modalities),
            "device": self.device,
            # a modality's settings only where it is extracted: they change nothing else
            "text": {"model": self.text_model, "max_length": self.text_max_length, "context": self.text_context,
                     "pooling": self.text_pooling, "precision": self.text_precision} if "text" in self.modalities else None,
            "audio": {"feature_set": "ComParE_2016", "level": "functionals", "sample_rate": 16000}
            if "audio" in self.modalities else None,
            "visual": {"faces": self.faces, "num_frames": self.num_frames, "precision": self.precision, "seed": self.seed,
                       "detect_max_side": self.detect_max_side, "compile": self.compile} if "visual" in self.modalities else None,
            "limit": self.limit,
            "shards": {"dialogues": self.dialogues_per_shard} if self.dialogues_per_shard else {"utterances": self.shard_utterances},
            "weights": weights,
        }


def _absolute(path: Path | str) -> Path:
    return Path(path).expanduser().absolute()


@dataclass
class ExtractResult:
    out: Path
    shards_written: int
    shards_skipped: int
    utterances: int
    failures: list[dict[str, str]]
    seconds: float
    model_loads: dict[str, int] = field(default_factory=dict)
    complete: bool = True

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
    text_precision: str = "fp32"
    compile: bool = False
    detect_max_side: int | None = 640
    crop_batch: int | None = None
    detect_batch: int | None = None
    text_revision: str | None = None  # a hub text model's snapshot commit, resolved once by the client
    text_weights_sha256: tuple[tuple[str, str], ...] = ()  # the client's (file, sha256) of the text weights


_EXTRACTORS: dict[WorkerSettings, dict[str, Any]] = {}
_EXTRACTORS_LOCK = threading.Lock()


class OneCallAtATime:
    """An extractor that runs one call at a time in its process. The tasks a Dask worker runs in
    its threads share one set of models, and neither fast tokenizers ("Already borrowed") nor torch
    modules are safe to call from several threads at once; each modality has its own lock, so two
    tasks can still run text and audio side by side."""

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.extractor, name)
        if not callable(method):
            return method

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)

        return locked


def _worker_threads() -> int:
    """Concurrent tasks of the Dask worker this runs in (1 outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def usable_cores() -> int:
    """Cores this process may use, as Dask counts them (CPU affinity and cgroup quotas respected,
    unlike ``os.cpu_count()``): also what `dask worker` starts that many threads from by default."""
    from dask.system import CPU_COUNT

    return max(1, CPU_COUNT)


def torch_threads_for(settings: WorkerSettings) -> int:
    """Torch threads of this process: ``settings.threads``, or, when it is 0 (a cluster the client
    does not know), the cores of this machine shared among the worker's concurrent tasks."""
    return settings.threads or max(1, usable_cores() // _worker_threads())


def worker_device(device: str) -> str:
    """The device this process's models go on. ``cuda`` without an index, in a Dask worker that
    sees several GPUs, becomes one GPU per worker: ``cuda:(name mod GPUs)`` for the integer-named
    workers of a local cluster. A worker started with ``CUDA_VISIBLE_DEVICES`` (one GPU each, as
    dask-cuda does) or any other device is left as it is."""
    if device != "cuda" or os.environ.get("CUDA_VISIBLE_DEVICES"):
        return device
    import torch

    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError, AttributeError):
        return device
    count = torch.cuda.device_count()
    if count < 2 or not isinstance(name, int):
        return device
    return f"cuda:{name % count}"


def _extractors(settings: WorkerSettings) -> tuple[dict[str, Any], bool]:
    """The extractors of this process for ``settings``, built on first use (each behind its own
    lock, see ``OneCallAtATime``). Returns (them, built_now)."""
    with _EXTRACTORS_LOCK:
        if settings in _EXTRACTORS:
            return _EXTRACTORS[settings], False
        import torch

        torch.set_num_threads(torch_threads_for(settings))
        device = worker_device(settings.device)
        built: dict[str, Any] = {}
        if "text" in settings.modalities:
            from erc.features.text import TextConfig, TextExtractor

            built["text"] = TextExtractor(
                TextConfig(model=settings.text_model, max_length=settings.text_max_length,
                           context=settings.text_context, pooling=settings.text_pooling, device=device,
                           revision=settings.text_revision, precision=settings.text_precision)
            )
            _check_text_weights(built["text"], settings)
        if "audio" in settings.modalities:
            from erc.features.audio import AudioConfig, AudioExtractor

            built["audio"] = AudioExtractor(AudioConfig())
        if "visual" in settings.modalities:
            from erc.features.visual import VisualConfig, VisualExtractor

            built["visual"] = VisualExtractor(
                VisualConfig(num_frames=settings.num_frames, faces=settings.faces, face_weights=settings.face_weights,
                             random_face_weights=settings.random_face_weights, seed=settings.seed,
                             device=device, precision=settings.precision,
                             detect_max_side=settings.detect_max_side, crop_batch=settings.crop_batch,
                             detect_batch=settings.detect_batch, compile=settings.compile)
            )
        built = {modality: OneCallAtATime(extractor) for modality, extractor in built.items()}
        _EXTRACTORS[settings] = built
        return built, True


def _check_text_weights(extractor: Any, settings: WorkerSettings) -> None:
    """Raise ConfigError, naming this worker, if its text weight files do not hash as the client's."""
    if not settings.text_weights_sha256:
        return
    expected, found = dict(settings.text_weights_sha256), extractor.info()["weights_sha256"]
    if found != expected:
        differing = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise ConfigError(
            f"worker {_worker_name()}: the text model {settings.text_model!r}"
            + (f" (revision {settings.text_revision})" if settings.text_revision else "")
            + f" has other weights here than on the client ({', '.join(differing)} differ): give every machine "
            "the same model files"
        )


@dataclass
class ShardPayload:
    """The features of some dialogues, as one worker computed them (``extract_dialogues``)."""

    records: list[UtteranceRecord]
    failures: list[dict[str, str]]
    dims: dict[str, int]
    worker: str
    loaded_models: bool
    torch_threads: int = 1
    seconds: dict[str, float] = field(default_factory=dict)  # per modality, on the worker
    compile_fallback: str | None = None  # why the worker's compiled face networks were given up for the eager ones


def _worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


def failure_record(item: str, modality: str, exc: BaseException, source: str | Path | None = None) -> dict[str, str]:
    """What the shard and report.json keep of one failed item: exception type and a one-line message
    (naming the media file); the traceback too when the exception was not a foreseen MediaError."""
    lines = str(exc).strip().splitlines()
    message = (lines[0] if lines else "").strip()[:MAX_MESSAGE]
    foreseen = isinstance(exc, MediaError)
    if not foreseen:  # name the file and the exception: "x.mp4: ValueError: ..."
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        if source is not None and str(source) not in message:
            message = f"{source}: {message}"
    record = {"item": item, "modality": modality, "error": message, "type": type(exc).__name__}
    if not foreseen:
        record["traceback"] = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK:]
    return record


def _check_vector(vector: np.ndarray, dim: int, modality: str) -> np.ndarray:
    vector = np.asarray(vector)
    if vector.shape != (dim,) or not np.all(np.isfinite(vector)):
        raise ValueError(f"{modality} features have shape {vector.shape} (expected ({dim},)) or non-finite values")
    return vector


def _media_source(u: Utterance, modality: str) -> tuple[Path, float | None, float | None] | None:
    """The file and span a media modality of ``u`` is read from; None when the corpus lists no media
    for it (a missing modality by design, not a failure)."""
    if modality == "audio":
        source = u.audio or u.video
        if source is None:
            return None
        return (Path(source), u.audio_start, u.audio_end) if u.audio is not None else (Path(source), u.start, u.end)
    return (Path(u.video), u.start, u.end) if u.video is not None else None


class MediaReader:
    """Reads the media of the utterances ahead of the networks, in one background thread.

    The sampled video frames (decoding) and the openSMILE functionals need no network, so while the
    worker's networks handle one utterance, this thread prepares up to ``ahead`` of the next
    (utterance, modality) items, in the order they will be asked for. On a GPU the networks are fast
    enough that reading in line would leave the GPU waiting; on a CPU it costs nothing measurable.
    ``ahead=0`` reads each item when it is asked for. An item's exception is raised by ``get`` for
    that item, so failures stay with their items.
    """

    def __init__(self, items: list[tuple[tuple[str, str], Callable[[], Any]]], ahead: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._items, self._ahead = items, ahead
        self._position = {key: i for i, (key, _) in enumerate(items)}
        self._pending: dict[tuple[str, str], Any] = {}
        self._submitted = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="erc-media") if ahead > 0 and items else None

    def get(self, key: tuple[str, str]) -> Any:
        """The result of item ``key`` (utterance id, modality), reading ahead from there."""
        if self._pool is None:
            return self._items[self._position[key]][1]()
        last = min(self._position[key] + self._ahead, len(self._items) - 1)
        while self._submitted <= last:
            queued_key, read = self._items[self._submitted]
            self._pending[queued_key] = self._pool.submit(read)
            self._submitted += 1
        return self._pending.pop(key).result()

    def close(self) -> None:
        """Stop reading ahead (items not yet started are dropped); waits for the item being read."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def extract_dialogues(
    dialogues: list[Dialogue],
    label_names: list[str],
    settings: WorkerSettings,
    *,
    strict: bool = False,
    skip: dict[tuple[str, str], dict[str, str]] | None = None,
    read_ahead: int = 2,
) -> ShardPayload:
    """Compute the features of whole dialogues (runs on a worker).

    Every exception while extracting one modality of one utterance (for text: of one dialogue) is
    caught, masks that modality and becomes a failure record; with ``strict``, an exception that is
    not a :class:`MediaError` raises :class:`ExtractionError` instead. ``skip`` maps (utterance id,
    modality) to the failure record of an item known to crash its worker process: it is not read.
    ``read_ahead``: media items a ``MediaReader`` prepares ahead of the networks (0: in line).
    """
    extractors, loaded = _extractors(settings)
    label_index = {name: i for i, name in enumerate(label_names)}
    records: list[UtteranceRecord] = []
    failures: list[dict[str, str]] = []
    skip = skip or {}
    seconds: Counter[str] = Counter()  # per modality: where this task's time went

    def attempt(item: str, modality: str, source: Any, run: Callable[[], Any]) -> Any:
        """``run()``, or None with a failure recorded (re-raised under --strict if unforeseen)."""
        if (item, modality) in skip:
            failures.append(dict(skip[item, modality]))
            return None
        started = time.perf_counter()
        try:
            return run()
        except MediaError as exc:
            failures.append(failure_record(item, modality, exc, source))
        except Exception as exc:
            if strict:
                raise ExtractionError(
                    f"{item} [{modality}]: {failure_record(item, modality, exc, source)['error']} "
                    "(--strict stops at the first unforeseen error; without it the item is recorded and skipped)"
                ) from exc
            failures.append(failure_record(item, modality, exc, source))
        finally:
            seconds[modality] += time.perf_counter() - started
        return None

    def shared_call(call: Callable[[], Any], utterances: int) -> Any:
        """``call()``, one network call for the visual work of several ``utterances``; None when there is
        only one, or when the call fails: each utterance is then done alone, so a failure stays with its
        item. Its time counts as visual."""
        if utterances < 2:
            return None
        started = time.perf_counter()
        try:
            return call()
        except Exception:
            return None
        finally:
            seconds["visual"] += time.perf_counter() - started

    # utterances whose faces are cropped, waiting for the ResNet: on a GPU the crops of several
    # utterances share one call (VisualConfig.crops_per_call); on a CPU each utterance goes alone
    waiting: list[tuple[UtteranceRecord, Path, Any]] = []

    def embed_waiting() -> None:
        """ResNet outputs for the waiting utterances' crops in one call, pooled into each record;
        if that call fails, each utterance is embedded alone so the failure stays with its item."""
        if not waiting:
            return
        visual = extractors["visual"]

        def finish(record: UtteranceRecord, faces: Any, embeddings: np.ndarray) -> None:
            features = visual.pool(faces, embeddings)
            _check_vector(features.utterance, visual.dim, "visual")
            if not np.all(np.isfinite(features.frames)):
                raise ValueError("per-frame visual features have non-finite values")
            record.features["visual"] = features.utterance
            record.visual_frames, record.visual_frame_mask = features.frames, features.frame_mask

        embeddings = shared_call(lambda: visual.embed_faces(np.concatenate([faces.crops for _, _, faces in waiting])),
                                 len(waiting))
        offsets = np.cumsum([0] + [len(faces.crops) for _, _, faces in waiting])
        for (record, source, faces), first, last in zip(waiting, offsets[:-1], offsets[1:]):
            own = (lambda: embeddings[first:last]) if embeddings is not None else (lambda: visual.embed_faces(faces.crops))
            attempt(record.utterance_id, "visual", source, lambda: finish(record, faces, own()))
        waiting.clear()

    # utterances whose frames are read, waiting for MTCNN: on a GPU the frames of several utterances
    # share one call (VisualConfig.utterances_per_detect_call); on a CPU each utterance goes alone
    undetected: list[tuple[UtteranceRecord, tuple[Path, float | None, float | None], np.ndarray]] = []

    def detect_undetected() -> None:
        """Face boxes of the waiting utterances' frames in one MTCNN call (per frame size), then their
        crops, queued for the ResNet; if the shared call fails, each utterance is searched alone so
        the failure stays with its item."""
        if not undetected:
            return
        visual = extractors["visual"]
        boxes = shared_call(lambda: visual.detect_faces_of_many([frames for _, _, frames in undetected]), len(undetected))
        for i, (record, media, frames) in enumerate(undetected):
            own = boxes[i] if boxes is not None else None
            faces = attempt(record.utterance_id, "visual", media[0], lambda: visual.crop_faces(frames, *media, boxes=own))
            if faces is not None:
                waiting.append((record, media[0], faces))
                if sum(len(f.crops) for _, _, f in waiting) >= visual.config.crops_per_call:
                    embed_waiting()
        undetected.clear()

    reads = [
        ((u.utterance_id, m), partial(_read_media, extractors, m, media))
        for dialogue in dialogues for u in dialogue.utterances for m in ("audio", "visual")
        if m in extractors and (u.utterance_id, m) not in skip and (media := _media_source(u, m)) is not None
    ]
    reader = MediaReader(reads, read_ahead)
    try:
        for dialogue in dialogues:
            utterances = dialogue.utterances
            texts = None
            if "text" in extractors:
                text = extractors["text"]

                def encode_dialogue() -> list[np.ndarray]:
                    vectors = text.extract_dialogue([u.speaker for u in utterances], [u.text for u in utterances])
                    if len(vectors) != len(utterances):
                        raise ValueError(f"the text encoder gave {len(vectors)} vectors for {len(utterances)} utterances")
                    return [_check_vector(v, text.dim, "text") for v in vectors]

                skipped = [u for u in utterances if (u.utterance_id, "text") in skip]
                if skipped:  # the dialogue's text crashed a worker: every utterance of it fails for text
                    failures.extend(dict(skip[u.utterance_id, "text"]) for u in skipped)
                else:
                    mark = len(failures)
                    texts = attempt(utterances[0].utterance_id, "text", f"dialogue {dialogue.dialogue_id}", encode_dialogue)
                    if texts is None and len(failures) > mark:  # one failure per utterance, all with the same cause
                        cause = failures.pop()
                        failures.extend({**cause, "item": u.utterance_id} for u in utterances)
            for i, u in enumerate(utterances):
                record = UtteranceRecord(
                    utterance_id=u.utterance_id, dialogue_id=u.dialogue_id, utterance_index=u.index, split=u.split,
                    speaker=u.speaker, speaker_index=u.speaker_index, text=u.text,
                    label=label_index[u.label] if u.label is not None else -1,
                )
                if texts is not None:
                    record.features["text"] = texts[i]
                if "audio" in extractors and (media := _media_source(u, "audio")) is not None:
                    record.features["audio"] = attempt(
                        u.utterance_id, "audio", media[0], lambda: reader.get((u.utterance_id, "audio"))
                    )
                if "visual" in extractors and (media := _media_source(u, "visual")) is not None:
                    frames = attempt(u.utterance_id, "visual", media[0], lambda: reader.get((u.utterance_id, "visual")))
                    if frames is not None:
                        undetected.append((record, media, frames))
                        if len(undetected) >= extractors["visual"].config.utterances_per_detect_call:
                            detect_undetected()
                records.append(record)
        detect_undetected()
        embed_waiting()
    finally:
        reader.close()
    dims = {m: extractors[m].dim for m in settings.modalities}
    import torch

    visual = extractors.get("visual")
    return ShardPayload(records, failures, dims, worker=_worker_name(), loaded_models=loaded,
                        torch_threads=torch.get_num_threads(), seconds=dict(seconds),
                        compile_fallback=visual.compile_fallback if visual is not None else None)


def _read_media(extractors: Mapping[str, Any], modality: str, media: tuple[Path, float | None, float | None]) -> Any:
    """What ``MediaReader`` prepares for an item: the audio's checked openSMILE vector, or the
    video's sampled frames."""
    if modality == "audio":
        return _check_vector(extractors["audio"].extract(*media), extractors["audio"].dim, "audio")
    from erc.features.video import read_frames

    return read_frames(*media, extractors["visual"].config.num_frames)[0]


@dataclass
class ShardTask:
    """One shard to extract and write (picklable: what the client sends a worker)."""

    name: str
    path: str  # absolute: where the worker writes the shard
    dialogues: list[Dialogue]
    label_names: list[str]
    settings: WorkerSettings
    attrs: dict[str, Any]
    num_frames: int
    strict: bool = False
    skip: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    read_ahead: int = 2  # media items read in a background thread ahead of the networks (MediaReader)


@dataclass
class ShardDone:
    """What a worker returns for a shard it wrote: counts and failures, never features."""

    name: str
    utterances: int
    failures: list[dict[str, str]]
    worker: str
    loaded_models: bool
    torch_threads: int = 1
    seconds: dict[str, float] = field(default_factory=dict)  # per modality, on the worker
    compile_fallback: str | None = None


def extract_shard(task: ShardTask) -> ShardDone:
    """Extract one shard's dialogues and write the shard file (runs on a worker)."""
    payload = extract_dialogues(task.dialogues, task.label_names, task.settings, strict=task.strict, skip=task.skip,
                                read_ahead=task.read_ahead)
    write_shard(Path(task.path), payload.records, attrs=task.attrs, dims=payload.dims, num_frames=task.num_frames,
                failures=payload.failures)
    return ShardDone(task.name, len(payload.records), payload.failures, payload.worker, payload.loaded_models,
                     payload.torch_threads, payload.seconds, payload.compile_fallback)


def probe_item(dialogue: Dialogue, utterance_index: int | None, modality: str, settings: WorkerSettings) -> None:
    """Extract one item alone and discard the result (runs on a worker, after a worker died on its shard).
    Exceptions are swallowed: only whether the process survives matters here."""
    extractors, _ = _extractors(settings)
    try:
        if modality == "text":
            extractors["text"].extract_dialogue([u.speaker for u in dialogue.utterances],
                                                [u.text for u in dialogue.utterances])
        else:
            media = _media_source(dialogue.utterances[utterance_index], modality)
            if media is not None:
                extractors[modality].extract(*media)
    except Exception:
        pass


def check_worker_paths(readable: dict[str, str], writable: str) -> str | None:
    """Runs on each worker before any task: the paths it must read and the folder it must write."""
    problems = []
    for what, path in readable.items():
        if not os.path.exists(path):
            problems.append(f"cannot see {what} {path}")
        elif not os.access(path, os.R_OK):
            problems.append(f"cannot read {what} {path}")
    if not os.path.isdir(writable) or not os.access(writable, os.W_OK):
        problems.append(f"cannot write the output folder {writable}")
    return "; ".join(problems) or None


# ----------------------------------------------------------------------------------------------
# Client side: plan, resume, schedule, write


def collect_weights(config: ExtractConfig) -> dict[str, Any]:
    """Provenance of every weight file the features depend on (sha256 where there is a file, and the
    snapshot commit of a hub text model)."""
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
        if not Path(config.text_model).expanduser().is_dir():  # a hub model: the snapshot's commit
            from erc.features.text import hub_snapshot

            weights["text"]["revision"] = hub_snapshot(config.text_model).name
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




def _finished(path: Path, expected_hash: str) -> bool:
    """A whole shard of this configuration is on disk; anything else there is removed."""
    if not path.exists():
        return False
    try:
        summarize_shard(path)
        if read_shard_attrs(path).get("config_hash") == expected_hash:
            return True
    except ShardError:
        pass
    path.unlink()
    return False


def _connect(config: ExtractConfig):
    """A client of ``--scheduler`` (clear errors, within ``scheduler_timeout``, when it cannot be reached
    or has no worker), else of a new local cluster."""
    import dask
    from distributed import Client, LocalCluster

    if config.scheduler:
        timeout = config.scheduler_timeout
        try:
            client = Client(config.scheduler, timeout=timeout)
        except (OSError, ValueError, TimeoutError) as exc:
            raise ExtractionError(
                f"cannot reach the Dask scheduler at {config.scheduler} within {timeout:g} s "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check --scheduler"
            ) from None
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (OSError, TimeoutError):
            client.close()
            raise ExtractionError(
                f"the Dask scheduler at {config.scheduler} has no worker (waited {timeout:g} s): start "
                f"`dask worker {config.scheduler}` where the extraction should run"
            ) from None
        return client, None
    # A worker process that dies fails its task at once (no blind retries), and a worker holds only the task
    # it runs (saturation 1), so the death is blamed on that task alone: the client then isolates the item.
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536; setting it turns off glibc's dynamic
    # mmap threshold, so every large tensor the networks allocate is mapped and faulted in afresh (measured:
    # 2.55 -> 3.30 s of visual work per 10 s clip). The workers keep glibc's default instead.
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                              "distributed.scheduler.worker-saturation": 1.0,
                              "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(
                n_workers=config.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=40,
            )
    except Exception as exc:  # e.g. worker processes that cannot be spawned
        raise ExtractionError(f"cannot start a local Dask cluster of {config.workers} worker(s) "
                              f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc
    return Client(cluster), cluster


def _check_workers(client, config: ExtractConfig, shards_dir: Path) -> None:
    """Every worker must read the corpus, manifest and weights at the client's paths and write the shards."""
    readable = {"--root": str(config.root)}
    if config.manifest is not None:
        readable["--manifest"] = str(config.manifest)
    if "visual" in config.modalities and config.face_weights is not None:
        readable["--face-weights"] = str(config.face_weights)
    if "text" in config.modalities and Path(config.text_model).is_dir():
        readable["--text-model"] = config.text_model
    answers = client.run(check_worker_paths, readable, str(shards_dir), on_error="return")
    for worker, answer in sorted(answers.items()):
        if isinstance(answer, BaseException):
            raise ExtractionError(f"worker {worker} failed its path check ({type(answer).__name__}: {answer})")
        if answer:
            raise ExtractionError(
                f"worker {worker}: {answer}; every worker needs the client's paths (shared storage mounted at "
                "the same place)"
            )


def _is_worker_death(exc: BaseException) -> bool:
    from distributed import KilledWorker

    return isinstance(exc, KilledWorker)


def _find_crashing_items(client, dialogues: list[Dialogue], settings: WorkerSettings,
                         shard: str) -> dict[tuple[str, str], dict[str, str]]:
    """After a worker died on ``shard``: probe each of its items alone; those whose probe kills a worker
    (again, alone, when several died together) become skip entries (failure records)."""
    from distributed import as_completed

    units: list[tuple[Dialogue, int | None, str]] = []
    for dialogue in dialogues:
        if "text" in settings.modalities:
            units.append((dialogue, None, "text"))
        for i, u in enumerate(dialogue.utterances):
            units += [(dialogue, i, m) for m in ("audio", "visual")
                      if m in settings.modalities and _media_source(u, m) is not None]

    def submit(unit):
        return client.submit(probe_item, *unit, settings, key=f"erc-probe-{shard}-{uuid.uuid4().hex}", pure=False,
                             priority=100)

    def died(futures: dict) -> list:
        dead = []
        for future in as_completed(list(futures), loop=client.loop):  # this client's loop, not the default one's
            try:
                future.result()
            except Exception as exc:
                if _is_worker_death(exc):
                    dead.append(futures[future])
            finally:
                future.release()
        return dead

    dead = died({submit(unit): unit for unit in units})
    if len(dead) > 1:  # tasks that shared a dying worker die with it: re-probe each alone
        dead = [unit for unit in dead if died({submit(unit): unit})]
    skip: dict[tuple[str, str], dict[str, str]] = {}
    for dialogue, index, modality in dead:
        source = (f"dialogue {dialogue.dialogue_id}" if modality == "text"
                  else _media_source(dialogue.utterances[index], modality)[0])
        message = (f"{source}: the worker process died while extracting this item (a crash in a decoder or model, "
                   f"e.g. a segfault); isolated and skipped")
        items = dialogue.utterances if index is None else [dialogue.utterances[index]]
        for u in items:
            skip[u.utterance_id, modality] = {"item": u.utterance_id, "modality": modality, "error": message,
                                              "type": "KilledWorker"}
    return skip


def extract(config: ExtractConfig, progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Run the extraction stage. ``progress(done_utterances, total_utterances)`` is called as shards
    finish. Raises ErcError subclasses with one-line messages."""
    from erc.provenance import package_versions

    started = time.perf_counter()
    corpus = load_corpus(config.dataset, config.root, manifest=config.manifest, label_set=config.label_set,
                         labels=config.labels)
    if config.limit is not None:
        corpus = limit_dialogues(corpus, config.limit)
    weights = collect_weights(config)
    feature_config = config.feature_config(weights)
    plan = plan_shards(corpus.dialogues, config.shard_utterances, config.dialogues_per_shard)
    _prepare_out(config, feature_config, plan)
    shards_dir = config.out / "shards"
    expected_hash = config_hash(feature_config)
    todo = {name: ds for name, ds in plan.items() if not _finished(shards_dir / name, expected_hash)}
    total = corpus.num_utterances
    done = sum(len(d) for name, ds in plan.items() if name not in todo for d in ds)
    if progress:
        progress(done, total)

    attrs = {
        "dataset": corpus.name,
        "label_names": corpus.label_names,
        "config": feature_config,
        "config_hash": expected_hash,
        "versions": package_versions(),
        "weights": weights,
        "text_model": config.text_model if "text" in config.modalities else "",
        "excluded_labels": getattr(corpus, "excluded", {}),
    }
    model_loads: dict[str, int] = {}
    torch_threads: dict[str, int] = {}
    compile_fallbacks: dict[str, str] = {}
    stage_seconds: Counter[str] = Counter()  # worker seconds per modality, summed over this run's shards
    failed_items = {f["item"] for name in plan if name not in todo for f in summarize_shard(shards_dir / name).failures}
    max_failures = config.max_failures if config.max_failures is not None else max(1, total // 10)
    stopped: str | None = None
    if todo:
        from distributed import as_completed

        # the local cluster's workers share this machine; a cluster's workers size themselves (0)
        threads = config.threads_per_worker or (
            0 if config.scheduler else max(1, usable_cores() // max(1, config.workers)))
        settings = config.worker_settings(config.device, threads, weights)
        # dask runs higher priorities first: the largest units start first, so the run ends on small ones
        size = {name: sum(len(d) for d in dialogues) for name, dialogues in plan.items()}
        attempts: Counter[str] = Counter()
        skips: dict[str, dict[tuple[str, str], dict[str, str]]] = {}
        client, cluster = _connect(config)
        try:
            _check_workers(client, config, shards_dir)
            pending: dict[Any, str] = {}
            finished = as_completed(loop=client.loop)  # not the default client's loop (another client may exist)

            def submit(name: str) -> None:
                task = ShardTask(name=name, path=str(shards_dir / name), dialogues=todo[name],
                                 label_names=corpus.label_names, settings=settings, attrs=attrs,
                                 num_frames=config.num_frames, strict=config.strict, skip=skips.get(name, {}),
                                 read_ahead=config.read_ahead)
                future = client.submit(extract_shard, task, key=f"erc-shard-{name}-{expected_hash}-{attempts[name]}",
                                       pure=False, priority=size[name])
                pending[future] = name
                finished.add(future)

            for name in todo:
                submit(name)
            for future in finished:
                name = pending.pop(future)
                try:
                    result: ShardDone = future.result()
                except ErcError:
                    raise
                except Exception as exc:
                    dialogues = ", ".join(d.dialogue_id for d in todo[name])
                    if not _is_worker_death(exc):
                        raise ExtractionError(f"shard {name} (dialogues {dialogues}) failed: "
                                              f"{type(exc).__name__}: {str(exc)[:MAX_MESSAGE]}") from exc
                    attempts[name] += 1
                    if config.strict or attempts[name] >= MAX_SHARD_ATTEMPTS:
                        raise ExtractionError(
                            f"shard {name} (dialogues {dialogues}): a worker process died "
                            f"{attempts[name]} time(s) extracting it"
                            + (" (--strict: not isolated)" if config.strict else
                               "; no single item reproduced the crash alone")
                        ) from None
                    skips.setdefault(name, {}).update(_find_crashing_items(client, todo[name], settings, name))
                    submit(name)
                    continue
                finally:
                    future.release()  # drop the scheduler's reference now, not at the end of the run
                    del future
                path = shards_dir / name
                if not path.exists():
                    raise ExtractionError(
                        f"worker {result.worker} wrote {path}, but it is not visible here: --out must be on storage "
                        "that the client and every worker share"
                    )
                model_loads[result.worker] = model_loads.get(result.worker, 0) + int(result.loaded_models)
                torch_threads[result.worker] = result.torch_threads
                if result.compile_fallback:
                    compile_fallbacks[result.worker] = result.compile_fallback
                stage_seconds.update(result.seconds)
                done += result.utterances
                failed_items |= {f["item"] for f in result.failures}
                if progress:
                    progress(done, total)
                if len(failed_items) > max_failures:
                    for other in list(pending):
                        other.cancel()
                    pending.clear()
                    stopped = f"more than --max-failures {max_failures} utterances failed"
                    break
        finally:
            client.close()
            if cluster is not None:
                cluster.close()  # waits for the local workers: a shard in flight is written whole or not at all
    if stopped is not None:
        # the report and index are written only now, so a shard a worker finished after the stop is counted
        _write_report(config.out, model_loads, time.perf_counter() - started, stopped=stopped,
                      torch_threads=torch_threads, stage_seconds=stage_seconds, compile_fallbacks=compile_fallbacks)
        raise ExtractionError(
            f"{len(failed_items)} utterances failed, more than --max-failures {max_failures}; "
            f"see {config.out / 'report.json'} (the shard set is marked incomplete; finished shards are "
            "kept: fix the input and re-run to resume)"
        )
    failures, complete = _write_report(config.out, model_loads, time.perf_counter() - started,
                                       torch_threads=torch_threads, stage_seconds=stage_seconds,
                                       compile_fallbacks=compile_fallbacks)
    return ExtractResult(
        out=config.out, shards_written=len(todo), shards_skipped=len(plan) - len(todo), utterances=total,
        failures=failures, seconds=time.perf_counter() - started, model_loads=model_loads, complete=complete,
    )


def _write_report(out: Path, model_loads: dict[str, int], seconds: float, stopped: str | None = None,
                  torch_threads: dict[str, int] | None = None,
                  stage_seconds: Mapping[str, float] | None = None,
                  compile_fallbacks: Mapping[str, str] | None = None) -> tuple[list[dict[str, str]], bool]:
    """Rebuild the index from the shards on disk (complete only if every planned shard is there) and
    write the run report: failures of all shards (with tracebacks of unforeseen exceptions)."""
    index = build_index(out)
    failures = [f for shard in index["shards"] for f in shard["failures"]]
    write_json_atomic(out / "report.json", {
        "complete": index["complete"],
        "planned_shards": index["planned_shards"],
        "missing_shards": index["missing_shards"],
        "stopped": stopped,
        "failures": failures,
        "failed_utterances": len({f["item"] for f in failures}),
        "failures_by_type": dict(Counter(f.get("type", "MediaError") for f in failures)),
        "shards_on_disk": len(index["shards"]),
        "last_run": {"seconds": round(seconds, 2), "model_loads_per_worker": model_loads,
                     "torch_threads_per_worker": torch_threads or {},
                     "worker_seconds_per_modality": {m: round(v, 2) for m, v in (stage_seconds or {}).items()},
                     "compile_fallback_per_worker": dict(compile_fallbacks or {})},
    })
    return failures, index["complete"]


def config_summary(config: ExtractConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
