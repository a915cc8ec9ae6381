"""The exported page in headless Chromium: its images match Python's ONNX Runtime; bad input shows a message.

Runs when Debian's chromium is installed (.ci/run installs it); otherwise it is skipped, saying why.
"""

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from ldm.web.browser import CHROMIUM

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]

PROMPT = "koala, twemoji style"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import torch

    from ldm.pack import pack_bundle
    from ldm.testing import build_bundle
    from ldm.web.export import export_site

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("web")
    # packed as the shipped models are: fp16 weights, and a token table whose rows outside the
    # prompt's tokens are one shared row (stored once in the exported text-encoder graph)
    bundle = root / "packed"
    pack_bundle(build_bundle(root / "bundle"), bundle, keep_captions=[PROMPT])
    return bundle, export_site(bundle, root / "site", seeds=2, max_steps=8, etas=(0.0, 0.5))


@pytest.fixture(scope="module")
def page(site):
    from ldm.web.browser import Chromium
    from ldm.web.serve import make_server

    server = make_server(site[1], 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with Chromium() as browser:
        browser.open(url)
        browser.wait_for("window.ldm && window.ldm.status !== 'loading'", timeout=60)
        yield browser, url
    server.shutdown()
    server.server_close()


def set_inputs(browser, **values):
    for name, value in values.items():
        browser.evaluate(f"document.getElementById({name!r}).value = {str(value)!r}")


def run_page(browser, **values):
    set_inputs(browser, **values)
    browser.evaluate("window.ldm.status = 'clicked'; document.getElementById('generate').click()")
    status = browser.wait_for("['done', 'error'].includes(window.ldm.status) && window.ldm.status", timeout=60)
    return status, browser.evaluate("document.getElementById('message').textContent")


def python_image(bundle, *, negative, steps, method, eta, guidance, seed, sigmas=None):
    from ldm.pipeline import Text2ImagePipeline

    pipe = Text2ImagePipeline.from_pretrained(bundle, backend="onnx")
    images = pipe(PROMPT, negative or None, steps=steps, method=method, eta=eta, guidance=guidance, seed=seed,
                  output="tensor", sigmas=sigmas)
    return ((images[0].clamp(-1, 1) / 2 + 0.5) * 255).round().permute(1, 2, 0).numpy()  # (H, W, 3) as to_pil


def test_the_packed_token_table_is_exported_once(site):
    assert (Path(site[1]) / "text_encoder.onnx").stat().st_size < 49408 * 16 * 4  # the full 49,408 x 16 table alone


# sampler index in the page: 0 = DDIM eta 0, 1 = DDIM eta 0.5, 2 = DDPM, then ldm.web.coefficients.SIGMA_SAMPLERS:
# 3 = DPM++ 2M, 4 = DPM++ 2M Karras, 5 = Euler, 6 = Euler a
@pytest.mark.parametrize("sampler,method,eta,seed,negative,sigmas", [
    (0, "ddim", 0.0, 0, "", None),
    (1, "ddim", 0.5, 1, "blurry, low quality", None),
    (2, "ddpm", 0.0, 1, "", None),
    (4, "dpmpp-2m", 0.0, 0, "", "karras"),
    (6, "euler-a", 0.0, 1, "", None),
])
def test_page_matches_python_onnxruntime(site, page, sampler, method, eta, seed, negative, sigmas):
    browser, _ = page
    status, message = run_page(browser, prompt=PROMPT, negative=negative, guidance=3, steps=8, sampler=sampler, seed=seed)
    assert status == "done", message
    assert browser.evaluate("window.ldm.noise") == "python"
    assert browser.evaluate("window.ldm.provider") in ("wasm", "webgpu")
    if browser.evaluate("window.ldm.provider") == "wasm":  # the graphs run in onnxruntime-web's worker
        assert browser.evaluate("window.ldm.proxy") is True
    assert browser.evaluate("window.ldm.timings.longest_block_ms") > 0
    assert "execution provider: " in browser.evaluate("document.getElementById('provider').textContent")
    img = browser.evaluate("window.ldm.image")
    got = np.array(img["rgb"], dtype=np.float64).reshape(img["height"], img["width"], 3)
    ref = python_image(site[0], negative=negative, steps=8, method=method, eta=eta, guidance=3.0, seed=seed,
                       sigmas=sigmas)
    assert got.shape == ref.shape
    assert np.abs(got - ref).mean() <= 1.0, f"mean |page - python| = {np.abs(got - ref).mean():.3f} / 255"
    assert got.std() > 1  # a real image, not a blank canvas
    timings = browser.evaluate("window.ldm.timings")
    assert len(timings["step_ms"]) == 8 and all(t > 0 for t in timings["step_ms"])
    assert "ms per step" in message


def test_other_seeds_say_they_are_not_pythons(page):
    browser, _ = page
    status, message = run_page(browser, prompt=PROMPT, negative="", guidance=2, steps=3, sampler=0, seed=12345)
    assert status == "done"
    assert browser.evaluate("window.ldm.noise") == "page" and "not Python's" in message
    assert "Seeds 0..1 use Python's noise" in browser.evaluate("document.getElementById('noise-note').textContent")


@pytest.mark.parametrize("values,expected", [
    ({"prompt": "   ", "steps": 4}, "Enter a prompt"),
    ({"prompt": PROMPT, "steps": 0}, "Steps must be a whole number from 1 to 8"),
    ({"prompt": PROMPT, "steps": 9}, "Steps must be a whole number from 1 to 8"),
    ({"prompt": PROMPT, "steps": 2.5}, "Steps must be a whole number"),
    ({"prompt": PROMPT, "steps": 4, "guidance": -1}, "Guidance must be a number >= 0"),
])
def test_bad_input_shows_a_message(page, values, expected):
    browser, _ = page
    status, message = run_page(browser, **{"negative": "", "guidance": 2, "seed": 0, "sampler": 0, **values})
    assert status == "error" and expected in message
    # the tab still answers and can generate again
    assert browser.evaluate("document.getElementById('generate').disabled") is False
    status, message = run_page(browser, prompt=PROMPT, steps=2, guidance=2)
    assert status == "done", message


def test_missing_model_file_shows_a_message(site, page):
    browser, url = page
    unet = Path(site[1]) / "unet.onnx"
    moved = unet.with_suffix(".moved")
    unet.rename(moved)
    try:
        browser.open(url)
        browser.wait_for("window.ldm && window.ldm.status === 'error'", timeout=60)
        message = browser.evaluate("document.getElementById('message').textContent")
        assert "unet.onnx" in message and "404" in message
        assert browser.evaluate("document.getElementById('generate').disabled") is True
    finally:
        moved.rename(unet)
