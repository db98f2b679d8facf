"""Base / novel class split and k-shot sampling (docs/method.md section 4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedpgp.errors import ConfigError, DatasetError


def base_novel_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ceil(C/2) labels, novel = the rest (labels are already sorted)."""
    if num_classes < 1:
        raise ConfigError(f"base/novel split: expected at least 1 class, found {num_classes}")
    num_base = math.ceil(num_classes / 2)
    return list(range(num_base)), list(range(num_base, num_classes))


def sample_shots(
    labels: np.ndarray,
    classes: Sequence[int],
    shots: int,
    rng: np.random.Generator,
    classnames: Sequence[str] | None = None,
) -> np.ndarray:
    """`shots` indices per class drawn without replacement from `rng`; sorted."""
    if shots < 1:
        raise ConfigError(f"shots: expected a positive integer or null, found {shots}")
    labels = np.asarray(labels)
    chosen = []
    # Classes in sorted order so the draw does not depend on how the caller ordered them.
    for label in sorted(int(c) for c in classes):
        pool = np.flatnonzero(labels == label)
        if pool.size < shots:
            name = f" ('{classnames[label]}')" if classnames is not None else ""
            raise DatasetError(
                f"shots={shots}: class {label}{name} has only {pool.size} training "
                f"image(s); expected at least {shots}"
            )
        chosen.append(rng.choice(pool, size=shots, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def few_shot_indices(
    labels: np.ndarray,
    classes: Sequence[int],
    shots: int,
    seed: int,
    *,
    classnames: Sequence[str] | None = None,
) -> np.ndarray:
    """Sorted indices into `labels`: exactly `shots` per class of `classes`, drawn from `seed`.

    A class with fewer than `shots` images is a DatasetError naming the class.
    """
    return sample_shots(labels, classes, shots, np.random.default_rng(seed), classnames)
