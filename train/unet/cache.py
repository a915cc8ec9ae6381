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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldm_io import atomic_directory
from train.data import Split, load_split
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


def cache_key(cache: CacheConfig, data: DataConfig, autoencoder, text_encoder) -> dict:
    """The parts of the cache key, as a JSON-able dict (its hash names the folder)."""
    if not data.path or not Path(data.path).exists():
        raise FileNotFoundError(f"data.path={data.path!r} does not exist; give a captioned image folder (e.g. made by `ldm data`)")
    return {
        "format": FORMAT_VERSION,
        "autoencoder": autoencoder_hash(autoencoder),
        "text_encoder": text_encoder.weights_hash(),
        "data": folder_hash(Path(data.path) if Path(data.path).is_dir() else Path(data.path).parent, data.allow_outside_paths),
        "data_config": asdict(data) | {"path": None},
        "context_dtype": cache.context_dtype,
    }


# -- the cache -------------------------------------------------------------------------------------


class LatentCache:
    """An opened cache folder; reads are row gathers from memory-mapped arrays."""

    def __init__(self, folder: Path):
        from conditioning.cache import CachedEmbeddings

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._latents = np.load(self.folder / "latents.npy", mmap_mode="r")  # (N, C, h, w)
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
        return tuple(self._latents.shape[1:])

    def latents(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 latents of images ``indices``."""
        return torch.from_numpy(np.ascontiguousarray(self._latents[np.asarray(indices)]))

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


@torch.no_grad()
def write_cache(folder: Path, key: dict, data: Split, autoencoder, text_encoder, *,
                batch_size: int, context_dtype: str, device, progress: bool = True) -> Path:
    """Encode every image and distinct caption and write the cache folder atomically."""
    from tqdm import tqdm

    from conditioning import EmbeddingCache

    n = len(data.train_rows) + len(data.heldout_rows)  # at most: rows changed on disk since the scan are left out
    readable = ((ds, i, heldout, image) for ds, ds_rows, heldout in ((data.train, data.train_rows, False),
                                                                      (data.heldout, data.heldout_rows, True))
                for i, image in ds.read_rows(ds_rows, ds.transform))
    rows = []  # (data set, row, held out) of every image encoded
    # another process that finished the same cache first keeps its folder
    with atomic_directory(folder, durable=True, keep_existing=True) as tmp:
        latents = None
        bar = tqdm(total=n, desc="caching latents", unit="img", disable=not progress)
        while batch := list(itertools.islice(readable, batch_size)):
            images = torch.stack([image for *_, image in batch])  # (B, 3, H, W)
            z = autoencoder.encode(images.to(device)).float().cpu()  # (B, C, h, w)
            if latents is None:
                latents = np.lib.format.open_memmap(tmp / "latents.npy", mode="w+", dtype=np.float32, shape=(n, *z.shape[1:]))
            latents[len(rows) : len(rows) + len(z)] = z.numpy()
            rows += [(ds, i, heldout) for ds, i, heldout, _ in batch]
            bar.update(len(z))
        bar.close()
        if latents is None:
            raise ValueError(f"{data.train.summary().path}: none of its images can be read any more (they changed on "
                             "disk since the scan)")
        latents.flush()
        if len(rows) < n:  # keep the rows written
            kept = np.lib.format.open_memmap(tmp / "latents.tmp.npy", mode="w+", dtype=np.float32,
                                             shape=(len(rows), *latents.shape[1:]))
            for start in range(0, len(rows), 4096):
                end = min(start + 4096, len(rows))
                kept[start:end] = latents[start:end]
            kept.flush()
            del kept, latents
            os.replace(tmp / "latents.tmp.npy", tmp / "latents.npy")
        else:
            del latents

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
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
    return folder


def build_cache(cache: CacheConfig, data: DataConfig, autoencoder, text_encoder, device="cpu", *,
                progress: bool = True) -> tuple[Path, bool]:
    """The cache folder for these encoders and data, written if missing; returns (folder, built_now)."""
    key = cache_key(cache, data, autoencoder, text_encoder)
    folder = cache_folder(cache, key)
    if (folder / "meta.json").is_file():
        return folder, False
    parts = load_split(data.path, data.holdout_fraction, caption_column=data.caption_column, size=data.resolution,
                       crop="center", min_size=min(32, data.resolution), progress=progress,
                       allow_outside_paths=data.allow_outside_paths)
    write_cache(folder, key, parts, autoencoder, text_encoder, batch_size=cache.batch_size,
                context_dtype=cache.context_dtype, device=device, progress=progress)
    if progress:
        print(parts.summary(), file=sys.stderr)  # after the encoding: it counts the rows that changed since the scan
    return folder, True
