"""VisExtNet: MultiEMO's visual feature extractor (Shi & Huang, 2023, §3.3.3).

For one utterance: 20 frames spread evenly over its span; MTCNN finds the faces in all 20 frames in
one batch; every face crop, resized to 224×224 and ImageNet-normalised, goes through a ResNet-101
(the 1000-d output of its final linear layer); a frame's vector is the mean over its faces and the
utterance's vector the mean over the frames that had a face. (The paper says a frame's faces are
concatenated; its code averages all faces of the 20 frames together.)

Differences from the authors' code, all measured or motivated:
- only the 20 sampled frames are decoded and searched for faces (their code runs MTCNN on every
  frame of the clip, then keeps 20 frames that had faces), so cost does not grow with clip length;
- MTCNN runs on a copy of the frames whose longest side is at most ``detect_max_side`` and the boxes
  are mapped back to full resolution for the crops; on 1280×720 frames (MELD's usual size) MTCNN
  then costs about 4× less, and the faces it stops finding are under ~40 px, i.e. far background
  people (benchmarks/bench_visual.py measures it);
- ``faces="largest"`` keeps only the biggest face of each frame, against the limitation the paper
  states (background people's faces mixed into the speaker's);
- the ResNet's batch norms are folded into its convolutions (exact up to float rounding), and it can
  run in bfloat16 (``precision="bf16"``, about 2× faster on CPUs with AVX-512 BF16 or AMX);
- ``compile=True`` compiles the ResNet and MTCNN's three networks with ``torch.compile`` (inductor,
  weights frozen, dynamic shapes): their element-wise passes (ReLU, PReLU, residual additions, max
  pooling) fuse into the convolutions, which on a CPU cost as much as the convolutions themselves.
  ResNet bf16 about 2.2× faster, MTCNN about 1.5×, for a one-time cost of one to two minutes per
  process (less once inductor's cache holds the graphs). Where the compiled networks fail and the
  eager ones succeed (no C++ compiler, ...), the eager ones run from then on and
  ``compile_fallback`` says why.

The VGGFace2 ResNet-101 weights the paper used are not published; ``face_weights`` takes a state
dict in torchvision's layout or in the layout of MultiEMO's ``Resnet101.py`` (converted on load).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from facenet_pytorch import MTCNN
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision.models import resnet101

from erc.errors import ConfigError, NoFaceError
from erc.features.video import read_frames
from erc.provenance import sha256_file

logger = logging.getLogger(__name__)

FACE_SIZE = 224
MTCNN_NETS = ("pnet", "rnet", "onet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_FACE_SIDE = 4
"""Boxes narrower or shorter than this many pixels once clipped to the frame are not faces."""
MTCNN_WEIGHTS = f"facenet-pytorch {version('facenet-pytorch')} (bundled pnet/rnet/onet weights)"


@dataclass
class VisualConfig:
    """Options of :class:`VisualExtractor`.

    ``detect_max_side``: MTCNN sees frames shrunk to this longest side (None: full resolution);
    faces smaller than ``20 * longest_side / detect_max_side`` pixels are then missed.
    """

    num_frames: int = 20
    faces: str = "all"  # "all" | "largest"
    face_weights: str | None = None
    random_face_weights: bool = False
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # "fp32" | "bf16"
    detect_max_side: int | None = 640
    crop_batch: int | None = None  # face crops per ResNet call across utterances (None: per device, see below)
    detect_batch: int | None = None  # utterances whose frames share one MTCNN call (None: per device, see below)
    compile: bool = False  # torch.compile the ResNet and MTCNN (see the module docstring)

    @property
    def crops_per_call(self) -> int:
        """``crop_batch``, or by default 256 on a GPU (which sits idle behind one utterance's ~20
        crops) and 1 on a CPU, i.e. each utterance's crops alone: a CPU gains nothing from larger
        batches (measured: 47 ms per crop at 20, 59 at 60, bf16, one thread)."""
        return self._per_device(self.crop_batch, on_cuda=256)

    @property
    def utterances_per_detect_call(self) -> int:
        """``detect_batch``, or by default 8 on a GPU (MTCNN's image pyramid is many small kernels, so
        one utterance's 20 frames leave it idle) and 1 on a CPU, whose cores one utterance's frames
        already fill."""
        return self._per_device(self.detect_batch, on_cuda=8)

    def _per_device(self, setting: int | None, on_cuda: int) -> int:
        """A batching ``setting`` if given, else ``on_cuda`` on a GPU and 1 (one utterance) on a CPU."""
        if setting is not None:
            return setting
        return on_cuda if self.device.startswith("cuda") else 1

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be at least 1, got {self.num_frames}")
        if self.faces not in ("all", "largest"):
            raise ConfigError(f"faces must be 'all' or 'largest', got {self.faces!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("crop_batch", "detect_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.detect_max_side is not None and self.detect_max_side < 64:
            raise ConfigError(f"detect_max_side must be at least 64 pixels or None, got {self.detect_max_side}")


@dataclass
class FaceCrops:
    """The faces found in an utterance's sampled frames: (n, 224, 224, 3) uint8 RGB crops in frame
    order and the number of faces of each frame (n = its sum > 0)."""

    crops: np.ndarray
    faces_per_frame: np.ndarray  # (num_frames,) int32


@dataclass
class VisualFeatures:
    """Visual features of one utterance. Rows of ``frames`` whose ``frame_mask`` is False had no face."""

    utterance: np.ndarray  # (1000,) float32
    frames: np.ndarray  # (num_frames, 1000) float32
    frame_mask: np.ndarray  # (num_frames,) bool
    faces_per_frame: np.ndarray  # (num_frames,) int32


_MULTIEMO_STEM = {"features_0": "conv1", "features_1": "bn1", "classifier_0": "fc"}
_MULTIEMO_BLOCK = re.compile(r"features_([4-7])_(\d+)_(conv[1-3]|bn[1-3]|downsample_[01])")


def convert_multiemo_resnet101_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a MultiEMO ``Resnet101.py`` state dict to torchvision's resnet101 layout.

    ``features_0``/``features_1`` → ``conv1``/``bn1``; ``features_{4,5,6,7}_{b}_{part}`` →
    ``layer{1,2,3,4}.{b}.{part}`` (``downsample_k`` → ``downsample.k``); ``classifier_0`` → ``fc``.
    """
    converted = {}
    for key, tensor in state_dict.items():
        module, _, parameter = key.partition(".")
        if module in _MULTIEMO_STEM:
            converted[f"{_MULTIEMO_STEM[module]}.{parameter}"] = tensor
            continue
        match = _MULTIEMO_BLOCK.fullmatch(module)
        if match is None:
            raise ConfigError(f"key {key!r} is not part of MultiEMO's ResNet-101 layout")
        stage, block, part = match.groups()
        converted[f"layer{int(stage) - 3}.{block}.{part.replace('_', '.')}.{parameter}"] = tensor
    return converted


def load_face_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a torchvision- or MultiEMO-layout ResNet-101 state dict into ``model``, strictly.

    Only BatchNorm ``num_batches_tracked`` counters (unused at inference) may be absent.
    Raises ConfigError naming ``source`` on missing, unexpected or wrongly shaped tensors.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = ", ".join(list(state_dict)[:5]) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ConfigError(f"{source}: not a state dict of tensors ({keys})")
    if any(key.startswith("features_") for key in state_dict):
        state_dict = convert_multiemo_resnet101_state_dict(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in state_dict
        if k in expected and state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        if keys
    ]
    if problems:
        raise ConfigError(f"{source}: not a ResNet-101 state dict; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)


class VisualExtractor:
    """MTCNN + ResNet-101 face features of utterance videos; models are loaded once."""

    dim = 1000

    def __init__(self, config: VisualConfig):
        if config.face_weights is not None and config.random_face_weights:
            raise ConfigError("give either face_weights or random_face_weights=True, not both")
        if config.face_weights is None and not config.random_face_weights:
            raise ConfigError(
                "no face-encoder weights: pass face_weights=<ResNet-101 state dict file>, "
                "or random_face_weights=True for a randomly initialised encoder (testing only)"
            )
        self.config = config
        self.device = torch.device(config.device)
        self.mtcnn = MTCNN(keep_all=True, device=self.device)
        for name in MTCNN_NETS:  # channels_last: vectorised PReLU and max pooling, ~20% faster on a CPU, same boxes
            getattr(self.mtcnn, name).to(memory_format=torch.channels_last)
        self.resnet = self._build_resnet()
        self._eager_nets = {"resnet": self.resnet, **{name: getattr(self.mtcnn, name) for name in MTCNN_NETS}}
        self._compiled_nets = (
            {name: torch.compile(net, dynamic=True, options={"freezing": True}) for name, net in self._eager_nets.items()}
            if config.compile
            else None
        )
        self.compile_fallback: str | None = None  # why the compiled networks were given up for the eager ones
        self._install_nets(compiled=config.compile)
        self._weights_sha256 = sha256_file(config.face_weights) if config.face_weights else None
        self._pixel_mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._pixel_std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def _build_resnet(self) -> nn.Module:
        """The face encoder: resnet101 with the configured weights, BN folded, eval, channels_last."""
        if self.config.face_weights is not None:
            path = Path(self.config.face_weights)
            if not path.is_file():
                raise ConfigError(f"{path}: face-encoder weights file not found")
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
                reason = type(error).__name__
                raise ConfigError(f"{path}: not a file torch.load can read as weights ({reason})") from error
            model = resnet101()
            load_face_weights(model, state_dict, str(path))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                model = resnet101()
        return fuse(model.eval(), inplace=True).to(self.device, memory_format=torch.channels_last)

    def weights_info(self) -> dict:
        """Provenance of the models, for shards to record."""
        return {
            "face_weights": self.config.face_weights or "random",
            "face_weights_sha256": self._weights_sha256,
            "seed": self.config.seed,
            "mtcnn": MTCNN_WEIGHTS,
        }

    def extract(self, video: Path, start: float | None = None, end: float | None = None) -> VisualFeatures:
        """Features of the utterance shown in ``video`` between ``start`` and ``end`` seconds (None: whole video).

        Raises MediaError for unreadable media and NoFaceError when no sampled frame shows a face.
        """
        faces = self.find_faces(video, start, end)
        return self.pool(faces, self.embed_faces(faces.crops))

    def find_faces(self, video: Path, start: float | None = None, end: float | None = None) -> FaceCrops:
        """Decode the sampled frames and crop their faces (the first half of ``extract``; the crops
        of several utterances can then share one ``embed_faces`` call)."""
        return self.crop_faces(read_frames(video, start, end, self.config.num_frames)[0], video, start, end)

    def crop_faces(
        self, frames: np.ndarray, video: Path, start: float | None = None, end: float | None = None,
        boxes: list[np.ndarray] | None = None,
    ) -> FaceCrops:
        """MTCNN on the sampled ``frames`` (decoded by ``read_frames``, possibly in another thread)
        and their face crops; ``video``, ``start`` and ``end`` name the item in errors. ``boxes``:
        the frames' face boxes if already found (by :meth:`detect_faces_of_many`)."""
        boxes = self.detect_faces(frames) if boxes is None else boxes
        faces_per_frame = np.array([len(b) for b in boxes], dtype=np.int32)
        if faces_per_frame.sum() == 0:
            span = f"{0 if start is None else start}-{'end' if end is None else end} s"
            raise NoFaceError(f"{video}: no face in any of the {len(frames)} frames sampled from {span}")
        crops = [_crop(frame, box) for frame, frame_boxes in zip(frames, boxes) for box in frame_boxes]
        return FaceCrops(np.stack(crops), faces_per_frame)

    def pool(self, faces: FaceCrops, embeddings: np.ndarray) -> VisualFeatures:
        """Frame vectors (mean over each frame's faces) and the utterance vector (mean over the
        frames with a face) from the ResNet outputs of ``faces.crops``."""
        faces_per_frame = faces.faces_per_frame
        owner = np.repeat(np.arange(len(faces_per_frame)), faces_per_frame)
        frame_vectors = np.zeros((len(faces_per_frame), self.dim), dtype=np.float32)
        np.add.at(frame_vectors, owner, embeddings)
        frame_mask = faces_per_frame > 0
        frame_vectors[frame_mask] /= faces_per_frame[frame_mask, None]
        return VisualFeatures(
            utterance=frame_vectors[frame_mask].mean(axis=0),
            frames=frame_vectors,
            frame_mask=frame_mask,
            faces_per_frame=faces_per_frame,
        )

    def detect_faces_of_many(self, frame_sets: list[np.ndarray]) -> list[list[np.ndarray]]:
        """:meth:`detect_faces` of several utterances' frames, with one MTCNN call per frame size."""
        found: list[list[np.ndarray] | None] = [None] * len(frame_sets)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, frames in enumerate(frame_sets):
            by_size.setdefault(frames.shape[1:], []).append(i)
        for members in by_size.values():
            boxes = self.detect_faces(np.concatenate([frame_sets[i] for i in members]))
            offsets = np.cumsum([0] + [len(frame_sets[i]) for i in members])
            for i, first, last in zip(members, offsets[:-1], offsets[1:]):
                found[i] = boxes[first:last]
        return found  # type: ignore[return-value]

    def detect_faces(self, frames: np.ndarray) -> list[np.ndarray]:
        """Face boxes per frame, (k, 4) int arrays of x1, y1, x2, y2 in full-resolution pixels."""
        height, width = frames.shape[1:3]
        scale = 1.0
        if self.config.detect_max_side is not None and max(height, width) > self.config.detect_max_side:
            scale = self.config.detect_max_side / max(height, width)
            size = (round(width * scale), round(height * scale))
            frames = np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])
        with torch.inference_mode():
            batch_boxes, _ = self._compiled_or_eager(lambda: self.mtcnn.detect(frames))
        result = []
        for boxes in batch_boxes:
            boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64) / scale
            boxes = np.round(boxes).astype(int).clip(0, [width, height, width, height])
            sides = boxes[:, 2:] - boxes[:, :2]
            keep = (sides >= MIN_FACE_SIDE).all(axis=1)
            boxes, areas = boxes[keep], sides[keep].prod(axis=1)
            if self.config.faces == "largest" and len(boxes):
                boxes = boxes[[areas.argmax()]]
            result.append(boxes)
        return result

    def embed_faces(self, crops: np.ndarray) -> np.ndarray:
        """ResNet-101 outputs (n, 1000) float32 for (n, 224, 224, 3) uint8 RGB face crops, in one batch."""
        images = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float()
        images = ((images - self._pixel_mean) / self._pixel_std).contiguous(memory_format=torch.channels_last)
        bf16 = self.config.precision == "bf16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self._compiled_or_eager(lambda: self._resnet(images)).float().cpu().numpy()

    def _install_nets(self, compiled: bool) -> None:
        nets = self._compiled_nets if compiled and self._compiled_nets is not None else self._eager_nets
        self._resnet = nets["resnet"]
        for name in MTCNN_NETS:
            setattr(self.mtcnn, name, nets[name])

    def _compiled_or_eager(self, call: Callable[[], Any]) -> Any:
        """``call()`` with the installed networks. If compiled networks fail where the eager ones
        succeed (no C++ compiler, an inductor failure, ...), the eager ones stay from then on; an
        input that fails either way raises as it would without compilation."""
        if self._compiled_nets is None or self.compile_fallback is not None:
            return call()
        try:
            return call()
        except Exception as error:
            self._install_nets(compiled=False)
            try:
                result = call()
            except Exception:
                self._install_nets(compiled=True)
                raise
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            self.compile_fallback = f"{type(error).__name__}: {first_line}"
            logger.warning("compiled face networks failed (%s); running them eagerly", self.compile_fallback)
            return result


def _crop(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box's pixels resized to FACE_SIZE×FACE_SIZE (area averaging when shrinking)."""
    x1, y1, x2, y2 = box
    face = frame[y1:y2, x1:x2]
    shrinking = face.shape[0] > FACE_SIZE or face.shape[1] > FACE_SIZE
    return cv2.resize(face, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
