"""The training cache: every image's latent and every caption's context, computed once with the
frozen autoencoder and text encoder, stored on disk as memory-mapped ``.npy`` arrays.

    cache = build_cache(config.cache, config.data, autoencoder, text_encoder, device)
    z0 = cache.latents(idx)          # (B, C, h, w) float32, already times the scaling factor
    ctx = cache.contexts(idx)        # (B, L, D) float32
    cache.empty                      # (1, L, D) the empty prompt's context (caption dropout)

A cache lives in ``<cache.dir>/ldm-<key>/``. The key hashes the autoencoder's weights and scaling,
the text encoder's ``weights_hash()``, the bytes of every file of the data set, the resolution and
the caption column, so a changed encoder or data set gets a fresh cache and an unchanged one is
reused by every run. The folder is written under a temporary name and renamed when complete.

Files: ``latents.npy`` (N, C, h, w) float32; ``contexts.npy`` (U, L, D) over the U distinct
captions (float32, float16, or bfloat16 stored as uint16); ``context_rows.npy`` (N,) the row of
each image's caption; ``empty.npy`` (1, L, D); ``heldout.npy`` (N,) bool; ``meta.json``.
For a VQ autoencoder the latents are the continuous pre-quantisation ones its ``encode`` returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from train.ldm_config import CacheConfig, DataConfig

FORMAT_VERSION = 1
HELDOUT_SPLITS = ("test", "validation", "val", "heldout")


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


def folder_hash(folder: Path) -> str:
    """sha256 over every file under ``folder`` (relative path and bytes), hidden files excluded."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(cache: CacheConfig, data: DataConfig, autoencoder, text_encoder) -> dict:
    """The parts of the cache key, as a JSON-able dict (its hash names the folder)."""
    return {
        "format": FORMAT_VERSION,
        "autoencoder": autoencoder_hash(autoencoder),
        "text_encoder": text_encoder.weights_hash(),
        "data": folder_hash(Path(data.path)),
        "data_config": asdict(data) | {"path": None},
        "context_dtype": cache.context_dtype,
    }


# -- reading the data set ------------------------------------------------------------------------


class CaptionedImages:
    """(image (3, H, W) in [-1, 1], caption) pairs of an imagefolder, and which are held out."""

    def __init__(self, root: Path, rows: list[dict], data: DataConfig):
        self.root, self.rows, self.data = root, rows, data
        self.captions = [r[data.caption_column] for r in rows]
        self.heldout = _heldout_flags(rows, data.holdout_fraction)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        with Image.open(self.root / self.rows[i]["file_name"]) as im:
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, "white")
            im = Image.alpha_composite(white, im).convert("RGB")
        s = self.data.resolution
        scale = s / min(im.size)
        im = im.resize((max(s, round(im.width * scale)), max(s, round(im.height * scale))), Image.Resampling.BICUBIC)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W) in [0, 255]
        return x / 127.5 - 1, self.captions[i]


def _heldout_flags(rows: list[dict], fraction: float) -> list[bool]:
    """Rows whose ``split`` is test/validation; without a split column, a fixed hash-chosen fraction."""
    if any("split" in r for r in rows):
        return [r.get("split") in HELDOUT_SPLITS for r in rows]
    flag = lambda name: int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 < fraction  # noqa: E731
    return [flag(r["file_name"]) for r in rows]


# TODO(integration): replace with train.data's loader (imagefolder, sidecar captions, CSV, parquet, ...).
def open_captioned_images(data: DataConfig) -> CaptionedImages:
    """The data set at ``data.path``: an imagefolder with metadata.jsonl (file_name, caption column)."""
    root = Path(data.path)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"data.path={root} has no metadata.jsonl; expected an imagefolder (file_name, {data.caption_column})")
    rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get(data.caption_column), str) and r[data.caption_column].strip()]
    if not rows:
        raise ValueError(f"data.path={root}: no image has a non-empty {data.caption_column!r} caption")
    return CaptionedImages(root, rows, data)


# -- the cache -------------------------------------------------------------------------------------


class LatentCache:
    """An opened cache folder; reads are row gathers from memory-mapped arrays."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._latents = np.load(self.folder / "latents.npy", mmap_mode="r")  # (N, C, h, w)
        self._contexts = np.load(self.folder / "contexts.npy", mmap_mode="r")  # (U, L, D)
        self._rows = np.load(self.folder / "context_rows.npy")  # (N,)
        self.empty = self._as_tensor(np.load(self.folder / "empty.npy"))  # (1, L, D)
        heldout = np.load(self.folder / "heldout.npy")  # (N,)
        self.train_indices = np.flatnonzero(~heldout)
        self.heldout_indices = np.flatnonzero(heldout)
        self.captions: list[str] = self.meta["captions"]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self._latents.shape[1:])

    @property
    def context_dim(self) -> int:
        return int(self._contexts.shape[-1])

    def _as_tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.meta["context_dtype"] == "bfloat16" and t.dtype == torch.int16:
            t = t.view(torch.bfloat16)
        return t.float()

    def latents(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 latents of images ``indices``."""
        return torch.from_numpy(np.ascontiguousarray(self._latents[np.asarray(indices)]))

    def contexts(self, indices: Sequence[int]) -> torch.Tensor:
        """(B, L, D) float32 contexts of the captions of images ``indices``."""
        return self._as_tensor(self._contexts[self._rows[np.asarray(indices)]])


_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _to_numpy(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.detach().cpu()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy()
    return x.to(torch.float32).numpy().astype(_NP_DTYPES[dtype])


def cache_folder(cache: CacheConfig, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache.dir) / f"ldm-{digest}"


@torch.no_grad()
def write_cache(folder: Path, key: dict, dataset: CaptionedImages, autoencoder, text_encoder, *,
                batch_size: int, context_dtype: str, device, progress: bool = True) -> Path:
    """Encode every image and distinct caption and write the cache folder atomically."""
    from tqdm import tqdm

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        n = len(dataset)
        latents = None
        bar = tqdm(total=n, desc="caching latents", unit="img", disable=not progress)
        for start in range(0, n, batch_size):
            images = torch.stack([dataset[i][0] for i in range(start, min(n, start + batch_size))])  # (B, 3, H, W)
            z = autoencoder.encode(images.to(device)).float().cpu()  # (B, C, h, w)
            if latents is None:
                latents = np.lib.format.open_memmap(tmp / "latents.npy", mode="w+", dtype=np.float32, shape=(n, *z.shape[1:]))
            latents[start : start + len(z)] = z.numpy()
            bar.update(len(z))
        bar.close()
        latents.flush()
        del latents

        distinct = sorted(set(dataset.captions))
        row = {c: i for i, c in enumerate(distinct)}
        contexts = None
        for start in tqdm(range(0, len(distinct), batch_size), desc="caching contexts", unit="batch", disable=not progress):
            ctx = text_encoder(distinct[start : start + batch_size])[0]  # (B, L, D)
            if contexts is None:
                np_dtype = np.int16 if context_dtype == "bfloat16" else _NP_DTYPES[context_dtype]
                contexts = np.lib.format.open_memmap(tmp / "contexts.npy", mode="w+", dtype=np_dtype,
                                                     shape=(len(distinct), *ctx.shape[1:]))
            contexts[start : start + len(ctx)] = _to_numpy(ctx, context_dtype)
        contexts.flush()
        del contexts
        np.save(tmp / "context_rows.npy", np.array([row[c] for c in dataset.captions], dtype=np.int64))
        np.save(tmp / "empty.npy", _to_numpy(text_encoder.empty_context(1), context_dtype))
        np.save(tmp / "heldout.npy", np.array(dataset.heldout, dtype=bool))
        meta = {"key": key, "captions": dataset.captions, "files": [r["file_name"] for r in dataset.rows],
                "context_dtype": context_dtype}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():  # another process finished the same cache first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def build_cache(cache: CacheConfig, data: DataConfig, autoencoder, text_encoder, device="cpu", *,
                progress: bool = True) -> tuple[Path, bool]:
    """The cache folder for these encoders and data, written if missing; returns (folder, built_now)."""
    key = cache_key(cache, data, autoencoder, text_encoder)
    folder = cache_folder(cache, key)
    if (folder / "meta.json").is_file():
        return folder, False
    dataset = open_captioned_images(data)
    write_cache(folder, key, dataset, autoencoder, text_encoder, batch_size=cache.batch_size,
                context_dtype=cache.context_dtype, device=device, progress=progress)
    return folder, True
