"""The shipped world CLIP: hash-checked, small, knows every word of the world, and zero-shot
classifies the world far above chance."""

from __future__ import annotations

import json

import pytest

from fedpgp.backbone import PACKAGE_WEIGHTS, BackboneSpec, FrozenCLIP
from fedpgp.data.world_images import MAX_CLASSES, class_names
from fedpgp.errors import BackboneError
from fedpgp.world.pretrain import zero_shot_accuracy


@pytest.fixture(scope="module")
def world_clip() -> FrozenCLIP:
    return FrozenCLIP.load(BackboneSpec())


def test_packaged_weights_are_registered_and_small() -> None:
    entry = json.loads((PACKAGE_WEIGHTS / "weights.json").read_text())["fedpgp-world:world"]
    assert (PACKAGE_WEIGHTS / entry["file"]).stat().st_size <= 8 * 1024 * 1024


def test_every_class_word_is_known(world_clip: FrozenCLIP) -> None:
    names = class_names()
    ids, eot = world_clip.tokenize(names)
    # [SOS] pattern colour shape [EOT]: one known token per word
    assert (eot == 4).all() and (ids[:, 1:4] > 0).all()
    prompts = [" ".join(["X"] * 16 + [name]) + "." for name in names]
    world_clip.tokenize(prompts + [f"a photo of a {name}." for name in names])
    with pytest.raises(BackboneError, match="no token"):
        world_clip.tokenize(["a photo of a zebra."])


def test_zero_shot_is_far_above_chance(world_clip: FrozenCLIP) -> None:
    accuracy = zero_shot_accuracy(world_clip, per_class=3, seed=1)
    chance = 100 / MAX_CLASSES
    assert accuracy["all"] > 20 * chance
    assert accuracy["held_out"] > 10 * chance
