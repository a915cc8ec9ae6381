"""Procedural shapes: the generator's captions, and the reader's accuracy on clean and degraded images."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm import shapes
from ldm.cli import main
from train.data import load_captioned_images


def accuracy(pairs) -> dict:
    """Per-attribute fraction of readings that agree with the specs."""
    right = {a: 0 for a in shapes.ATTRIBUTES}
    n = 0
    for image, spec in pairs:
        reading = shapes.read_shape(image)
        n += 1
        for a in shapes.ATTRIBUTES:
            right[a] += getattr(reading, a) == getattr(spec, a)
    return {a: right[a] / n for a in shapes.ATTRIBUTES}


@pytest.mark.parametrize("side,n", [(64, 648), (32, 324)])
def test_reader_is_right_on_generated_images(side, n):
    acc = accuracy((image, spec) for image, _, spec in shapes.generate(n, side, seed=7))
    assert min(acc.values()) >= 0.99, acc


def test_reader_tolerates_mild_blur_and_noise():
    rng = np.random.default_rng(0)

    def degraded():
        for image, _, spec in shapes.generate(324, 64, seed=3):
            blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
            noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
            yield noisy, spec

    acc = accuracy(degraded())
    assert min(acc.values()) >= 0.98, acc


def test_reader_finds_nothing_on_a_blank_image_and_no_colour_off_the_palette():
    blank = shapes.read_shape(Image.new("RGB", (64, 64), "white"))
    assert (blank.colour, blank.shape, blank.size, blank.position) == (None, None, None, None)
    grey = shapes.read_shape(np.full((32, 32, 3), 90, np.uint8))
    assert grey.shape is None
    # a black square: shape, size and position are read, the colour is none of the palette's
    black = np.full((64, 64, 3), 255, np.uint8)
    black[24:43, 24:43] = 0
    reading = shapes.read_shape(black)
    assert (reading.colour, reading.shape, reading.size, reading.position) == (None, "square", "large", "centre")


def test_captions_and_parser_round_trip():
    specs = shapes.all_specs()
    assert len(specs) == len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.SIZES) * 9 == 324
    for spec in specs:
        assert shapes.parse_caption(spec.caption) == spec
    assert shapes.ShapeSpec("red", "circle", "small", "top left").caption == "a small red circle at the top left"
    assert shapes.ShapeSpec("blue", "square", "large", "centre").caption == "a large blue square in the centre"
    # only captions naming all four attributes are shapes captions; partial=True reads the rest
    assert shapes.parse_caption("koala, twemoji style") is None
    assert shapes.parse_caption("A RED thing in the center") is None
    assert shapes.parse_caption("A RED thing in the center", partial=True) == shapes.ShapeSpec("red", None, None, "centre")
    assert shapes.parse_caption("a LARGE cyan Triangle, bottom-left") == shapes.ShapeSpec("cyan", "triangle", "large", "bottom left")


def test_score_attributes_marks_each_wrong_attribute():
    spec = shapes.ShapeSpec("green", "triangle", "large", "bottom right")
    image = shapes.render(spec, 64)
    assert shapes.score_attributes(image, spec.caption) == {
        "colour": True, "shape": True, "size": True, "position": True, "all": True}
    scores = shapes.score_attributes(image, "a large green circle at the top right")
    assert scores == {"colour": True, "shape": False, "size": True, "position": False, "all": False}
    # attributes the caption does not name are not scored
    assert shapes.score_attributes(image, "something green") == {
        "colour": True, "shape": None, "size": None, "position": None, "all": True}


def test_generate_is_seeded_and_balanced():
    first = [(np.asarray(im), cap) for im, cap, _ in shapes.generate(400, 32, seed=5)]
    again = [(np.asarray(im), cap) for im, cap, _ in shapes.generate(400, 32, seed=5)]
    other = [cap for _, cap, _ in shapes.generate(400, 32, seed=6)]
    assert all(a[1] == b[1] and np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert [c for _, c in first] != other
    assert len({cap for _, cap in first[:324]}) == 324  # each pass covers every spec once


def test_shapes_are_drawn_where_and_how_the_caption_says():
    # exact geometry without jitter: the centre of a large square in the top left cell sits at (side/6, side/6)
    image = np.asarray(shapes.render(shapes.ShapeSpec("red", "square", "large", "top left"), 60))
    mask = (np.abs(image.astype(int) - shapes.COLOURS["red"]).sum(axis=2) < 10)  # fully covered pixels
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (1, 18, 1, 18)  # 0.30 * 60 = 18 px box from 1 to 19
    assert tuple(image[40, 40]) == shapes.BACKGROUND


def test_shapes_command_writes_a_loadable_set(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--size", "32", "--n", "30", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temporary folder
    for row in rows:
        spec = shapes.ShapeSpec(row["colour"], row["shape"], row["size"], row["position"])
        assert row["text"] == spec.caption
        reading = shapes.read_shape(Image.open(out / row["file_name"]))
        assert (reading.colour, reading.shape, reading.size, reading.position) == tuple(
            row[a] for a in shapes.ATTRIBUTES)
    data = load_captioned_images(out, size=32, count_tokens=lambda s: len(s.split()), progress=False)
    assert len(data) == 30 and data[0][0].shape == (3, 32, 32)
    assert main(["data", "shapes", "--out", str(tmp_path / "x"), "--size", "48"]) == 2
