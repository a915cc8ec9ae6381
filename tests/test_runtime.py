"""The torch-free runtime (``ldm.runtime``): its parts against the torch originals, and ``ldm generate`` through
it on a tiny bundle: no torch imported, images equal alone and in a batch, ``--from-png`` bit-exact."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.generate_cli import FAST_RUNNER, PNG_KEY
from ldm.runtime.noise import TorchCPUGenerator, _uniforms
from ldm.runtime.steps import apply_step
from ldm.runtime.tokenizer import simple_tokenizer, token_ids
from ldm.schedule import NoiseSchedule
from ldm.testing import build_bundle
from ldm.web.coefficients import step_rows

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "open_clip")


def test_noise_is_torch_randn_to_a_few_ulp():
    for seed in (0, 7, 2**32 + 5):
        for shape in ((1, 4, 8, 8), (1, 4, 3, 5), (2, 17), (16,)):  # whole blocks of 16, a redone tail
            g, ours = torch.Generator().manual_seed(seed), TorchCPUGenerator(seed)
            for _ in range(2):  # the stream goes on: a sampler's step noise after x_T
                ref, got = torch.randn(shape, generator=g).numpy(), ours.randn(shape)
                # the uniforms and the Box-Muller layout are torch's exactly (below); log, sin and cos are numpy's
                # float32 functions where torch uses Sleef's, each within 1 ulp: radius (log) times cos or sin
                # carries both errors plus the product's rounding, so a value ends within 4 ulp of torch's
                assert got.shape == ref.shape and got.dtype == np.float32
                assert np.all(np.abs(got - ref) <= 4 * np.spacing(np.abs(ref)))
    g = torch.Generator().manual_seed(3)
    assert np.array_equal(_uniforms(np.random.RandomState(3), 100), torch.rand(100, generator=g).numpy())


def test_tokenizer_gives_open_clips_ids():
    from open_clip.tokenizer import SimpleTokenizer

    ours, ref = simple_tokenizer("lower"), SimpleTokenizer(clean="lower")
    prompts = ["koala, twemoji style", "", "  A  Café &amp; naïve  ", "don't SHOUT!!! 123", "ﬁne ｗｉｄｅ",
               "<start_of_text> hi", "日本語のテキスト", "emoji 🐨🐨", "word " * 100]
    for p in prompts:
        assert ours.encode(p) == ref.encode(p), p
    ids = token_ids(ours, "word " * 100, 77)  # cut to 77 with the end token kept
    assert len(ids) == 77 and ids[-1] == ours.eot_token_id and ids[0] == ours.sot_token_id


@pytest.mark.parametrize("method, eta, sigmas, prediction, clip", [
    ("ddim", 0.0, None, "eps", None), ("ddim", 0.5, None, "v", 1.0), ("ddpm", 0.0, None, "eps", None),
    ("dpmpp-2m", 0.0, "karras", "eps", None), ("euler", 0.0, None, "x0", None), ("euler-a", 0.0, None, "eps", None)])
def test_step_arithmetic_is_the_same_bits_in_torch_and_numpy(method, eta, sigmas, prediction, clip):
    """The pipeline steps torch tensors and the runner numpy arrays through apply_step: same inputs, same bits."""
    rows = step_rows(NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012), method=method, steps=6, eta=eta,
                     sigmas=sigmas, prediction=prediction)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    xt, x0_prev, x0t_prev = torch.from_numpy(x.copy()), None, None
    for row in rows:
        out, noise = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
        x, x0_prev = apply_step(row, x, out, noise if row[1] else None, x0_prev, clip, np.clip)
        xt, x0t_prev = apply_step(row, xt, torch.from_numpy(out), torch.from_numpy(noise) if row[1] else None,
                                  x0t_prev, clip, torch.clamp)
        assert x.dtype == np.float32 and xt.dtype == torch.float32
        assert np.array_equal(x, xt.numpy()) and np.array_equal(x0_prev, x0t_prev.numpy())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny bundle after one torch-path run, which exported its graphs and the runner's files."""
    root = tmp_path_factory.mktemp("runtime")
    bundle = build_bundle(root / "tiny")
    assert main(["generate", "a koala", "--model", str(bundle), "--steps", "4", "--guidance", "3", "--num-images", "3",
                 "--out", str(root / "torch.png"), "--quiet"]) == 0
    return bundle, root


def run_fast(bundle: Path, out: Path, *extra: str) -> dict:
    """``ldm generate`` in a fresh process; returns which of HEAVY it imported and its exit code."""
    args = ["generate", "a koala", "--model", str(bundle), "--steps", "4", "--guidance", "3", "--out", str(out),
            "--quiet", *extra]
    code = (f"import sys, json; from ldm.cli import main; rc = main({args!r}); "
            f"print(json.dumps({{'rc': rc, 'heavy': sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})}}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_runs_without_torch_and_batches_change_no_image(prepared, tmp_path, capsys):
    bundle, root = prepared
    result = run_fast(bundle, tmp_path / "fast.png", "--num-images", "3", "--batch-size", "2")
    assert result == {"rc": 0, "heavy": []}  # none of torch, diffusers, transformers, open_clip
    record = json.loads(Image.open(tmp_path / "fast-2.png").text[PNG_KEY])
    assert record["runner"] == FAST_RUNNER and record["backend"] == "onnx" and record["seed"] == 2
    torch_png = Image.open(root / "torch-2.png")  # the same request's image from the torch path
    torch_record = json.loads(torch_png.text[PNG_KEY])
    assert set(record) == set(torch_record) | {"runner"} and record["versions"] == torch_record["versions"]
    assert Image.open(tmp_path / "fast-2.png").text["parameters"] == torch_png.text["parameters"]
    alone = run_fast(bundle, tmp_path / "alone.png", "--seed", "2")  # image 2 made alone
    assert alone["heavy"] == []
    assert np.array_equal(pixels(tmp_path / "alone.png"), pixels(tmp_path / "fast-2.png"))
    # against the torch pipeline on the same graphs: the runner's noise is torch's to 1 ulp and its contexts come
    # from the text encoder's graph, so a pixel may round the other way; no more than a level, in a few pixels
    diff = np.abs(pixels(tmp_path / "fast-2.png") - pixels(root / "torch-2.png"))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(tmp_path / "fast-1.png"), "--out", str(again), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


@pytest.mark.slow  # three torch-path processes
def test_what_the_runner_cannot_do_goes_to_torch(prepared, tmp_path):
    bundle, _ = prepared
    for extra in (["--steps", "3"], ["--height", "16"], ["--runtime", "torch"]):  # rows, graph, flag
        result = run_fast(bundle, tmp_path / "x.png", *extra)
        assert result["rc"] == 0 and "torch" in result["heavy"], extra
        assert "runner" not in json.loads(Image.open(tmp_path / "x.png").text[PNG_KEY]), extra


def test_pipeline_image_alone_equals_in_batch_on_each_backend(prepared):
    from ldm.pipeline import Text2ImagePipeline

    bundle, _ = prepared
    for backend in ("torch", "onnx"):
        pipe = Text2ImagePipeline.from_pretrained(bundle, backend=backend)
        kwargs = dict(steps=3, guidance=3.0, output="tensor", method="ddpm")
        batch = pipe(["a koala", "a cat"], seed=5, num_images=2, batch_size=3, **kwargs)
        alone = pipe("a cat", seed=8, num_images=1, **kwargs)
        assert torch.equal(batch[3:], alone), backend


@pytest.mark.slow  # the default model on both backends, then the runner (exports its graphs on a first run)
def test_default_model_image_alone_equals_in_batch_on_every_path():
    from ldm.bundle import DEFAULT_BUNDLE, bundle_hash
    from ldm.pipeline import Text2ImagePipeline, to_pil
    from ldm.runtime.runner import Runner, prepare

    kwargs = dict(steps=10, guidance=7.5, output="tensor")
    for backend in ("torch", "onnx"):
        pipe = Text2ImagePipeline.from_pretrained(DEFAULT_BUNDLE, backend=backend)
        batch = pipe("koala, twemoji style", seed=0, num_images=3, **kwargs)
        alone = pipe("koala, twemoji style", seed=2, num_images=1, **kwargs)
        assert torch.equal(batch[2:], alone), backend
    assert prepare(pipe, method="ddim", steps=10, eta=0.0, sigmas=None)
    runner = Runner(DEFAULT_BUNDLE, bundle_hash(DEFAULT_BUNDLE))
    request = dict(steps=10, method="ddim", eta=0.0, sigmas=None, guidance=7.5)
    batch = runner.generate(["koala, twemoji style"] * 3, [None] * 3, [0, 1, 2], **request)
    alone = runner.generate(["koala, twemoji style"], [None], [2], **request)
    assert np.array_equal(batch[2], alone[0])
    # the runner against the pipeline on the same graphs: the same image up to a level in a rare pixel (README)
    diff = np.abs(batch[2].astype(np.int16) - np.asarray(to_pil(pipe.decode(pipe.generate_latents(
        pipe.request("koala, twemoji style", None, 2, 1), steps=10)))[0], dtype=np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
