"""Text2ImagePipeline's own logic: batching, seeds, guidance calls, sizes, bad input."""

import pytest
import torch

from ldm.backends import TorchBackend, make_backend
from ldm.onnx_backend import OnnxBackend
from ldm.pipeline import SamplingConfig, Text2ImagePipeline
from ldm.schedule import NoiseSchedule
from pipeline_fakes import FakeAutoencoder, FakeTextEncoder, tiny_unet


class CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.inner, self.batches = unet, []
        self.config = unet.config

    def forward(self, x, t, encoder_hidden_states):
        self.batches.append(x.shape[0])
        return self.inner(x, t, encoder_hidden_states=encoder_hidden_states)


def make_pipe(onnx=False):
    unet, autoencoder, text_encoder = CountingUNet(tiny_unet()), FakeAutoencoder(), FakeTextEncoder()
    backend = OnnxBackend.for_modules(unet.inner, autoencoder, text_encoder) if onnx else None
    return Text2ImagePipeline(unet, autoencoder, text_encoder, NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012),
                              SamplingConfig(), sample_size=8, backend=backend)


def test_images_and_one_unet_call_per_image_and_step():
    pipe = make_pipe()
    images = pipe(["a koala", "a cat"], steps=4, guidance=5.0, num_images=3, batch_size=4)
    assert len(images) == 6 and images[0].size == (32, 32) and images[0].mode == "RGB"
    assert pipe.unet.batches == [2] * 6 * 4  # each image's [uncond, cond] pair alone, 4 steps
    assert all(len(call) == 1 for call in pipe.text_encoder.calls)  # each prompt encoded alone


def test_guidance_one_skips_the_unconditional_half():
    pipe = make_pipe()
    pipe("a koala", steps=3, guidance=1.0, num_images=2)
    assert pipe.unet.batches == [1] * 2 * 3
    assert pipe.text_encoder.calls == [["a koala"]]  # nor is the empty prompt encoded


def test_each_image_is_reproducible_alone_from_its_seed():
    pipe = make_pipe()
    for method, eta in [("ddim", 0.0), ("ddpm", 0.0), ("ddim", 1.0)]:
        batch = pipe(["a koala", "a cat"], steps=5, method=method, eta=eta, seed=10, num_images=2, output="tensor")
        alone = pipe("a cat", steps=5, method=method, eta=eta, seed=13, num_images=1, output="tensor")  # image 3
        # exact: the image's prompts, U-Net calls and decoding see it alone in both runs, so no kernel
        # blocks its numbers differently (a batched call did: 8.2e-6 apart with AVX2 kernels)
        torch.testing.assert_close(batch[3:], alone, rtol=0, atol=0)
        assert not torch.allclose(batch[2], batch[3], atol=1e-3)  # different seeds differ


def test_prompt_and_negative_prompt_change_the_image():
    pipe = make_pipe()
    base = pipe("a koala", steps=4, seed=0, output="tensor")
    assert not torch.allclose(base, pipe("a cat", steps=4, seed=0, output="tensor"), atol=1e-3)
    neg = pipe("a koala", negative_prompt="blurry", steps=4, seed=0, output="tensor")
    assert not torch.allclose(base, neg, atol=1e-3)
    same = pipe("a koala", negative_prompt="", steps=4, seed=0, output="tensor")  # "" is the empty prompt
    torch.testing.assert_close(base, same)


def test_size_follows_height_and_width():
    pipe = make_pipe()
    img = pipe("a koala", steps=2, height=48, width=24)[0]
    assert img.size == (24, 48)


def test_progress_reports_every_step():
    pipe, seen = make_pipe(), []
    pipe(["a", "b", "c"], steps=3, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=[]), "empty list"),
        (dict(prompt=3), "prompt must be a string"),
        (dict(prompt="a", guidance=-1.0), "guidance"),
        (dict(prompt="a", steps=0), "steps=0"),
        (dict(prompt="a", height=30), "height=30 must be a positive multiple of the autoencoder's factor 4"),
        (dict(prompt="a", method="heun"), "method='heun'"),
        (dict(prompt="a", method="ddim", sigmas="karras"), "sigmas='karras' applies to"),
        (dict(prompt="a", method="euler-a", eta=0.5), "method='euler-a' has no eta"),
        (dict(prompt="a", num_images=0), "num_images=0"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "3 negative prompts for 2 prompts"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pipe()(**{"steps": 2, **kwargs})


@pytest.mark.parametrize("sampler", [dict(method="ddim"), dict(method="euler", sigmas="karras")],
                         ids=["ddim", "euler-karras"])  # euler-karras: fractional float32 t reach the graph
def test_onnx_backend_gives_the_same_images(tmp_path, monkeypatch, sampler):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch_pipe, onnx_pipe = make_pipe(), make_pipe(onnx=True)
    kwargs = dict(prompt=["a koala", "a cat", "a dog"], steps=4, guidance=3.0, seed=0, height=32, width=24, output="tensor",
                  **sampler)
    ref, got = torch_pipe(**kwargs), onnx_pipe(**kwargs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "ldm-toolkit" / "onnx" / "unsaved").glob("*.onnx")) == ["decoder-8x6.onnx", "unet-8x6.onnx"]


class RecordingBackend(TorchBackend):
    """The torch backend, noting each call the pipeline makes to it."""

    def __init__(self, unet, autoencoder):
        super().__init__(unet, autoencoder)
        self.calls = []

    def unet(self, x_t, t, context):
        self.calls.append("unet")
        return super().unet(x_t, t, context)

    def decode(self, z):
        self.calls.append("decode")
        return super().decode(z)


def test_the_pipeline_runs_the_unet_and_decoder_only_through_its_backend():
    pipe = make_pipe()
    recording = RecordingBackend(pipe.unet, pipe.autoencoder)
    given = pipe.with_backend(recording)
    kwargs = dict(prompt=["a koala", "a cat"], steps=3, guidance=3.0, seed=0, output="tensor")
    torch.testing.assert_close(given(**kwargs), pipe(**kwargs), rtol=0, atol=0)
    assert recording.calls == ["unet"] * 2 * 3 + ["decode"] * 2  # per image
    assert pipe.backend is not recording  # the first pipeline keeps its own backend


def test_make_backend_names_and_refusals():
    unet, autoencoder, text_encoder = tiny_unet(), FakeAutoencoder(), FakeTextEncoder()
    assert isinstance(make_backend("torch", unet, autoencoder, text_encoder), TorchBackend)
    assert isinstance(make_backend("auto", unet, autoencoder, text_encoder, dtype=torch.bfloat16), TorchBackend)
    with pytest.raises(ValueError, match="backend='onnx' runs fp32 on the CPU"):
        make_backend("onnx", unet, autoencoder, text_encoder, device="cuda")
    with pytest.raises(ValueError, match="backend='tensorrt' is not supported; allowed values: auto, torch, onnx"):
        make_backend("tensorrt", unet, autoencoder, text_encoder)
