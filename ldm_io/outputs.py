"""Claiming an output before the work: every writer checks where it will write, in one place, first.

    claim_output_dir(out, command="ldm pack", overwrite=args.overwrite, inputs=[bundle])   # a folder
    claim_output_file(path, command="ldm generate", ours=is_our_png)                        # a file
    ...                                                                                     # the work
    with atomic_directory(out) as tmp:
        ...
        write_marker(tmp, "ldm pack")                                                       # "ours" from now on

The rule (the same for every command): nothing is removed or replaced that the user did not name as
the thing to replace.

- A folder output may be written when it is absent (missing parents are created), an empty folder,
  or, with ``overwrite``, an earlier output of the same command (the ``.ldm-output`` marker it
  wrote, or for outputs made before markers, its recognisable files) holding nothing else. A folder
  that is not empty and not ours is refused, with or without ``overwrite``.
- A file output may replace only a file the same kind of command wrote (``ours``); a folder under
  that name, or any other file, is refused.
- Never an input, never inside a model given as input (``sealed``: what is written there changes the
  model and its hash), and never a folder holding an input when replacing it.
- The place must exist as folders (a file in the way is refused) and be writable: a temporary file
  is created and removed in the nearest existing folder, which catches a read-only file system,
  missing permissions and a full inode table up front, even when running as root.

Errors are ``OutputError`` (a ``ValueError``): one line that names the path, the problem and the way out.
Standard library only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

PathLike = Union[str, os.PathLike]

__all__ = ["MARKER", "OutputError", "check_inputs", "check_location", "check_replaceable", "claim_output_dir", "claim_output_file",
           "earlier_output", "entries", "is_main_process", "png_text_keys", "remove_output", "software_text",
           "write_marker", "written_by_ldm"]

MARKER = ".ldm-output"  # JSON {"command": ..., "entries": [...]}; no .json suffix, so bundle hashes skip it
SOFTWARE = "ldm-toolkit"  # a PNG of ours: a text chunk of this name (generate's record) or Software "ldm-toolkit ..."


class OutputError(ValueError):
    """An output location a command may not write; the message is one line with the way out."""


def is_main_process() -> bool:
    """False on the other processes of a distributed launch (torchrun / accelerate set RANK): only the
    first one checks and prepares output folders, so the others never see it half-made."""
    return os.environ.get("RANK", "0") in ("", "0")


def _internal(name: str) -> bool:
    """Names our own writers leave beside or inside an output: the marker, ``.<name>.<hex>.tmp/.old``."""
    return name == MARKER or (name.startswith(".") and name.endswith((".tmp", ".old")))


def entries(folder: PathLike) -> list[str]:
    """The names in ``folder`` that count (our marker and temporary names left out), sorted."""
    return sorted(n for n in os.listdir(folder) if not _internal(n))


def _abs(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _named(option: str, path: PathLike) -> str:
    """How a message names the output: ``--out DIR`` for an option, ``train.output_dir=DIR`` for a config key."""
    return f"{option} {path}" if option.startswith("-") else f"{option}={path}"


def _short(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _try_write(folder: Path, path: Path, option: str) -> None:
    probe = folder / f".ldm-write-test.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{_named(option, path)}: cannot write in {folder} ({reason}); "
                          f"choose a {option} where you can write") from None


def check_location(path: PathLike, *, option: str = "--out", folder: bool, replace: bool = False) -> Path:
    """``path`` can be made as a folder (``folder``) or a file: nothing of the other kind is in the way,
    no file stands where a parent folder must go, and the folder it will be written in is writable
    (``replace``: the folder itself is renamed into place, so its parent must be writable too)."""
    path = Path(path)
    if folder and os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"{_named(option, path)} is a file; give a folder (a new or empty one)")
    if not folder and path.is_dir():
        example = path / ("out" + (path.suffix or ".png"))
        raise OutputError(f"{_named(option, path)} is a folder; give a file name, e.g. {example}")
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputError(f"{_named(option, path)} cannot be made: {ancestor} is a file, not a folder; "
                          f"choose another {option}")
    if folder and path.is_dir():
        _try_write(path, path, option)
        if replace:
            _try_write(path.parent, path, option)
    else:
        _try_write(ancestor, path, option)
    return path


def check_inputs(path: PathLike, inputs: Iterable[Optional[PathLike]] = (), *, option: str = "--out",
                 holding: bool = True, sealed: Iterable[Optional[PathLike]] = ()) -> None:
    """The output is none of the inputs; not inside a ``sealed`` one (a model: what is written inside
    changes it, its hash included; ``inputs`` such as a data set or a cache may hold the output); and with
    ``holding=False`` (the output is replaced, so what it holds is deleted) it holds no input."""
    out = _abs(path)
    sealed = [s for s in sealed if s is not None and str(s) != ""]
    for given in [*(i for i in inputs if i is not None and str(i) != ""), *sealed]:
        inp = _abs(given)
        if out == inp:
            raise OutputError(f"{_named(option, path)} is the input {given}; write the output somewhere else")
        if given in sealed and _within(out, inp):
            raise OutputError(f"{_named(option, path)} is inside the input {given}; write the output outside it")
        if not holding and _within(inp, out) and os.path.lexists(out):
            raise OutputError(f"{_named(option, path)} holds the input {given}, which replacing it would delete; "
                              f"choose another {option}")


def check_replaceable(path: PathLike, *, option: str = "--out") -> None:
    """An earlier output about to be replaced is not the folder the command runs in, nor around it."""
    if _within(_abs(os.getcwd()), _abs(path)):
        raise OutputError(f"{_named(option, path)} holds the current folder, which replacing it would delete; "
                          "run the command from outside it")


def read_marker(folder: Path) -> Optional[dict]:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("command"), str) else None


def write_marker(folder: PathLike, command: str, names: Optional[Iterable[str]] = None) -> None:
    """Mark ``folder`` as ``command``'s output; ``names``: what it holds (default: what is there now)."""
    folder = Path(folder)
    names = entries(folder) if names is None else sorted(n for n in names if not _internal(n))
    (folder / MARKER).write_text(json.dumps({"command": command, "entries": names}, indent=1) + "\n", encoding="utf-8")


def earlier_output(path: PathLike, *, command: str, known: Iterable[str] = (),
                   signature: Iterable[str] = ()) -> tuple[bool, str]:
    """Whether folder ``path`` (existing, not empty) is an earlier output of ``command`` holding nothing
    else; (False, the reason and the way out, as the end of a sentence about ``path``) when not.

    Ours: its marker names ``command``, or (an output made before markers) every name of ``signature``
    is there; and each entry is one the marker lists or one of ``known``."""
    path = Path(path)
    names = entries(path)
    marker = read_marker(path)
    if marker is not None:
        if marker["command"] != command:
            return False, f"holds the output of {marker['command']}, not of {command}; choose a new or empty folder"
        allowed = set(marker.get("entries") or ()) | set(known)
    else:
        signature = list(signature)
        if not signature or not all(os.path.lexists(path / s) for s in signature):
            return False, (f"is not empty (it holds {_short(names)}) and is not an earlier output of {command}; "
                           "choose a new or empty folder")
        allowed = set(known)
    foreign = [n for n in names if n not in allowed]
    if foreign:
        them = "it" if len(foreign) == 1 else "them"
        return False, (f"holds {_short(foreign)}, which {command} did not write; move {them} out, "
                       "or choose a new or empty folder")
    return True, ""


def claim_output_dir(path: PathLike, *, command: str, option: str = "--out", overwrite: bool = False,
                     inputs: Iterable[Optional[PathLike]] = (), sealed: Iterable[Optional[PathLike]] = (),
                     known: Iterable[str] = (), signature: Iterable[str] = (), replace: bool = True) -> bool:
    """Check that folder ``path`` may receive ``command``'s output; raise ``OutputError`` when not.

    Returns True when ``path`` is an earlier output that will be replaced (``overwrite``), False when it
    is absent or empty. ``replace``: the writer renames a whole new folder into place (atomic_directory)
    rather than writing into ``path``. ``inputs``/``sealed``: see ``check_inputs``; ``known``/``signature``:
    see ``earlier_output``.
    """
    path = Path(path)
    check_location(path, option=option, folder=True, replace=replace)
    check_inputs(path, inputs, option=option, holding=not overwrite, sealed=sealed)
    if not path.is_dir() or not entries(path):
        return False
    ours, why = earlier_output(path, command=command, known=known, signature=signature)
    if not ours:
        raise OutputError(f"{_named(option, path)} {why}")
    if not overwrite:
        raise OutputError(f"{_named(option, path)} holds an earlier output of {command}; "
                          "pass --overwrite to replace it, or choose another folder")
    check_replaceable(path, option=option)
    return True


def claim_output_file(path: PathLike, *, command: str, option: str = "--out",
                      inputs: Iterable[Optional[PathLike]] = (), sealed: Iterable[Optional[PathLike]] = (),
                      ours: Optional[Callable[[Path], bool]] = None) -> Path:
    """Check that file ``path`` may be written: not a folder, no input, inside no ``sealed`` input,
    writable, and when it exists, a file ``ours(path)`` says ``command`` wrote (it is then replaced)."""
    path = Path(path)
    check_location(path, option=option, folder=False)
    check_inputs(path, inputs, option=option, sealed=sealed)
    if os.path.lexists(path) and not (ours is not None and path.is_file() and ours(path)):
        raise OutputError(f"{_named(option, path)} exists and was not written by {command}; "
                          "choose another file name, or move that file away first")
    return path


def remove_output(path: PathLike) -> None:
    """Remove an earlier output folder (after ``claim_output_dir`` said it is ours): renamed aside first,
    so ``path`` is never seen half-deleted, then deleted."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    os.replace(path, aside)
    shutil.rmtree(aside)


_PNG = b"\x89PNG\r\n\x1a\n"


def png_text_keys(path: PathLike, limit: int = 1 << 20) -> dict[str, str]:
    """The tEXt chunks of a PNG (keyword -> text; iTXt and zTXt keywords with an empty text), read with
    the standard library; {} for a file that is not a PNG. Reads at most ``limit`` bytes of chunks."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG:
                return {}
            read = 8
            while read < limit:
                head = f.read(8)
                if len(head) < 8:
                    break
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"IDAT" or kind == b"IEND":
                    if kind == b"IEND":
                        break
                    f.seek(length + 4, os.SEEK_CUR)  # text chunks may also follow the image data
                    read += length + 12
                    continue
                data = f.read(length)
                f.seek(4, os.SEEK_CUR)  # CRC
                read += length + 12
                if kind in (b"tEXt", b"iTXt", b"zTXt"):
                    key, _, text = data.partition(b"\0")
                    out[key.decode("latin-1")] = text.decode("latin-1") if kind == b"tEXt" else ""
    except OSError:
        return {}
    return out


def software_text(command: str) -> tuple[str, str]:
    """The PNG text chunk that marks an image as ``command``'s output: ``PngInfo().add_text(*software_text(...))``."""
    return "Software", f"{SOFTWARE} {command}"


def written_by_ldm(path: PathLike) -> bool:
    """A PNG one of our commands wrote: it carries generate's record or our Software text chunk."""
    keys = png_text_keys(path)
    return SOFTWARE in keys or keys.get("Software", "").startswith(SOFTWARE)
