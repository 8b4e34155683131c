"""Compare two erc shard sets written from the same corpus (docker/smoke.sh: host vs container).

    python docker/compare_shards.py HOST_SET CONTAINER_SET [--atol 1e-4]

Checks: same dialogues in the same shards and splits, same utterance metadata (ids, speakers, texts,
labels), same presence masks and visual frame masks, same label names, dims and extraction config,
and every feature (text, audio, visual, visual_frames) equal within ``--atol``. The one allowed
config difference is where the text encoder lies (a site-packages path on each side): its sha256
must match. Prints one line per check and the largest difference per modality; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np

from erc.pipeline.shards import ShardSet


def _without_encoder_path(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config with the text encoder's location blanked, and the paths that were blanked."""
    config = copy.deepcopy(config)
    paths = []
    if isinstance(config.get("text"), dict) and "model" in config["text"]:
        paths.append(config["text"]["model"])
        config["text"]["model"] = "<text encoder>"
    text_weights = config.get("weights", {}).get("text")
    if isinstance(text_weights, dict) and "model" in text_weights:
        paths.append(text_weights["model"])
        text_weights["model"] = "<text encoder>"
    return config, paths


def compare(host_dir: Path, other_dir: Path, atol: float) -> tuple[list[str], dict[str, float]]:
    """Problems found (empty when the sets agree) and the largest absolute difference per modality."""
    a, b = ShardSet(host_dir), ShardSet(other_dir)
    problems: list[str] = []
    for key in ("label_names", "dims", "modalities"):
        if getattr(a, key) != getattr(b, key):
            problems.append(f"{key}: {getattr(a, key)} != {getattr(b, key)}")
    config_a, paths_a = _without_encoder_path(a.config)
    config_b, paths_b = _without_encoder_path(b.config)
    if config_a != config_b:
        problems.append(f"config differs beyond the text encoder's path:\n  host      {config_a}\n  container {config_b}")
    if {Path(p).name for p in paths_a} != {Path(p).name for p in paths_b}:
        problems.append(f"text encoders differ: {paths_a} vs {paths_b}")
    if a.config.get("weights", {}).get("text", {}).get("sha256") is None:
        problems.append("no sha256 of the text encoder recorded")
    # Package versions recorded in the shards: reported, not required (a patch release may not
    # change a single feature; the features below decide).
    va, vb = a.index.get("versions") or {}, b.index.get("versions") or {}
    differ = {k: (va.get(k), vb.get(k)) for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)}
    print(f"compare: package versions recorded in the shards: "
          f"{'identical (' + str(len(va)) + ' packages)' if not differ else f'differ: {differ}'}")

    layout = lambda s: [(r.shard.name, r.dialogue_id, r.split, len(r)) for r in s.refs]  # noqa: E731
    if layout(a) != layout(b):
        problems.append(f"dialogue layout differs: {layout(a)} vs {layout(b)}")
        return problems, {}

    max_diff: dict[str, float] = {}
    utterances = 0
    for ra, rb in zip(a.refs, b.refs):
        da, db = a.load(ra, frames=True), b.load(rb, frames=True)
        utterances += len(ra)
        for col in ("utterance_id", "dialogue_id", "split", "speaker", "text", "utterance_index", "speaker_index", "label"):
            if list(da[col]) != list(db[col]):
                problems.append(f"{ra.dialogue_id}: column {col} differs")
        for m in a.modalities:
            if not np.array_equal(da["present"][m], db["present"][m]):
                problems.append(f"{ra.dialogue_id}: present/{m} differs")
        features = dict(da["features"]), dict(db["features"])
        if "visual_frames" in da:
            if not np.array_equal(da["visual_frame_mask"], db["visual_frame_mask"]):
                problems.append(f"{ra.dialogue_id}: visual_frame_mask differs")
            features[0]["visual_frames"], features[1]["visual_frames"] = da["visual_frames"], db["visual_frames"]
        for m, fa in features[0].items():
            fb = features[1][m]
            if fa.dtype != np.float32 or fb.dtype != np.float32 or fa.shape != fb.shape:
                problems.append(f"{ra.dialogue_id}: {m} is {fa.dtype}{fa.shape} vs {fb.dtype}{fb.shape}")
                continue
            diff = float(np.max(np.abs(fa - fb))) if fa.size else 0.0
            max_diff[m] = max(max_diff.get(m, 0.0), diff)
    for m, diff in max_diff.items():
        if not diff <= atol:
            problems.append(f"{m}: features differ by up to {diff:.3g} > {atol:g}")
    a.close()
    b.close()
    print(f"compare: {len(a.refs)} dialogues, {utterances} utterances, modalities {', '.join(a.modalities)}")
    return problems, max_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host", type=Path)
    parser.add_argument("container", type=Path)
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()
    problems, max_diff = compare(args.host, args.container, args.atol)
    for m, diff in max_diff.items():
        print(f"compare: max |host - container| {m:<14} {diff:.3g}")
    if problems:
        for p in problems:
            print(f"compare: MISMATCH {p}")
        sys.exit(1)
    print(f"compare: OK: same utterances, masks and config; features equal within {args.atol:g}")


if __name__ == "__main__":
    main()
