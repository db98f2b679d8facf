"""The world's images are a pure function of (seed, split, index), and its class list is fixed."""

from __future__ import annotations

import numpy as np
import pytest

from fedpgp.data.world_images import (
    COLOURS,
    MAX_CLASSES,
    PATTERNS,
    SHAPES,
    STYLE_NAMES,
    WorldImages,
    class_names,
    concept,
    held_out_labels,
)


def _images(seed: int, stream: str = "test", **kwargs: object) -> WorldImages:
    return WorldImages(np.arange(12), seed=seed, stream=stream, **kwargs)


def test_same_seed_same_pixels() -> None:
    first, second = _images(3).array(), _images(3).array()
    assert first.dtype == np.uint8 and first.shape == (12, 32, 32, 3)
    assert np.array_equal(first, second)
    assert np.array_equal(np.asarray(_images(3)[5]), first[5])
    assert _images(3).fingerprint() == _images(3).fingerprint()


def test_other_seed_or_split_other_pixels() -> None:
    base = _images(3)
    for other in (_images(4), _images(3, stream="train")):
        assert not np.array_equal(base.array(), other.array())
        assert other.fingerprint() != base.fingerprint()


def test_image_size_and_index_bounds() -> None:
    images = _images(0, image_size=48)
    assert images.render(0).shape == (48, 48, 3)
    with pytest.raises(IndexError):
        images.render(12)


def test_every_style_changes_the_image() -> None:
    clean = _images(1).array()
    for style in range(1, len(STYLE_NAMES)):
        styled = _images(1, class_styles=np.full(12, style)).array()
        assert not np.array_equal(styled, clean), STYLE_NAMES[style]
    weak = _images(1, class_styles=np.full(12, 1), style_strength=0.0).array()
    assert np.array_equal(weak, clean)


def test_class_names_are_three_known_parts() -> None:
    names = class_names()
    assert len(names) == MAX_CLASSES >= 60
    assert len(set(names)) == MAX_CLASSES
    for name in names:
        pattern, colour, shape = name.split()
        assert (pattern, colour, shape) in [
            (p, c, s) for p in PATTERNS for c in COLOURS for s in SHAPES
        ]
    assert class_names(20) == names[:20]


@pytest.mark.parametrize("count", [12, 13, 60, 77, 90])
def test_base_and_novel_each_hold_every_part(count: int) -> None:
    base_count = (count + 1) // 2
    for labels in (range(base_count), range(base_count, count)):
        parts = [concept(k) for k in labels]
        assert {p.colour for p in parts} == set(range(len(COLOURS)))
        assert {p.shape for p in parts} == set(range(len(SHAPES)))
        assert {p.pattern for p in parts} == set(range(len(PATTERNS)))


def test_held_out_classes_leave_every_part_seen() -> None:
    held_out = held_out_labels()
    assert len(held_out) == 18
    assert sum(k < MAX_CLASSES // 2 for k in held_out) == 9
    seen = [concept(k) for k in range(MAX_CLASSES) if k not in held_out]
    assert {p.colour for p in seen} == set(range(len(COLOURS)))
    assert {p.shape for p in seen} == set(range(len(SHAPES)))
    assert {p.pattern for p in seen} == set(range(len(PATTERNS)))
