"""Procedural shapes with exact captions, and a reader that scores images against them.

Each image is one shape on a plain white square canvas, drawn with 4x4 supersampling (anti-aliased):

- shapes: circle, square, triangle (isosceles, apex up, as wide as it is tall);
- colours (far apart in RGB, none near the white background)::

      red (220, 30, 30)     green (30, 160, 40)    blue (30, 60, 220)
      yellow (240, 200, 0)  purple (150, 40, 180)  cyan (0, 190, 200)

- sizes: small (bounding box 0.18 of the image side) and large (0.30);
- positions: the cells of a 3x3 grid, named top left, top, top right, left, centre, right,
  bottom left, bottom, bottom right; the shape's bounding-box centre sits at the cell centre,
  jittered by at most 1.6% of the side (1 px at 64 px), so a large shape in a corner still fits.

Captions read "a small red circle at the top left", "a large blue square in the centre".

The reader (``read_shape``) needs no network: the background is the median of the border pixels,
the colour the nearest palette colour to the median of the most saturated foreground pixels, a
pixel's foreground weight its projection onto (colour - background), and shape and size the best
of the six anti-aliased templates (3 shapes x 2 sizes) placed at the weight's centroid, by L1
distance. Position is the grid cell of the best template's centre. It is exact on the generated
images and tolerates blur and noise; fields are None where nothing is found. ``score_attributes``
compares a reading with a caption, for scoring a model's samples.

numpy and PIL only: ``ldm sweep`` uses this without torch.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 0),
    "purple": (150, 40, 180),
    "cyan": (0, 190, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.30}  # bounding-box side / image side
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
BACKGROUND = (255, 255, 255)
JITTER = 0.016  # largest shift of the shape's centre, as a fraction of the image side
ATTRIBUTES = ("colour", "shape", "size", "position")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; fields are None where unknown (a reading that found nothing, a partial caption)."""

    colour: Optional[str]
    shape: Optional[str]
    size: Optional[str]
    position: Optional[str]

    @property
    def caption(self) -> str:
        """'a small red circle at the top left'; 'in the centre' for the centre cell."""
        if None in (self.colour, self.shape, self.size, self.position):
            raise ValueError(f"{self} has unknown fields; only a full spec has a caption")
        where = "in the centre" if self.position == "centre" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


@dataclass(frozen=True)
class ShapeReading(ShapeSpec):
    """A ``ShapeSpec`` read from an image, with ``fit`` in [0, 1]: 1 - L1 distance of the image's
    foreground weights to the chosen template / (their masses summed). 1 is a perfect match."""

    fit: float = 0.0


def all_specs() -> list[ShapeSpec]:
    """Every combination: 6 colours x 3 shapes x 2 sizes x 9 positions = 324."""
    return [ShapeSpec(c, s, z, p) for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]


def _cell_centre(position: str, side: int) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return ((col + 0.5) * side / 3, (row + 0.5) * side / 3)  # (x, y) in pixels


def shape_mask(shape: str, size: str, centre: tuple[float, float], side: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (side, side) float32, of a shape whose bounding box is centred at ``centre``."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {', '.join(SHAPES)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r}; allowed: {', '.join(SIZES)}")
    k = _SUPERSAMPLE
    canvas = Image.new("L", (side * k, side * k), 0)
    half = SIZES[size] * side * k / 2
    cx, cy = centre[0] * k, centre[1] * k
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=255)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0  # (side, side)


def render(spec: ShapeSpec, side: int = 64, rng: Optional[np.random.Generator] = None) -> Image.Image:
    """The RGB image of ``spec``, ``side`` x ``side``; ``rng`` jitters the centre (none without it)."""
    if spec.colour not in COLOURS:
        raise ValueError(f"colour={spec.colour!r}; allowed: {', '.join(COLOURS)}")
    if spec.position not in POSITIONS:
        raise ValueError(f"position={spec.position!r}; allowed: {', '.join(POSITIONS)}")
    x, y = _cell_centre(spec.position, side)
    if rng is not None:
        x, y = np.array([x, y]) + rng.uniform(-JITTER, JITTER, size=2) * side
    alpha = shape_mask(spec.shape, spec.size, (x, y), side)[..., None]  # (H, W, 1)
    pixels = alpha * np.array(COLOURS[spec.colour], np.float32) + (1 - alpha) * np.array(BACKGROUND, np.float32)
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def generate(n: int, side: int = 64, seed: int = 0) -> Iterator[tuple[Image.Image, str, ShapeSpec]]:
    """``n`` (image, caption, spec) triples, balanced: each pass over the 324 specs is a fresh shuffle."""
    if side < 16:
        raise ValueError(f"side={side} is too small to draw shapes; use 16 or more (32 or 64)")
    rng = np.random.default_rng(seed)
    specs = all_specs()
    for start in range(0, n, len(specs)):
        for i in rng.permutation(len(specs))[: n - start]:
            spec = specs[i]
            yield render(spec, side, rng), spec.caption, spec


# --- the reader -------------------------------------------------------------------------------

_PALETTE = np.array(list(COLOURS.values()), np.float32)  # (K, 3)
_FLOOR = 0.25  # foreground weights below this count as background
_PALETTE_GAP = min(float(np.linalg.norm(a - b)) for a, b in itertools.combinations(_PALETTE, 2))


def _as_array(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] != array.shape[1]:
        raise ValueError(f"image of shape {array.shape}: give a square RGB image, (H, H, 3) uint8 or a PIL image")
    return array  # (H, W, 3) in 0..255


def _nothing(fit: float = 0.0) -> ShapeReading:
    return ShapeReading(None, None, None, None, fit)


def read_shape(image: Union[Image.Image, np.ndarray]) -> ShapeReading:
    """Read colour, shape, size and position from a square RGB image (PIL or (H, H, 3) uint8 array).

    Fields are None when no foreground is found; ``colour`` is None when the foreground colour is
    further from every palette colour than the palette's closest pair are from each other.
    """
    pixels = _as_array(image)  # (H, W, 3)
    side = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (4H, 3)
    background = np.median(border, axis=0)  # (3,)
    diff = pixels - background  # (H, W, 3)
    strength = np.linalg.norm(diff, axis=2)  # (H, W)
    peak = float(np.percentile(strength, 99.5))
    small_area = (SIZES["small"] * side) ** 2 * 0.5  # the smallest template: a small triangle
    core = strength >= max(60.0, 0.7 * peak)  # (H, W) bool
    if core.sum() < 0.15 * small_area:
        return _nothing()
    estimate = np.median(pixels[core], axis=0)  # (3,)
    distances = np.linalg.norm(_PALETTE - estimate, axis=1)  # (K,)
    colour = list(COLOURS)[int(distances.argmin())] if distances.min() <= _PALETTE_GAP else None

    direction = estimate - background  # (3,)
    weight = np.clip(diff @ direction / float(direction @ direction), 0.0, 1.0)  # (H, W)
    # weights of background noise would pull the centroid towards the middle: drop those under
    # _FLOOR, or under 4 standard deviations of the border's noise (a robust estimate, 1.4826 MAD)
    border_weight = (border - background) @ direction / float(direction @ direction)  # (4H,)
    noise = 1.4826 * float(np.median(np.abs(border_weight - np.median(border_weight))))
    floor = max(_FLOOR, 4 * noise)
    weight[weight < floor] = 0.0
    mass = float(weight.sum())
    if mass < 0.15 * small_area:
        return _nothing()
    ys, xs = np.mgrid[0:side, 0:side] + 0.5  # pixel centres
    centroid = (float((weight * xs).sum() / mass), float((weight * ys).sum() / mass))

    best = None
    for shape, size in itertools.product(SHAPES, SIZES):
        # a triangle's centroid lies a sixth of its height below its bounding-box centre
        dy = SIZES[size] * side / 6 if shape == "triangle" else 0.0
        centre = (centroid[0], centroid[1] - dy)
        template = shape_mask(shape, size, centre, side)  # (H, W)
        template[template < floor] = 0.0
        fit = 1.0 - float(np.abs(weight - template).sum()) / (mass + float(template.sum()))
        if best is None or fit > best[0]:
            best = (fit, shape, size, centre)
    fit, shape, size, (x, y) = best
    col = min(max(int(x // (side / 3)), 0), 2)
    row = min(max(int(y // (side / 3)), 0), 2)
    return ShapeReading(colour, shape, size, POSITIONS[row * 3 + col], fit)


_POSITION_WORDS = sorted(POSITIONS + ("center",), key=len, reverse=True)


def parse_caption(caption: str, *, partial: bool = False) -> Optional[ShapeSpec]:
    """The attributes a shapes caption names ("center" reads as "centre").

    A caption of the shapes set names all four; for any other caption this returns None (so
    ``parse_caption(p) is not None`` tells shapes prompts apart), unless ``partial``, which returns
    a spec with None for each attribute not named ("a red thing" -> colour red).
    """
    text = " ".join(re.findall(r"[a-z]+", caption.lower()))

    def find(words) -> Optional[str]:
        for word in words:
            if re.search(rf"\b{word}\b", text):
                return word
        return None

    position = find(_POSITION_WORDS)
    spec = ShapeSpec(find(COLOURS), find(SHAPES), find(SIZES), "centre" if position == "center" else position)
    if not partial and None in (spec.colour, spec.shape, spec.size, spec.position):
        return None
    return spec


def score_attributes(image: Union[Image.Image, np.ndarray], caption: str) -> dict[str, Optional[bool]]:
    """Per-attribute agreement of an image with a caption: ``{"colour", "shape", "size", "position", "all"}``.

    Each is True or False, or None for an attribute the caption does not name (only for captions
    outside the shapes set's language); ``"all"`` is True when every named attribute is right.
    """
    wanted, read = parse_caption(caption, partial=True), read_shape(image)
    scores: dict[str, Optional[bool]] = {}
    for name in ATTRIBUTES:
        target = getattr(wanted, name)
        scores[name] = None if target is None else getattr(read, name) == target
    named = [v for v in scores.values() if v is not None]
    scores["all"] = bool(named) and all(named)
    return scores
