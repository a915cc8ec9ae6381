"""The training cache: every image's latent and every caption's context, computed once with the
frozen autoencoder and text encoder, stored on disk in shards of memory-mapped ``.npy`` arrays.

    folder, built = build_cache(config.cache, config.data, autoencoder, text_encoder, device)
    cache = LatentCache(folder)
    z0 = cache.latents(idx)          # (B, C, h, w) float32, already times the scaling factor
    ctx = cache.contexts(idx)        # (B, L, D) float32 (stored as cache.context_dtype, float16 by default)
    cache.empty                      # (1, L, D) the empty prompt's context (caption dropout)

A cache lives in ``<cache.dir>/ldm-<key>/``. The key hashes the autoencoder's weights and scaling,
the text encoder's ``weights_hash()``, the data set, the data settings and the candidate buckets, so a
changed encoder or data set gets a fresh cache and an unchanged one is reused by every run. The data
set enters the key by a manifest: every file's relative path, size and modification time (hidden files
left out; a symlink out of the folder by its target's name), so a start reads no image.
``cache.verify: content`` keys by every byte instead (``folder_hash``: slower, and blind to
modification times, e.g. after a copy). A stream (``train.data.streams``) enters by its shards' (or
local data set's) manifest, or by its address when it is remote.

Rows: the data is read by ``train.data`` (every format it knows, bad rows skipped and counted, paths
kept inside the data folder unless ``data.allow_outside_paths``), resized and centre-cropped once: a
cached run has no random crops or flips. A folder data set is scanned first (``train.data.load_split``)
and its rows put in order: training rows before held-out ones (bucket by bucket with buckets); a stream
is cached in its own order, held out by the key hash, without buckets. An image that changed on disk
between the scan and the encoding is left out and counted.

Shards: the rows are cached ``cache.shard_size`` at a time: shard s covers rows
``[s * shard_size, (s + 1) * shard_size)`` of that order (of the stream's rows, for a stream) and holds
those that are usable. Each shard folder is written under a temporary name and renamed when complete,
so a stopped build (killed, out of disk) resumes at its first missing shard and writes exactly the
files an unstopped one would (each shard is encoded in its own batches from its own first row).
``build.json`` (the key and the layout) and ``empty.npy`` come first, ``meta.json`` (the number of
shards, the loader's summary) last: a cache is complete when ``meta.json`` exists. Training waits for a
complete cache (the data order is a permutation of all training rows, and resuming training bitwise
needs the same rows); ``LatentCache(folder, partial=True)`` reads the shards finished so far.

Files of shard s (``shard-<s>/``): ``latents-<k>.npy`` (n_k, C, h_k, w_k) float32 for each bucket k
it holds rows of (k = 0 without buckets); ``caption_offsets.npy`` (n + 1,) and ``caption_rows.npy``:
row i's caption options are rows ``caption_rows[caption_offsets[i]:caption_offsets[i + 1]]`` of the
shard's sorted distinct captions, whose contexts live in the text encoder's own embedding cache
(``conditioning.EmbeddingCache``, in ``<cache.dir>/contexts/<context_dtype>/``, keyed by the encoder's hash and
the captions); ``heldout.npy`` (n,) bool (``train.data.split``: the held-out rule of every trainer);
``key_hash.npy`` (n,) uint64 (the caption draw's hash of each row's key); ``shard.json`` (per row its
key and captions, the distinct captions, the contexts file, per bucket its row count, the rows it
covers and what it skipped). A reader keeps memory maps, and per row only its index, so its resident
memory does not grow with the data set (``bench/bench_data_scale.py`` measures it). For a VQ
autoencoder the latents are the continuous pre-quantisation ones its ``encode`` returns.

Aspect-ratio buckets (``data.buckets``, ``train.data.buckets``): each image is resized to cover the
bucket of nearest aspect ratio and centre-cropped to it; the rows are ordered bucket by bucket
(training rows before held-out ones within each), so bucket k's rows are the consecutive rows
``bucket_offsets[k]:bucket_offsets[k + 1]`` of the cache, spread over the shards.
``meta.json`` adds the bucket sizes (pixels, (height, width)) and the cropping report. The key holds
the bucket settings and the candidate buckets they make for this model, so a changed setting never
reads a stale cache. ``enabled: auto`` buckets when the images fall in more than one bucket;
otherwise the cache is the plain one above, exactly as without buckets.

Several processes and nodes: the cache folder is the same for every rank that sees the same
``cache.dir``; the trainer lets the main process build it while the others wait
(``main_process_first``), then every rank opens it read-only.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import Sequence as SequenceABC
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ldm_io import atomic_directory, atomic_path, exclusive_lock, write_text
from train.data import ImageTransform, Split, load_split
from train.data.buckets import assign, bucket_report, check_sizes, make_buckets, parse_size
from train.data.captioned import CHANGED, MAX_TOKENS, DataSummary, check_row, clip_token_count
from train.data.sources import is_inside
from train.data.split import caption_index_of_hash, key_hash
from train.data.streams import open_stream, stream_format
from train.unet.config import CacheConfig, DataConfig

FORMAT_VERSION = 5
CONTEXT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- keys --------------------------------------------------------------------------------------


def module_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def autoencoder_hash(autoencoder) -> str:
    """The autoencoder's weights plus the settings that change its latents."""
    extra = f"{getattr(autoencoder, 'kind', '')}|{autoencoder.scaling_factor!r}|{getattr(autoencoder, 'shift_factor', 0.0)!r}"
    return hashlib.sha256((module_hash(autoencoder) + extra).encode()).hexdigest()


def folder_hash(folder: Path, allow_outside: bool = False) -> str:
    """sha256 over every file under ``folder`` (relative path and bytes), hidden files excluded; a symlink
    out of the folder counts by its target's name, its bytes unread (unless ``allow_outside``)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0")
        if not allow_outside and f.is_symlink() and not is_inside(f, folder):
            h.update(b"link\0" + os.readlink(f).encode(errors="surrogateescape"))
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def manifest_hash(folder: Path, allow_outside: bool = False) -> str:
    """sha256 over every file under ``folder``: relative path, size and modification time (ns), hidden
    files excluded, no file opened; a symlink out of the folder counts by its target's name (unless
    ``allow_outside``)."""
    h = hashlib.sha256()
    root = os.path.abspath(folder)

    def walk(directory: str, rel: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for e in entries:  # files (a symlink by its target; a dangling one left out) before folders, as os.walk
            if e.is_file():
                h.update(f"{rel}{e.name}".encode(errors="surrogateescape") + b"\0")
                if not allow_outside and e.is_symlink() and not is_inside(e.path, root):
                    h.update(b"link\0" + os.readlink(e.path).encode(errors="surrogateescape"))
                    continue
                st = e.stat()
                h.update(f"{st.st_size}|{st.st_mtime_ns}\0".encode())
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                walk(e.path, f"{rel}{e.name}/")

    walk(root, "")
    return h.hexdigest()


def candidate_buckets(data: DataConfig, factor: int, granularity: Optional[int]) -> Optional[list[tuple[int, int]]]:
    """The (height, width) buckets ``data.buckets`` allows for a model of this granularity (None when
    bucketing is off); a size or step that is not a multiple of the granularity is a ValueError."""
    b = data.buckets
    if b.enabled is False:
        return None
    if granularity is None:
        raise ValueError("data.buckets needs the model's granularity (autoencoder factor x 2^U-Net down-samplings); "
                         "the trainer passes it")
    if b.sizes:
        buckets = [parse_size(size) for size in b.sizes]
        check_sizes(buckets, granularity, factor)
        return sorted(set(buckets), key=lambda hw: (hw[1] / hw[0], hw))
    step = b.step or granularity
    if step % granularity:
        raise ValueError(f"data.buckets.step={step} is not a multiple of the latent granularity {granularity} "
                         f"(the autoencoder's factor {factor} times the U-Net's down-sampling {granularity // factor})")
    resolution = data.resolution
    return make_buckets(resolution * resolution, step, b.min_side or resolution // 2, b.max_side or 2 * resolution)


def cache_key(cache: CacheConfig, data: DataConfig, autoencoder, text_encoder, granularity: Optional[int] = None) -> dict:
    """The parts of the cache key, as a JSON-able dict (its hash names the folder)."""
    content = cache.verify == "content"
    if stream_format(data.path) is not None:
        if data.buckets.enabled is True:
            raise ValueError(f"data.buckets.enabled=true needs every image's size before caching; a stream ({data.path}) "
                             "is cached without buckets: set data.buckets.enabled=false (or auto)")
        stream = open_stream(data.path, caption_column=data.caption_column, allow_outside_paths=data.allow_outside_paths)
        data_hash = hashlib.sha256(json.dumps(stream.manifest(content)).encode()).hexdigest()
        buckets = None
    else:
        if not data.path or not Path(data.path).exists():
            raise FileNotFoundError(f"data.path={data.path!r} does not exist; give a captioned image folder (e.g. made by "
                                    "`ldm data`), webdataset .tar shards or hf:NAME")
        folder = Path(data.path) if Path(data.path).is_dir() else Path(data.path).parent
        data_hash = (folder_hash if content else manifest_hash)(folder, data.allow_outside_paths)
        buckets = candidate_buckets(data, autoencoder.downsample_factor, granularity)
    return {
        "format": FORMAT_VERSION,
        "autoencoder": autoencoder_hash(autoencoder),
        "text_encoder": text_encoder.weights_hash(),
        "data": data_hash,
        "verify": cache.verify,
        "data_config": asdict(data) | {"path": None},
        "context_dtype": cache.context_dtype,
        "buckets": None if buckets is None else [list(hw) for hw in buckets],
    }


# -- the cache -------------------------------------------------------------------------------------


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


class _PerRow(SequenceABC):
    """A per-row field of ``shard.json`` (``keys``, ``captions``), read a shard at a time when asked for."""

    def __init__(self, cache: "LatentCache", name: str):
        self._cache, self._name = cache, name

    def __len__(self) -> int:
        return len(self._cache)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s, local = self._cache._locate(int(i))
        return self._cache._shard_json(s)[self._name][local]

    def __iter__(self):
        for s in range(len(self._cache._shards)):
            yield from self._cache._shard_json(s)[self._name]


@dataclass
class _Shard:
    """One finished shard, memory-mapped."""

    folder: Path
    latents: dict  # bucket -> (n_k, C, h_k, w_k) memmap
    bucket_starts: np.ndarray  # (K + 1,) the shard's rows of bucket k: bucket_starts[k]:bucket_starts[k + 1]
    offsets: np.ndarray  # (n + 1,) caption options of row i: offsets[i]:offsets[i + 1]
    options: np.ndarray  # (sum of options,) rows of the shard's distinct captions
    key_hash: np.ndarray  # (n,) uint64
    contexts: Optional[torch.Tensor]  # (U, L, D) over a memory map, as stored


class LatentCache:
    """An opened cache folder; reads are row gathers from memory-mapped arrays, shard by shard.

    ``partial``: open a cache still being built, with the shards finished so far (``complete`` tells);
    without it such a cache is a ValueError.
    """

    def __init__(self, folder: Path, partial: bool = False):
        from conditioning.cache import _memmap

        self.folder = Path(folder)
        if (self.folder / "meta.json").is_file():
            self.meta = json.loads((self.folder / "meta.json").read_text())
            n_shards, self.complete = self.meta["shards"], True
        elif partial and (self.folder / "build.json").is_file():
            self.meta = json.loads((self.folder / "build.json").read_text())
            n_shards, self.complete = 0, False
            while (self.folder / _shard_name(n_shards) / "shard.json").is_file():
                n_shards += 1
        else:
            raise ValueError(f"the cache {self.folder} is not complete (no meta.json): it is being built, or its build "
                             "stopped (the next run resumes it); LatentCache(folder, partial=True) reads its finished shards")
        # bucket k's pixel size (height, width); a cache without buckets is one "bucket" of every row
        self.buckets: Optional[list[tuple[int, int]]] = [tuple(hw) for hw in self.meta["buckets"]] if self.meta.get("buckets") else None
        n_buckets = len(self.buckets) if self.buckets else 1
        self._shards: list[_Shard] = []
        heldout, counts = [], np.zeros(n_buckets, dtype=np.int64)
        for s in range(n_shards):
            sf = self.folder / _shard_name(s)
            info = json.loads((sf / "shard.json").read_text())
            def mapped(name: str) -> np.ndarray:  # a plain ndarray over the memory map (np.memmap's indexing is slower)
                return np.asarray(np.load(sf / name, mmap_mode="r"))

            latents = {k: mapped(f"latents-{k}.npy") for k in range(n_buckets) if info["bucket_counts"][k]}
            contexts = _memmap(self.folder.parent / "contexts" / info["contexts"])["context"] if info["contexts"] else None
            self._shards.append(_Shard(sf, latents, np.cumsum([0] + info["bucket_counts"]), mapped("caption_offsets.npy"),
                                       mapped("caption_rows.npy"), mapped("key_hash.npy"), contexts))
            heldout.append(np.load(sf / "heldout.npy"))
            counts += info["bucket_counts"]
        self.shard_starts = np.cumsum([0] + [len(h) for h in heldout]).astype(np.int64)  # (S + 1,)
        self.bucket_offsets = np.cumsum(np.concatenate([[0], counts])).astype(np.int64)  # (K + 1,)
        heldout = np.concatenate(heldout) if heldout else np.zeros(0, dtype=bool)  # (N,)
        self.train_indices = np.flatnonzero(~heldout)
        self.heldout_indices = np.flatnonzero(heldout)
        self.empty = torch.from_numpy(np.load(self.folder / "empty.npy"))  # (1, L, D) float32
        self.captions: Sequence[list[str]] = _PerRow(self, "captions")  # per image, its caption options
        self.keys: Sequence[str] = _PerRow(self, "keys")  # per image, its key (train.data.split)

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, row in it) of cache row ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of a cache of {len(self)} rows")
        s = int(np.searchsorted(self.shard_starts, i, side="right")) - 1
        return s, i - int(self.shard_starts[s])

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def shard_info(self, s: int) -> dict:
        """Shard s's ``shard.json``: per row its key and captions, its sorted distinct captions, its contexts
        file, its rows per bucket, the data rows it covers and what it skipped."""
        return self._shard_json(s)

    @functools.lru_cache(maxsize=2)
    def _shard_json(self, s: int) -> dict:
        return json.loads((self._shards[s].folder / "shard.json").read_text())

    def _first_latents(self, k: int) -> np.ndarray:
        return next(sh.latents[k] for sh in self._shards if k in sh.latents)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of every latent; a cache of several buckets has no one shape (``bucket_shape(k)``)."""
        if self.buckets is not None and len(self.buckets) > 1:
            raise ValueError(f"the cache {self.folder} holds {len(self.buckets)} bucket sizes; see bucket_shape(k)")
        return tuple(self._first_latents(0).shape[1:])

    def bucket_shape(self, k: int) -> tuple[int, int, int]:
        """(C, h, w) of bucket k's latents."""
        return tuple(self._first_latents(k).shape[1:])

    @property
    def sample_size(self) -> int:
        """The latent side of the square training size (data.resolution / f): validation images' size."""
        return int(self.meta.get("sample_size") or self.latent_shape[-1])

    def bucket_of(self, indices: Sequence[int]) -> np.ndarray:
        """(B,) the bucket of each of rows ``indices`` (0 for a cache without buckets)."""
        return np.searchsorted(self.bucket_offsets, np.asarray(indices, dtype=np.int64), side="right") - 1

    def groups(self, indices: Sequence[int]) -> list[np.ndarray]:
        """``indices`` split by bucket: one array per bucket, in bucket order, each keeping the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        of = self.bucket_of(indices)
        return [indices[of == k] for k in range(len(self.bucket_offsets) - 1)]

    def batches(self, indices: Sequence[int], batch_size: int) -> list[np.ndarray]:
        """``indices`` cut into batches of at most ``batch_size`` rows of one bucket, taking the buckets in
        turn (so the first few batches cover every bucket); without buckets: consecutive slices."""
        per_bucket = [[g[s : s + batch_size] for s in range(0, len(g), batch_size)] for g in self.groups(indices)]
        return [b for turn in itertools.zip_longest(*per_bucket) for b in turn if b is not None]

    def _by_shard(self, indices: np.ndarray) -> Iterator[tuple[_Shard, np.ndarray, np.ndarray]]:
        """(shard, positions in ``indices``, rows in the shard) for each shard ``indices`` touch."""
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"rows {indices.tolist()} of a cache of {len(self)} rows")
        of = np.searchsorted(self.shard_starts, indices, side="right") - 1  # (B,)
        order = np.argsort(of, kind="stable")  # positions grouped by shard
        cuts = np.flatnonzero(np.diff(of[order])) + 1
        for where in np.split(order, cuts) if len(order) else []:
            s = int(of[where[0]])
            yield self._shards[s], where, indices[where] - self.shard_starts[s]

    def latents(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 latents of images ``indices``, which must share one bucket."""
        indices = np.asarray(indices, dtype=np.int64)
        buckets = np.unique(self.bucket_of(indices))
        if len(buckets) > 1:
            raise ValueError(f"rows {indices.tolist()} come from {len(buckets)} buckets; a batch takes one bucket's rows")
        k = int(buckets[0]) if len(buckets) else 0
        out = np.empty((len(indices), *self._first_latents(k).shape[1:]), dtype=np.float32)  # (B, C, h, w)
        for shard, where, local in self._by_shard(indices):
            out[where] = shard.latents[k][local - shard.bucket_starts[k]]
        return torch.from_numpy(out)

    def contexts(self, indices: Sequence[int], epoch: int = 0, seed: int = 0) -> torch.Tensor:
        """(B, L, D) float32 contexts of images ``indices``; an image with several captions gets the one
        ``train.data.split.caption_index`` draws for (seed, epoch, its key), as every trainer does."""
        indices = np.asarray(indices, dtype=np.int64)
        out = torch.empty((len(indices), *self.empty.shape[1:]), dtype=torch.float32)  # (B, L, D)
        for shard, where, local in self._by_shard(indices):
            starts, counts = shard.offsets[local], shard.offsets[local + 1] - shard.offsets[local]  # (b,), (b,)
            pick = np.zeros(len(local), dtype=np.int64)  # one caption: option 0; several: the draw
            for j in np.flatnonzero(counts > 1):
                pick[j] = caption_index_of_hash(int(counts[j]), seed, epoch, int(shard.key_hash[local[j]]))
            rows = np.asarray(shard.options[starts + pick], dtype=np.int64)  # (b,)
            out[torch.from_numpy(where)] = shard.contexts[torch.from_numpy(rows)].float()
        return out


def cache_folder(cache: CacheConfig, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache.dir) / f"ldm-{digest}"


# -- writing ---------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One usable row, ready to encode."""

    key: str
    captions: list[str]
    heldout: bool
    bucket: int
    image: torch.Tensor  # (3, H, W) in [-1, 1]


class _FolderRows:
    """The rows of a scanned folder data set, in cache order: ``items(start)`` yields, for each row from
    ``start`` on, a ``_Row`` or the reason it is left out (an image changed on disk since the scan)."""

    def __init__(self, parts: Split, buckets: Optional[dict]):
        self.parts, self.buckets = parts, buckets
        rows = [(ds, i, heldout) for ds, ds_rows, heldout in ((parts.train, parts.train_rows, False),
                                                              (parts.heldout, parts.heldout_rows, True)) for i in ds_rows]
        if buckets is not None:  # bucket by bucket, training rows first within each (a stable sort)
            rows.sort(key=lambda r: buckets["index"][id(r[0]), r[1]])
        self.rows = rows
        self.total = len(rows)
        sizes = buckets["sizes"] if buckets else [None]
        self._transforms = [ImageTransform(hw, crop="center") if hw else None for hw in sizes]

    def bucket(self, row) -> int:
        return self.buckets["index"][id(row[0]), row[1]] if self.buckets else 0

    def capacity(self, start: int, stop: int) -> collections.Counter:
        """Rows per bucket among items [start, stop): the latents files' sizes before any is dropped."""
        return collections.Counter(self.bucket(r) for r in self.rows[start:stop])

    def items(self, start: int) -> Iterator[Any]:
        for ds, i, heldout in self.rows[start:]:
            k = self.bucket((ds, i))
            transform = self._transforms[k] or ds.transform
            image = next((image for _, image in ds.read_rows([i], transform)), None)
            yield CHANGED if image is None else _Row(ds.key(i), ds.captions(i), heldout, k, image)

    def summary(self, shards: list[dict]) -> str:
        return self.parts.summary()


class _StreamRows:
    """The rows of a stream (``train.data.streams``), checked as ``load_captioned_images`` checks rows,
    held out by the key hash."""

    total = None  # unknown until read

    def __init__(self, data: DataConfig):
        self.data = data
        self.stream = open_stream(data.path, caption_column=data.caption_column, allow_outside_paths=data.allow_outside_paths)
        self.transform = ImageTransform(data.resolution, crop="center")
        self.min_size = min(32, data.resolution)

    def capacity(self, start: int, stop: int) -> collections.Counter:
        return collections.Counter({0: stop - start})

    def items(self, start: int) -> Iterator[Any]:
        fraction = self.data.holdout_fraction
        for key, ref, cell, reason in self.stream.rows(skip=start):
            checked = reason or check_row(ref, cell, self.stream.inside, self.min_size)
            if isinstance(checked, str):
                yield checked
                continue
            image, options = checked
            yield _Row(key, options, key_hash(key) / 2**64 < fraction, 0, self.transform(image))

    def summary(self, shards: list[dict]) -> str:
        skipped = collections.Counter(self.stream.skipped)
        for info in shards:
            skipped.update(info["skipped"])
        kept = sum(sum(info["bucket_counts"]) for info in shards)
        heldout = sum(info["heldout"] for info in shards)
        summary = DataSummary(self.data.path, self.stream.format, None, kept, dict(skipped),
                              sum(info["captions_n"] for info in shards), sum(info["long_captions"] for info in shards),
                              max([info["longest"] for info in shards] or [0]))
        return f"{summary}\nheld out: {heldout} images (by a hash of each row's key); training on {kept - heldout}"


def _store(latents: dict, path_of, capacity: collections.Counter, k: int, z: torch.Tensor, at: int) -> None:
    """Write ``z`` (b, C, h, w) at row ``at`` of bucket k's latents file, made on first use."""
    if k not in latents:
        latents[k] = np.lib.format.open_memmap(path_of(k), mode="w+", dtype=np.float32,
                                               shape=(capacity[k], *z.shape[1:]))
    latents[k][at : at + len(z)] = z.numpy()


def _truncate(path: Path, array: np.ndarray, n: int) -> None:
    """Keep the first ``n`` rows of the latents file ``path`` (``array`` its memmap)."""
    array.flush()
    if n == len(array):
        return
    tmp = path.with_suffix(".tmp.npy")
    kept = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *array.shape[1:]))
    for start in range(0, n, 4096):
        kept[start : min(start + 4096, n)] = array[start : min(start + 4096, n)]
    kept.flush()
    del kept
    os.replace(tmp, path)


@torch.no_grad()
def _write_shard(folder: Path, s: int, items: Iterator[Any], capacity: collections.Counter, n_buckets: int,
                 autoencoder, text_encoder, *, batch_size: int, context_dtype: str, device, bar) -> dict:
    """Encode shard s's items (``_Row`` or a skip reason) into ``folder/shard-<s>``, atomically; returns its
    shard.json (with ``"covered"``: how many items it consumed, 0 at the end of a stream)."""
    from conditioning import EmbeddingCache

    with atomic_directory(folder / _shard_name(s), durable=True, keep_existing=True) as tmp:
        latents: dict = {}
        written = collections.Counter()  # bucket -> rows written
        rows: list[_Row] = []  # the rows written, images dropped
        skipped, covered = collections.Counter(), 0
        batch: list[_Row] = []

        def flush():
            if batch:
                k = batch[0].bucket
                z = autoencoder.encode(torch.stack([r.image for r in batch]).to(device)).float().cpu()  # (B, C, h, w)
                _store(latents, lambda k: tmp / f"latents-{k}.npy", capacity, k, z, written[k])
                written[k] += len(z)
                rows.extend(_Row(r.key, r.captions, r.heldout, r.bucket, None) for r in batch)
                bar.update(len(batch))
                batch.clear()

        for item in items:
            covered += 1
            if isinstance(item, str):
                skipped[item] += 1
                bar.update(1)
                continue
            if batch and (batch[0].bucket != item.bucket or len(batch) == batch_size):
                flush()
            batch.append(item)
        flush()
        for k, array in latents.items():
            _truncate(tmp / f"latents-{k}.npy", array, written[k])
        latents.clear()

        captions = [r.captions for r in rows]
        distinct = sorted({c for options in captions for c in options})
        contexts = None
        if distinct:
            # one folder per storage type: the embedding cache's file names do not say it
            contexts = EmbeddingCache(folder.parent / "contexts" / context_dtype, text_encoder, batch_size=batch_size,
                                      store_dtype=CONTEXT_DTYPES[context_dtype], progress=False).get(distinct).path
            contexts = f"{context_dtype}/{contexts.name}"
        index = {c: i for i, c in enumerate(distinct)}
        np.save(tmp / "caption_offsets.npy", np.cumsum([0] + [len(o) for o in captions]).astype(np.int64))
        np.save(tmp / "caption_rows.npy", np.array([index[c] for o in captions for c in o], dtype=np.int64))
        np.save(tmp / "heldout.npy", np.array([r.heldout for r in rows], dtype=bool))
        np.save(tmp / "key_hash.npy", np.array([key_hash(r.key) for r in rows], dtype=np.uint64))
        tokens = {c: clip_token_count(c) for c in distinct}
        info = {"keys": [r.key for r in rows], "captions": captions, "distinct_captions": distinct, "contexts": contexts,
                "bucket_counts": [written[k] for k in range(n_buckets)], "covered": covered, "skipped": dict(skipped),
                "heldout": int(sum(r.heldout for r in rows)), "captions_n": sum(len(o) for o in captions),
                "long_captions": sum(tokens[c] > MAX_TOKENS for o in captions for c in o),
                "longest": max(tokens.values(), default=0)}
        if covered == 0:  # the stream ended at the previous shard: nothing to keep
            raise _EndOfData
        (tmp / "shard.json").write_text(json.dumps(info, ensure_ascii=False))
    return info


class _EndOfData(Exception):
    """A shard with no row: the data ended."""


def write_cache(folder: Path, key: dict, source, autoencoder, text_encoder, *, batch_size: int, context_dtype: str,
                shard_size: int, device, progress: bool = True, buckets: Optional[dict] = None) -> Path:
    """Write (or resume) the cache folder of ``source`` (``_FolderRows`` or ``_StreamRows``) shard by shard.

    ``buckets``: None, or {"sizes": [(height, width), ...], "index": {(id(data set), row): bucket},
    "report": str, "sample_size": int}: each image resized to cover its bucket and centre-cropped.
    """
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    layout = {"key": key, "shard_size": shard_size, "rows": source.total,
              "buckets": [list(hw) for hw in buckets["sizes"]] if buckets else None,
              "sample_size": buckets["sample_size"] if buckets else None}
    if (folder / "build.json").is_file():  # resuming: the layout it was started with
        layout = json.loads((folder / "build.json").read_text())
        shard_size = layout["shard_size"]
    else:
        with atomic_path(folder / "empty.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, text_encoder.empty_context(1).float().cpu().numpy())
        write_text(folder / "build.json", json.dumps(layout))
    n_buckets = len(buckets["sizes"]) if buckets else 1
    done = 0
    while (folder / _shard_name(done) / "shard.json").is_file():
        done += 1
    infos = [json.loads((folder / _shard_name(s) / "shard.json").read_text()) for s in range(done)]
    bar = tqdm(total=source.total, initial=done * shard_size if source.total else 0, desc="caching latents",
               unit="img", disable=not progress)
    items = source.items(done * shard_size)
    s = done
    while source.total is None or s * shard_size < source.total:
        start = s * shard_size
        stop = start + shard_size if source.total is None else min(start + shard_size, source.total)
        chunk = itertools.islice(items, stop - start)
        if (folder / _shard_name(s) / "shard.json").is_file():  # another builder wrote it meanwhile
            covered = sum(1 for _ in chunk)
            infos.append(json.loads((folder / _shard_name(s) / "shard.json").read_text()))
        else:
            try:
                infos.append(_write_shard(folder, s, chunk, source.capacity(start, stop), n_buckets, autoencoder,
                                          text_encoder, batch_size=batch_size, context_dtype=context_dtype,
                                          device=device, bar=bar))
            except _EndOfData:
                break
            covered = infos[-1]["covered"]
        s += 1
        if covered < stop - start:
            break
    bar.close()
    if not any(sum(info["bucket_counts"]) for info in infos):
        raise ValueError(f"{key['data_config'].get('path') or 'the data set'}: none of its images can be read "
                         f"(see `ldm data check`)")
    meta = layout | {"shards": len(infos), "summary": source.summary(infos)}
    if buckets is not None:
        meta["bucket_report"] = buckets["report"]
    write_text(folder / "meta.json", json.dumps(meta, ensure_ascii=False))
    for leftover in folder.iterdir():  # temporary shard folders of a build that was killed
        if leftover.name.startswith("."):
            shutil.rmtree(leftover, ignore_errors=True)
    return folder


def plan_buckets(data: Split, candidates: list[tuple[int, int]], enabled, sample_size: int) -> Optional[dict]:
    """The buckets ``write_cache`` uses: every image to its nearest candidate, only the buckets used
    kept; None when ``enabled`` is "auto" and the images all fall in one bucket."""
    rows = [(ds, i, heldout) for ds, ds_rows, heldout in ((data.train, data.train_rows, False),
                                                          (data.heldout, data.heldout_rows, True)) for i in ds_rows]
    index, cropped = assign(np.array([ds.size(i) for ds, i, _ in rows]).reshape(-1, 2), candidates)  # (N,), (N,)
    used = sorted(set(index.tolist()))
    if enabled == "auto" and len(used) < 2:
        return None
    renumber = {k: j for j, k in enumerate(used)}  # candidate -> bucket of the cache
    return {"sizes": [candidates[k] for k in used],
            "index": {(id(ds), i): renumber[int(k)] for (ds, i, _), k in zip(rows, index)},
            "report": bucket_report(candidates, index, cropped, heldout=np.array([h for *_, h in rows])),
            "sample_size": sample_size}




def build_cache(cache: CacheConfig, data: DataConfig, autoencoder, text_encoder, device="cpu", *,
                progress: bool = True, granularity: Optional[int] = None) -> tuple[Path, bool]:
    """The cache folder for these encoders and data, written (or its stopped build resumed) if not
    complete; returns (folder, built_now). ``granularity``: the model's (autoencoder factor x 2^U-Net
    down-samplings), needed when ``data.buckets`` is on or auto."""
    key = cache_key(cache, data, autoencoder, text_encoder, granularity)
    folder = cache_folder(cache, key)
    if (folder / "meta.json").is_file():
        return folder, False

    def waiting():
        if progress:
            print(f"waiting for another process to finish the latent cache {folder}", file=sys.stderr)

    # One builder at a time: the build removes the temporary shard folders a killed build left behind,
    # which would be another live builder's (two runs started together on one data set). The lock file goes
    # once the cache is complete: whoever takes the lock after that finds meta.json and builds nothing.
    with exclusive_lock(folder.parent / f".{folder.name}.lock", waiting=waiting) as lock:
        if (folder / "meta.json").is_file():  # the other process built it
            return folder, False
        _build_cache(folder, key, cache, data, autoencoder, text_encoder, device, progress)
        lock.unlink(missing_ok=True)
    return folder, True


def _build_cache(folder: Path, key: dict, cache: CacheConfig, data: DataConfig, autoencoder, text_encoder, device,
                 progress: bool) -> None:
    buckets = None
    if stream_format(data.path) is not None:
        source = _StreamRows(data)
    else:
        parts = load_split(data.path, data.holdout_fraction, caption_column=data.caption_column, size=data.resolution,
                           crop="center", min_size=min(32, data.resolution), progress=progress,
                           allow_outside_paths=data.allow_outside_paths)
        if key["buckets"] is not None:
            buckets = plan_buckets(parts, [tuple(hw) for hw in key["buckets"]], data.buckets.enabled,
                                   data.resolution // autoencoder.downsample_factor)
        source = _FolderRows(parts, buckets)
    write_cache(folder, key, source, autoencoder, text_encoder, batch_size=cache.batch_size,
                context_dtype=cache.context_dtype, shard_size=cache.shard_size, device=device, progress=progress,
                buckets=buckets)
    if progress:
        # after the encoding: it counts the rows that changed since the scan
        meta = json.loads((folder / "meta.json").read_text())
        print(meta["summary"] + ("\n" + buckets["report"] if buckets else ""), file=sys.stderr)
