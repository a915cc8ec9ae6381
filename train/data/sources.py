"""Reading users' captioned-image data in its several formats into one ``datasets.Dataset``.

``open_source(path, ...)`` returns a ``Source``: a ``datasets.Dataset`` with an image column and a
caption column, the folder relative image paths resolve against, and the rows that could not even
be listed (bad metadata lines, images with no metadata row), counted by reason. Nothing is
decoded here; ``train.data`` checks each row and decodes images.

Formats (``FORMATS``), detected from ``path`` unless ``format`` is given:

- ``imagefolder``: a folder with ``metadata.jsonl`` or ``metadata.csv`` (Hugging Face
  imagefolder: ``file_name`` relative to the metadata file, captions in ``text`` by default).
  Metadata files in subfolders (``train/metadata.jsonl``) count too; image files no row names
  are skipped as "missing caption".
- ``sidecar``: a folder of images, each with ``<stem>.txt`` or ``<stem>.caption`` beside it
  (kohya-style); each non-empty line of a sidecar is one caption.
- ``csv``, ``jsonl``: a file of rows with an image path (relative to the file) and a caption.
- ``disk``: a folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict).
- ``parquet``: a ``.parquet`` file or a folder of them, images as ``datasets.Image`` structs,
  raw bytes or paths.

A caption cell may hold one string or a list of strings (one is sampled per epoch).

Text files (metadata, sidecars, CSV/JSONL) are read as UTF-8, or as UTF-16/32 when they start with
a byte-order mark; a row holding bytes that are not UTF-8 is skipped ("not UTF-8 text"), never
trained on with replacement characters.

Paths stay inside the data set: an image path (``file_name``, a path column) that is absolute or
climbs out with ``..``, and a symlink (image, sidecar, metadata file) whose target is outside, are
skipped under ``OUTSIDE`` unless ``allow_outside_paths`` (``data.allow_outside_paths: true`` in the
trainers' configs, ``ldm data check --allow-outside``). The data set's folder is ``Source.base_dir``:
the folder given, or the folder holding the CSV/JSONL/parquet file given; absolute paths into it are
fine.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets

FORMATS = ("imagefolder", "sidecar", "csv", "jsonl", "disk", "parquet")
# listed as images (an .svg is listed so it is counted as skipped, "vector image (SVG)")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg")
SIDECAR_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# image columns tried in order when none is given
IMAGE_COLUMNS = ("image", "file_name", "path", "image_path", "file", "filename", "img")

BAD_ROW = "bad metadata row"
MISSING_CAPTION = "missing caption"
NOT_UTF8 = "not UTF-8 text"
OUTSIDE = "outside the data folder (allow with data.allow_outside_paths=true, or ldm data check --allow-outside)"

_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass
class Source:
    """Rows of (image, caption cell) from one data set, not yet decoded."""

    path: Path
    format: str
    table: datasets.Dataset
    image_column: str
    caption_column: str
    base_dir: Path  # relative image paths resolve here; the folder paths must stay in
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> rows dropped while listing
    allow_outside_paths: bool = False

    def inside(self, ref: Any) -> bool:
        """Whether image ``ref`` (a path: its symlinks followed) may be read: inside ``base_dir``, or
        anywhere when ``allow_outside_paths``; bytes and None always."""
        return not isinstance(ref, Path) or self.allow_outside_paths or is_inside(ref, self.base_dir)

    def image_ref(self, index: int) -> Any:
        """Path (absolute) or bytes of row ``index``'s image, or None."""
        return resolve_image(self.table[index][self.image_column], self.base_dir)

    def rows(self) -> Iterator[tuple[Any, Any]]:
        """(image path or bytes or None, raw caption cell) for every row, in order."""
        for row in self.table.select_columns([self.image_column, self.caption_column]):
            yield resolve_image(row[self.image_column], self.base_dir), row[self.caption_column]


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, every symlink followed, lies in ``folder`` (its symlinks followed too)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def decode_text(raw: bytes) -> str:
    """File bytes as text: UTF-32/16/8 by their byte-order mark, else UTF-8 with bytes that are not UTF-8
    kept as lone surrogates (``has_bad_bytes`` finds them)."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            return raw.decode(encoding, errors="replace")
    return raw.decode("utf-8", errors="surrogateescape")


def has_bad_bytes(value: Any) -> bool:
    """Whether text from ``decode_text`` (a string, or a row's dict or list of them) held bytes that are not UTF-8."""
    if isinstance(value, str):
        return _BAD_BYTES.search(value) is not None
    if isinstance(value, dict):
        return any(has_bad_bytes(k) or has_bad_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_bad_bytes(v) for v in value)
    return False


def resolve_image(value: Any, base_dir: Path) -> Any:
    """An image cell as bytes or an absolute Path: ``datasets.Image`` dicts give their bytes (else their path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        return path if path.is_absolute() else base_dir / path
    return None


def caption_list(value: Any) -> Optional[list[str]]:
    """A caption cell as a list of stripped strings ([] or [""] when empty); None when there is none."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return None
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, (list, tuple)):
        return [v.strip() for v in value if isinstance(v, str)]
    return [str(value).strip()]


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' progress bars off while we read (our own bar reports the scan)."""
    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def detect_format(path: Path) -> str:
    """Which of ``FORMATS`` ``path`` holds."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        by_suffix = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
        if suffix in by_suffix:
            return by_suffix[suffix]
        raise ValueError(f"data file {path}: use a .csv, .jsonl or .parquet file, or a folder ({', '.join(FORMATS)})")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "disk"
    if any((path / name).is_file() for name in METADATA_FILES) or _metadata_files(path):
        return "imagefolder"
    if any(_image_files(path)):
        return "sidecar"
    if any(path.rglob("*.parquet")):
        return "parquet"
    raise ValueError(f"data folder {path} holds no images, metadata.jsonl/csv, parquet files or save_to_disk data; "
                     f"formats: {', '.join(FORMATS)}")


def _image_files(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` (hidden folders and files left out), sorted, as normalised absolute paths."""
    for root, dirs, files in os.walk(os.path.abspath(folder)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(root, name)


def _metadata_files(folder: Path) -> list[Path]:
    return sorted(Path(root, name) for root, dirs, files in os.walk(folder) for name in files if name in METADATA_FILES)


def _read_jsonl(path: Path, skipped: collections.Counter) -> list[dict]:
    """The rows of a JSONL file; rows holding bytes that are not UTF-8 are kept for the caller to skip
    (``has_bad_bytes``), so an imagefolder knows which image they name."""
    rows = []
    for line in decode_text(path.read_bytes()).split("\n"):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped[BAD_ROW] += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped[BAD_ROW] += 1
    return rows


def _read_csv(path: Path, skipped: collections.Counter) -> list[dict]:
    rows = []
    for row in csv.DictReader(io.StringIO(decode_text(path.read_bytes()), newline="")):
        if None in row or None in row.values():  # too many or too few fields
            skipped[BAD_ROW] += 1
            continue
        rows.append({k: (v if v != "" else None) for k, v in row.items()})
    return rows


def _read_rows(path: Path, skipped: collections.Counter) -> list[dict]:
    return _read_csv(path, skipped) if path.suffix.lower() == ".csv" else _read_jsonl(path, skipped)


def _pick_image_column(columns, image_column: Optional[str], where: str) -> str:
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image_column={image_column!r} is not a column of {where}; columns: {', '.join(columns)}")
        return image_column
    for name in IMAGE_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"no image column in {where} (tried {', '.join(IMAGE_COLUMNS)}); columns: {', '.join(columns)}; "
                     "pass image_column")


def _check_caption_column(columns, caption_column: str, where: str) -> None:
    if caption_column not in columns:
        raise ValueError(f"caption_column={caption_column!r} is not a column of {where}; columns: {', '.join(columns)}")


def _table(images: list, captions: list) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"image": [str(p) for p in images], "captions": [caption_list(c) for c in captions]},
        features=datasets.Features({"image": datasets.Value("string"), "captions": datasets.List(datasets.Value("string"))}),
    )


def _keep_split(row: dict, split: Optional[str], subfolder: str) -> bool:
    if split is None:
        return True
    if "split" in row:
        return row["split"] == split
    return subfolder == split


def _open_imagefolder(path: Path, caption_column: str, split: Optional[str], allow_outside: bool) -> Source:
    skipped: collections.Counter = collections.Counter()
    images, captions, listed, columns = [], [], set(), set()
    path = Path(os.path.abspath(path))
    for metadata in _metadata_files(path):
        if not allow_outside and not is_inside(metadata, path):  # a symlink out of the folder: not read
            skipped[OUTSIDE] += 1
            continue
        folder = metadata.parent
        subfolder = folder.relative_to(path).parts[0] if folder != path else ""
        for row in _read_rows(metadata, skipped):
            columns.update(row)
            file_name = row.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                skipped[BAD_ROW] += 1
                continue
            image = Path(os.path.normpath(folder / file_name))
            listed.add(image)
            if not _keep_split(row, split, subfolder):
                continue
            if has_bad_bytes(row):
                skipped[NOT_UTF8] += 1
                continue
            images.append(image)
            captions.append(row.get(caption_column))
    if images:
        _check_caption_column(sorted(columns), caption_column, f"{path}'s metadata")
    # images that no metadata row names have no caption (only those in the requested split's folders)
    for image in _image_files(path):
        parts = image.relative_to(path).parts
        subfolder = parts[0] if len(parts) > 1 else ""
        if image not in listed and (split is None or subfolder == split):
            skipped[MISSING_CAPTION] += 1
    return Source(path, "imagefolder", _table(images, captions), "image", "captions", path, skipped, allow_outside)


def _read_sidecar(image: Path, root: Path, allow_outside: bool) -> tuple[Optional[list[str]], Optional[str]]:
    """(caption lines or None when there is no sidecar, the reason to skip the row or None)."""
    for ext in SIDECAR_EXTENSIONS:
        sidecar = image.with_suffix(ext)
        if sidecar.is_file():
            if not allow_outside and not is_inside(sidecar, root):
                return None, OUTSIDE
            text = decode_text(sidecar.read_bytes())
            if has_bad_bytes(text):
                return None, NOT_UTF8
            return [line.strip() for line in text.splitlines()] or [""], None
    return None, None


def _open_sidecar(path: Path, allow_outside: bool) -> Source:
    skipped: collections.Counter = collections.Counter()
    images, captions = [], []
    for image in _image_files(path):
        caption, reason = _read_sidecar(image, path, allow_outside)
        if reason:
            skipped[reason] += 1
        else:
            images.append(image)
            captions.append(caption)
    return Source(path, "sidecar", _table(images, captions), "image", "captions", path, skipped, allow_outside)


def _open_rows_file(path: Path, fmt: str, caption_column: str, image_column: Optional[str], split: Optional[str],
                    allow_outside: bool) -> Source:
    skipped: collections.Counter = collections.Counter()
    rows = _read_rows(path, skipped)
    columns = sorted({k for row in rows for k in row})
    if not rows:
        return Source(path, fmt, _table([], []), "image", "captions", path.parent, skipped, allow_outside)
    image_column = _pick_image_column(columns, image_column, str(path))
    _check_caption_column(columns, caption_column, str(path))
    images, captions = [], []
    for row in rows:
        if not _keep_split(row, split, ""):
            continue
        value = row.get(image_column)
        if not isinstance(value, str) or not value:
            skipped[BAD_ROW] += 1
            continue
        if has_bad_bytes(row):
            skipped[NOT_UTF8] += 1
            continue
        images.append(value)  # resolved against base_dir when read (Source.rows), once
        captions.append(row.get(caption_column))
    return Source(path, fmt, _table(images, captions), "image", "captions", path.parent, skipped, allow_outside)


def _from_table(path: Path, fmt: str, table: datasets.Dataset, caption_column: str, image_column: Optional[str],
                split: Optional[str], base_dir: Path, allow_outside: bool) -> Source:
    columns = list(table.column_names)
    if image_column is None:
        images = [name for name, feature in table.features.items() if isinstance(feature, datasets.Image)]
        image_column = images[0] if images else _pick_image_column(columns, None, str(path))
    image_column = _pick_image_column(columns, image_column, str(path))
    _check_caption_column(columns, caption_column, str(path))
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    if split is not None and "split" in columns:
        table = table.select([i for i, s in enumerate(table["split"]) if s == split])
    return Source(path, fmt, table, image_column, caption_column, base_dir, allow_outside_paths=allow_outside)


def _open_disk(path: Path, caption_column: str, image_column: Optional[str], split: Optional[str],
               allow_outside: bool) -> Source:
    with _quiet_datasets():
        loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        chosen = split or ("train" if "train" in loaded else None)
        if chosen not in loaded:
            raise ValueError(f"{path} holds splits {', '.join(loaded)}; pass split= one of them")
        loaded, split = loaded[chosen], None
    return _from_table(path, "disk", loaded, caption_column, image_column, split, path, allow_outside)


def _open_parquet(path: Path, caption_column: str, image_column: Optional[str], split: Optional[str],
                  allow_outside: bool) -> Source:
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    with _quiet_datasets():
        table = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    return _from_table(path, "parquet", table, caption_column, image_column, split, path if path.is_dir() else path.parent,
                       allow_outside)


def open_source(path, *, format: Optional[str] = None, caption_column: str = "text",
                image_column: Optional[str] = None, split: Optional[str] = None,
                allow_outside_paths: bool = False) -> Source:
    """List the (image, caption) rows of ``path`` in one of ``FORMATS`` (detected when ``format`` is None).

    ``split`` keeps the rows whose ``split`` column (or top-level subfolder, for imagefolders; or
    DatasetDict split, for ``save_to_disk`` data) equals it; None keeps every row.
    ``allow_outside_paths``: read images, sidecars and metadata files outside the data set's folder
    (off: they are skipped as ``OUTSIDE``; ``Source.inside`` tells).
    """
    path = Path(path).expanduser()
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; allowed: {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    allow = bool(allow_outside_paths)
    if fmt == "imagefolder":
        return _open_imagefolder(path, caption_column, split, allow)
    if fmt == "sidecar":
        return _open_sidecar(path, allow)
    if fmt in ("csv", "jsonl"):
        return _open_rows_file(path, fmt, caption_column, image_column, split, allow)
    if fmt == "disk":
        return _open_disk(path, caption_column, image_column, split, allow)
    return _open_parquet(path, caption_column, image_column, split, allow)
