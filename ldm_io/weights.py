"""A model folder's weight files, found and checked before a library reads them.

    weights = find_weights(folder, "diffusion_pytorch_model")   # diffusers
    weights = find_weights(folder, "model", "pytorch_model")    # transformers
    weights.files, weights.variant, weights.safetensors

A diffusers or transformers folder holds its weights as ``<stem>.safetensors``; or only as a variant
(``<stem>.fp16.safetensors``: what diffusers and transformers load with ``variant="fp16"``); or in
shards that ``<stem>[.<variant>].safetensors.index.json`` lists; or pickled, ``<stem>.bin``
(transformers: ``pytorch_model.bin``), which diffusers and transformers read with
``torch.load(weights_only=True)``. Safetensors are preferred, then no variant, then fp16.

Every file is checked here, with the standard library and without reading the tensors: a
safetensors header must parse and its tensors must cover the file exactly; a ``.bin`` must be a
complete zip archive (torch's format) or a pickle. A truncated or corrupt file is a one-line
``WeightsError`` (a ``ValueError``) naming the file and the fix, not a library's traceback
from deep inside its loader; so is a ``.bin`` that ``torch.load(weights_only=True)`` refuses
(``refused_pickle`` turns the loader's error into that line).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

# Bytes per element of the safetensors dtypes.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 << 20  # the safetensors library refuses larger headers too
PREFERRED_VARIANTS = (None, "fp16", "bf16")  # then any other, by name


class WeightsError(ValueError):
    """A weight file that cannot be read: truncated, overwritten, not weights, or a pickle that
    ``torch.load(weights_only=True)`` refuses."""


@dataclass(frozen=True)
class Weights:
    """Where a folder's weights are: ``files`` (shards in order), the ``variant`` the libraries must be
    told (``"fp16"`` for ``<stem>.fp16.safetensors``; None for plain files) and whether they are safetensors."""

    files: tuple[Path, ...]
    variant: Optional[str]
    safetensors: bool


def _corrupt(path: Path, why: str) -> WeightsError:
    return WeightsError(f"{path} is truncated or corrupt ({why}); copy or download the model folder again")


def check_safetensors(path: PathLike) -> dict:
    """Raise ``WeightsError`` unless ``path``'s header parses and its tensors cover the file exactly; returns
    the header (tensor name -> dtype, shape, offsets, and ``__metadata__`` where the file has one)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 10:
            raise _corrupt(path, f"{size} bytes, too short for a safetensors header")
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise _corrupt(path, f"the header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = math.prod(info["shape"])
            itemsize = DTYPE_SIZES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        if not 0 <= begin <= stop or (itemsize is not None and stop - begin != count * itemsize):
            raise _corrupt(path, f"tensor {name!r} has data_offsets {info['data_offsets']} that do not fit its shape")
        end = max(end, stop)
    if end != size - 8 - n:
        raise _corrupt(path, f"its tensors need {end} bytes of data but the file holds {size - 8 - n}")
    return header


def check_pickle(path: PathLike) -> None:
    """Raise ``WeightsError`` unless ``path`` is a complete zip archive (torch.save's format) or a pickle."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":  # a pickle's PROTO opcode (torch's legacy format starts with one)
            raise _corrupt(path, "neither a torch zip archive nor a pickle")


def refused_pickle(path: PathLike, exc: BaseException) -> WeightsError:
    """The one-line error for a ``.bin`` that ``torch.load(weights_only=True)`` (ours, diffusers' or
    transformers') failed on; ``exc`` is what the loader raised (the reason is looked for down its causes)."""
    messages = []
    while exc is not None and len(messages) < 10:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(\. |\.?$)", "\n".join(messages), re.M)
    why = found.group(1) if found else (messages[-1].strip().splitlines() or ["unreadable"])[0]
    return WeightsError(f"{path} cannot be loaded with torch.load(weights_only=True) ({why}); pickled checkpoints "
                        "are loaded no other way: convert a trusted copy to safetensors")


def _shards(index: Path) -> tuple[Path, ...]:
    try:
        names = json.loads(index.read_text())["weight_map"].values()
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise _corrupt(index, "not a JSON object with a weight_map") from None
    files = tuple(index.parent / name for name in dict.fromkeys(names))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists {', '.join(missing[:3])}, which {index.parent} lacks; "
                                "copy or download the model folder again")
    return files


def _variants(folder: Path, stem: str, ext: str) -> list[Optional[str]]:
    """The variants present for ``<stem>[.<variant>].<ext>`` (or its index), preferred first."""
    found = set()
    for p in folder.glob(f"{stem}*{ext}*"):
        name = p.name[len(stem):]
        name = name[: -len(".index.json")] if name.endswith(".index.json") else name
        if name == ext:
            found.add(None)
        elif name.startswith(".") and name.endswith(ext) and "." not in name[1: -len(ext)]:
            found.add(name[1: -len(ext)])
    return [v for v in PREFERRED_VARIANTS if v in found] + sorted(v for v in found if v not in PREFERRED_VARIANTS)


def find_weights(folder: PathLike, stem: str, bin_stem: Optional[str] = None) -> Weights:
    """The weights of ``folder`` (see the module docstring), each file checked; FileNotFoundError when none.
    ``bin_stem``: the pickled files' stem where it differs (transformers: model.safetensors, pytorch_model.bin)."""
    folder = Path(folder)
    bin_stem = bin_stem or stem
    for stem_, ext, safetensors in ((stem, ".safetensors", True), (bin_stem, ".bin", False)):
        for variant in _variants(folder, stem_, ext):
            name = f"{stem_}{'.' + variant if variant else ''}{ext}"
            index = folder / f"{name}.index.json"
            files = _shards(index) if index.is_file() and not (folder / name).is_file() else (folder / name,)
            for f in files:
                (check_safetensors if safetensors else check_pickle)(f)
            return Weights(files, variant, safetensors)
    raise FileNotFoundError(f"{folder / stem}.safetensors not found (nor {stem}.fp16.safetensors, nor {bin_stem}.bin): "
                            f"{folder} holds no weights; copy or download the model folder again")
