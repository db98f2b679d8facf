"""Seeds derived from the run seed: every random choice has its own named stream, so a round can
be replayed (or resumed) without carrying generator state from earlier rounds."""

from __future__ import annotations

import hashlib

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
