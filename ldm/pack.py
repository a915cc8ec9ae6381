"""Packing a trained bundle for shipping: half-precision weights and a compact token table.

A bundle straight out of ``ldm train`` stores fp32 weights and the text encoder's full
49,408-row token table. ``pack_bundle`` writes a copy that loads into the same pipeline:

- every floating-point tensor of the U-Net, the autoencoder and the text encoder is stored
  as ``dtype`` (fp16 by default; the pipeline casts back to its compute dtype on load);
- the token table keeps only the rows of the tokens in ``keep_captions`` (the training
  captions); every other token shares one row, the mean of the dropped ones. A CLIP trained on
  one data set never moves those rows from their random start, so nothing learned is lost:
  prompts made of kept tokens encode as before, up to fp16 rounding
  (``conditioning.clip_model.compact_token_table``).

The copy is written beside ``out`` and renamed into place; an ONNX cache is not copied. ``out`` must
be new or empty, or with ``overwrite`` an earlier bundle (``claim_pack_output``), never the source
or a folder around or inside it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

from ldm.bundle import check_bundle
from ldm_io import atomic_directory, claim_output_dir, write_marker

PathLike = str | os.PathLike
PARTS = ("unet", "vae", "text_encoder")
COMMAND = "ldm pack"
# What a bundle folder holds (ldm.bundle.save_bundle, the trainer's training_config.yaml, the ONNX cache): an unmarked
# folder with model_index.json and nothing else is an earlier bundle that --overwrite may replace.
BUNDLE_ENTRIES = ("model_index.json", "unet", "unet_lora", "pytorch_lora_weights.safetensors", "vae", "text_encoder",
                  "tokenizer", "scheduler", "training_config.yaml", "onnx")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def caption_token_ids(bundle: PathLike, captions: Iterable[str]) -> set[int]:
    """Every token id the bundle's tokenizer gives for ``captions`` (start, end and padding included)."""
    import conditioning

    encoder = conditioning.load_text_encoder(bundle)
    ids = {int(i) for i in encoder.tokenize([""]).flatten()}
    captions = list(captions)
    for start in range(0, len(captions), 1024):
        ids.update(int(i) for i in encoder.tokenize(captions[start:start + 1024]).unique())
    return ids


def claim_pack_output(src: PathLike, out: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """Check, before any work, that ``out`` may receive a packed copy of bundle ``src``: not the source,
    not inside it nor around it, new or empty, or with ``overwrite`` an earlier bundle; the bundle checked
    too. ``inputs``: other inputs (the --vocab-from data sets). Returns the source bundle's folder."""
    root = check_bundle(src)
    if Path(out).resolve() == root.resolve():
        raise ValueError(f"--out {out} is the source bundle; write the packed copy to another folder")
    claim_output_dir(out, command=COMMAND, overwrite=overwrite, inputs=inputs, sealed=[root],
                     known=BUNDLE_ENTRIES, signature=("model_index.json",))
    return root


def pack_bundle(src: PathLike, out: PathLike, *, dtype: str = "float16",
                keep_captions: Optional[Iterable[str]] = None, overwrite: bool = False) -> dict[str, int]:
    """Write a packed copy of bundle ``src`` to ``out``; returns bytes per part before and after.
    ``overwrite``: ``out`` may be an earlier bundle, replaced (see ``claim_pack_output``)."""
    from safetensors.torch import load_file, save_file

    from conditioning.clip_model import TOKEN_TABLE, compact_token_table

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed values: {', '.join(DTYPES)}")
    root = claim_pack_output(src, out, overwrite=overwrite)
    final = Path(out)
    keep = caption_token_ids(root, keep_captions) if keep_captions is not None else None
    sizes: dict[str, int] = {}
    with atomic_directory(final) as tmp:
        shutil.copytree(root, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("onnx", "*.old"))
        for part in PARTS:
            for path in sorted((tmp / part).glob("*.safetensors")):
                sizes[f"{part} before"] = sizes.get(f"{part} before", 0) + path.stat().st_size
                state = _cast(load_file(str(path)), DTYPES[dtype])
                if part == "text_encoder" and keep is not None and TOKEN_TABLE in state:
                    state = compact_token_table(state, keep)
                save_file(state, str(path), metadata={"format": "pt"})
                sizes[f"{part} after"] = sizes.get(f"{part} after", 0) + path.stat().st_size
        write_marker(tmp, COMMAND)
        claim_pack_output(root, final, overwrite=overwrite)  # again: nothing came into ``out`` meanwhile
    return sizes
