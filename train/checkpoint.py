"""Training checkpoints as folders of safetensors, written atomically, resumed with ``--resume latest``.

    <run>/checkpoints/step-00001000/
        model.safetensors        the model's state dict
        optimizer.safetensors    the optimizer's tensors; its param_groups and scalars in the metadata
        state.json               step, position in the data, anything else the trainer needs

A checkpoint folder is built under a temporary name and renamed into place, so
a process killed at any moment leaves the previous checkpoints intact and never
a half-written one under a ``step-*`` name. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from conditioning.files import atomic_directory

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
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoint_dir/step-NNNNNNNN/`` atomically; keep only the ``keep_last`` newest."""
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / checkpoint_name(step)
    with atomic_directory(path) as tmp:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, metadata = optimizer_to_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=metadata)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2), encoding="utf-8")
    if keep_last > 0:
        for old in list_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old)
    return path


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
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path / 'model.safetensors'} does not fit the model built from the config: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if optimizer is not None:
        opt_path = path / "optimizer.safetensors"
        with safe_open(str(opt_path), framework="pt") as f:
            metadata = f.metadata()
        optimizer_from_tensors(optimizer, load_file(str(opt_path)), metadata)
    return json.loads((path / "state.json").read_text(encoding="utf-8"))
