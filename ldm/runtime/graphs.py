"""Where a bundle's ONNX graphs are cached and how a session opens one; torch-free.

``ldm.onnx_backend`` exports the graphs (with torch) and runs them for the pipeline; the torch-free
runner (``ldm.runtime.runner``) runs the same files. Both find them with ``cache_dir`` and open them
with ``session``, so the two cannot disagree on the place or on the session options.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def cache_dir(bundle: Optional[str], key: str, variant: Optional[str] = None) -> Path:
    """Where a bundle's graphs live: beside it if writable, else in the user's cache; those of a
    ``variant`` of its modules (LoRAs merged in) in a subfolder, so the two never replace each other's."""
    if bundle is not None and os.access(bundle, os.W_OK):
        root = Path(bundle) / "onnx"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-toolkit" / "onnx" / key
    return root / variant if variant else root


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session for the graph at ``path``; ``threads``: intra-op threads (0: ORT's default,
    one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def stamped(folder: Path, name: str, bundle_hash: str) -> Optional[Path]:
    """``folder/name.onnx`` when it was exported from the bundle whose hash is ``bundle_hash`` (its stamp
    ``name.json`` says so), else None."""
    path = folder / f"{name}.onnx"
    try:
        ok = path.is_file() and json.loads((folder / f"{name}.json").read_text()).get("bundle_hash") == bundle_hash
    except (OSError, ValueError, AttributeError):
        ok = False
    return path if ok else None
