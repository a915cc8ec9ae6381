"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

    with atomic_path(out / "weights.safetensors") as tmp:     # a file
        save_file(state, str(tmp))
    with atomic_directory(out / "bundle") as tmp:              # a folder
        (tmp / "model_index.json").write_text("{}")
    write_text(out / "metrics.json", text)                     # conveniences over atomic_path
    save_image(image, out / "grid.png", pnginfo=info)

Each writer gets a temporary name in the destination's own folder (``.<name>.<random>.tmp``, so
the final ``os.replace`` is a rename on one file system); on success it is renamed into place,
on any error (an exception, Ctrl-C) it is removed and whatever was under the final name before
is left untouched. A folder that already exists under the final name is moved aside
(``.<name>.<random>.old``) and deleted only after the new one is in place.

Temporary files and folders are created with the modes ``open`` and ``mkdir`` give (0o666 and
0o777 less the umask), not ``tempfile``'s owner-only 0o600 / 0o700, so what lands under the final
name has the permissions a plain write would have given it.

A full disk (or a used-up quota) inside any of these writers is raised as ``DiskFull`` (an
``OSError`` with errno ENOSPC or EDQUOT) naming the final path, also when the writer was
safetensors (whose own error is not an OSError); nothing under the final name has changed then.

Before the work, a writer claims its output (``ldm_io.outputs``: ``claim_output_dir``,
``claim_output_file``): the one check of where it may write, the same rule for every command.

Standard library only: every package of the project (``ldm``, ``vae``, ``conditioning``,
``train``) may import it, and it imports none of them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Union

from ldm_io.outputs import OutputError, claim_output_dir, claim_output_file, write_marker

PathLike = Union[str, os.PathLike]

__all__ = ["DiskFull", "OutputError", "atomic_directory", "atomic_path", "claim_output_dir", "claim_output_file",
           "save_image", "write_bytes", "write_marker", "write_text"]

# Pillow's format names for the file suffixes save_image infers a format from.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF"}


class DiskFull(OSError):
    """No space left on the device (errno ENOSPC, or EDQUOT: the quota used up) while writing ``filename``.

    ``str()`` is one line: what was being written, that nothing under that name changed (``intact``: the
    write was an atomic one of this module), and ``hint`` (what to do next, e.g. which checkpoint to
    resume from)."""

    def __init__(self, path: PathLike, hint: str = "", code: int = errno.ENOSPC, intact: bool = True):
        super().__init__(code, os.strerror(code), str(path))
        self.hint, self.intact = hint, intact

    def __str__(self) -> str:
        text = "no space left on the device" if self.errno == errno.ENOSPC else "disk quota exceeded"
        text += f" while writing {self.filename}"
        if self.intact:
            text += "; nothing under that name was changed or left half-written"
        return f"{text}; {self.hint}" if self.hint else text


_FULL = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # safetensors' I/O errors: "... No space left on device (os error 28)"


@contextlib.contextmanager
def _disk_full_as_oserror(path: Path, tmp: Path) -> Iterator[None]:
    """Within the block, a full disk (an OSError, or safetensors' SafetensorError carrying the OS error)
    is raised as ``DiskFull(path)``; safetensors' other OS errors as ``OSError(code, ..., path)``."""
    try:
        yield
    except Exception as exc:
        code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
        if code is None and type(exc).__name__ == "SafetensorError" and (m := _OS_ERROR.search(str(exc))):
            code = int(m[1])
        if code is None or (isinstance(exc, OSError) and code not in _FULL):
            raise
        if isinstance(exc, DiskFull) and not str(exc.filename).startswith(str(tmp)):
            raise  # a write elsewhere, already named
        if code in _FULL:
            raise DiskFull(path, getattr(exc, "hint", ""), code) from exc
        raise OSError(code, os.strerror(code), str(path)) from exc


def _sibling(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new name ``.<name>.<random><suffix>`` beside ``path``, created by ``create`` (which must
    fail with FileExistsError when the name is taken, so two writers never share one)."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free temporary name beside {path}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode less the umask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (an empty file already exists there; write over it);
    rename it to ``path`` when the block succeeds. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, ".tmp", _new_file)
    try:
        with _disk_full_as_oserror(path, tmp):
            yield tmp
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _fsync_tree(folder: Path) -> None:
    """Every file under ``folder`` on disk (so a rename that makes it visible cannot outlive its contents)."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, durable: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` when the block succeeds.

    An existing ``path`` is renamed aside first and removed only once the new folder is in place, so
    at every moment ``path`` is either the old folder or the new one. Missing parent folders are created.
    ``durable``: fsync every file before the rename (checkpoints, caches: a power cut cannot leave a
    complete-looking folder of empty files). ``keep_existing``: when ``path`` exists by the time the
    block succeeds (another process wrote the same thing first), keep that one and drop ours.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, ".tmp", os.mkdir)  # mode 0o777 less the umask
    try:
        with _disk_full_as_oserror(path, tmp):
            yield tmp
            if durable:
                _fsync_tree(tmp)
        if keep_existing and os.path.lexists(path):
            return
        old = None
        if os.path.lexists(path):
            old = _sibling(path, ".old", os.mkdir)
            try:
                os.replace(path, old)  # a folder renamed onto an empty folder replaces it
            except BaseException:
                os.rmdir(old)
                raise
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the old folder back
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def exclusive_lock(path: PathLike, *, waiting: Callable[[], None] = lambda: None) -> Iterator[Path]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the block.

    Two processes that build the same thing (two fine-tunes sharing one latent cache) take turns: the
    second blocks until the first leaves its block, calling ``waiting()`` once first. The lock goes with
    the process, so a killed holder frees it. The file stays; a caller may remove it inside the block only
    once the guarded work is complete, so that a waiter which then takes the lock on the removed file, or a
    process that makes a new one, finds the work done. Where ``fcntl`` is missing (Windows) the block runs
    unlocked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield path
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path`` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path`` as a Path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def save_image(image, path: PathLike, *, format: str | None = None, **params) -> Path:
    """Save a PIL image to ``path`` atomically, ``image.save(tmp, format=..., **params)`` (e.g.
    ``pnginfo=PngInfo()``); the format comes from the suffix of ``path`` unless given."""
    path = Path(path)
    if format is None:
        if path.suffix.lower() not in IMAGE_FORMATS:
            raise ValueError(f"cannot tell an image format from {path.name!r}; use one of "
                             f"{', '.join(IMAGE_FORMATS)} or pass format=")
        format = IMAGE_FORMATS[path.suffix.lower()]
    with atomic_path(path) as tmp:
        image.save(tmp, format=format, **params)
    return path
