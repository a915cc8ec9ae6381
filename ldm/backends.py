"""Backends: what runs the U-Net and the decoder for the pipeline.

A backend is an object with two calls, given to ``Text2ImagePipeline`` when it is built
(as ``denoise`` is given to the sampler), never patched into a built pipeline:

    backend.unet(x_t, t, context) -> output   # (B, C, h, w), (B,) long, (B, L, D) -> (B, C, h, w)
    backend.decode(z) -> images                # scaled latents (B, C, h, w) -> (B, 3, H, W), about [-1, 1]

``TorchBackend`` calls the torch modules; ``ldm.onnx_backend.OnnxBackend`` runs the same modules
exported to ONNX Runtime (fp32, CPU) and ``ldm.openvino_backend.OpenVinoBackend`` those graphs in
OpenVINO (f32, CPU; an optional package). ``make_backend`` builds one by name for ``from_pretrained``.
"""

from __future__ import annotations

import sys
from typing import Optional, Protocol

import torch

BACKENDS = ("auto", "torch", "onnx", "openvino")


class Backend(Protocol):
    name: str

    def unet(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


class TorchBackend:
    """The torch modules themselves: a diffusers-style U-Net (``unet(x, t, encoder_hidden_states=c).sample``)
    and an autoencoder with ``decode`` (``vae.Autoencoder``). They run on whatever device and dtype they are on.
    ``compile=True`` calls the U-Net through ``torch.compile`` (inductor; compiled at its first call and again
    for each new batch shape); the module itself is left as it is."""

    name = "torch"

    def __init__(self, unet: torch.nn.Module, autoencoder, *, compile: bool = False):
        self.unet_module, self.autoencoder = unet, autoencoder
        self.compiled = torch.compile(unet) if check_compile(compile) else None

    def unet(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        module = self.compiled if self.compiled is not None else self.unet_module
        return module(x_t, t, encoder_hidden_states=context).sample  # (B, C, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)  # (B, 3, H, W)


def check_compile(compile: bool) -> bool:
    """``compile``, once checked that torch.compile runs in this Python (ValueError, one line, where it does not)."""
    if not compile:
        return False
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ValueError(f"torch.compile does not run here (torch {torch.__version__}, Python "
                         f"{sys.version.split()[0]}); leave compiling off")
    return True


def compile_in_place(unet: torch.nn.Module, device: torch.device) -> None:
    """``unet.compile()`` for training, once checked that torch.compile runs here: in place, so the module keeps its
    parameter names (checkpoints, EMA, the bundle). On CUDA with torch < 2.14 inductor's coalescing tiling analysis
    is turned off first: torch 2.11's fails an assertion (tiling_utils.py) on the U-Net's training graph (seen on an
    H100, docs/gpu.md), and without it the graph compiles and training gives eager's weights within 1e-4
    (tests/test_gpu.py). Only inductor's choice of tiles changes."""
    check_compile(True)
    if device.type == "cuda" and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 14):
        from torch._inductor import config as inductor

        inductor.triton.coalesce_tiling_analysis = False
    unet.compile()


def resolve_backend(backend: str, device=None, dtype=None, compile: bool = False) -> str:
    """``auto`` is the fastest exact path: ONNX Runtime for fp32 on the CPU (see
    bench/bench_pipeline.py), PyTorch everywhere else, and PyTorch whenever ``compile`` is asked for
    (torch.compile compiles the torch U-Net; the onnx backend refuses it)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed values: {', '.join(BACKENDS)}")
    if backend in ("onnx", "openvino") and compile:
        raise ValueError(f"compile applies to the torch backend (torch.compile of the U-Net); the {backend} backend runs "
                         "its own graph: use backend torch (or auto) to compile, or leave compiling off")
    if backend != "auto":
        return backend
    if compile:
        return "torch"
    cpu_fp32 = torch.device(device or "cpu").type == "cpu" and (dtype or torch.float32) == torch.float32
    return "onnx" if cpu_fp32 else "torch"


def make_backend(backend: str, unet, autoencoder, text_encoder, *, bundle: Optional[str] = None,
                 device=None, dtype=None, variant: Optional[str] = None, compile: bool = False) -> Backend:
    """The backend named ``backend`` (torch, onnx, openvino or auto) over these modules, for a pipeline that
    runs on ``device`` in ``dtype``; ``bundle`` is the folder they were loaded from (the ONNX graph cache),
    ``variant`` names modules that differ from the bundle's (LoRAs merged in): their graphs go apart;
    ``compile``: the torch backend calls the U-Net through torch.compile."""
    name = resolve_backend(backend, device, dtype, compile)
    if name == "torch":
        return TorchBackend(unet, autoencoder, compile=compile)
    if torch.device(device or "cpu").type != "cpu" or (dtype or torch.float32) != torch.float32:
        raise ValueError(f"backend={name!r} runs fp32 on the CPU; use backend='torch' for other devices and dtypes")
    if name == "openvino":
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            raise ValueError("backend='openvino' needs the openvino package: pip install 'ldm-toolkit[openvino]' "
                             "(or use backend='onnx')")
        from ldm.openvino_backend import OpenVinoBackend as runner
    else:
        from ldm.onnx_backend import OnnxBackend as runner

    return runner.for_modules(unet, autoencoder, text_encoder, bundle, variant=variant)
