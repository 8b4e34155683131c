"""VisExtNet: frame sampling and reading, real MTCNN on a real face, the ResNet-101 weights, errors.

The videos are written here with OpenCV: skimage's astronaut (a real photograph) pasted onto a
noisy background, moving and growing over time; each frame carries its index as the brightness of
a corner block (3 grey levels per frame) so the frames read back can be identified.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from torchvision.models import resnet101

import erc
from erc.errors import ConfigError, MediaError, NoFaceError
from erc.features import video as video_module
from erc.features.video import read_frames, sample_frame_indices
from erc.features.visual import (
    VisualConfig,
    VisualExtractor,
    convert_multiemo_resnet101_state_dict,
    load_face_weights,
)
from erc.provenance import package_versions, sha256_file

FPS = 24
WIDTH, HEIGHT = 640, 360
FACE = skimage.data.astronaut()[0:220, 120:330]  # hair to chin; MTCNN puts the face near x 61-148, y 62-172
FACE_BOX_IN_CROP = np.array([61, 62, 148, 172])


def face_placement(i: int, count: int) -> tuple[int, int, float]:
    """Top-left corner and scale of the face in frame i of a moving-face clip."""
    t = i / (count - 1)
    return int(40 + 300 * t), 30, 0.8 + 0.4 * t


def write_video(path: Path, count: int, faces=lambda i, count: [face_placement(i, count)], fourcc="mp4v") -> Path:
    """Write `count` frames; `faces(i, count)` lists (x, y, scale) of the faces pasted in frame i."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (WIDTH, HEIGHT))
    for i in range(count):
        frame = rng.integers(80, 110, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        for x, y, scale in faces(i, count):
            face = cv2.resize(FACE, None, fx=scale, fy=scale)
            frame[y : y + face.shape[0], x : x + face.shape[1]] = face
        frame[HEIGHT - 16 :, :16] = 3 * i % 256
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame, decoded sequentially, as RGB."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (frame := capture.read()[1]) is not None:
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def face_video(media) -> Path:
    """3 s, 72 frames, one face moving right and growing."""
    return write_video(media / "face.mp4", 3 * FPS)


@pytest.fixture(scope="module")
def two_faces_video(media) -> Path:
    """1 s, a large face on the left and a small one on the right, both still."""
    return write_video(media / "two_faces.mp4", FPS, faces=lambda i, count: [(20, 20, 1.2), (420, 60, 0.7)])


@pytest.fixture(scope="module")
def extractor() -> VisualExtractor:
    return VisualExtractor(VisualConfig(random_face_weights=True, seed=0))


@pytest.fixture(scope="module")
def face_features(extractor, face_video):
    return extractor.extract(face_video)


# Six-frame extractors keep the ResNet's work small where 20 frames prove nothing more.
@pytest.fixture(scope="module")
def six_frames() -> VisualExtractor:
    return VisualExtractor(VisualConfig(num_frames=6, random_face_weights=True, seed=0))


@pytest.fixture(scope="module")
def six_frames_largest() -> VisualExtractor:
    return VisualExtractor(VisualConfig(num_frames=6, random_face_weights=True, seed=0, faces="largest"))


@pytest.fixture(scope="module")
def six_frame_features(six_frames, face_video):
    return six_frames.extract(face_video)


def test_sample_frame_indices_spread_evenly_over_the_inclusive_range():
    indices = sample_frame_indices(24, 59, 20)
    assert len(indices) == 20 and indices[0] == 24 and indices[-1] == 59
    gaps = np.diff(indices)
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1

    short = sample_frame_indices(10, 12, 20)
    assert len(short) == 20 and sorted(short) == short and set(short) == {10, 11, 12}
    assert sample_frame_indices(5, 5, 3) == [5, 5, 5]
    with pytest.raises(ValueError):
        sample_frame_indices(8, 7, 20)


@pytest.mark.parametrize("grab_limit", [0, 48, 10**6], ids=["always-seek", "default", "never-seek"])
def test_read_frames_returns_exactly_the_sampled_frames(face_video, monkeypatch, grab_limit):
    monkeypatch.setattr(video_module, "GRAB_LIMIT", grab_limit)
    sequential = decode_all(face_video)
    assert len(sequential) == 72

    frames, indices = read_frames(face_video, 1.0, 2.5)
    assert frames.shape == (20, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert indices == sample_frame_indices(24, 59, 20)
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, sequential[index])
        assert abs(float(frame[HEIGHT - 12 :, :12].mean()) - 3 * index) < 4  # the frame's own brightness code

    frames, indices = read_frames(face_video, None, None)
    assert indices[0] == 0 and indices[-1] == 71
    np.testing.assert_array_equal(frames[-1], sequential[71])


@pytest.mark.parametrize("grab_limit", [0, 48], ids=["always-seek", "default"])
def test_read_frames_in_an_xvid_avi(media, monkeypatch, grab_limit):
    monkeypatch.setattr(video_module, "GRAB_LIMIT", grab_limit)
    path = media / "xvid.avi"
    if not path.exists():
        write_video(path, 120, fourcc="XVID")
    sequential = decode_all(path)
    frames, indices = read_frames(path, 0.5, None, num_frames=5)
    assert indices == [12, 39, 66, 92, 119]
    for frame, index in zip(frames, indices):
        np.testing.assert_array_equal(frame, sequential[index])


def test_mtcnn_finds_the_moving_face(extractor, face_video):
    frames, indices = read_frames(face_video, None, None)
    boxes = extractor.detect_faces(frames)
    found = 0
    for frame_boxes, index in zip(boxes, indices):
        x, y, scale = face_placement(index, 72)
        expected = FACE_BOX_IN_CROP * scale + [x, y, x, y]
        if len(frame_boxes) == 1:
            box = frame_boxes[0]
            centre, expected_centre = (box[:2] + box[2:]) / 2, (expected[:2] + expected[2:]) / 2
            assert np.abs(centre - expected_centre).max() < 15, (index, box, expected)
            found += 1
    assert found >= 15


def test_channels_last_face_detector_finds_the_boxes_of_the_default_layout(six_frames, face_video):
    """erc runs MTCNN's networks in channels_last (faster on a CPU); the boxes and probabilities must be
    those of facenet-pytorch's MTCNN as shipped, to float rounding."""
    from facenet_pytorch import MTCNN

    conv_weights = [p for name in ("pnet", "rnet", "onet") for p in getattr(six_frames.mtcnn, name).parameters() if p.dim() == 4]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    frames, _ = read_frames(face_video, None, None, num_frames=6)
    with torch.inference_mode():
        ours, ours_p = six_frames.mtcnn.detect(frames)
        shipped, shipped_p = MTCNN(keep_all=True, device="cpu").detect(frames)
    assert sum(len(b) for b in ours) == sum(len(b) for b in shipped) >= 6
    for a, b, pa, pb in zip(ours, shipped, ours_p, shipped_p):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-2)
        np.testing.assert_allclose(np.asarray(pa, float), np.asarray(pb, float), atol=1e-5)


def test_boxes_found_on_shrunk_frames_map_back_to_full_resolution(six_frames, face_video, monkeypatch):
    frames, _ = read_frames(face_video, None, None, num_frames=6)
    assert six_frames.config.detect_max_side >= WIDTH  # the default leaves 640×360 frames as they are
    full = six_frames.detect_faces(frames)
    monkeypatch.setattr(six_frames.config, "detect_max_side", 320)
    shrunk = six_frames.detect_faces(frames)
    for a, b in zip(full, shrunk):
        assert len(a) == len(b) == 1
        overlap = np.prod(np.clip(np.minimum(a[0, 2:], b[0, 2:]) - np.maximum(a[0, :2], b[0, :2]), 0, None))
        union = np.prod(a[0, 2:] - a[0, :2]) + np.prod(b[0, 2:] - b[0, :2]) - overlap
        assert overlap / union > 0.7, (a, b)


def test_features_shapes_mask_and_means(face_features):
    features = face_features
    assert features.utterance.shape == (1000,) and features.utterance.dtype == np.float32
    assert features.frames.shape == (20, 1000) and features.frames.dtype == np.float32
    assert features.frame_mask.shape == (20,) and features.frame_mask.dtype == bool
    assert features.faces_per_frame.shape == (20,) and features.faces_per_frame.dtype == np.int32
    assert features.frame_mask.sum() >= 15
    np.testing.assert_array_equal(features.frame_mask, features.faces_per_frame > 0)
    assert not features.frames[~features.frame_mask].any()
    assert np.isfinite(features.frames).all()
    np.testing.assert_allclose(features.utterance, features.frames[features.frame_mask].mean(axis=0), rtol=1e-5)
    # the face moves and grows, so frames differ
    assert not np.allclose(features.frames[features.frame_mask][0], features.frames[features.frame_mask][-1])


def test_same_seed_gives_the_same_features_and_another_seed_other_weights(
    six_frame_features, six_frames_largest, face_video, six_frames
):
    # a second extractor built from the same seed; with one face per frame "largest" keeps every face
    again = six_frames_largest.extract(face_video)
    assert again.frame_mask.all()
    np.testing.assert_array_equal(again.faces_per_frame, six_frame_features.faces_per_frame)
    np.testing.assert_array_equal(again.frames, six_frame_features.frames)
    other = VisualExtractor(VisualConfig(num_frames=6, random_face_weights=True, seed=1))
    assert not torch.equal(next(six_frames.resnet.parameters()), next(other.resnet.parameters()))
    assert not np.allclose(other.extract(face_video).frames, six_frame_features.frames)


def test_largest_keeps_only_the_biggest_face(six_frames, six_frames_largest, two_faces_video):
    frames, _ = read_frames(two_faces_video, None, None, num_frames=6)
    all_boxes = six_frames.detect_faces(frames)
    largest_boxes = six_frames_largest.detect_faces(frames)
    assert sum(len(b) == 2 for b in all_boxes) >= 5
    for every, largest in zip(all_boxes, largest_boxes):
        if len(every):
            areas = (every[:, 2] - every[:, 0]) * (every[:, 3] - every[:, 1])
            np.testing.assert_array_equal(largest, every[[areas.argmax()]])
            assert largest[0, 0] < WIDTH / 2  # the big face is the left one

    everyone = six_frames.extract(two_faces_video)
    speaker = six_frames_largest.extract(two_faces_video)
    assert everyone.faces_per_frame.max() == 2 and speaker.faces_per_frame.max() == 1
    # with "all", a frame's vector is the mean of its large face's vector ("largest") and its small face's
    both = np.flatnonzero(everyone.faces_per_frame == 2)[0]
    x1, y1, x2, y2 = max(all_boxes[both], key=lambda box: box[0])
    small_face = cv2.resize(frames[both][y1:y2, x1:x2], (224, 224))  # enlarged, as the extractor does
    small = six_frames.embed_faces(small_face[None])[0]
    np.testing.assert_allclose(everyone.frames[both], (speaker.frames[both] + small) / 2, rtol=1e-3)


def test_bf16_is_close_to_fp32(six_frame_features, face_video):
    config = VisualConfig(num_frames=6, random_face_weights=True, seed=0, precision="bf16")
    bf16 = VisualExtractor(config).extract(face_video)
    fp32 = six_frame_features
    np.testing.assert_array_equal(bf16.frame_mask, fp32.frame_mask)
    error = np.linalg.norm(bf16.utterance - fp32.utterance) / np.linalg.norm(fp32.utterance)
    assert bf16.utterance.dtype == np.float32 and 0 < error < 0.05
    cosine = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cosine(bf16.utterance, fp32.utterance) >= 0.999  # what --precision auto promises (README)
    assert all(cosine(a, b) >= 0.999 for a, b, m in zip(bf16.frames, fp32.frames, fp32.frame_mask) if m)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="no C++ compiler: torch.compile cannot build CPU kernels here (the fallback test covers this)")
def test_compiled_networks_give_the_eager_boxes_and_features(six_frames, six_frame_features, face_video):
    """torch.compile of MTCNN and the ResNet (bf16, frozen, fused): the same face boxes, every frame
    within cosine 0.999 of the eager fp32 features, and another number of crops reuses the graph."""
    compiled = VisualExtractor(VisualConfig(num_frames=6, random_face_weights=True, seed=0, precision="bf16",
                                            compile=True))
    features = compiled.extract(face_video)
    assert compiled.compile_fallback is None, compiled.compile_fallback  # it compiled and ran
    assert type(compiled.mtcnn.pnet).__name__ == "OptimizedModule"
    frames, _ = read_frames(face_video, None, None, 6)
    for boxes, eager_boxes in zip(compiled.detect_faces(frames), six_frames.detect_faces(frames), strict=True):
        np.testing.assert_array_equal(boxes, eager_boxes)
    fp32 = six_frame_features
    np.testing.assert_array_equal(features.frame_mask, fp32.frame_mask)
    cosine = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert all(cosine(a, b) >= 0.999 for a, b, m in zip(features.frames, fp32.frames, fp32.frame_mask) if m)
    again = compiled.embed_faces(compiled.find_faces(face_video).crops[:3])  # dynamic batch
    assert again.shape == (3, 1000) and compiled.compile_fallback is None
    with pytest.raises(ZeroDivisionError):  # an input that fails eagerly too is not a compilation failure
        compiled._compiled_or_eager(lambda: 1 / 0)
    assert compiled.compile_fallback is None and type(compiled.mtcnn.pnet).__name__ == "OptimizedModule"


def test_networks_that_cannot_compile_run_eagerly_and_say_why(six_frame_features, face_video, monkeypatch):
    class Uncompilable(torch.nn.Module):  # what torch.compile returns, failing on its first call
        def __init__(self, model):
            super().__init__()
            self.model = model  # its parameters, as an OptimizedModule has (MTCNN reads their dtype)

        def forward(self, *inputs):
            raise RuntimeError("no C++ compiler found\nlong traceback")

    def broken_compile(model, **options):
        return Uncompilable(model)

    monkeypatch.setattr(torch, "compile", broken_compile)
    extractor = VisualExtractor(VisualConfig(num_frames=6, random_face_weights=True, seed=0, compile=True))
    features = extractor.extract(face_video)
    assert extractor.compile_fallback == "RuntimeError: no C++ compiler found"
    assert not isinstance(extractor.mtcnn.pnet, Uncompilable)  # the eager networks are back in place
    np.testing.assert_array_equal(features.frames, six_frame_features.frames)  # the eager network's features


def test_video_without_a_face_raises_no_face_error(six_frames, media):
    path = write_video(media / "empty_room.mp4", FPS, faces=lambda i, count: [])
    with pytest.raises(NoFaceError, match=re.escape(str(path))):
        six_frames.extract(path, 0.0, 0.9)


def test_bad_media_raise_media_error_naming_the_file(six_frames, media, face_video):
    missing = media / "missing.mp4"
    corrupt = media / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(20_000))
    empty = media / "no_frames.mp4"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (64, 64)).release()
    for path in (missing, corrupt, empty):
        with pytest.raises(MediaError, match=re.escape(str(path))) as caught:
            six_frames.extract(path)
        assert type(caught.value) is MediaError and "\n" not in str(caught.value)
    for start, end in ((10.0, 11.0), (2.0, 1.0), (-1.0, 1.0), (1.0, 9.0)):
        with pytest.raises(MediaError, match="outside the video"):
            read_frames(face_video, start, end)
    assert read_frames(face_video, 2.5, 3.2)[1][-1] == 71  # an end just past the video is clamped


def test_extractor_refuses_to_run_without_weights():
    with pytest.raises(ConfigError, match="random_face_weights"):
        VisualExtractor(VisualConfig())
    with pytest.raises(ConfigError):
        VisualExtractor(VisualConfig(face_weights="w.pt", random_face_weights=True))
    with pytest.raises(ConfigError):
        VisualConfig(faces="speaker")
    with pytest.raises(ConfigError):
        VisualConfig(precision="fp16")


def to_multiemo_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision resnet101 keys → the attribute names of MultiEMO's Resnet101.py."""
    renamed = {}
    for key, tensor in state_dict.items():
        module, parameter = key.rsplit(".", 1)
        stem = {"conv1": "features_0", "bn1": "features_1", "fc": "classifier_0"}
        if module in stem:
            renamed[f"{stem[module]}.{parameter}"] = tensor
        else:
            layer, block, part = module.split(".", 2)
            renamed[f"features_{int(layer[-1]) + 3}_{block}_{part.replace('.', '_')}.{parameter}"] = tensor
    return renamed


def test_multiemo_weights_convert_to_torchvision_and_give_identical_outputs(tmp_path, face_video, six_frame_features):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = resnet101().eval()
    multiemo = to_multiemo_layout(original.state_dict())
    some_keys = {"features_0.weight", "features_6_22_conv3.weight", "features_7_0_downsample_1.running_var"}
    assert some_keys | {"classifier_0.bias"} <= set(multiemo)
    converted = convert_multiemo_resnet101_state_dict(multiemo)
    assert list(converted) == list(original.state_dict())
    assert all(torch.equal(converted[key], tensor) for key, tensor in original.state_dict().items())

    # a file in MultiEMO's layout, without BatchNorm counters, through the extractor: exactly the
    # features of the extractor whose random weights came from the same seed
    weights = tmp_path / "multiemo_resnet101.pt"
    torch.save({k: v for k, v in multiemo.items() if not k.endswith("num_batches_tracked")}, weights)
    loaded = VisualExtractor(VisualConfig(num_frames=6, face_weights=str(weights)))
    np.testing.assert_array_equal(loaded.extract(face_video).frames, six_frame_features.frames)
    info = loaded.weights_info()
    assert info["face_weights"] == str(weights)
    assert info["face_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_mismatched_weights_raise_config_error(tmp_path):
    model = resnet101()
    state_dict = model.state_dict()
    with pytest.raises(ConfigError, match="features_9_0_conv1.weight"):
        convert_multiemo_resnet101_state_dict({"features_9_0_conv1.weight": torch.zeros(1)})
    wrong_head = dict(state_dict, **{"fc.weight": torch.zeros(7, 2048), "fc.bias": torch.zeros(7)})
    with pytest.raises(ConfigError, match=r"wrong shape: fc.weight \(7, 2048\)"):
        load_face_weights(model, wrong_head, "wrong_head.pt")
    truncated = {k: v for k, v in state_dict.items() if not k.startswith("layer4")}
    with pytest.raises(ConfigError, match="missing: layer4.0.conv1.weight"):
        load_face_weights(model, truncated, "truncated.pt")
    with pytest.raises(ConfigError, match="not a state dict of tensors"):
        load_face_weights(model, {"state_dict": state_dict, "epoch": 3}, "checkpoint.pt")
    not_weights = tmp_path / "not_weights.pt"
    not_weights.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=re.escape(str(not_weights))):
        VisualExtractor(VisualConfig(face_weights=str(not_weights)))


def test_weights_info_and_provenance(extractor, tmp_path):
    info = extractor.weights_info()
    assert info == {
        "face_weights": "random",
        "face_weights_sha256": None,
        "seed": 0,
        "mtcnn": f"facenet-pytorch {package_versions()['facenet-pytorch']} (bundled pnet/rnet/onet weights)",
    }
    file = tmp_path / "bytes.bin"
    file.write_bytes(b"erc" * 1000)
    assert sha256_file(file) == hashlib.sha256(b"erc" * 1000).hexdigest()
    versions = package_versions()
    assert versions["erc"] == erc.__version__
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(versions) >= {"torchvision", "transformers", "opencv-python-headless", "av", "h5py", "dask", "xlstm"}


def _visual_records(spans: list[tuple[Path, float | None, float | None]], **batching):
    """``extract_dialogues`` of one dialogue whose utterances show ``spans`` (video, start, end): visual
    only, 6 frames, fp32, CPU, with ``batching`` (``crop_batch`` / ``detect_batch``). Records by
    utterance id, and (item, modality) of each failure in order."""
    from erc.pipeline.corpus import Dialogue, Utterance
    from erc.pipeline.extract import WorkerSettings, extract_dialogues

    utterances = [Utterance(f"u{i}", "d", i, "train", "A", 0, "", None, video=path, start=start, end=end)
                  for i, (path, start, end) in enumerate(spans)]
    settings = WorkerSettings(modalities=("visual",), text_model="", text_max_length=8, text_context=False,
                              text_pooling=None, face_weights=None, random_face_weights=True, faces="all",
                              num_frames=6, precision="fp32", seed=0, device="cpu", threads=1, **batching)
    payload = extract_dialogues([Dialogue("d", "train", utterances)], [], settings)
    return {r.utterance_id: r for r in payload.records}, [(f["item"], f["modality"]) for f in payload.failures]


def _count_calls(monkeypatch, method: str) -> tuple[list[int], Any]:
    """Wrap ``VisualExtractor.<method>`` so that each call records the length of its batch argument;
    returns (that list, the real method)."""
    calls: list[int] = []
    real = getattr(VisualExtractor, method)
    monkeypatch.setattr(VisualExtractor, method, lambda self, batch: calls.append(len(batch)) or real(self, batch))
    return calls, real


def _assert_same_visual_features(records: dict, reference: dict, uids: tuple[str, ...]) -> None:
    """Utterance and per-frame visual features of ``uids`` equal to float rounding, same frame masks."""
    for uid in uids:
        scale = float(np.abs(reference[uid].visual_frames).max())
        np.testing.assert_allclose(records[uid].features["visual"], reference[uid].features["visual"], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(records[uid].visual_frames, reference[uid].visual_frames, rtol=0, atol=1e-5 * scale)
        assert np.array_equal(records[uid].visual_frame_mask, reference[uid].visual_frame_mask)


def test_crops_of_several_utterances_share_resnet_calls_with_the_same_features(media, face_video, two_faces_video, monkeypatch):
    """``crop_batch``: the face crops of several utterances go through the ResNet together (as on a
    GPU by default). Features equal one utterance at a time; an utterance without a face is still
    its own failure; and when a shared call fails, each utterance is embedded alone, so one bad
    utterance cannot take the others with it."""
    empty = write_video(media / "empty_room_batch.mp4", FPS, faces=lambda i, count: [])
    spans = [(face_video, 0.0, 1.0), (empty, 0.0, 0.9), (two_faces_video, None, None), (face_video, 1.0, 3.0)]

    calls, real_embed = _count_calls(monkeypatch, "embed_faces")
    alone, alone_failures = _visual_records(spans, crop_batch=1)
    alone_calls, calls[:] = list(calls), []
    together, together_failures = _visual_records(spans, crop_batch=1000)
    assert len(alone_calls) == 3 and len(calls) == 1 and calls[0] == sum(alone_calls)
    assert alone_failures == together_failures == [("u1", "visual")]
    assert "visual" not in together["u1"].features
    _assert_same_visual_features(together, alone, ("u0", "u2", "u3"))

    def refuse_shared_calls(self, crops):  # a shared call fails; each utterance's own crops pass
        calls.append(len(crops))
        if len(crops) > max(alone_calls):
            raise RuntimeError("out of memory")
        return real_embed(self, crops)

    calls[:] = []
    monkeypatch.setattr(VisualExtractor, "embed_faces", refuse_shared_calls)
    retried, retried_failures = _visual_records(spans, crop_batch=999)
    assert calls == [sum(alone_calls), *alone_calls] and retried_failures == [("u1", "visual")]
    for uid in ("u0", "u2", "u3"):
        np.testing.assert_array_equal(retried[uid].features["visual"], alone[uid].features["visual"])


def test_frames_of_several_utterances_share_mtcnn_calls_with_the_same_features(media, face_video, two_faces_video, monkeypatch):
    """``detect_batch``: the sampled frames of several utterances go through MTCNN together, one call
    per frame size (as on a GPU by default). Features equal one utterance at a time; an utterance
    without a face is still its own failure; and when a shared call fails, each utterance is searched
    alone, so one bad utterance cannot take the others with it."""
    empty = write_video(media / "empty_room_detect.mp4", FPS, faces=lambda i, count: [])
    small = media / "small_face.mp4"  # another frame size: its own MTCNN call
    writer = cv2.VideoWriter(str(small), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (320, 240))
    for i in range(FPS):
        frame = np.full((240, 320, 3), 95, np.uint8)
        face = cv2.resize(FACE, None, fx=0.9, fy=0.9)
        frame[20 : 20 + face.shape[0], 40 + i : 40 + i + face.shape[1]] = face
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    spans = [(face_video, 0.0, 1.0), (empty, 0.0, 0.9), (small, None, None), (two_faces_video, None, None), (face_video, 1.0, 3.0)]

    calls, real_detect = _count_calls(monkeypatch, "detect_faces")
    alone, alone_failures = _visual_records(spans, detect_batch=1)
    assert calls == [6] * 5
    calls[:] = []
    together, together_failures = _visual_records(spans, detect_batch=1000)
    assert sorted(calls) == [6, 24]  # four utterances of 640×360 frames in one call, the 320×240 one in another
    assert alone_failures == together_failures == [("u1", "visual")]
    assert "visual" not in together["u1"].features
    _assert_same_visual_features(together, alone, ("u0", "u2", "u3", "u4"))

    def refuse_shared_calls(self, frames):  # a shared call fails; each utterance's own frames pass
        calls.append(len(frames))
        if len(frames) > 6:
            raise RuntimeError("out of memory")
        return real_detect(self, frames)

    calls[:] = []
    monkeypatch.setattr(VisualExtractor, "detect_faces", refuse_shared_calls)
    retried, retried_failures = _visual_records(spans, detect_batch=999)
    assert calls == [24, 6, 6, 6, 6, 6] and retried_failures == [("u1", "visual")]
    for uid in ("u0", "u2", "u3", "u4"):
        np.testing.assert_array_equal(retried[uid].features["visual"], alone[uid].features["visual"])
