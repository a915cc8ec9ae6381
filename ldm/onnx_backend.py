"""ONNX Runtime inference backend: the U-Net and the decoder exported once, cached beside the bundle.

``OnnxGraphs`` exports and caches the graphs (the web export reads them too); ``OnnxBackend`` runs
them, as the backend object a ``Text2ImagePipeline`` is given (see ``ldm.backends``).

ONNX Runtime runs the exported fp32 graphs faster than PyTorch eager on a CPU (the same
numbers to about 1e-6: the graphs are the same maths, only fused), which makes it the fastest
exact CPU path; see bench/bench_pipeline.py. The same graphs, with the text encoder's
(tokens -> context), serve the in-browser demo (``ldm export-web``, ``ldm.web``).

Graphs are exported per latent size with a dynamic batch axis, into ``<bundle>/onnx/`` when
the bundle folder is writable and ``~/.cache/ldm-toolkit/onnx/<bundle hash>/`` otherwise. Each
graph ``<name>.onnx`` is keyed by what it was made from (``module_key``: the module's weights and
buffers, its structure and settings, the example shapes, the opset), recorded beside it in
``<name>.json``, and re-exported when that differs (example dtypes included: graphs from before the
U-Net took float32 t are re-exported): replacing a bundle's ``vae/`` re-exports the
decoder graph, however the U-Net's is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ldm.runtime.graphs import ORT_LEVEL, ORT_LEVELS, SAVED_LEVEL, cache_dir, optimized_path, session  # noqa: F401  (re-exported)
from ldm_io import atomic_path, write_text

OPSET = 17


class _UNetGraph(torch.nn.Module):
    """(x_t, t, context) -> output, the plain signature the graph gets."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):  # (B, C, h, w), (B,), (B, L, D)
        return self.unet(x, t, encoder_hidden_states=context).sample


class _TextEncoderGraph(torch.nn.Module):
    """tokens -> context: the sequence the U-Net cross-attends to (the pooled output is not exported)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, tokens):  # (B, L) long -> (B, L, D)
        return self.text_encoder._encode_tokens(tokens)[0]


class _SharedRowsEmbedding(torch.nn.Module):
    """An embedding table whose equal rows are stored once: id -> row number -> row.

    A packed bundle's token table (``ldm pack --vocab-from``) has a few thousand rows of its own
    and ~49k copies of one shared row; stored this way its graph is ~7x smaller, same outputs."""

    def __init__(self, weight: torch.Tensor):  # (V, D)
        super().__init__()
        rows, row_of_id = torch.unique(weight.detach(), dim=0, return_inverse=True)  # (K, D), (V,)
        self.register_buffer("rows", rows)
        self.register_buffer("row_of_id", row_of_id)

    def forward(self, ids):  # (B, L) long -> (B, L, D)
        return self.rows[self.row_of_id[ids]]


@contextmanager
def shared_row_embeddings(module: torch.nn.Module, min_rows: int = 1000):
    """Within the block, every embedding of at least ``min_rows`` rows of which at most half are
    distinct is a ``_SharedRowsEmbedding`` (for export); the originals are put back after."""
    swapped = []
    for name, child in list(module.named_modules()):
        if isinstance(child, torch.nn.Embedding) and child.num_embeddings >= min_rows:
            shared = _SharedRowsEmbedding(child.weight)
            if 2 * len(shared.rows) <= child.num_embeddings:
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name)
                setattr(parent, attr, shared)
                swapped.append((parent, attr, child))
    try:
        yield
    finally:
        for parent, attr, child in swapped:
            setattr(parent, attr, child)


class _DecoderGraph(torch.nn.Module):
    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z):  # (B, C, h, w) -> (B, 3, H, W)
        return self.autoencoder.decode(z)


def module_key(module: torch.nn.Module, args: tuple) -> str:
    """A hash of what a graph exported from ``module(*args)`` depends on: every parameter and buffer
    (name, dtype, shape, bytes), the module's structure (its repr), the plain settings of each
    submodule (e.g. an autoencoder's scaling_factor), the example inputs' shapes, and the opset."""
    h = hashlib.sha256(f"opset {OPSET} {torch.__version__}\n{module!r}\n".encode())
    for name, sub in module.named_modules():
        settings = {}
        for k, v in sorted(vars(sub).items()):
            if (k.startswith("_") and k != "_internal_dict") or k == "training":  # _internal_dict: diffusers' config
                continue
            if k == "_internal_dict":  # diffusers' _use_default_values lists a set: its order changes per process
                v = {name: value for name, value in v.items() if name != "_use_default_values"}
            try:
                settings[k] = json.loads(json.dumps(v))  # only plain values: numbers, strings, lists, dicts
            except (TypeError, ValueError):
                continue
        h.update(f"{name} {json.dumps(settings, sort_keys=True)}\n".encode())
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    h.update(repr([(tuple(a.shape), str(a.dtype)) for a in args]).encode())
    return h.hexdigest()[:32]


# graphs whose weights pass this are stored with them in one ``<name>.onnx.data`` beside the graph:
# a protobuf file cannot exceed 2 GiB (the full-size U-Net's float32 weights are 3.2 GiB)
EXTERNAL_DATA_BYTES = 1 << 30


def export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str]) -> None:
    """Export ``module(*args)`` to ``path`` (atomically) with a dynamic batch axis on every input; a module
    of more than ``EXTERNAL_DATA_BYTES`` of weights gets its tensors in ``<path>.data`` beside the graph."""
    axes = {name: {0: "batch"} for name in input_names + ["out"]}
    weights = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    kwargs = dict(input_names=input_names, output_names=["out"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if weights <= EXTERNAL_DATA_BYTES:
            with atomic_path(path) as tmp:
                torch.onnx.export(module.eval(), args, str(tmp), **kwargs)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent) as tmp:
            raw = Path(tmp) / "raw" / "graph.onnx"  # the exporter writes one file per tensor beside it
            raw.parent.mkdir()
            torch.onnx.export(module.eval(), args, str(raw), **kwargs)
            _gather_external_data(raw, Path(tmp) / path.name)
            # the data first, then the graph that names it: a graph never points at missing data
            os.replace(Path(tmp) / f"{path.name}.data", path.with_name(f"{path.name}.data"))
            os.replace(Path(tmp) / path.name, path)


def _gather_external_data(raw: Path, out: Path, chunk: int = 1 << 26, min_bytes: int = 1024) -> None:
    """Rewrite the graph ``raw`` as ``out`` with every tensor of ``min_bytes`` or more in one ``<out>.data``
    (the layout ``onnx.save(save_as_external_data=True)`` writes): those the exporter wrote to files of their
    own beside ``raw`` are streamed from there, so that no second copy of the weights is held in memory."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    model = onnx.load(str(raw), load_external_data=False)
    offset = 0
    with open(out.with_name(f"{out.name}.data"), "wb") as data:
        for tensor in [*model.graph.initializer, *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(tensor)
                length = 0
                with open(raw.parent / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    left = info.length or None
                    while left is None or left > 0:
                        block = src.read(chunk if left is None else min(chunk, left))
                        if not block:
                            break
                        data.write(block)
                        length += len(block)
                        left = None if left is None else left - len(block)
            elif len(tensor.raw_data) >= min_bytes:
                length = data.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            for key, value in (("location", f"{out.name}.data"), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += length
    onnx.save(model, str(out))


class OnnxGraphs:
    """The U-Net and decoder graphs of one bundle, exported on first use for each latent size."""

    def __init__(self, unet, autoencoder, context_shape: tuple[int, int], bundle: Optional[str], key: str,
                 variant: Optional[str] = None):
        self.unet, self.autoencoder = unet, autoencoder
        self.context_shape = context_shape  # (L, D)
        self.dir = cache_dir(bundle, key, variant)
        self.key = key

    def graph(self, name: str, module, args, input_names, exporting=nullcontext) -> Path:
        """The path of graph ``name``, exported from ``module(*args)`` (within the context
        ``exporting()``) unless one made from the same weights (``module_key``) is cached."""
        path = self.dir / f"{name}.onnx"
        stamp = self.dir / f"{name}.json"
        key = module_key(module, args)
        try:
            recorded = json.loads(stamp.read_text())
            fresh = path.is_file() and recorded.get("weights") == key
        except (OSError, ValueError, AttributeError):  # no stamp, or not ours
            recorded, fresh = {}, False
        if fresh and recorded.get("bundle_hash") != self.key:  # same weights, bundle files changed: the
            write_text(stamp, json.dumps({"weights": key, "bundle_hash": self.key}))  # runner reads this hash
        if not fresh:
            stamp.unlink(missing_ok=True)  # a process stopped between the two writes leaves no stale stamp
            with exporting():
                export(module, args, path, input_names)
            write_text(stamp, json.dumps({"weights": key, "bundle_hash": self.key}))
        return path

    def _unet_args(self, latent_shape: tuple[int, int, int]):
        c, h, w = latent_shape
        # t is float32: Euler with Karras sigmas visits fractional timesteps (ldm.samplers); integers are exact
        example = (torch.zeros(2, c, h, w), torch.zeros(2, dtype=torch.float32), torch.zeros(2, *self.context_shape))
        return f"unet-{h}x{w}", _UNetGraph(self.unet), example, ["x", "t", "context"]

    def _decoder_args(self, latent_shape: tuple[int, int, int]):
        c, h, w = latent_shape
        return f"decoder-{h}x{w}", _DecoderGraph(self.autoencoder), (torch.zeros(2, c, h, w),), ["z"]

    def unet_graph(self, latent_shape: tuple[int, int, int]) -> Path:
        """The U-Net graph (x (B, C, h, w), t (B,) float32, context (B, L, D)) -> out, for latents (C, h, w)."""
        return self.graph(*self._unet_args(latent_shape))

    def decoder_graph(self, latent_shape: tuple[int, int, int]) -> Path:
        """The decoder graph z (B, C, h, w) -> images (B, 3, H, W) about [-1, 1] (not clamped)."""
        return self.graph(*self._decoder_args(latent_shape))

    def text_encoder_graph(self, text_encoder) -> Path:
        """The text encoder graph tokens (B, L) long -> context (B, L, D); a token table with
        shared rows (a packed bundle's) is stored with each distinct row once."""
        tokens = torch.zeros(2, self.context_shape[0], dtype=torch.long)  # (2, L)
        return self.graph("text_encoder", _TextEncoderGraph(text_encoder), (tokens,), ["tokens"],
                          exporting=lambda: shared_row_embeddings(text_encoder))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().contiguous().numpy()


class OnnxBackend:
    """The U-Net's and the decoder's calls (``ldm.backends.Backend``) run by ONNX Runtime, fp32 on the
    CPU: one session per graph and latent size, the graph exported (or found cached) on first use."""

    name = "onnx"

    def __init__(self, graphs: OnnxGraphs):
        self.graphs = graphs
        self.sessions: dict[tuple, object] = {}

    @classmethod
    def for_modules(cls, unet, autoencoder, text_encoder, bundle: Optional[str] = None,
                    variant: Optional[str] = None) -> "OnnxBackend":
        """A backend over graphs of these torch modules; ``bundle``: the folder they were loaded from
        (graphs are cached beside it, keyed by its hash), or None for modules not saved ("unsaved");
        ``variant``: modules changed since (LoRAs merged in), whose graphs are cached in a subfolder."""
        from ldm.bundle import bundle_hash

        context = text_encoder.empty_context(1)  # (1, L, D)
        key = bundle_hash(bundle) if bundle else "unsaved"
        return cls(OnnxGraphs(unet, autoencoder, tuple(context.shape[1:]), bundle, key, variant))

    def open_session(self, path: Path):
        """A runner of the graph ``path`` with ONNX Runtime's ``run(None, feeds) -> [outputs]``, on torch's threads."""
        return session(path, threads=torch.get_num_threads())

    def _session(self, graph, latent_shape: tuple[int, int, int]):
        if (graph.__name__, latent_shape) not in self.sessions:
            self.sessions[graph.__name__, latent_shape] = self.open_session(graph(latent_shape))
        return self.sessions[graph.__name__, latent_shape]

    def unet(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sess = self._session(self.graphs.unet_graph, tuple(x_t.shape[1:]))
        out = sess.run(None, {"x": _np(x_t), "t": t.cpu().numpy().astype(np.float32), "context": _np(context)})[0]
        return torch.from_numpy(out).to(x_t.device)  # (B, C, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        sess = self._session(self.graphs.decoder_graph, tuple(z.shape[1:]))
        return torch.from_numpy(sess.run(None, {"z": _np(z)})[0]).to(z.device)  # (B, 3, H, W)
