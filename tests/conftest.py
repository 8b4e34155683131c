"""Session-wide fixtures: miniature corpora in the real IEMOCAP, MELD and manifest layouts, and a
module-scoped single torch thread for the training tests.

The trees are built once per test session with real synthetic media (erc.pipeline.synthetic); tests
that modify files must work on their own copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from erc.pipeline.synthetic import make_iemocap_tree, make_manifest_corpus, make_meld_tree

# The real MELD CSVs live in the shared folder beside the clone (../shared relative to the repo root).
MELD_CSV_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "meld"
MELD_CSV_NAMES = ("train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv")
MELD_MISSING_VIDEO = "train/dia1_utt2"  # left out of the MELD fixture, like train dia125_utt3 in the release


@pytest.fixture(scope="session")
def meld_csv_dir() -> Path:
    """The folder of the real MELD CSVs; tests that need it are skipped where it is absent."""
    if not all((MELD_CSV_DIR / name).is_file() for name in MELD_CSV_NAMES):
        pytest.skip(f"real MELD CSVs not found in {MELD_CSV_DIR}")
    return MELD_CSV_DIR


@pytest.fixture(scope="session")
def iemocap_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IEMOCAP_full_release with Sessions 1-5, one 4-utterance dialogue each (13 kept, 7 excluded)."""
    return make_iemocap_tree(tmp_path_factory.mktemp("iemocap") / "IEMOCAP_full_release")


@pytest.fixture(scope="session")
def meld_root(tmp_path_factory: pytest.TempPathFactory, meld_csv_dir: Path) -> Path:
    """MELD.Raw with the real rows of 2 dialogues x at most 3 utterances per split; one video left out."""
    root = tmp_path_factory.mktemp("meld") / "MELD.Raw"
    return make_meld_tree(root, meld_csv_dir, dialogues_per_split=2, max_utterances=3, missing=[MELD_MISSING_VIDEO])


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest corpus (train/dev/test) with per-utterance clips, spans, audio-only and media-less rows."""
    return make_manifest_corpus(tmp_path_factory.mktemp("manifest"))


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised RoBERTa-style encoder with its tokenizer, saved locally."""
    from erc.features.tiny_models import build_tiny_text_encoder

    return build_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text_encoder"), style="roberta")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (tiny tensors: threads only add synchronisation cost); restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
