"""The training cache: every image's latent and every caption's context, computed once with the
frozen autoencoder and text encoder, stored on disk as memory-mapped ``.npy`` arrays.

    cache = build_cache(config.cache, config.data, autoencoder, text_encoder, device)
    z0 = cache.latents(idx)          # (B, C, h, w) float32, already times the scaling factor
    ctx = cache.contexts(idx)        # (B, L, D) float32
    cache.empty                      # (1, L, D) the empty prompt's context (caption dropout)

A cache lives in ``<cache.dir>/ldm-<key>/``. The key hashes the autoencoder's weights and scaling,
the text encoder's ``weights_hash()``, the bytes of every file of the data set (the folder given as
``data.path``, or the folder holding that file), the resolution and the caption column, so a changed
encoder or data set gets a fresh cache and an unchanged one is reused by every run. The folder is
written under a temporary name and renamed when complete. The data is read by ``train.data``
(every format it knows, bad rows skipped and counted, paths kept inside the data folder unless
``data.allow_outside_paths``), resized and centre-cropped once: a cached run has no random crops or
flips. An image that changed on disk between the scan and the encoding is left out and counted.

Files: ``latents.npy`` (N, C, h, w) float32; ``caption_offsets.npy`` (N + 1,) and
``caption_rows.npy``: image i's caption options are rows
``caption_rows[caption_offsets[i]:caption_offsets[i + 1]]`` of the sorted distinct captions, whose
contexts live in the text encoder's own embedding cache (``conditioning.EmbeddingCache``, in
``<cache.dir>/contexts/``, keyed by the encoder's hash and the captions); ``empty.npy`` (1, L, D);
``heldout.npy`` (N,) bool (``train.data.split``: the held-out rule of every trainer); ``meta.json``
(key, captions, row keys, the contexts file, the loader's summary).
For a VQ autoencoder the latents are the continuous pre-quantisation ones its ``encode`` returns.

Aspect-ratio buckets (``data.buckets``, ``train.data.buckets``): each image is resized to cover the
bucket of nearest aspect ratio and centre-cropped to it; the rows are then ordered bucket by bucket
(training rows before held-out ones within each), ``latents-<k>.npy`` holds bucket k's latents
(n_k, C, h_k, w_k) and ``bucket_offsets.npy`` (K + 1,) maps them: rows
``bucket_offsets[k]:bucket_offsets[k + 1]`` are bucket k's, in its file's order. ``meta.json`` adds the
bucket sizes (pixels, (height, width)) and the cropping report. The key holds the bucket settings and
the candidate buckets they make for this model, so a changed setting never reads a stale cache.
``enabled: auto`` buckets when the images fall in more than one bucket; otherwise the cache is the
plain one above, exactly as without buckets.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ldm_io import atomic_directory
from train.data import ImageTransform, Split, load_split
from train.data.buckets import assign, bucket_report, check_sizes, make_buckets, parse_size
from train.data.sources import is_inside
from train.data.split import caption_index
from train.unet.config import CacheConfig, DataConfig

FORMAT_VERSION = 4
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
    if not data.path or not Path(data.path).exists():
        raise FileNotFoundError(f"data.path={data.path!r} does not exist; give a captioned image folder (e.g. made by `ldm data`)")
    buckets = candidate_buckets(data, autoencoder.downsample_factor, granularity)
    return {
        "format": FORMAT_VERSION,
        "autoencoder": autoencoder_hash(autoencoder),
        "text_encoder": text_encoder.weights_hash(),
        "data": folder_hash(Path(data.path) if Path(data.path).is_dir() else Path(data.path).parent, data.allow_outside_paths),
        "data_config": asdict(data) | {"path": None},
        "context_dtype": cache.context_dtype,
        "buckets": None if buckets is None else [list(hw) for hw in buckets],
    }


# -- the cache -------------------------------------------------------------------------------------


class LatentCache:
    """An opened cache folder; reads are row gathers from memory-mapped arrays."""

    def __init__(self, folder: Path):
        from conditioning.cache import CachedEmbeddings

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        # bucket k's pixel size (height, width), its latents (n_k, C, h_k, w_k) and its rows offsets[k]:offsets[k + 1];
        # a cache without buckets is one "bucket" of every row
        self.buckets: Optional[list[tuple[int, int]]] = [tuple(hw) for hw in self.meta["buckets"]] if self.meta.get("buckets") else None
        if self.buckets is None:
            self._latents = [np.load(self.folder / "latents.npy", mmap_mode="r")]  # [(N, C, h, w)]
            self.bucket_offsets = np.array([0, len(self._latents[0])], dtype=np.int64)
        else:
            self._latents = [np.load(self.folder / f"latents-{k}.npy", mmap_mode="r") for k in range(len(self.buckets))]
            self.bucket_offsets = np.load(self.folder / "bucket_offsets.npy")  # (K + 1,)
        self._offsets = np.load(self.folder / "caption_offsets.npy")  # (N + 1,) image i: options offsets[i]:offsets[i+1]
        self._options = np.load(self.folder / "caption_rows.npy")  # (sum of options,) rows of the distinct captions
        contexts = self.folder.parent / "contexts" / self.meta["contexts"]  # conditioning.EmbeddingCache's file
        self._contexts = CachedEmbeddings(contexts, self.meta["distinct_captions"], computed=False)
        self.empty = torch.from_numpy(np.load(self.folder / "empty.npy"))  # (1, L, D) float32
        heldout = np.load(self.folder / "heldout.npy")  # (N,)
        self.train_indices = np.flatnonzero(~heldout)
        self.heldout_indices = np.flatnonzero(heldout)
        self.captions: list[list[str]] = self.meta["captions"]  # per image, its caption options
        self.keys: list[str] = self.meta["keys"]  # per image, its key (train.data.split)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of every latent; a cache of several buckets has no one shape (``bucket_shape(k)``)."""
        if len(self._latents) > 1:
            raise ValueError(f"the cache {self.folder} holds {len(self._latents)} bucket sizes; see bucket_shape(k)")
        return tuple(self._latents[0].shape[1:])

    def bucket_shape(self, k: int) -> tuple[int, int, int]:
        """(C, h, w) of bucket k's latents."""
        return tuple(self._latents[k].shape[1:])

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
        return [indices[of == k] for k in range(len(self._latents))]

    def batches(self, indices: Sequence[int], batch_size: int) -> list[np.ndarray]:
        """``indices`` cut into batches of at most ``batch_size`` rows of one bucket, taking the buckets in
        turn (so the first few batches cover every bucket); without buckets: consecutive slices."""
        per_bucket = [[g[s : s + batch_size] for s in range(0, len(g), batch_size)] for g in self.groups(indices)]
        return [b for turn in itertools.zip_longest(*per_bucket) for b in turn if b is not None]

    def latents(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 latents of images ``indices``, which must share one bucket."""
        indices = np.asarray(indices, dtype=np.int64)
        buckets = np.unique(self.bucket_of(indices))
        if len(buckets) > 1:
            raise ValueError(f"rows {indices.tolist()} come from {len(buckets)} buckets; a batch takes one bucket's rows")
        k = int(buckets[0]) if len(buckets) else 0
        return torch.from_numpy(np.ascontiguousarray(self._latents[k][indices - self.bucket_offsets[k]]))

    def contexts(self, indices: Sequence[int], epoch: int = 0, seed: int = 0) -> torch.Tensor:
        """(B, L, D) float32 contexts of images ``indices``; an image with several captions gets the one
        ``train.data.split.caption_index`` draws for (seed, epoch, its key), as every trainer does."""
        indices = np.asarray(indices)
        starts, counts = self._offsets[indices], np.diff(self._offsets)[indices]  # (B,), (B,)
        pick = [caption_index(int(n), seed, epoch, self.keys[int(i)]) for i, n in zip(indices, counts)]
        return self._contexts.batch(self._options[starts + np.array(pick, dtype=np.int64)])[0].float()  # (B, L, D)


def cache_folder(cache: CacheConfig, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache.dir) / f"ldm-{digest}"


def _encode_group(path: Path, rows: list, transform, autoencoder, *, batch_size: int, device, bar) -> list:
    """Encode the images of ``rows`` ((data set, row, held out), read through ``transform``) into the
    latents file ``path`` (n, C, h, w); returns the rows written (those whose image still decodes)."""
    readable = ((ds, i, heldout, image) for ds, ds_rows, heldout in _runs(rows)
                for i, image in ds.read_rows(ds_rows, transform(ds)))
    written, latents = [], None  # (data set, row, held out) of every image encoded
    while batch := list(itertools.islice(readable, batch_size)):
        images = torch.stack([image for *_, image in batch])  # (B, 3, H, W)
        z = autoencoder.encode(images.to(device)).float().cpu()  # (B, C, h, w)
        if latents is None:
            latents = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(rows), *z.shape[1:]))
        latents[len(written) : len(written) + len(z)] = z.numpy()
        written += [(ds, i, heldout) for ds, i, heldout, _ in batch]
        bar.update(len(z))
    if latents is None:
        return written
    latents.flush()
    if len(written) < len(rows):  # keep the rows written
        tmp = path.with_suffix(".tmp.npy")
        kept = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(written), *latents.shape[1:]))
        for start in range(0, len(written), 4096):
            end = min(start + 4096, len(written))
            kept[start:end] = latents[start:end]
        kept.flush()
        del kept, latents
        os.replace(tmp, path)
    return written


def _runs(rows: list):
    """(data set, its rows, held out) for each run of consecutive ``rows`` of one data set and side."""
    for (ds, heldout), run in itertools.groupby(rows, key=lambda r: (id(r[0]), r[2])):
        run = list(run)
        yield run[0][0], [i for _, i, _ in run], run[0][2]


@torch.no_grad()
def write_cache(folder: Path, key: dict, data: Split, autoencoder, text_encoder, *,
                batch_size: int, context_dtype: str, device, progress: bool = True,
                buckets: Optional[dict] = None) -> Path:
    """Encode every image and distinct caption and write the cache folder atomically.

    ``buckets``: None (every image through its data set's own transform into ``latents.npy``), or
    {"sizes": [(height, width), ...], "index": {(id(data set), row): bucket}, "report": str,
    "sample_size": int}: each image resized to cover its bucket and centre-cropped, one latents file per bucket.
    """
    from tqdm import tqdm

    from conditioning import EmbeddingCache

    rows = [(ds, i, heldout) for ds, ds_rows, heldout in ((data.train, data.train_rows, False),
                                                          (data.heldout, data.heldout_rows, True)) for i in ds_rows]
    if buckets is None:
        groups = [(rows, lambda ds: ds.transform, "latents.npy")]
    else:
        groups = [([r for r in rows if buckets["index"][id(r[0]), r[1]] == k],
                   lambda ds, hw=hw: ImageTransform(hw, crop="center"), f"latents-{k}.npy")
                  for k, hw in enumerate(buckets["sizes"])]
    # another process that finished the same cache first keeps its folder
    with atomic_directory(folder, durable=True, keep_existing=True) as tmp:
        bar = tqdm(total=len(rows), desc="caching latents", unit="img", disable=not progress)
        written = []
        for group, transform, name in groups:
            written.append(_encode_group(tmp / name, group, transform, autoencoder, batch_size=batch_size,
                                         device=device, bar=bar) if group else [])
        bar.close()
        if not any(written):
            raise ValueError(f"{data.train.summary().path}: none of its images can be read any more (they changed on "
                             "disk since the scan)")
        rows = [r for w in written for r in w]  # the cache's order: bucket by bucket
        if buckets is not None:
            for k, w in enumerate(written):
                if not w:  # a bucket whose every image changed on disk: an empty file of its shape
                    h, wd = buckets["sizes"][k]
                    f = autoencoder.downsample_factor
                    np.save(tmp / f"latents-{k}.npy", np.zeros((0, autoencoder.latent_channels, h // f, wd // f), np.float32))
            np.save(tmp / "bucket_offsets.npy", np.cumsum([0] + [len(w) for w in written]).astype(np.int64))

        captions = [ds.captions(i) for ds, i, _ in rows]  # per image, its options
        distinct = sorted({c for options in captions for c in options})
        row = {c: i for i, c in enumerate(distinct)}
        contexts = EmbeddingCache(folder.parent / "contexts", text_encoder, batch_size=batch_size,
                                  store_dtype=CONTEXT_DTYPES[context_dtype], progress=progress).get(distinct)
        np.save(tmp / "caption_offsets.npy", np.cumsum([0] + [len(o) for o in captions]).astype(np.int64))
        np.save(tmp / "caption_rows.npy", np.array([row[c] for o in captions for c in o], dtype=np.int64))
        np.save(tmp / "empty.npy", text_encoder.empty_context(1).float().cpu().numpy())
        np.save(tmp / "heldout.npy", np.array([h for _, _, h in rows], dtype=bool))
        meta = {"key": key, "captions": captions, "keys": [ds.key(i) for ds, i, _ in rows], "distinct_captions": distinct,
                "contexts": contexts.path.name, "summary": data.summary()}
        if buckets is not None:
            meta |= {"buckets": [list(hw) for hw in buckets["sizes"]], "bucket_report": buckets["report"],
                     "sample_size": buckets["sample_size"]}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
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
    """The cache folder for these encoders and data, written if missing; returns (folder, built_now).
    ``granularity``: the model's (autoencoder factor x 2^U-Net down-samplings), needed when
    ``data.buckets`` is on or auto."""
    key = cache_key(cache, data, autoencoder, text_encoder, granularity)
    folder = cache_folder(cache, key)
    if (folder / "meta.json").is_file():
        return folder, False
    parts = load_split(data.path, data.holdout_fraction, caption_column=data.caption_column, size=data.resolution,
                       crop="center", min_size=min(32, data.resolution), progress=progress,
                       allow_outside_paths=data.allow_outside_paths)
    buckets = None
    if key["buckets"] is not None:
        buckets = plan_buckets(parts, [tuple(hw) for hw in key["buckets"]], data.buckets.enabled,
                               data.resolution // autoencoder.downsample_factor)
    write_cache(folder, key, parts, autoencoder, text_encoder, batch_size=cache.batch_size,
                context_dtype=cache.context_dtype, device=device, progress=progress, buckets=buckets)
    if progress:
        # after the encoding: it counts the rows that changed since the scan
        print(parts.summary() + ("\n" + buckets["report"] if buckets else ""), file=sys.stderr)
    return folder, True
