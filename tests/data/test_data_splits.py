"""Base / novel split and k-shot sampling."""

from __future__ import annotations

import numpy as np
import pytest

from fedpgp.data import base_novel_split, few_shot_indices
from fedpgp.errors import ConfigError, DatasetError

LABELS = np.repeat(np.arange(5), [20, 18, 25, 16, 30])


def test_base_novel_for_five_classes() -> None:
    assert base_novel_split(5) == ([0, 1, 2], [3, 4])


@pytest.mark.parametrize(("count", "base"), [(1, 1), (2, 1), (10, 5), (101, 51), (100, 50)])
def test_base_is_the_first_half_rounded_up(count: int, base: int) -> None:
    first, rest = base_novel_split(count)
    assert first == list(range(base)) and rest == list(range(base, count))


def test_base_novel_needs_a_class() -> None:
    with pytest.raises(ConfigError, match="at least 1 class"):
        base_novel_split(0)


def test_few_shot_gives_exactly_k_per_class_sorted() -> None:
    chosen = few_shot_indices(LABELS, [0, 1, 2], shots=16, seed=3)
    assert np.all(np.diff(chosen) > 0)
    assert np.bincount(LABELS[chosen], minlength=5).tolist() == [16, 16, 16, 0, 0]


def test_few_shot_is_reproducible_and_depends_on_the_seed() -> None:
    first = few_shot_indices(LABELS, [0, 1, 2, 3, 4], shots=8, seed=7)
    assert np.array_equal(first, few_shot_indices(LABELS, [4, 3, 2, 1, 0], shots=8, seed=7))
    assert not np.array_equal(first, few_shot_indices(LABELS, [0, 1, 2, 3, 4], shots=8, seed=8))


def test_few_shot_names_the_class_that_is_too_small() -> None:
    names = ["a", "b", "c", "d", "e"]
    with pytest.raises(DatasetError, match=r"class 3 \('d'\) has only 16"):
        few_shot_indices(LABELS, [0, 3], shots=17, seed=0, classnames=names)


def test_few_shot_rejects_non_positive_shots() -> None:
    with pytest.raises(ConfigError, match="shots"):
        few_shot_indices(LABELS, [0], shots=0, seed=0)
