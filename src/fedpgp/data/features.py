"""Image features of the frozen encoder, computed once per image (and per stored view)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor

from ..seeding import derive_seed
from .datasets import ImageSource

Encoder = Callable[[Tensor], Tensor]
Transform = Callable[[Image.Image], Tensor]


def encode_images(
    encoder: Encoder,
    images: ImageSource,
    indices: Sequence[int],
    transform: Transform,
    batch_size: int = 256,
) -> Tensor:
    """Features (n, E) of ``images[i]`` for i in ``indices``, in that order, on the CPU."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = torch.stack([transform(images[i]) for i in indices[start : start + batch_size]])
            chunks.append(encoder(batch).float().cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def encode_views(
    encoder: Encoder,
    images: ImageSource,
    indices: Sequence[int],
    transform: Transform,
    views: int,
    batch_size: int = 256,
) -> Tensor:
    """Features (views, n, E) of ``views`` random augmentations of each image. View v draws its
    crops from a stream seeded by v alone, so stored views can be shared by every run."""
    stacked = []
    for view in range(views):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(0, "view", view))
            stacked.append(encode_images(encoder, images, indices, transform, batch_size))
    return torch.stack(stacked)
