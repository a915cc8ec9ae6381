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

from ldm_io import atomic_path


def cache_dir(bundle: Optional[str], key: str, variant: Optional[str] = None) -> Path:
    """Where a bundle's graphs live: beside it if writable, else in the user's cache; those of a
    ``variant`` of its modules (LoRAs merged in) in a subfolder, so the two never replace each other's."""
    if bundle is not None and os.access(bundle, os.W_OK):
        root = Path(bundle) / "onnx"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-toolkit" / "onnx" / key
    return root / variant if variant else root


# ONNX Runtime's graph optimisation level for every session (the pipeline's and the runner's). bench/bench_pipeline.py measured each (README,
# "Speed on a CPU"): "all" (fusions, then the NCHWc layout for this CPU's vector width) is the fastest, most
# clearly at batch 8. Its graph is tied to this CPU's instructions, so what is saved is the "extended" one
# (the fusions, which cost most of a start) and "all" adds only the layout at each start.
ORT_LEVEL = "all"
ORT_LEVELS = ("disable", "basic", "extended", "all")
SAVED_LEVEL = "extended"


def session(path: Path, threads: int = 0, *, level: str = ORT_LEVEL, save_optimized: bool = True):
    """An ONNX Runtime CPU session over the graph ``path`` at optimisation ``level`` on ``threads``
    intra-op threads (0: ONNX Runtime's default, one per physical core); imports no torch. With ``save_optimized``
    (levels "extended" and "all") the graph optimised at "extended" is kept beside it
    (``ort-<version>-extended/<name>.onnx``, made once, atomically) and later sessions start from that
    one: "extended" with optimisation off, "all" with only its CPU-specific layout step left to run."""
    import onnxruntime as ort

    if level not in ORT_LEVELS:
        raise ValueError(f"level={level!r}; allowed: {', '.join(ORT_LEVELS)}")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

    def options(at: str):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = levels[at]
        return opts

    providers = ["CPUExecutionProvider"]
    if not save_optimized or level in ("disable", "basic"):
        return ort.InferenceSession(str(path), options(level), providers=providers)
    saved = optimized_path(path, SAVED_LEVEL)
    if not (saved.is_file() and saved.stat().st_mtime_ns >= path.stat().st_mtime_ns):
        opts = options(SAVED_LEVEL)
        if path.with_name(f"{path.name}.data").is_file():  # a graph with external data keeps its weights apart
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{saved.name}.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        with atomic_path(saved) as tmp:
            opts.optimized_model_filepath = str(tmp)
            made = ort.InferenceSession(str(path), opts, providers=providers)
        if level == SAVED_LEVEL:
            return made
        del made
    return ort.InferenceSession(str(saved), options("disable" if level == SAVED_LEVEL else level), providers=providers)


def optimized_path(path: Path, level: str = SAVED_LEVEL) -> Path:
    """Where ``session`` keeps the graph ``path`` optimised at ``level`` by this ONNX Runtime version: in a
    subfolder, so that the exported graphs stay the only ``*.onnx`` beside the stamps."""
    import onnxruntime as ort

    return path.parent / f"ort-{ort.__version__}-{level}" / path.name


def stamped(folder: Path, name: str, bundle_hash: str) -> Optional[Path]:
    """``folder/name.onnx`` when it was exported from the bundle whose hash is ``bundle_hash`` (its stamp
    ``name.json`` says so), else None."""
    path = folder / f"{name}.onnx"
    try:
        ok = path.is_file() and json.loads((folder / f"{name}.json").read_text()).get("bundle_hash") == bundle_hash
    except (OSError, ValueError, AttributeError):
        ok = False
    return path if ok else None
