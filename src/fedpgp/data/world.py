"""Dataset ``world``: the offline world of ``fedpgp.data.world_images``, no files needed.

Styles: every base class (label < ceil(C/2), the split rule of ``fedpgp.data.splits``) is seen
under one style (a colour cast, low contrast, blur, noise, ...), drawn once from the world seed
so that the styles are spread evenly over the base classes; novel classes stay clean, as the
world looked in pretraining. The style is thus a function of the class, and every client of a
label partition sees the styles of the classes it owns, in training and in its local test set;
``domains`` holds the style id of every image and ``domain_names`` names the styles in use
(``"clean"`` first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpgp.data.datasets import DatasetSplits, LabeledSet, register
from fedpgp.data.splits import base_novel_split
from fedpgp.data.world_images import (
    COLOURS,
    MAX_CLASSES,
    PATTERNS,
    SHAPES,
    STYLE_NAMES,
    WorldImages,
    class_names,
)
from fedpgp.errors import ConfigError

# Both halves of the class list hold every part once they have 6 classes each.
MIN_CLASSES = 2 * max(len(COLOURS), len(SHAPES), len(PATTERNS))
_STYLE_STREAM = 5  # seeds the style draw apart from the image streams


def _integer(name: str, value: object, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"world option '{name}': expected an integer, found {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"world option '{name}': expected {bound}{why}, found {value}")
    return int(value)


def class_styles(num_classes: int, styles: int, seed: int) -> np.ndarray:
    """Style id per class: base classes cycle through styles 1..``styles`` in an order drawn from
    ``seed``; novel classes get 0 (clean)."""
    base, _ = base_novel_split(num_classes)
    result = np.zeros(num_classes, dtype=np.int64)
    if styles:
        order = np.random.default_rng([seed, _STYLE_STREAM]).permutation(len(base))
        result[np.asarray(base)[order]] = 1 + np.arange(len(base)) % styles
    return result


@register("world")
def load_world(
    root: Path | None = None,
    classes: int = MAX_CLASSES,
    train_per_class: int = 32,
    val_per_class: int = 8,
    test_per_class: int = 50,
    image_size: int = 32,
    seed: int = 0,
    styles: int = len(STYLE_NAMES) - 1,
    style_strength: float = 0.5,
) -> DatasetSplits:
    """The world with ``classes`` classes (12..90), rendered at ``image_size`` pixels from
    ``seed``; ``styles`` styles (0 = all clean) spread over the base classes at
    ``style_strength`` (0..1). ``root`` is ignored: the world needs no files."""
    why = (
        f" (the world has {len(COLOURS)} colours x {len(SHAPES)} shapes x {len(PATTERNS)} "
        f"patterns; base and novel need {MIN_CLASSES // 2} classes each to hold every part)"
    )
    classes = _integer("classes", classes, MIN_CLASSES, MAX_CLASSES, why)
    train_per_class = _integer("train_per_class", train_per_class, 1)
    val_per_class = _integer("val_per_class", val_per_class, 0)
    test_per_class = _integer("test_per_class", test_per_class, 1)
    image_size = _integer("image_size", image_size, 8, 512)
    seed = _integer("seed", seed, 0)
    styles = _integer("styles", styles, 0, len(STYLE_NAMES) - 1)
    if isinstance(style_strength, bool) or not isinstance(style_strength, (int, float)):
        raise ConfigError(
            f"world option 'style_strength': expected a number, found {style_strength!r}"
        )
    if not 0.0 <= style_strength <= 1.0:
        raise ConfigError(f"world option 'style_strength': expected 0..1, found {style_strength}")

    per_class = class_styles(classes, styles, seed)

    def split(stream: str, count: int) -> LabeledSet:
        labels = np.repeat(np.arange(classes), count)
        images = WorldImages(
            labels,
            seed=seed,
            stream=stream,
            image_size=image_size,
            class_styles=per_class,
            style_strength=float(style_strength),
        )
        return LabeledSet(images, labels, per_class[labels])

    return DatasetSplits(
        name="world",
        classnames=class_names(classes),
        train=split("train", train_per_class),
        test=split("test", test_per_class),
        val=split("val", val_per_class) if val_per_class else None,
        domain_names=list(STYLE_NAMES[: styles + 1]),
    )
