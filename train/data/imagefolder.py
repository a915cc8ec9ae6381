"""Writing Hugging Face imagefolders (images + metadata.jsonl) atomically.

The data set builders (emoji, shapes) write into a temporary sibling folder and rename it into
place when everything is written, so a reader never sees half a data set.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ldm_io import atomic_directory, claim_output_dir, write_marker

COMMAND = "ldm data"
# What the builders write (emoji: twemoji/, noto/ and the licence texts; openmoji: openmoji/ and its licence
# text; shapes: images/): an unmarked
# folder with metadata.jsonl and nothing else is an earlier data set that --overwrite may replace.
DATASET_ENTRIES = ("metadata.jsonl", "images", "twemoji", "noto", "openmoji", "README.md", "LICENSE.txt",
                   "LICENSE-APACHE-2.0.txt", "LICENSE-CC-BY-SA-4.0.txt", "ATTRIBUTION.txt")


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False,
                      inputs: Iterable[Optional[os.PathLike]] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed
    (``ldm_io.atomic_directory``). ``out`` must be new or empty; ``overwrite``: it may be an earlier
    data set of ours (holding nothing else), never a folder holding one of ``inputs``. Checked before
    the block runs, and again before the rename."""
    out, inputs = Path(out), list(inputs)

    def claim() -> None:
        claim_output_dir(out, command=COMMAND, overwrite=overwrite, inputs=inputs, known=DATASET_ENTRIES,
                         signature=("metadata.jsonl",))

    claim()
    with atomic_directory(out) as tmp:
        yield tmp
        write_marker(tmp, COMMAND)
        claim()


def write_metadata(folder: Path, rows: Iterable[dict]) -> int:
    """Write ``folder/metadata.jsonl``, one JSON object per row (each with ``file_name``); returns the row count."""
    count = 0
    with open(Path(folder) / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
