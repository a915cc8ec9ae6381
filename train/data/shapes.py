"""The procedural shapes data set on disk (``ldm data shapes``): ``ldm.shapes`` images as an imagefolder.

Layout: ``DIR/images/000000.png ...`` and ``DIR/metadata.jsonl`` with ``file_name``, ``text``
(the exact caption) and the four attributes ``colour``, ``shape``, ``size``, ``position``, so a
trainer or a sweep can score against them without parsing captions.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ldm import shapes
from train.data.imagefolder import atomic_output_dir, write_metadata

SIDES = (32, 64)


def build_shapes_dataset(out: Path, *, side: int = 64, n: int = 5000, seed: int = 0, overwrite: bool = False) -> int:
    """Write ``n`` generated images of ``side`` px (32 or 64) to ``out``; returns ``n``."""
    if side not in SIDES:
        raise ValueError(f"--size {side}; allowed: {', '.join(map(str, SIDES))}")
    if n < 1:
        raise ValueError(f"--n {n}; give at least 1 image")
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for i, (image, caption, spec) in enumerate(tqdm(shapes.generate(n, side, seed), total=n, desc="shapes", unit="img")):
            file_name = f"images/{i:06d}.png"
            image.save(tmp / file_name)
            rows.append({"file_name": file_name, "text": caption, "colour": spec.colour, "shape": spec.shape,
                         "size": spec.size, "position": spec.position})
        write_metadata(tmp, rows)
    return n
