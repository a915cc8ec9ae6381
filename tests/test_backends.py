"""The CPU backends' graphs and sessions (issue 17, point 3): ONNX Runtime's saved optimised graph,
graphs with external data, the cache key across processes, and the OpenVINO backend.

Tolerances: the graphs compute the same float32 maths as torch in another order (fused ops, other
kernels), so outputs of order 1 agree to a few float32 ulps per op; 1e-4 (as tests/test_pipeline.py's
ONNX check) bounds that with room and is far below a real difference (a wrong weight or op moves
outputs by 1e-2 and more).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ldm.onnx_backend as onnx_backend
from ldm.backends import make_backend
from ldm.onnx_backend import OnnxBackend, export, module_key, optimized_path, session
from ldm.openvino_backend import OpenVinoBackend
from ldm.pipeline import SamplingConfig, Text2ImagePipeline
from ldm.schedule import NoiseSchedule
from ldm.testing import unet as tiny_diffusers_unet
from pipeline_fakes import FakeAutoencoder, FakeTextEncoder, tiny_unet

ROOT = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-4, atol=1e-4)


def unet_example(width=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 500.0]), torch.randn(2, 77, width, generator=g))


def feeds(args):
    x, t, c = (a.numpy() for a in args)
    return {"x": x, "t": t, "context": c}


def torch_output(unet, args):
    with torch.no_grad():
        return unet(args[0], args[1], encoder_hidden_states=args[2]).sample.numpy()


def test_saved_optimised_graph_is_reused_and_follows_a_new_export(tmp_path):
    unet, args = tiny_diffusers_unet().eval(), unet_example()
    path = tmp_path / "unet.onnx"
    export(onnx_backend._UNetGraph(unet), args, path, ["x", "t", "context"])
    first = session(path)  # optimises and saves
    saved = optimized_path(path, "extended")
    assert saved.is_file() and saved.parent.parent == tmp_path
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["unet.onnx"]  # the cache's own graphs stay alone
    stamp = saved.stat().st_mtime_ns
    second = session(path)  # loads the saved one
    assert saved.stat().st_mtime_ns == stamp
    ref = torch_output(unet, args)
    for s in (first, second):
        np.testing.assert_allclose(s.run(None, feeds(args))[0], ref, **TOL)
    # a graph exported again (other weights) after the saved one was made: optimised again, from the new graph
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    time.sleep(0.01)
    export(onnx_backend._UNetGraph(unet), args, path, ["x", "t", "context"])
    third = session(path)
    assert saved.stat().st_mtime_ns > stamp
    np.testing.assert_allclose(third.run(None, feeds(args))[0], torch_output(unet, args), **TOL)


def test_large_graphs_keep_their_weights_in_one_external_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_backend, "EXTERNAL_DATA_BYTES", 1000)  # the tiny U-Net counts as large
    unet, args = tiny_diffusers_unet().eval(), unet_example()
    path = tmp_path / "onnx" / "unet.onnx"  # a folder not made yet, as a bundle's first export
    export(onnx_backend._UNetGraph(unet), args, path, ["x", "t", "context"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["unet.onnx", "unet.onnx.data"]  # no per-tensor files, no temp
    weights = sum(p.numel() * 4 for p in unet.parameters())  # float32 bytes; tensors under 1 KiB stay in the graph
    assert path.with_name("unet.onnx.data").stat().st_size >= 0.9 * weights
    ref = torch_output(unet, args)
    np.testing.assert_allclose(session(path, save_optimized=False).run(None, feeds(args))[0], ref, **TOL)
    s = session(path)  # the optimised copy keeps its weights apart too
    assert optimized_path(path, "extended").with_name("unet.onnx.data").is_file()
    np.testing.assert_allclose(s.run(None, feeds(args))[0], ref, **TOL)
    np.testing.assert_allclose(session(path).run(None, feeds(args))[0], ref, **TOL)


def test_graph_key_is_the_same_in_every_process(tmp_path):
    """diffusers' configs list their defaulted names in set order, which changes with the hash seed; a key
    that followed it re-exported the graphs in every new process."""
    code = ("from ldm.testing import unet; from ldm.onnx_backend import module_key, _UNetGraph; import torch; "
            "print(module_key(_UNetGraph(unet()), (torch.zeros(2, 4, 8, 8),)))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT)}).stdout.strip()
            for seed in (1, 2, 3)}
    assert len(keys) == 1 and len(next(iter(keys))) == 32
    assert keys == {module_key(onnx_backend._UNetGraph(tiny_diffusers_unet()), (torch.zeros(2, 4, 8, 8),))}


def make_pipe(backend=None):
    unet, autoencoder, text_encoder = tiny_unet(), FakeAutoencoder(), FakeTextEncoder()
    runner = backend.for_modules(unet, autoencoder, text_encoder) if backend else None
    return Text2ImagePipeline(unet, autoencoder, text_encoder, NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012),
                              SamplingConfig(), sample_size=8, backend=runner)


def test_openvino_backend_gives_the_same_images(tmp_path):
    """In a process of its own: OpenVINO's TBB thread pool in the pytest process made later tests that fork
    (DataLoader workers) crash it with a segmentation fault."""
    code = f"import sys; sys.path[:0] = {[str(ROOT / 'tests'), str(ROOT)]!r}; import test_backends; test_backends.openvino_images_check()"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def openvino_images_check():
    tmp_path = Path(os.environ["XDG_CACHE_HOME"])
    kwargs = dict(prompt=["a koala", "a cat"], steps=4, guidance=3.0, seed=0, height=32, width=24, output="tensor")
    ref = make_pipe()(**kwargs)
    got = make_pipe(OpenVinoBackend)(**kwargs)
    torch.testing.assert_close(got, ref, **TOL)
    onnx = make_pipe(OnnxBackend)
    torch.testing.assert_close(onnx(**kwargs), ref, **TOL)  # the same graphs, cached once for both
    assert sorted(p.name for p in (tmp_path / "ldm-toolkit" / "onnx" / "unsaved").glob("*.onnx")) == ["decoder-8x6.onnx", "unet-8x6.onnx"]


def test_openvino_by_name_and_without_the_package(monkeypatch):
    unet, autoencoder, text_encoder = tiny_unet(), FakeAutoencoder(), FakeTextEncoder()
    assert isinstance(make_backend("openvino", unet, autoencoder, text_encoder), OpenVinoBackend)
    with pytest.raises(ValueError, match="backend='openvino' runs fp32 on the CPU"):
        make_backend("openvino", unet, autoencoder, text_encoder, dtype=torch.bfloat16)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs the openvino package: pip install 'ldm-toolkit\[openvino\]'"):
        make_backend("openvino", unet, autoencoder, text_encoder)
