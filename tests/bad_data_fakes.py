"""A data set with one of every kind of bad data beside usable images (tests/test_bad_data.py)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from train_fakes import make_imagefolder


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int) -> bytes:
    """A black 8-bit greyscale PNG of any size, compressed row by row (a 67 MP one is 65 kB, made in 0.2 s)."""
    compressor, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(parts))
            + png_chunk(b"IEND", b""))


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels over a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


# reason -> rows of that reason in ``make_bad_data_set``'s folder
BAD_REASONS = {
    "truncated or corrupt": 1,  # a PNG cut in half
    "empty file": 1,  # zero bytes
    "not an image": 1,  # a text file named .png
    "vector image (SVG)": 1,
    "missing file": 1,
    "bad metadata row": 2,  # not JSON; no file_name
    "not UTF-8 text": 1,  # a Latin-1 line in metadata.jsonl
    "missing caption": 1,  # an image no row names
    "empty caption": 1,
}
TOO_LARGE = 2  # a header-only bomb (40000 x 40000) and a real 8200 x 8200 PNG that Pillow would decode
OUTSIDE = 4  # ../outside.png, its absolute path, /etc/passwd, a symlink to ../outside.png
KEPT_AWKWARD = 5  # CMYK JPEG, 16-bit grey, palette with transparency, animated GIF, symlink inside the folder


def make_bad_data_set(root: Path, n_good: int = 24, size: int = 32) -> Path:
    """``root/data``: ``n_good`` shapes images (``train_fakes.make_imagefolder``) plus one of every bad kind
    (``BAD_REASONS``, ``TOO_LARGE``, ``OUTSIDE``) and usable awkward ones (``KEPT_AWKWARD``);
    ``root/outside.png`` is a good image outside it."""
    folder = make_imagefolder(Path(root) / "data", n=n_good, size=size, heldout_every=0)
    lines = [(folder / "metadata.jsonl").read_bytes()]

    def add(name, caption="a thing", **extra):
        lines.append(json.dumps({"file_name": name, "text": caption, **extra}).encode() + b"\n")

    good = Image.open(folder / "0000.png").convert("RGB")
    buf = io.BytesIO()
    good.save(buf, "PNG")
    full = buf.getvalue()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2]); add("truncated.png")
    (folder / "zero.png").write_bytes(b""); add("zero.png")
    (folder / "text.png").write_text("this is not an image\n"); add("text.png")
    (folder / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
                                        '<rect width="32" height="32" fill="red"/></svg>\n'); add("drawing.svg")
    add("gone.png")
    lines.append(b"{not json\n")
    lines.append(json.dumps({"text": "a row with no file_name"}).encode() + b"\n")
    good.save(folder / "latin1.png")
    lines.append('{"file_name": "latin1.png", "text": "a caf\u00e9 sign"}\n'.encode("latin-1"))
    good.save(folder / "no_row.png")
    good.save(folder / "blank.png"); add("blank.png", "  ")
    (folder / "bomb.png").write_bytes(bomb_png()); add("bomb.png")
    (folder / "huge.png").write_bytes(grey_png(8200, 8200)); add("huge.png")
    # outside the folder
    good.save(folder.parent / "outside.png")
    add("../outside.png")
    add(str((folder.parent / "outside.png").resolve()))
    add("/etc/passwd")
    os.symlink(folder.parent / "outside.png", folder / "link_out.png"); add("link_out.png")
    # usable, awkward
    Image.new("CMYK", (size, size), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95); add("cmyk.jpg", "a cmyk red")
    Image.fromarray(np.full((size, size), 65535, np.uint16)).save(folder / "grey16.png"); add("grey16.png", "a white 16 bit")
    palette = Image.new("P", (size, size), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(folder / "palette.png", transparency=1); add("palette.png", "a transparent palette")
    frames = [Image.new("RGB", (size, size), c) for c in ((0, 0, 255), (255, 0, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("anim.gif", "a blue animation")
    os.symlink("0000.png", folder / "link_in.png"); add("link_in.png", "a linked red square")
    (folder / "metadata.jsonl").write_bytes(b"".join(lines))
    return folder


def expected_skips() -> dict[str, int]:
    """The summary's ``skipped`` of ``make_bad_data_set`` (the reasons' labels from train.data)."""
    from train.data.images import TOO_LARGE as too_large
    from train.data.sources import OUTSIDE as outside

    return {**BAD_REASONS, too_large: TOO_LARGE, outside: OUTSIDE}
