"""Helpers shared by the tests: a tiny dataset on disk in CoOp's real layout, whose classes
differ by colour so that a prompt can learn them, and the overrides of a fast tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fedpgp.data.coop import LAYOUTS

TINY_CLASSES = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "pink",
    "brown",
]


def write_tiny_dtd(
    root: Path,
    classes: list[str] = TINY_CLASSES,
    train: int = 6,
    test: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """A DTD-layout dataset (dtd/images/<class>/*.jpg + split_zhou_DescribableTextures.json)
    whose class c is a noisy image of a colour unique to c."""
    return write_tiny_coop(root, "dtd", classes, train, test, size, seed)


def write_tiny_coop(
    root: Path,
    layout: str,
    classes: list[str] = TINY_CLASSES,
    train: int = 6,
    test: int = 4,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """The tiny dataset of :func:`write_tiny_dtd` in the CoOp layout of dataset ``layout``
    (e.g. oxford_pets: oxford_pets/images/ + split_zhou_OxfordPets.json)."""
    rng = np.random.default_rng(seed)
    spec = LAYOUTS[layout]
    base = root / spec.folder
    images = base / spec.image_dir
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        folder = images / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(train + test):
            pixels = np.clip(colour + rng.normal(0, 20, size=(size, size, 3)), 0, 255)
            rel = f"{name}/{name}_{i:03d}.jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(images / rel, quality=95)
            split["train" if i < train else "test"].append([rel, label, name])
    (base / spec.split_file).write_text(json.dumps(split))
    return root


def tiny_overrides(data_root: Path, **extra: object) -> list[str]:
    """--set overrides for a fast run on the tiny dataset and the tiny random CLIP."""
    values = {
        "dataset.name": "dtd",
        "dataset.root": str(data_root),
        "backbone.name": "fedpgp-tiny",
        "backbone.pretrained": "null",
        "num_clients": 2,
        "shots": 4,
        "rounds": 3,
        "n_ctx": 4,
        "fedpgp.rank": 2,
        "local_epochs": 1,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]
