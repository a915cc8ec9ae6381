"""Embedding cache: a data set's caption contexts, computed once, stored on disk, memory-mapped.

    cache = EmbeddingCache("runs/cache", encoder)
    emb = cache.get(captions)                 # computes on the first run, opens the file afterwards
    context, pooled = emb.batch([0, 5, 7])    # (3, L, D), (3, D_pooled), read from the mapped file

The file is ``<cache_dir>/contexts-<encoder hash>-<captions hash>.safetensors``:
the encoder hash is ``encoder.weights_hash()`` (weights, layer, context length,
tokenizer), the captions hash covers the set of distinct caption texts. Each
distinct caption is encoded once (rows in sorted caption order), so the same
captions in another order, or repeated, reuse the file; a different encoder
or a changed caption gives a different file name and a fresh computation.
Files are written atomically. Reading memory-maps the safetensors data (a
plain header followed by the raw array), so a batch reads only its own rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from conditioning.encoders import TextEncoder, check_prompts
from ldm_io import atomic_path

_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def captions_hash(captions: Sequence[str]) -> str:
    """A 16-hex-digit hash of the set of distinct caption texts."""
    h = hashlib.sha256(json.dumps(sorted(set(captions)), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:16]


def _memmap(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as CPU tensors over a read-only memory map."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype = _NUMPY_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            array = np.zeros(shape, dtype=np_dtype)
        else:
            # copy-on-write: the file is never modified, and torch gets a writable array
            array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + header_len + start, shape=shape)
        tensor = torch.from_numpy(array)
        out[name] = tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor
    return out


class CachedEmbeddings:
    """Contexts and pooled embeddings of a list of captions, row i for ``captions[i]``."""

    def __init__(self, path: Path, captions: list[str], computed: bool):
        self.path = path
        self.captions = captions
        self.computed = computed  # True when this call encoded the captions, False when it reused the file
        tensors = _memmap(path)
        self._context = tensors["context"]  # (U, L, D) over the distinct captions, sorted
        self._pooled = tensors["pooled"]  # (U, D_pooled)
        row = {c: i for i, c in enumerate(sorted(set(captions)))}
        self.rows = torch.tensor([row[c] for c in captions], dtype=torch.long)  # (N,)

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), pooled (B, D_pooled)) for caption indices; copies, safe to modify."""
        rows = self.rows[torch.as_tensor(indices, dtype=torch.long)].numpy()  # (B,)
        return self._context[rows].clone(), self._pooled[rows].clone()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        context, pooled = self.batch([i])
        return context[0], pooled[0]


class EmbeddingCache:
    """Computes caption contexts with ``encoder`` once and keeps them under ``cache_dir``.

    Args:
        cache_dir: folder for the cache files (created when needed).
        encoder: the text encoder; its ``weights_hash()`` is part of every file name.
        batch_size: prompts per encoder call while computing.
        store_dtype: dtype on disk (default: the encoder's dtype); float16 halves the size.
        progress: show a progress bar while computing.
    """

    def __init__(self, cache_dir: str | os.PathLike, encoder: TextEncoder, batch_size: int = 64,
                 store_dtype: Optional[torch.dtype] = None, progress: bool = True):
        if not isinstance(encoder, TextEncoder):
            raise ValueError(f"encoder must be a conditioning TextEncoder, got {type(encoder).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.cache_dir = Path(cache_dir)
        self.encoder = encoder
        self.batch_size = batch_size
        self.store_dtype = store_dtype
        self.progress = progress

    def path(self, captions: Sequence[str]) -> Path:
        """The cache file for these captions and the encoder's current weights."""
        return self.cache_dir / f"contexts-{self.encoder.weights_hash()}-{captions_hash(captions)}.safetensors"

    def get(self, captions: Sequence[str]) -> CachedEmbeddings:
        """The cached embeddings of ``captions``, computing and storing them if no file matches."""
        captions = check_prompts(captions)
        path = self.path(captions)
        computed = not path.is_file()
        if computed:
            self._compute(sorted(set(captions)), path)
        return CachedEmbeddings(path, captions, computed)

    @torch.no_grad()
    def _compute(self, unique: list[str], path: Path) -> None:
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        dtype = self.store_dtype or self.encoder.dtype
        contexts, pooled = [], []
        starts = range(0, len(unique), self.batch_size)
        for start in tqdm(starts, desc="caching text contexts", unit="batch", disable=not self.progress):
            c, p = self.encoder(unique[start : start + self.batch_size])  # (b, L, D), (b, D_pooled)
            contexts.append(c.to("cpu", dtype))
            pooled.append(p.to("cpu", dtype))
        tensors = {"context": torch.cat(contexts).contiguous(), "pooled": torch.cat(pooled).contiguous()}
        metadata = {"encoder_hash": self.encoder.weights_hash(), "captions_hash": captions_hash(unique),
                    "num_captions": str(len(unique)), "backend": self.encoder.backend, "layer": self.encoder.layer}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
