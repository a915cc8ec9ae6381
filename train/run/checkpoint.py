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
``remove_partial`` clears what a killed process left behind (ldm_io's ``.step-N.<random>.tmp`` and
``.old`` folders, and ``.step-N.trash``). Nothing here unpickles anything: RNG states (``rng_state``)
are JSON.

Faults:

- A full disk while writing a checkpoint raises ``ldm_io.DiskFull`` (an OSError, errno ENOSPC) whose
  one-line message names the checkpoint, says the previous one is intact and how to continue;
  ``resumable_writes`` gives the same message for any write of a run (its bundle, its logs).
- A checkpoint is written only from sane weights (``weights_problem``: all finite, none beyond
  ``MAX_ABS_WEIGHT``); otherwise it is skipped with a warning, so the "last good checkpoint" of a
  diverged run holds weights worth resuming from.
- ``--resume latest`` takes the newest checkpoint that is whole (``checkpoint_problem``: state.json
  parses, every safetensors file is as long as its header says), warning about each damaged one it
  skips; a damaged checkpoint named explicitly is refused in one line. Reading a damaged tensor file
  (``load_tensors``) is a ValueError naming it, never a deserialization traceback.
- ``set_rng_state`` returns the random states it could not restore (the resumed run is then not
  bit-exact), for the trainer to warn about.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from ldm_io import DiskFull, atomic_directory

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


# A weight beyond this (in absolute value) means a diverged run: trained networks stay within a few
# hundred; a checkpoint of such weights would be a "last good checkpoint" not worth resuming from.
MAX_ABS_WEIGHT = 1e6


def warn(text: str, log=None) -> None:
    """``warning: text`` on stderr (above any progress bar), and in the run log's log.txt when given."""
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {text}", file=sys.stderr)
    if log is not None:
        show, log.show = log.show, False  # already on the screen
        try:
            log.message(f"warning: {text}")
        finally:
            log.show = show


def weights_problem(weights: dict[str, torch.Tensor], max_abs: float = MAX_ABS_WEIGHT) -> Optional[str]:
    """Why ``weights`` are not worth a checkpoint (a NaN or inf, or a value beyond +-``max_abs``), or None."""
    for name, t in weights.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = float(t.detach().abs().amax())  # NaN propagates
        if not math.isfinite(peak):
            return f"{name} holds non-finite values"
        if peak > max_abs:
            return f"{name} holds a value of magnitude {peak:.3g} (above {max_abs:.0e})"
    return None


@contextlib.contextmanager
def resumable_writes(checkpoint_dir: str | os.PathLike) -> Iterator[None]:
    """Within the block (a training run), a full disk is raised as one ``DiskFull`` line that names the
    newest checkpoint of ``checkpoint_dir`` (in a run folder) and how to continue from it."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or getattr(exc, "hint", ""):
            raise
        newest = (list_checkpoints(checkpoint_dir) or [None])[-1]
        hint = (f"the newest checkpoint {newest} is complete: free some space, then continue with --resume latest"
                if newest else "no checkpoint was written yet: free some space and start again")
        intact = isinstance(exc, DiskFull)  # an atomic write (ldm_io's); else a plain one, e.g. the run log's
        where = exc.filename or Path(checkpoint_dir).parent
        raise DiskFull(where, hint, exc.errno, intact=intact) from exc


def save_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    model: Union[torch.nn.Module, dict[str, torch.Tensor]],
    optimizer: Optional[torch.optim.Optimizer],
    state: dict[str, Any],
    keep_last: int = 2,
    extra: Optional[dict[str, dict[str, torch.Tensor]]] = None,
    extra_optimizers: Optional[dict[str, torch.optim.Optimizer]] = None,
    log=None,
    max_abs_weight: float = MAX_ABS_WEIGHT,
) -> Optional[Path]:
    """Write ``checkpoint_dir/step-NNNNNNNN/`` atomically; keep only the ``keep_last`` newest.

    ``model``: a module (its state dict is saved) or the tensors to save as model.safetensors;
    ``extra``: further tensor groups, each saved as ``<name>.safetensors``;
    ``extra_optimizers``: further optimizers, each saved as ``<name>.safetensors`` (read back with
    ``load_optimizer(path, optimizer, name)``).

    Returns the checkpoint, or None when the model's weights are not sane (``weights_problem``): then
    nothing is written and a warning goes to stderr and ``log``. A full disk raises ``DiskFull``
    (the previous checkpoints untouched, nothing half-written left).
    """
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / checkpoint_name(step)
    weights = model if isinstance(model, dict) else model.state_dict()
    problem = weights_problem(weights, max_abs_weight)
    if problem is not None:
        newest = (list_checkpoints(checkpoint_dir) or [None])[-1]
        warn(f"checkpoint {path.name} not written: {problem}; the newest checkpoint stays "
             f"{newest if newest else '(none yet)'}", log)
        return None
    with resumable_writes(checkpoint_dir), atomic_directory(path, durable=True) as tmp:  # on disk before the rename
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


# What a process killed while writing or deleting checkpoints leaves: ldm_io's temporary and
# set-aside folders (.step-N.<random>.tmp, .step-N.<random>.old) and save_checkpoint's .step-N.trash.
_PARTIAL = re.compile(r"^\.step-\d+\.(.+\.(tmp|old)|trash)$")


def remove_partial(checkpoint_dir: str | os.PathLike) -> None:
    """Delete the temporary folders a process killed while writing or deleting checkpoints left behind."""
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_dir():
        for p in checkpoint_dir.iterdir():
            if _PARTIAL.match(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def safetensors_problem(path: str | os.PathLike) -> Optional[str]:
    """What is wrong with a safetensors file (cut short, too long, an unreadable header), or None.
    Reads only its header: the file must be 8 + header + the end of its last tensor bytes long."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            return f"is cut short ({size} bytes, less than its header)"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has an unreadable header"
    expected = 8 + n + end
    if size < expected:
        return f"is cut short ({size} of {expected} bytes)"
    if size > expected:
        return f"is {size - expected} bytes longer than its header says"
    return None


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """What makes a checkpoint folder unusable (state.json missing or malformed, model.safetensors
    missing, a safetensors file cut short), or None; reads state.json and the tensor files' headers only."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "state.json is missing"
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        return f"state.json is not valid JSON ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json holds no step number"
    if not (path / "model.safetensors").is_file():
        return "model.safetensors is missing"
    for f in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return f"{f.name} {problem}"
    return None


def resolve_resume(resume: str, checkpoint_dir: str | os.PathLike) -> Path:
    """``"latest"`` -> the newest whole checkpoint in ``checkpoint_dir`` (a warning names each damaged
    one skipped); anything else is a checkpoint folder, refused in one line when damaged."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_dir}")
        damaged = []
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                for bad, why in damaged:
                    warn(f"skipping the damaged checkpoint {bad} ({why}); resuming from {path.name}")
                return path
            damaged.append((path, problem))
        raise ValueError(f"--resume latest: no whole checkpoint in {checkpoint_dir}: "
                         + "; ".join(f"{p.name}: {why}" for p, why in damaged)
                         + "; start afresh in another train.output_dir")
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (expected {path / 'state.json'}); "
                                f"give a step-NNNNNNNN folder or 'latest'")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume {resume}: the checkpoint is damaged: {problem}; resume from another "
                         "checkpoint (--resume latest takes the newest whole one)")
    return path


def load_tensors(path: str | os.PathLike, device: Optional[str] = None) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a damaged one is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device or "cpu")
    except SafetensorError as exc:
        raise ValueError(f"{path} is damaged ({exc}); resume from another checkpoint") from exc


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore model (and optimizer) from a checkpoint folder; returns its state.json."""
    path = Path(path)
    weights = load_tensors(path / "model.safetensors")
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path / 'model.safetensors'} does not fit the model built from the config: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if optimizer is not None:
        load_optimizer(path, optimizer)
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load_optimizer(path: str | os.PathLike, optimizer: torch.optim.Optimizer, name: str = "optimizer") -> None:
    """Restore ``optimizer`` from a checkpoint folder's ``<name>.safetensors``."""
    from safetensors import SafetensorError, safe_open

    opt_path = Path(path) / f"{name}.safetensors"
    if not opt_path.is_file():
        raise ValueError(f"checkpoint {path} lacks {opt_path.name}; was it written by another trainer or config?")
    try:
        with safe_open(str(opt_path), framework="pt") as f:
            metadata = f.metadata()
    except SafetensorError as exc:
        raise ValueError(f"{opt_path} is damaged ({exc}); resume from another checkpoint") from exc
    if not metadata or "param_groups" not in metadata:
        raise ValueError(f"{opt_path} holds no optimizer settings (param_groups); was it written by another trainer?")
    optimizer_from_tensors(optimizer, load_tensors(opt_path), metadata)


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


def _set_python(py) -> None:
    random.setstate((py[0], tuple(py[1]), py[2]))


def _set_numpy(n) -> None:
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def set_rng_state(saved: dict, generators: dict[str, torch.Generator]) -> list[str]:
    """Restore what ``rng_state`` returned; returns the states that could not be restored (unreadable,
    or CUDA's on a machine with or without a GPU unlike the one that saved), each with why: the resumed
    run then continues, but not bit-exactly as an uninterrupted one would (see ``rng_warning``).
    A generator ``saved`` has no state for at all is a ValueError (another trainer's checkpoint)."""
    if not isinstance(saved, dict):
        return ["all (the entry is not a JSON object)"]
    saved_generators = saved.get("generators") if isinstance(saved.get("generators"), dict) else {}
    missing = [k for k in generators if k not in saved_generators]
    if missing:
        raise ValueError(f"checkpoint lacks the state of generator {missing[0]!r}")
    problems = []

    def restore(name: str, key: str, apply: Callable[[Any], None], container: dict) -> None:
        if key not in container:
            problems.append(f"{name} (missing)")
            return
        try:
            apply(container[key])
        except Exception as exc:  # noqa: BLE001  (any malformed entry: its kind and message are reported)
            problems.append(f"{name} ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})")

    restore("python", "python", _set_python, saved)
    restore("numpy", "numpy", _set_numpy, saved)
    restore("torch", "torch", lambda s: torch.set_rng_state(_unb64(s)), saved)
    if torch.cuda.is_available() and "cuda" in saved:
        restore("cuda", "cuda", lambda s: torch.cuda.set_rng_state_all([_unb64(x) for x in s]), saved)
    elif torch.cuda.is_available():
        problems.append("cuda (the checkpoint was written without a GPU)")
    elif "cuda" in saved:
        problems.append("cuda (the checkpoint was written on a GPU; this run has none)")
    for name, g in generators.items():
        restore(f"generator {name!r}", name, lambda s, g=g: g.set_state(_unb64(s)), saved_generators)
    return problems


def rng_warning(path: str | os.PathLike, problems: list[str]) -> Optional[str]:
    """The warning for the random states ``set_rng_state`` could not restore from checkpoint ``path``."""
    if not problems:
        return None
    return (f"checkpoint {path}: could not restore the random state of {'; '.join(problems)}; training "
            "continues from it, but no longer exactly as an uninterrupted run would")
