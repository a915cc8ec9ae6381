"""OpenVINO inference backend: the ONNX backend's graphs (``ldm.onnx_backend``) compiled by OpenVINO.

The same exported graphs and cache as ``OnnxBackend`` (a bundle's ``onnx/`` folder), run by
OpenVINO's CPU plugin instead of ONNX Runtime. OpenVINO computes in bf16 by default on CPUs with
bf16 instructions (AVX512-BF16, AMX), which moves images by far more than float32 rounding; this
backend asks for f32 (``INFERENCE_PRECISION_HINT``), so its outputs equal ONNX Runtime's and
PyTorch's to float32 tolerance. ``pip install 'ldm-toolkit[openvino]'`` installs OpenVINO;
bench/bench_pipeline.py and bench/bench_fullsize.py compare its speed with the other backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ldm.onnx_backend import OnnxBackend


class OpenVinoSession:
    """One compiled graph with ONNX Runtime's call: ``run(None, feeds) -> [outputs]`` (float32 arrays)."""

    def __init__(self, path: Path, threads: Optional[int] = None, precision: Optional[str] = "f32"):
        """``precision``: OpenVINO's INFERENCE_PRECISION_HINT; None leaves OpenVINO's default (bf16 on CPUs
        with bf16 instructions: not exact, for comparisons only)."""
        try:
            import openvino as ov
        except ImportError as e:
            raise ValueError("backend='openvino' needs the openvino package: pip install 'ldm-toolkit[openvino]' "
                             "(or use backend='onnx')") from e
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.array(results[out]) for out in self.compiled.outputs]  # copies: the request reuses its buffers


class OpenVinoBackend(OnnxBackend):
    """The U-Net's and the decoder's calls (``ldm.backends.Backend``) run by OpenVINO, f32 on the CPU,
    over the ONNX backend's graphs (exported or found cached on first use)."""

    name = "openvino"

    def open_session(self, path: Path) -> OpenVinoSession:
        return OpenVinoSession(path)
