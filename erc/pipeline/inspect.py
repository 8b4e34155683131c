"""`erc inspect`: what a shard set holds, what is missing, what failed, and where it came from."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from erc.errors import ShardError
from erc.pipeline.shards import build_index


def inspect_shards(directory: Path) -> dict[str, Any]:
    """Summarize a shard set directory (finished or interrupted) as one JSON-able dict."""
    directory = Path(directory)
    plan_path = directory / "plan.json"
    if not plan_path.exists() and not (directory / "index.json").exists():
        raise ShardError(f"{directory}: not an erc shard set (no plan.json or index.json)")
    index = build_index(directory, write=False)
    planned = json.loads(plan_path.read_text())["shards"] if plan_path.exists() else {}
    shards = index["shards"]

    per_split: dict[str, Counter] = {}
    per_label: dict[str, Counter] = {}
    present: Counter = Counter()
    for shard in shards:
        per_split.setdefault("utterances", Counter()).update(shard["splits"])
        for split, labels in shard["labels"].items():
            per_label.setdefault(split, Counter()).update(labels)
        present.update(shard["present"])
    dialogues: Counter = Counter()
    for shard in shards:
        dialogues.update(shard["dialogue_splits"])
    total = sum(s["utterances"] for s in shards)
    failures = [f for s in shards for f in s["failures"]]
    missing = sorted(set(planned) - {s["file"] for s in shards})
    return {
        "directory": str(directory),
        "complete": bool(shards) and not missing,
        "missing_shards": missing,
        "shards": {"done": len(shards), "planned": len(planned) or len(shards)},
        "dataset": index.get("dataset"),
        "utterances": total,
        "dialogues": dict(dialogues),
        "splits": dict(per_split.get("utterances", Counter())),
        "labels": {split: dict(sorted(c.items())) for split, c in sorted(per_label.items())},
        "label_names": index.get("label_names"),
        "dims": index.get("dims"),
        "missing": {m: total - present[m] for m in (index.get("dims") or {})},
        "failures": {
            "count": len(failures),
            "utterances": len({f["item"] for f in failures}),
            "by_modality": dict(Counter(f["modality"] for f in failures)),
            "by_type": dict(Counter(f.get("type", "MediaError") for f in failures)),
            "items": failures,
        },
        "provenance": {
            "config_hash": index.get("config_hash"),
            "config": index.get("config"),
            "weights": index.get("weights"),
            "versions": index.get("versions"),
        },
    }
