"""Training checkpoints that survive being killed at any moment, with no pickles.

    <run>/checkpoints/checkpoint-00000500/
        model.safetensors       trained weights (all of the U-Net, or the LoRA adapters)
        ema.safetensors         EMA weights by parameter name
        optimizer.safetensors   optimizer state tensors, "state.<param index>.<name>"
        state.json              step, epoch, data position, LR scheduler, EMA and optimizer scalars,
                                the RNG states of every process; written last

A checkpoint is written into ``.tmp-checkpoint-*``, every file fsync'ed, then renamed into place;
a folder named ``checkpoint-<step>`` with a ``state.json`` is therefore complete, and the latest
complete one is what ``--resume latest`` loads. Old checkpoints beyond ``keep_last`` are removed
only after the new one is in place (renamed to ``.trash-*`` first, so a half-deleted folder never
looks like a checkpoint). accelerate's ``save_state`` is not used: it pickles custom objects and
loads them with ``weights_only=False``, and its RNG restore fails silently under ``weights_only=True``.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

NAME = re.compile(r"^checkpoint-(\d{8})$")


# -- files ---------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = NAME.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(root: Path, resume: str) -> Path:
    """``latest`` -> the newest complete checkpoint under ``root``; anything else is a checkpoint folder."""
    if resume == "latest":
        path = latest_checkpoint(root)
        if path is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {root}")
        return path
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no state.json); give 'latest' or a checkpoint-<step> folder")
    return path


def remove_partial(root: Path) -> None:
    """Delete leftovers of a process killed while writing or pruning (``.tmp-*`` and ``.trash-*``)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-checkpoint-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep_last: int) -> Path:
    """Write ``<root>/checkpoint-<step>`` atomically (tensor groups as safetensors, then state.json),
    then delete all but the newest ``keep_last`` complete checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=root))
    try:
        for name, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run); replace it
            old = root / f".trash-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep_last]:
        trash = root / f".trash-{old.name}"
        os.rename(old, trash)
        shutil.rmtree(trash)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensor groups by file stem, state) of a checkpoint folder."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = {f.stem: load_file(f) for f in sorted(path.glob("*.safetensors"))}
    return tensors, state


# -- optimizer state without pickles ----------------------------------------------------------------


def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict split into tensors ("state.<i>.<name>") and JSON (param_groups, scalars)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    for key, v in saved["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- RNG states as JSON --------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Python's, numpy's and torch's global RNG states (and CUDA's), plus ``generators``' states."""
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
