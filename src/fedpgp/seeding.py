"""Seeds derived from the run seed: every random choice has its own named stream, so a round can
be replayed (or resumed) without carrying generator state from earlier rounds."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed determined by the run seed and the names of the stream."""
    text = "/".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch generator for the stream ``keys`` of run ``seed``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy generator for the stream ``keys`` of run ``seed``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def capture_rng() -> dict[str, Any]:
    """The global torch (CPU), numpy and Python RNG states. Every stream the run draws from is
    derived from the seed (fedpgp.seeding), so these only matter to code outside fedpgp that
    draws from the global generators; they are carried so that such code resumes exactly too."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the global RNGs to states captured by :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def check_rng(rng: dict[str, Any]) -> None:
    """Raise ValueError/TypeError unless ``rng`` can be restored; tries it on private
    generators, leaving the global ones alone."""
    torch.Generator().set_state(rng["torch"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.RandomState().set_state(
        (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss_next = rng["python"]
    random.Random().setstate((version, tuple(internal), gauss_next))
