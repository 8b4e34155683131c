"""The paired dialogue bootstrap that says whether a score difference outlasts the test set's size."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from erc.pipeline.evaluate import dialogue_bootstrap_difference


def _test_set(dialogues: int = 60, length: int = 8, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, dialogues * length)
    dialogue_ids = np.repeat([f"d{i}" for i in range(dialogues)], length)
    reference = np.where(rng.random(len(true)) < 0.6, true, rng.integers(0, classes, len(true)))
    return true, reference, dialogue_ids, rng


def test_identical_predictions_differ_by_nothing() -> None:
    true, reference, dialogues, _ = _test_set()
    difference, low, high = dialogue_bootstrap_difference(true, np.stack([reference, reference]), reference, dialogues,
                                                          resamples=200)
    assert (difference, low, high) == (0.0, 0.0, 0.0)


def test_a_better_model_everywhere_is_resolved_and_the_estimate_is_the_full_set_difference() -> None:
    true, reference, dialogues, rng = _test_set()
    better = np.where(rng.random(len(true)) < 0.5, true, reference)  # fixes about half the reference's errors
    difference, low, high = dialogue_bootstrap_difference(true, better, reference, dialogues, resamples=500)
    expected = 100 * (f1_score(true, better, average="weighted") - f1_score(true, reference, average="weighted"))
    assert difference == pytest.approx(expected)
    assert 0 < low < difference < high


def test_the_seeds_of_each_side_are_averaged() -> None:
    true, reference, dialogues, rng = _test_set()
    runs = np.stack([np.where(rng.random(len(true)) < p, true, reference) for p in (0.1, 0.5)])
    references = np.stack([reference, np.where(rng.random(len(true)) < 0.3, true, reference)])
    mean_f1 = lambda predicted: np.mean([f1_score(true, p, average="weighted") for p in predicted])  # noqa: E731
    difference, _, _ = dialogue_bootstrap_difference(true, runs, reference, dialogues, resamples=100)
    assert difference == pytest.approx(100 * (mean_f1(runs) - mean_f1([reference])))
    difference, _, _ = dialogue_bootstrap_difference(true, runs, references, dialogues, resamples=100)
    assert difference == pytest.approx(100 * (mean_f1(runs) - mean_f1(references)))


def test_utterances_of_a_dialogue_are_resampled_together() -> None:
    """A gain made in a few whole dialogues is less certain than the same gain spread over the corpus:
    resampling utterances one by one would hide that."""
    true, reference, dialogues, _ = _test_set(dialogues=60, length=8)
    in_five_dialogues = reference.copy()
    in_five_dialogues[: 5 * 8] = true[: 5 * 8]  # every utterance of the first five dialogues right
    one_per_dialogue = np.arange(len(true)).astype(str)  # the same utterances, each its own "dialogue"
    _, low, high = dialogue_bootstrap_difference(true, in_five_dialogues, reference, dialogues, resamples=500)
    _, low_flat, high_flat = dialogue_bootstrap_difference(true, in_five_dialogues, reference, one_per_dialogue,
                                                           resamples=500)
    assert high - low > 1.5 * (high_flat - low_flat)


def test_the_seed_makes_it_repeatable_and_mismatched_inputs_are_refused() -> None:
    true, reference, dialogues, rng = _test_set()
    run = np.where(rng.random(len(true)) < 0.2, true, reference)
    first = dialogue_bootstrap_difference(true, run, reference, dialogues, resamples=200, seed=3)
    assert dialogue_bootstrap_difference(true, run, reference, dialogues, resamples=200, seed=3) == first
    with pytest.raises(ValueError, match="same utterances"):
        dialogue_bootstrap_difference(true, run[:-1], reference, dialogues)
