"""Writing Hugging Face imagefolders (images + metadata.jsonl) atomically.

The data set builders (emoji, shapes) write into a temporary sibling folder and rename it into
place when everything is written, so a reader never sees half a data set.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from ldm_io import atomic_directory


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed
    (``ldm_io.atomic_directory``). A non-empty ``out`` is an error unless ``overwrite``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    with atomic_directory(out) as tmp:
        yield tmp


def write_metadata(folder: Path, rows: Iterable[dict]) -> int:
    """Write ``folder/metadata.jsonl``, one JSON object per row (each with ``file_name``); returns the row count."""
    count = 0
    with open(Path(folder) / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
