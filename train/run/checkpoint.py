"""Training checkpoints as folders of safetensors, written atomically, resumed with ``--resume latest``.

    <run>/checkpoints/step-00001000/
        model.safetensors        the model's state dict (or the tensors the trainer gives)
        optimizer.safetensors    the optimizer's tensors; its param_groups and scalars in the metadata
        <name>.safetensors       any further tensor groups (the U-Net trainer's EMA weights, the VAE
                                 trainer's discriminator and codebook) and further optimizers
        state.json               step, position in the data, RNG states, LR schedule, anything else
                                 the trainer needs

Every trainer (``ldm train-vae``, ``train-clip``, ``train``, ``finetune``) writes this one format.

A checkpoint folder is built under a temporary name, its files fsync'ed, and renamed into place,
so a process killed at any moment leaves the previous checkpoints intact and never a half-written
one under a ``step-*`` name; old checkpoints are renamed away before they are deleted.
``remove_partial`` clears what a killed process left behind. Nothing here unpickles anything:
RNG states (``rng_state``) are JSON.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ldm_io import atomic_directory

_NAME = re.compile(r"^step-(\d{8})$")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A torch optimizer's state dict as (tensors, string metadata) for safetensors."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Load what ``optimizer_to_tensors`` wrote back into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in json.loads(metadata.get("scalars", "{}")).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    model: Union[torch.nn.Module, dict[str, torch.Tensor]],
    optimizer: Optional[torch.optim.Optimizer],
    state: dict[str, Any],
    keep_last: int = 2,
    extra: Optional[dict[str, dict[str, torch.Tensor]]] = None,
    extra_optimizers: Optional[dict[str, torch.optim.Optimizer]] = None,
) -> Path:
    """Write ``checkpoint_dir/step-NNNNNNNN/`` atomically; keep only the ``keep_last`` newest.

    ``model``: a module (its state dict is saved) or the tensors to save as model.safetensors;
    ``extra``: further tensor groups, each saved as ``<name>.safetensors``;
    ``extra_optimizers``: further optimizers, each saved as ``<name>.safetensors`` (read back with
    ``load_optimizer(path, optimizer, name)``).
    """
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / checkpoint_name(step)
    with atomic_directory(path, durable=True) as tmp:  # on disk before the rename makes the checkpoint visible
        weights = model if isinstance(model, dict) else model.state_dict()
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        for name, opt in ({"optimizer": optimizer} | (extra_optimizers or {})).items():
            if opt is not None:
                tensors, metadata = optimizer_to_tensors(opt)
                save_file(tensors, str(tmp / f"{name}.safetensors"), metadata=metadata)
        for name, group in (extra or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2), encoding="utf-8")
    if keep_last > 0:
        for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
            trash = old.with_name(f".{old.name}.trash")  # never a half-deleted folder under a step-* name
            os.replace(old, trash)
            shutil.rmtree(trash)
    return path


def remove_partial(checkpoint_dir: str | os.PathLike) -> None:
    """Delete the temporary folders a process killed while writing or deleting checkpoints left behind."""
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_dir():
        for p in checkpoint_dir.iterdir():
            if p.is_dir() and p.name.startswith(".step-") and p.name.endswith((".tmp", ".old", ".trash")):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str, checkpoint_dir: str | os.PathLike) -> Path:
    """``"latest"`` -> the newest checkpoint in ``checkpoint_dir``; anything else is a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (expected {path / 'state.json'}); "
                                f"give a step-NNNNNNNN folder or 'latest'")
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore model (and optimizer) from a checkpoint folder; returns its state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path / 'model.safetensors'} does not fit the model built from the config: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if optimizer is not None:
        load_optimizer(path, optimizer)
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load_optimizer(path: str | os.PathLike, optimizer: torch.optim.Optimizer, name: str = "optimizer") -> None:
    """Restore ``optimizer`` from a checkpoint folder's ``<name>.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    opt_path = Path(path) / f"{name}.safetensors"
    if not opt_path.is_file():
        raise ValueError(f"checkpoint {path} lacks {opt_path.name}; was it written by another trainer or config?")
    with safe_open(str(opt_path), framework="pt") as f:
        metadata = f.metadata()
    optimizer_from_tensors(optimizer, load_file(str(opt_path)), metadata)


# -- RNG states as JSON ------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Python's, numpy's and torch's global RNG states (and CUDA's), plus ``generators``' states, as JSON."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "generators": {name: _b64(g.get_state()) for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(saved: dict, generators: dict[str, torch.Generator]) -> None:
    """Restore what ``rng_state`` returned."""
    py = saved["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = saved["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(saved["torch"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in saved["cuda"]])
    missing = [k for k in generators if k not in saved["generators"]]
    if missing:
        raise ValueError(f"checkpoint lacks the state of generator {missing[0]!r}")
    for name, g in generators.items():
        g.set_state(_unb64(saved["generators"][name]))
