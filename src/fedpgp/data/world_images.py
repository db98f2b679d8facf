"""The offline world: small images of coloured, patterned shapes, rendered from a seed.

A class is a concept named by three plain English words, ``"{pattern} {colour} {shape}"``
(e.g. "striped red triangle"): 3 patterns x 6 colours x 5 shapes = 90 classes. Image ``i`` of a
split is rendered on demand from ``(seed, split, i)`` with pure numpy, so a world needs no files
and is the same on every machine.

Class order: label ``k`` has colour ``k mod 6``, shape ``k mod 5`` and pattern
``(k + k // 30) mod 3``. Any 6 consecutive labels therefore hold every colour, shape and
pattern, so the base classes (the first half of the labels) and the novel ones (the second half)
each contain every part, and a novel class can be named and recognised from parts seen in
training. A world of ``C < 90`` classes keeps the first ``C`` labels.

Styles (a colour cast, low contrast, blur, noise, ...) model client-specific capture conditions.
They are applied after rendering, keyed by a style id per class (see ``fedpgp.data.world``).
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

WORLD_VERSION = "world-v1"

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
MAX_CLASSES = len(COLOURS) * len(SHAPES) * len(PATTERNS)

# Hue of each colour on the [0, 1) wheel, in the order of COLOURS.
_HUES = (0.0, 0.075, 0.155, 0.34, 0.6, 0.78)
_SUPERSAMPLE = 3  # render at 3x and average: anti-aliased edges and stripes
STREAMS = {"train": 1, "val": 2, "test": 3, "pretrain": 4}


@dataclass(frozen=True)
class Concept:
    """One class of the world: a colour, a shape and a pattern (indices into the part tuples)."""

    colour: int
    shape: int
    pattern: int

    @property
    def name(self) -> str:
        """The class name, e.g. "striped red triangle"."""
        return f"{PATTERNS[self.pattern]} {COLOURS[self.colour]} {SHAPES[self.shape]}"


def concept(label: int) -> Concept:
    """The concept of label ``label`` in the world's fixed class order (module docstring)."""
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"world label {label} outside [0, {MAX_CLASSES})")
    return Concept(label % len(COLOURS), label % len(SHAPES), (label + label // 30) % len(PATTERNS))


def class_names(count: int = MAX_CLASSES) -> list[str]:
    """Names of the first ``count`` classes, index == label."""
    return [concept(label).name for label in range(count)]


def held_out_labels() -> list[int]:
    """Labels held out of pretraining: those whose part indices satisfy
    ``(colour + 2 * shape + pattern) mod 5 == 2``. That is 18 of the 90 classes, 9 base and 9
    novel, 3 per colour, 3 or 4 per shape, 6 per pattern; every part also appears in seen ones."""
    held_out = []
    for label in range(MAX_CLASSES):
        item = concept(label)
        if (item.colour + 2 * item.shape + item.pattern) % 5 == 2:
            held_out.append(label)
    return held_out


# ---------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1] of the supersampled pixel centres (y down, x right); read-only."""
    n = size * _SUPERSAMPLE
    axis = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int) -> np.ndarray:
    """Inside a regular polygon of circumradius 1 with a vertex pointing up."""
    inradius = math.cos(math.pi / sides)
    distance = np.full(u.shape, -np.inf)
    for k in range(sides):
        angle = math.pi / 2 + math.pi / sides + 2 * math.pi * k / sides
        distance = np.maximum(distance, u * math.cos(angle) + v * math.sin(angle))
    return distance <= inradius


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside a five-pointed star: radius interpolates between tips (1.0) and notches (0.42)."""
    angle = np.mod(np.arctan2(v, u) - math.pi / 2, 2 * math.pi / 5) / (2 * math.pi / 5)
    edge = 0.42 + 0.58 * np.abs(1.0 - 2.0 * angle)
    return np.hypot(u, v) <= edge


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 0.8
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.68
    if shape == "triangle":
        return _regular_polygon(u, v + 0.15, 3)
    if shape == "star":
        return _star(u, v)
    arm_u = (np.abs(u) <= 0.3) & (np.abs(v) <= 0.92)
    return arm_u | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.92))


def _pattern_mask(
    pattern: str, x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Where the pattern's marks are; periods are in output pixels, so patterns stay visible at
    every object size."""
    pixel = 2.0 / size
    angle = rng.uniform(0, math.pi)
    a = x * math.cos(angle) + y * math.sin(angle)
    b = -x * math.sin(angle) + y * math.cos(angle)
    if pattern == "striped":
        period = rng.uniform(4.0, 5.5) * pixel
        return np.mod(a / period + rng.uniform(), 1.0) < 0.5
    if pattern == "dotted":
        spacing = rng.uniform(4.5, 6.0) * pixel
        du = np.mod(a / spacing + rng.uniform(), 1.0) - 0.5
        dv = np.mod(b / spacing + rng.uniform(), 1.0) - 0.5
        return du * du + dv * dv <= 0.29**2
    return np.zeros(x.shape, dtype=bool)


def _downsample(image: np.ndarray) -> np.ndarray:
    n = image.shape[0] // _SUPERSAMPLE
    return image.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE, 3).mean(axis=(1, 3))


def render_concept(item: Concept, rng: np.random.Generator, size: int) -> np.ndarray:
    """One clean image of ``item`` as float RGB in [0, 1], shape (size, size, 3).

    Random: background grey level, tint and gradient; object position, size and rotation; the
    exact hue, saturation and brightness of the colour; pattern period, phase and angle; whether
    the pattern's marks are light or dark; sensor noise.
    """
    x, y = _grid(size)
    grey = rng.uniform(0.2, 0.8)
    tint = rng.uniform(-0.06, 0.06, size=3)
    slope = rng.uniform(0.0, 0.2)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = (x * math.cos(direction) + y * math.sin(direction)) * slope / 2
    image = np.clip(grey + tint + ramp[..., None], 0.0, 1.0)

    radius = rng.uniform(0.5, 0.85)
    cx, cy = rng.uniform(-1 + radius * 0.8, 1 - radius * 0.8, size=2)
    rotation = rng.uniform(0, 2 * math.pi)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * math.cos(rotation) + dy * math.sin(rotation)
    v = -dx * math.sin(rotation) + dy * math.cos(rotation)
    inside = _shape_mask(SHAPES[item.shape], u, v)

    hue = (_HUES[item.colour] + rng.uniform(-0.02, 0.02)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)))
    light_marks = rng.uniform() < 0.5
    marks = inside & _pattern_mask(PATTERNS[item.pattern], x, y, size, rng)
    mark_colour = colour * 0.25 + 0.75 if light_marks else colour * 0.22
    image[inside] = colour
    image[marks] = mark_colour

    image = _downsample(image)
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.035), size=image.shape)
    return np.clip(image, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Styles: client-specific capture conditions, each a function of (image, strength, rng)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(2.5 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(w * padded[i : i + image.shape[0]] for i, w in enumerate(kernel))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[:, i : i + image.shape[1]] for i, w in enumerate(kernel))


def _pixelate(image: np.ndarray, strength: float) -> np.ndarray:
    h, w = image.shape[:2]
    hh, ww = h - h % 2, w - w % 2
    blocks = image[:hh, :ww].reshape(hh // 2, 2, ww // 2, 2, 3).mean(axis=(1, 3))
    coarse = image.copy()
    coarse[:hh, :ww] = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    return (1 - strength) * image + strength * coarse


def _cast(gain: Sequence[float], offset: Sequence[float]) -> Callable[..., np.ndarray]:
    def apply(image: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
        return image * (1 + s * np.asarray(gain)) + s * np.asarray(offset)

    return apply


def _grey(image: np.ndarray) -> np.ndarray:
    return (image @ np.array([0.299, 0.587, 0.114]))[..., None]


STYLES: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "clean": lambda image, s, rng: image,
    "warm": _cast((0.3, 0.05, -0.4), (0.08, 0.03, 0.0)),
    "cool": _cast((-0.4, 0.0, 0.3), (0.0, 0.03, 0.08)),
    "faded": lambda image, s, rng: 0.5 + (image - 0.5) * (1 - 0.6 * s) + 0.1 * s,
    "dark": lambda image, s, rng: image ** (1 + 1.2 * s) * (1 - 0.3 * s),
    "blurry": lambda image, s, rng: _blur(image, 1.1 * s),
    "noisy": lambda image, s, rng: image + rng.normal(0.0, 0.15 * s, size=image.shape),
    "pixelated": lambda image, s, rng: _pixelate(image, s),
    "tinted": _cast((-0.3, 0.25, -0.3), (0.0, 0.06, 0.0)),
    "washed": lambda image, s, rng: image + 0.6 * s * (_grey(image) - image) + 0.08 * s,
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)


def apply_style(
    image: np.ndarray, style: int, strength: float, rng: np.random.Generator
) -> np.ndarray:
    """``image`` (float RGB in [0, 1]) seen under style ``style`` (an index of STYLE_NAMES)."""
    return np.clip(STYLES[STYLE_NAMES[style]](image, strength, rng), 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] to uint8, rounding half up."""
    return np.floor(image * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# An ImageSource


class WorldImages:
    """Images of the world, rendered on demand: item ``i`` depends only on ``(seed, stream, i)``,
    its label and its class's style. Implements fedpgp.data's ``ImageSource`` protocol."""

    def __init__(
        self,
        labels: np.ndarray,
        *,
        seed: int,
        stream: str,
        image_size: int = 32,
        class_styles: np.ndarray | None = None,
        style_strength: float = 1.0,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed = int(seed)
        self.stream = stream
        self.image_size = int(image_size)
        count = int(self.labels.max()) + 1 if self.labels.size else 0
        styles = np.zeros(count, dtype=np.int64) if class_styles is None else class_styles
        self.class_styles = np.asarray(styles, dtype=np.int64)
        self.style_strength = float(style_strength)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def render(self, index: int) -> np.ndarray:
        """Item ``index`` as a uint8 array (H, W, 3)."""
        if not 0 <= index < len(self):
            raise IndexError(f"world image {index} outside [0, {len(self)})")
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, STREAMS[self.stream], index])
        image = render_concept(concept(label), rng, self.image_size)
        style = int(self.class_styles[label])
        if style:
            image = apply_style(image, style, self.style_strength, rng)
        return to_uint8(image)

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.render(int(index)))

    def array(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Items ``indices`` (default: all) as a uint8 array (N, H, W, 3)."""
        chosen = range(len(self)) if indices is None else indices
        rows = [self.render(int(i)) for i in chosen]
        if not rows:
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return np.stack(rows)

    def fingerprint(self) -> str:
        """World version plus every parameter that decides the pixels."""
        digest = hashlib.sha256()
        for part in (
            WORLD_VERSION,
            f"{self.seed}:{self.stream}:{self.image_size}:{self.style_strength!r}",
            self.labels.tobytes(),
            self.class_styles.tobytes(),
        ):
            digest.update(part if isinstance(part, bytes) else part.encode())
        return f"{WORLD_VERSION}:{digest.hexdigest()}"
