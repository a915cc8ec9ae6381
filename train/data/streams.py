"""Data sets read as a stream, for data larger than memory: webdataset tar shards and Hugging Face
datasets in streaming mode.

    stream = open_stream("data/{00000..00099}.tar")     # or "https://host/laion/{00000..00099}.tar",
                                                        # or "hf:user/name", "hf:/a/local/dataset/folder"
    for key, image, cell, reason in stream.rows(skip=0):  # image: bytes or a path, cell: the caption cell,
        ...                                                # reason: why the row is bad (or None)
        ...

Formats (``STREAM_FORMATS``), told from the path (``stream_format``):

- ``webdataset``: tar files as LAION and DataComp ship them (``webdataset`` on PyPI): a path or URL,
  with brace patterns (``{00000..00099}.tar``), a folder of ``.tar`` files, or several separated by
  ``::``. A sample is the files of one key (``000123.jpg``, ``000123.txt``, ``000123.json``): its image
  is the first of jpg/jpeg/png/webp/bmp/gif/tif/tiff, its caption the ``txt`` file, else the json's
  ``caption_column`` field (else its ``caption``). A row's key is ``<shard file name>/<sample key>``.
- ``hf``: ``hf:NAME`` is ``datasets.load_dataset(NAME, split="train", streaming=True)``: a hub name, or a
  local folder of data files (parquet, jsonl with images...); nothing is listed or decoded up front.
  The image column is the first ``datasets.Image`` column (else one of ``sources.IMAGE_COLUMNS``); a
  row's key is ``row <n>``.

Rows are checked as the folder formats check them (``train.data.captioned.check_row``) by the reader
(the U-Net cache): bad rows are skipped and counted by reason, never trained on. A sample without an
image counts as ``NO_IMAGE``, an unreadable caption (json that does not parse, bytes that are not
UTF-8) as ``sources.BAD_ROW`` / ``sources.NOT_UTF8``, a tar shard that breaks part-way as
``BROKEN_SHARD`` (its remaining samples unread). A local shard that does not exist, or a URL that gives
nothing, is an ``OSError`` naming it.

Streams have no ``test`` split: the held-out rule is the key hash (``train.data.split``), row by row.
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from train.data.sources import (BAD_ROW, IMAGE_COLUMNS, IMAGE_EXTENSIONS, NOT_UTF8, decode_text, has_bad_bytes,
                                is_inside, resolve_image)

STREAM_FORMATS = ("webdataset", "hf")
NO_IMAGE = "no image in the sample"
BROKEN_SHARD = "tar shard unreadable from here on"
_TAR_IMAGES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS if ext != ".svg")
_HF = "hf:"


def stream_format(path: Any) -> Optional[str]:
    """The ``STREAM_FORMATS`` entry ``path`` names, or None for a file or folder of the folder formats."""
    text = str(path)
    if text.startswith(_HF):
        return "hf"
    if "://" in text or text.startswith("pipe:") or any(p.endswith(".tar") for p in text.split("::")):
        return "webdataset"
    if os.path.isdir(text) and not any(True for _ in _non_tar_entries(Path(text))) and any(Path(text).glob("*.tar")):
        return "webdataset"
    return None


def _non_tar_entries(folder: Path) -> Iterator[Path]:
    return (p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix != ".tar")


def shard_urls(path: str) -> list[str]:
    """Every shard a webdataset path names: ``::``-separated parts, brace patterns expanded, folders
    listed (their ``.tar`` files, sorted); local files must exist (``FileNotFoundError`` otherwise)."""
    from braceexpand import braceexpand

    urls = []
    for part in str(path).split("::"):
        for url in braceexpand(part):
            if "://" not in url and os.path.isdir(url):
                urls += sorted(str(p) for p in Path(url).glob("*.tar"))
            else:
                urls.append(url)
    for url in urls:
        local = url[len("file://"):] if url.startswith("file://") else (None if _remote(url) else url)
        if local is not None and not os.path.isfile(local):
            raise FileNotFoundError(f"data.path: webdataset shard {url} does not exist "
                                    f"({len(urls)} shard{'s' * (len(urls) > 1)} named by {path})")
    if not urls:
        raise ValueError(f"data.path={path!r} names no tar shard")
    return urls


def _remote(url: str) -> bool:
    """Whether a shard is read through webdataset's gopen (a URL, or ``pipe:COMMAND``) rather than opened here."""
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


@dataclass
class Stream:
    """Rows (key, image bytes or path or None, caption cell) of a streamed data set, in a fixed order."""

    path: str
    format: str
    caption_column: str = "text"
    image_column: Optional[str] = None
    allow_outside_paths: bool = False
    skipped: collections.Counter = field(default_factory=collections.Counter)  # rows dropped while reading

    def inside(self, ref: Any) -> bool:
        """Whether image ``ref`` may be read (``Source.inside``'s rule; a hub data set's paths are its own)."""
        base = self._local_folder()
        return not isinstance(ref, Path) or self.allow_outside_paths or base is None or is_inside(ref, base)

    def _local_folder(self) -> Optional[Path]:
        name = self.path[len(_HF):] if self.format == "hf" else ""
        return Path(name) if name and os.path.isdir(name) else None

    def manifest(self, content: bool = False) -> list:
        """What keys a cache of this stream: per local file its name, size and modification time (with
        ``content``, a sha256 of its bytes instead); a remote shard or hub data set by its address."""
        import hashlib

        def entry(f: Path) -> list:
            if content:
                with open(f, "rb") as fh:
                    return [str(f), hashlib.file_digest(fh, "sha256").hexdigest()]
            st = f.stat()
            return [str(f), st.st_size, st.st_mtime_ns]

        if self.format == "webdataset":
            return [[u] if _remote(u) else entry(Path(u[len("file://"):] if u.startswith("file://") else u))
                    for u in shard_urls(self.path)]
        folder = self._local_folder()
        if folder is None:
            return [self.path]
        return [entry(f) for f in sorted(folder.rglob("*")) if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(folder).parts)]

    def rows(self, skip: int = 0) -> Iterator[tuple[str, Any, Any, Optional[str]]]:
        """(key, image, caption cell, reason) of every row after the first ``skip`` (passed over undecoded);
        ``reason`` is None, or why the row cannot be used before its image is even looked at."""
        rows = self._webdataset_rows() if self.format == "webdataset" else self._hf_rows(skip)
        if self.format == "webdataset":
            for _ in range(skip):
                if next(rows, None) is None:
                    return
        yield from rows

    # -- webdataset ----------------------------------------------------------------------------

    def _webdataset_rows(self) -> Iterator[tuple[str, Any, Any, Optional[str]]]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        for url in shard_urls(self.path):
            name = url.rstrip("/").rsplit("/", 1)[-1]
            try:
                stream = gopen(url)
            except Exception as exc:
                raise OSError(f"data.path: cannot open webdataset shard {url} ({exc})") from None
            n = 0
            try:
                with stream:
                    for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                        n += 1
                        yield (f"{name}/{sample['__key__']}", *self._tar_sample(sample))
            except Exception as exc:
                if n == 0 and _remote(url):
                    raise OSError(f"data.path: webdataset shard {url} gave no sample ({exc})") from None
                self.skipped[BROKEN_SHARD] += 1
                warnings.warn(f"data: {url}: {exc}; its samples after the {n}th are skipped")

    def _tar_sample(self, sample: dict) -> tuple[Any, Any, Optional[str]]:
        image = next((sample[ext] for ext in _TAR_IMAGES if ext in sample), None)
        if image is None:
            return None, None, NO_IMAGE
        if "txt" in sample:
            text = decode_text(sample["txt"])
            return image, text, (NOT_UTF8 if has_bad_bytes(text) else None)
        if "json" in sample:
            try:
                row = json.loads(decode_text(sample["json"]))
            except (json.JSONDecodeError, UnicodeError):
                return image, None, BAD_ROW
            if not isinstance(row, dict):
                return image, None, BAD_ROW
            return image, row.get(self.caption_column, row.get("caption")), (NOT_UTF8 if has_bad_bytes(row) else None)
        return image, None, None

    # -- Hugging Face streaming ----------------------------------------------------------------

    def _hf_rows(self, skip: int) -> Iterator[tuple[str, Any, Any, Optional[str]]]:
        import datasets

        name = self.path[len(_HF):]
        try:
            table = datasets.load_dataset(os.path.expanduser(name), split="train", streaming=True)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise OSError(f"data.path={self.path}: cannot stream it ({str(exc).splitlines()[0]})") from None
        columns = list(table.features or {}) or list(next(iter(table)))
        image_column = self.image_column
        if image_column is None:
            images = [c for c, f in (table.features or {}).items() if isinstance(f, datasets.Image)]
            image_column = images[0] if images else next((c for c in IMAGE_COLUMNS if c in columns), None)
        if image_column not in columns:
            raise ValueError(f"{self.path}: no image column {image_column or ''} (tried {', '.join(IMAGE_COLUMNS)}); "
                             f"columns: {', '.join(columns)}")
        if self.caption_column not in columns:
            raise ValueError(f"caption_column={self.caption_column!r} is not a column of {self.path}; "
                             f"columns: {', '.join(columns)}")
        if table.features and isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))
        base = self._local_folder() or Path(".")
        for n, row in enumerate(table.skip(skip) if skip else table, start=skip):
            cell = row[self.caption_column]
            yield f"row {n}", resolve_image(row[image_column], base), cell, (NOT_UTF8 if has_bad_bytes(cell) else None)


def open_stream(path: Any, *, caption_column: str = "text", image_column: Optional[str] = None,
                allow_outside_paths: bool = False) -> Stream:
    """The ``Stream`` of ``path`` (see the module docstring); a ValueError when it names no stream."""
    fmt = stream_format(path)
    if fmt is None:
        raise ValueError(f"{path} is not a stream; streams: webdataset .tar shards (paths, brace patterns, URLs) "
                         "or hf:NAME")
    stream = Stream(str(path), fmt, caption_column, image_column, bool(allow_outside_paths))
    if fmt == "webdataset":
        shard_urls(stream.path)  # a missing local shard: the error now, not after an hour of encoding
    else:
        name = stream.path[len(_HF):]
        if not name:
            raise ValueError("data.path='hf:' names no data set; give hf:NAME (a hub name or a local folder)")
        if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
            raise FileNotFoundError(f"data.path={stream.path}: folder {name} does not exist")
    return stream


def check_stream(path: Any, *, caption_column: str = "text", image_column: Optional[str] = None, min_size: int = 32,
                 allow_outside_paths: bool = False, progress: bool = True):
    """Read every row of the stream at ``path`` as the cache would, keeping nothing: its ``DataSummary``
    (what ``ldm data check`` prints for a stream)."""
    from tqdm import tqdm

    from train.data.captioned import MAX_TOKENS, DataSummary, check_row, clip_token_count

    stream = open_stream(path, caption_column=caption_column, image_column=image_column,
                         allow_outside_paths=allow_outside_paths)
    skipped: collections.Counter = collections.Counter()
    kept = n_captions = n_long = longest = 0
    for _, ref, cell, reason in tqdm(stream.rows(), desc=f"checking {path}", unit="img", disable=not progress):
        checked = reason or check_row(ref, cell, stream.inside, min_size)
        if isinstance(checked, str):
            skipped[checked] += 1
            continue
        kept += 1
        for caption in checked[1]:
            tokens = clip_token_count(caption)
            n_captions, n_long, longest = n_captions + 1, n_long + (tokens > MAX_TOKENS), max(longest, tokens)
    skipped.update(stream.skipped)
    return DataSummary(str(path), stream.format, None, kept, dict(skipped), n_captions, n_long, longest)
