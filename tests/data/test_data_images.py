"""Decoding images of every mode PIL opens to RGB with their real range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpgp.data.datasets import read_image, to_rgb


def test_a_16_bit_gradient_keeps_its_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    rgb = np.asarray(read_image(tmp_path / "ramp.png"))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected)
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    # Neither solid white nor clipped: the ramp runs from black to white.
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200


def test_a_16_bit_image_reads_like_its_8_bit_twin(tmp_path: Path) -> None:
    grey = np.random.default_rng(0).integers(0, 256, size=(16, 20), dtype=np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "wide.png")
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "narrow.png")
    assert np.array_equal(
        np.asarray(read_image(tmp_path / "wide.png")),
        np.asarray(read_image(tmp_path / "narrow.png")),
    )


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.fromarray(np.full((2, 2), 65535 // 2, dtype=np.int32)), 127),
        (Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)), 128),
        (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), 255),
        (Image.new("LA", (2, 2), (40, 255)), 40),
        (Image.new("P", (2, 2), 0), 0),
    ],
    ids=["I", "F", "CMYK", "LA", "P"],
)
def test_every_mode_becomes_rgb(image: Image.Image, expected: int) -> None:
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == expected
