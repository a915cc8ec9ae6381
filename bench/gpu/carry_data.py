"""Carry an image-folder data set to the GPU machine in fewer bytes than its PNG files.

The device tool carries at most 64 MiB, and the emoji set's 7,572 PNGs take 27.6 MB, too much beside the working
tree and the wheels. Their decoded pixels compress better than the PNGs themselves (one xz stream over every
image's raw bytes: 12.3 MB for the emoji set, its many flat backgrounds shared across images). Unpacking writes
the same pixels back as PNG files under the same names, with every other file (metadata.jsonl, licences) as it
was, so the data set reads back pixel for pixel and the project's own commands run on it unchanged.

    python bench/gpu/carry_data.py pack data/emoji bench/gpu/carry/emoji.xz     # here (git-ignored output)
    python bench/gpu/carry_data.py unpack bench/gpu/carry/emoji.xz /tmp/emoji   # on the GPU machine
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import struct
import sys
from pathlib import Path

from PIL import Image

PIXEL_MODES = {"RGB", "RGBA", "L", "LA"}  # whose raw bytes are the whole image (a palette image's are not)


def pack(folder: Path, out: Path) -> None:
    """Every file under ``folder`` into one xz stream: PNG images as raw pixels (mode and size kept), every other
    file (other formats, whose re-encoding could change pixels, and palette PNGs) as its bytes."""
    entries, blobs = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entry = {"name": path.relative_to(folder).as_posix()}
        data = None
        if path.suffix.lower() == ".png":
            with Image.open(path) as image:
                if image.mode in PIXEL_MODES:
                    data = image.tobytes()
                    entry.update(mode=image.mode, size=list(image.size))
        if data is None:
            data = path.read_bytes()
        entries.append({**entry, "bytes": len(data)})
        blobs.append(data)
    header = json.dumps(entries).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for data in blobs:
            f.write(data)
    os.replace(tmp, out)
    images = sum("mode" in e for e in entries)
    print(f"{folder}: {len(entries)} files ({images} images) -> {out} ({out.stat().st_size / 1e6:.1f} MB)")


def unpack(archive: Path, folder: Path) -> None:
    """Write the files of ``pack``'s archive under ``folder``: PNG images with the same pixels, the rest as they were."""
    with lzma.open(archive, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(length))
        for entry in entries:
            data = f.read(entry["bytes"])
            path = folder / entry["name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            if "mode" in entry:
                buffer = io.BytesIO()
                Image.frombytes(entry["mode"], tuple(entry["size"]), data).save(buffer, format="PNG")
                data = buffer.getvalue()
            path.write_bytes(data)
    print(f"{archive} -> {folder}: {len(entries)} files")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("source", type=Path, help="pack: the data folder; unpack: the archive")
    parser.add_argument("dest", type=Path, help="pack: the archive to write; unpack: the folder to write")
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"carry_data: {args.source} does not exist", file=sys.stderr)
        return 2
    (pack if args.action == "pack" else unpack)(args.source, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
