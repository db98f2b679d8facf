"""Dataset `world`: registered, validated options, styles on base classes only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedpgp.data.world  # noqa: F401 - registers the dataset
from fedpgp.data.datasets import ImageSource, load_dataset
from fedpgp.data.splits import base_novel_split
from fedpgp.data.world import load_world
from fedpgp.errors import ConfigError


def test_registered_and_loaded_through_the_registry(tmp_path: Path) -> None:
    world = load_dataset("world", tmp_path, classes=60, train_per_class=4, test_per_class=2)
    assert world.num_classes == 60 and len(world.classnames) == 60
    assert len(world.train) == 240 and len(world.test) == 120 and len(world.val) == 480
    assert isinstance(world.train.images, ImageSource)
    assert world.train.images[0].mode == "RGB" and world.train.images[0].size == (32, 32)
    assert (
        world.fingerprint()
        == load_dataset(
            "world", tmp_path, classes=60, train_per_class=4, test_per_class=2
        ).fingerprint()
    )


def test_styles_are_per_base_class_and_novel_is_clean() -> None:
    world = load_world(train_per_class=2, test_per_class=1, val_per_class=0)
    assert world.val is None
    base, novel = base_novel_split(world.num_classes)
    style_of = np.zeros(world.num_classes, dtype=np.int64)
    style_of[world.train.labels] = world.train.domains
    assert np.array_equal(style_of[world.test.labels], world.test.domains)
    assert (style_of[novel] == 0).all()
    counts = np.bincount(style_of[base], minlength=len(world.domain_names))
    assert counts[0] == 0 and counts[1:].max() - counts[1:].min() <= 1
    clean = load_world(train_per_class=2, test_per_class=1, val_per_class=0, styles=0)
    assert (clean.train.domains == 0).all()
    assert clean.fingerprint() != world.fingerprint()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"classes": 91}, "classes"),
        ({"classes": 11}, "classes"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"test_per_class": "50"}, "test_per_class"),
        ({"image_size": 2.5}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"styles": 10}, "styles"),
        ({"style_strength": 1.5}, "style_strength"),
        ({"seed": True}, "seed"),
    ],
)
def test_bad_options_are_config_errors(options: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_world(**options)


def test_unknown_option_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="colours"):
        load_dataset("world", tmp_path, colours=3)
