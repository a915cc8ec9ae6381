"""Captioned images for training: one loader for every format, bad data skipped and counted.

    from train.data import load_captioned_images
    data = load_captioned_images("/work/data/emoji", split="train", size=64)
    print(data.summary())            # kept, skipped by reason, captions over 77 tokens
    image, caption = data[0]         # (3, 64, 64) float tensor in [-1, 1], str
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, num_workers=2)
    for epoch in range(n):
        data.set_epoch(epoch)        # images with several captions get another one each epoch
        for images, captions in loader: ...
    for pil_image, caption in data.pairs(): ...   # the raw stream: RGB PIL images, no transform

Formats (see ``train.data.sources``): imagefolder with metadata.jsonl/csv, kohya-style .txt or
.caption sidecars, a CSV or JSONL file of (path, caption), a ``save_to_disk`` folder, parquet.

Loading scans every row once: a row is skipped, and counted under its reason, when its caption
is missing, empty or not UTF-8, its image lies outside the data folder (``train.data.sources``:
allowed by ``allow_outside_paths``), is missing, empty, not an image (an SVG is named as such),
truncated or corrupt, over ``train.data.images.MAX_PIXELS`` pixels, or smaller than ``min_size`` on
its shorter side. Every kept image has decoded fully, so a training step never meets a bad file.
Images of any mode become RGB (``train.data.images.to_rgb``). A trainer that then reads its rows
(``CaptionedImages.read_rows``) drops, and counts as ``CHANGED``, an image that no longer decodes.
"""

from __future__ import annotations

import collections
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image
from tqdm import tqdm

from train.data.sources import MISSING_CAPTION, OUTSIDE, Source, caption_list, open_source
from train.data.split import caption_index, heldout_flags
from train.data.images import ImageError, ImageTransform, decode_image

__all__ = ["CaptionedImages", "DataSummary", "ImageTransform", "Split", "clip_token_count", "heldout_keys",
           "load_captioned_images", "load_captions", "load_split"]

MAX_TOKENS = 77  # CLIP's context length, start and end tokens included
EMPTY_CAPTION = "empty caption"
TOO_SMALL = "too small"
CHANGED = "changed on disk since the scan"


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # offline: its BPE vocabulary ships in the package

    return SimpleTokenizer()


def clip_token_count(text: str) -> int:
    """Tokens CLIP's text encoder sees for ``text``: its BPE tokens plus the start and end tokens."""
    return len(_clip_tokenizer().encode(text)) + 2


@dataclass
class DataSummary:
    """What loading a data set kept and skipped; ``str()`` is the report printed before training."""

    path: str
    format: str
    split: Optional[str]
    kept: int  # usable (image, caption) rows
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    captions: int = 0  # caption strings of the kept rows (a row may have several)
    long_captions: int = 0  # of those, how many exceed max_tokens
    longest: int = 0  # tokens in the longest caption
    max_tokens: int = MAX_TOKENS

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        where = f"{self.path} ({self.format}" + (f", split {self.split})" if self.split else ")")
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        lines = [
            f"data: {where}",
            f"kept: {self.kept} image-caption pairs ({self.captions} captions)",
            f"skipped: {self.total_skipped}" + (f" ({reasons})" if reasons else ""),
            f"captions over {self.max_tokens} tokens: {self.long_captions} of {self.captions}"
            + (f" (longest {self.longest}; the text encoder truncates beyond {self.max_tokens})" if self.captions else ""),
        ]
        return "\n".join(lines)


class CaptionedImages:
    """A map-style dataset of the usable rows: ``data[i] -> (image (3, H, W) in [-1, 1], caption)``.

    Made by ``load_captioned_images``. Works with ``torch.utils.data.DataLoader`` (default collate
    stacks images when they share a size, i.e. when ``size`` was given).
    """

    def __init__(self, source: Source, refs: list, captions: list[list[str]], rows: list[int],
                 summary: DataSummary, transform: ImageTransform, seed: int, sizes: Optional[list[tuple[int, int]]] = None):
        self.source = source
        self._refs = refs  # per kept row: an image path, or None to read its bytes from the table
        self._captions = captions  # per kept row: its non-empty captions
        self._rows = rows  # per kept row: its index in source.table
        self._sizes = sizes  # per kept row: its image's (width, height) at the scan, after EXIF rotation
        self._summary = summary
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._warned = False
        self.dropped: set[int] = set()  # kept rows that ``read_rows`` found changed on disk since the scan

    def __len__(self) -> int:
        return len(self._rows)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose caption draw ``caption``/``__getitem__`` use (call before each epoch)."""
        self.epoch = int(epoch)

    def captions(self, index: int) -> list[str]:
        """All captions of kept row ``index``."""
        return list(self._captions[index])

    def size(self, index: int) -> tuple[int, int]:
        """(width, height) of kept row ``index``'s image as the scan decoded it."""
        return self._sizes[index]

    def key(self, index: int) -> str:
        """Row ``index``'s identity for the held-out and caption rules (``train.data.split``): its
        image's path relative to the data set, or its row number in the table that holds its bytes."""
        ref = self._refs[index]
        if ref is None:
            return f"row {self._rows[index]}"
        try:
            return Path(ref).relative_to(self.source.base_dir).as_posix()
        except ValueError:
            return Path(ref).as_posix()

    def caption(self, index: int, epoch: Optional[int] = None) -> str:
        """The caption of row ``index`` for ``epoch`` (default: the current one): with several, the
        one ``train.data.split.caption_index`` draws, so every trainer, worker and process agrees."""
        options = self._captions[index]
        epoch = self.epoch if epoch is None else epoch
        return options[caption_index(len(options), self.seed, epoch, self.key(index))]

    def image(self, index: int) -> Image.Image:
        """The RGB PIL image of kept row ``index``; ``ImageError`` if it no longer decodes (or its path
        now leads out of the data folder)."""
        ref = self._refs[index]
        if ref is not None and not self.source.inside(ref):  # a symlink swapped since the scan
            raise ImageError(OUTSIDE, str(ref))
        return decode_image(ref if ref is not None else self.source.image_ref(self._rows[index]))

    def read_rows(self, rows: Sequence[int], transform: Optional[Callable[[Image.Image], Any]] = None
                  ) -> Iterator[tuple[int, Any]]:
        """(row, its image through ``transform``) for each of ``rows`` whose image still decodes, in
        order. A row whose image changed on disk since the scan is left out and counted in the summary
        (under ``CHANGED``; ``dropped`` holds it), so a trainer reading its images once never fails
        there and never pairs an image with another row's caption."""
        for i in rows:
            try:
                image = self.image(i)
            except ImageError as exc:
                if i not in self.dropped:
                    self.dropped.add(i)
                    self._summary.kept -= 1
                    self._summary.skipped[CHANGED] = self._summary.skipped.get(CHANGED, 0) + 1
                    self._warn(f"{self.key(i)} decoded at the scan but no longer does ({exc}); left out")
                continue
            yield i, (transform(image) if transform is not None else image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if index < 0:
            index += len(self)
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                return self.transform(self.image(i)), self.caption(i)
            except ImageError as exc:  # changed on disk since the scan: use the next row
                self._warn(f"an image that loaded at the scan no longer does ({exc}); using the next row")
        raise ValueError(f"{self._summary.path}: none of its images can be read any more (they changed on disk "
                         f"since the scan); see `ldm data check {self._summary.path}`")

    def _warn(self, message: str) -> None:
        if not self._warned:  # once: the summary counts them all
            warnings.warn(f"data: {message}")
            self._warned = True

    def pairs(self, epoch: Optional[int] = None) -> Iterator[tuple[Image.Image, str]]:
        """The raw stream: (RGB PIL image, caption) for every kept row whose image still decodes, in order."""
        for i, image in self.read_rows(range(len(self))):
            yield image, self.caption(i, epoch)

    def summary(self) -> DataSummary:
        return self._summary


def check_row(ref: Any, cell: Any, inside: Callable[[Any], bool], min_size: int
              ) -> Union[str, tuple[Image.Image, list[str]]]:
    """One row checked as every reader checks it: (its RGB image, its non-empty captions), or the reason
    it is skipped (no caption, empty caption, outside the data folder, an ``ImageError`` reason, too small).
    ``inside(ref)`` says whether a path may be opened (``Source.inside``)."""
    options = caption_list(cell)
    if options is None:
        return MISSING_CAPTION
    options = [c for c in options if c]
    if not options:
        return EMPTY_CAPTION
    if not inside(ref):  # checked before anything under the path is opened
        return OUTSIDE
    try:
        image = decode_image(ref)
    except ImageError as exc:
        return exc.reason
    if min(image.size) < min_size:
        return TOO_SMALL
    return image, options


def load_captions(path: Union[str, Path], *, caption_column: str = "text", format: Optional[str] = None,
                  split: Optional[str] = None, allow_outside_paths: bool = False) -> list[str]:
    """Every non-empty caption of a data set, read without opening its images: the captions of
    ``load_captioned_images`` plus those of any row it would skip for its image."""
    source = open_source(path, format=format, caption_column=caption_column, split=split,
                         allow_outside_paths=allow_outside_paths)
    return [c for cell in source.table[source.caption_column] for c in (caption_list(cell) or []) if c]


def load_captioned_images(
    path: Union[str, Path],
    *,
    caption_column: str = "text",
    image_column: Optional[str] = None,
    format: Optional[str] = None,
    split: Optional[str] = None,
    size: Union[int, tuple[int, int], None] = None,
    crop: str = "center",
    hflip: bool = False,
    min_size: int = 32,
    count_tokens: Optional[Callable[[str], int]] = None,
    max_tokens: int = MAX_TOKENS,
    seed: int = 0,
    progress: bool = True,
    allow_outside_paths: bool = False,
) -> CaptionedImages:
    """Load a captioned image data set from ``path``, checking every row once.

    Args:
        path: a folder or file in one of ``train.data.sources.FORMATS``.
        caption_column: the column holding captions (a string or a list of strings per row);
            sidecar folders ignore it.
        image_column: the column holding images or paths (default: the first ``datasets.Image``
            column, else one of image, file_name, path, image_path, file, filename, img).
        format: force a format instead of detecting it.
        split: keep only rows of this split ("train", "test"); None keeps all.
        size, crop, hflip: the ``ImageTransform`` applied by ``__getitem__`` (size None keeps sizes).
        min_size: images whose shorter side is below this are skipped.
        count_tokens: caption -> token count for the summary (default ``clip_token_count``, the
            open_clip tokenizer, start/end tokens included); give the trainer's own tokenizer here.
        max_tokens: captions with more tokens than this are counted as too long (not dropped).
        seed: seeds the per-epoch caption draw.
        progress: show a progress bar while scanning.
        allow_outside_paths: read images outside the data set's folder (absolute paths, ``..``,
            symlinks out of it); off, such rows are skipped as ``train.data.sources.OUTSIDE``.
    """
    transform = ImageTransform(size, crop=crop, hflip=hflip)
    if min_size < 1:
        raise ValueError(f"min_size={min_size}; give a side length of at least 1 pixel")
    source = open_source(path, format=format, caption_column=caption_column, image_column=image_column, split=split,
                         allow_outside_paths=allow_outside_paths)
    count_tokens = count_tokens or clip_token_count
    skipped = collections.Counter(source.skipped)
    refs, captions, rows, sizes = [], [], [], []
    n_captions = n_long = longest = 0
    for row, (ref, cell) in enumerate(tqdm(source.rows(), total=len(source.table), desc=f"checking {Path(path).name}",
                                          unit="img", disable=not progress)):
        checked = check_row(ref, cell, source.inside, min_size)
        if isinstance(checked, str):
            skipped[checked] += 1
            continue
        image, options = checked
        refs.append(ref if isinstance(ref, Path) else None)
        captions.append(options)
        rows.append(row)
        sizes.append(image.size)
        for caption in options:
            tokens = count_tokens(caption)
            n_captions += 1
            n_long += tokens > max_tokens
            longest = max(longest, tokens)
    summary = DataSummary(str(path), source.format, split, len(rows), dict(skipped), n_captions, n_long, longest, max_tokens)
    return CaptionedImages(source, refs, captions, rows, summary, transform, seed, sizes)


@dataclass
class Split:
    """A data set cut into training and held-out rows (indices into ``train`` and ``heldout``)."""

    train: CaptionedImages
    train_rows: list[int]
    heldout: CaptionedImages  # the test split's own rows, or the same object as ``train``
    heldout_rows: list[int]

    def summary(self) -> str:
        same = self.heldout is self.train
        lines = [str(self.train.summary())] + ([] if same else [str(self.heldout.summary())])
        how = "by a hash of each image's path" if same else "the data set's test split"
        heldout = sum(i not in self.heldout.dropped for i in self.heldout_rows)  # less rows read_rows dropped
        train = sum(i not in self.train.dropped for i in self.train_rows)
        lines.append(f"held out: {heldout} images ({how}); training on {train}")
        return "\n".join(lines)


def load_split(path: Union[str, Path], holdout_fraction: float, **load_kw) -> Split:
    """``path`` loaded by ``train.data.load_captioned_images`` (``load_kw``) and split by the held-out rule."""
    train = load_captioned_images(path, split="train", **load_kw)
    if len(train):
        test = load_captioned_images(path, split="test", **load_kw)
        if len(test):
            return Split(train, list(range(len(train))), test, list(range(len(test))))
    else:
        train = load_captioned_images(path, split=None, **load_kw)
    if not len(train):
        raise ValueError(f"{path}: no usable (image, caption) pair; see `ldm data check {path}`")
    flags = heldout_flags([train.key(i) for i in range(len(train))], holdout_fraction)
    return Split(train, [i for i, f in enumerate(flags) if not f], train, [i for i, f in enumerate(flags) if f])


def heldout_keys(split: Split) -> list[str]:
    """The keys of the held-out images (what a test compares across trainers)."""
    return [split.heldout.key(i) for i in split.heldout_rows]


