"""The A1111 ``parameters`` PNG text: the layout stable-diffusion-webui writes (and so PNG Info, ComfyUI and model
sites read), checked against a hand-written text, its quoting rules, and end to end on a generated PNG."""

import json

from PIL import Image

from ldm.cli import main
from ldm.generate_cli import PNG_KEY
from ldm.infotext import a1111_parameters, parse_parameters
from ldm.testing import build_bundle

RECORD = {"prompt": "koala, twemoji style", "negative_prompt": None, "steps": 50, "method": "ddim", "eta": 0.0,
          "guidance": 7.5, "seed": 3, "width": 64, "height": 48, "model": "/x/default", "model_hash": "0123456789abcdef",
          "versions": {"ldm-toolkit": "0.4.0"}}


def test_text_is_a1111s_layout():
    assert a1111_parameters(RECORD) == (
        "koala, twemoji style\n"
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 64x48, Model hash: 0123456789, Model: default, "
        "Version: ldm-toolkit 0.4.0")


def test_negative_prompt_eta_loras_and_quoting():
    rec = {**RECORD, "prompt": "a koala\non a beach", "negative_prompt": "blurry, text: none", "method": "euler-a",
           "guidance": 4.0, "loras": [{"name": "style.safetensors", "hash": "fedcba9876543210", "scale": 0.8}]}
    text = a1111_parameters(rec)
    assert text.startswith("a koala\non a beach <lora:style:0.8>\nNegative prompt: blurry, text: none\n")
    assert 'Sampler: Euler a, CFG scale: 4, ' in text and 'Lora hashes: "style: fedcba9876"' in text
    assert "Eta DDIM" not in text
    assert "Eta DDIM: 0.5," in a1111_parameters({**RECORD, "eta": 0.5})


def test_parse_reads_back_every_field():
    rec = {**RECORD, "prompt": "a: b, c\nd", "negative_prompt": "e, f", "model": "/m/my model, v2"}
    got = parse_parameters(a1111_parameters(rec))
    assert got["Prompt"] == "a: b, c\nd" and got["Negative prompt"] == "e, f"
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"]) == ("50", "DDIM", "7.5", "3")
    assert (got["Size"], got["Model hash"], got["Model"]) == ("64x48", "0123456789", "my model, v2")


def test_generated_png_carries_both_records(tmp_path):
    bundle = build_bundle(tmp_path / "tiny")
    out = tmp_path / "k.png"
    assert main(["generate", "a koala, smiling", "--model", str(bundle), "--steps", "2", "--negative", "blurry",
                 "--guidance", "3", "--seed", "5", "--out", str(out), "--quiet"]) == 0
    text = Image.open(out).text
    record = json.loads(text[PNG_KEY])
    got = parse_parameters(text["parameters"])
    assert got["Prompt"] == "a koala, smiling" and got["Negative prompt"] == "blurry"
    assert got["Steps"] == "2" and got["Sampler"] == "DDIM" and got["CFG scale"] == "3" and got["Seed"] == "5"
    assert got["Size"] == f"{record['width']}x{record['height']}" and record["model_hash"].startswith(got["Model hash"])
