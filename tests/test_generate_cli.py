"""ldm generate / ldm sweep end to end on a tiny bundle: PNGs with metadata, bit-exact
regeneration from a PNG, and one-line errors with exit code 2 for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from ldm.generate_cli import PNG_KEY
from ldm.testing import build_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.mark.parametrize("sampler", [["--method", "ddpm"], ["--method", "euler-a", "--sigmas", "karras"]],
                         ids=["ddpm", "euler-a-karras"])
def test_generate_writes_pngs_with_metadata_and_regenerates_bit_exactly(bundle, tmp_path, capsys, sampler):
    out = tmp_path / "koala.png"
    args = ["generate", "a koala", "--model", str(bundle), "--steps", "3", "--num-images", "3", "--batch-size", "2",
            *sampler, "--guidance", "2.5", "--seed", "7", "--out", str(out), "--quiet"]
    assert main(args) == 0
    paths = [tmp_path / f"koala-{i}.png" for i in range(3)]
    assert all(p.is_file() for p in paths) and (tmp_path / "koala-grid.png").is_file()
    record = json.loads(Image.open(paths[2]).text[PNG_KEY])
    assert record["prompt"] == "a koala" and record["seed"] == 9 and record["method"] == sampler[1]
    assert record["sigmas"] == (sampler[3] if len(sampler) > 2 else None)
    params = Image.open(paths[2]).text["parameters"]
    assert ("Sampler: Euler a, Schedule type: Karras" in params) == (sampler[1] == "euler-a")
    assert record["guidance"] == 2.5 and (record["width"], record["height"]) == (32, 32)
    assert len(record["model_hash"]) == 16 and {"ldm-toolkit", "torch", "diffusers"} <= set(record["versions"])
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(paths[2]), "--out", str(again), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(paths[2])))


def test_sweep_writes_grid_and_metrics(bundle, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "a koala", "a cat", "--model", str(bundle), "--steps", "2", "--guidance", "1,3",
                 "--seeds", "0,1", "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"grid.png", "metrics.csv", "metrics.json", "metrics.png", "pareto.png",
                                               "suggestion.txt", "sweep.json", "images", ".ldm-output"}
    metrics = json.loads((out / "metrics.json").read_text())["cells"][1]["metrics"]
    assert {"clip_score", "diversity"} <= set(metrics)  # the bundle's own CLIP scores it


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--guidance", "-1"], "guidance"),
        (["--steps", "0"], "steps=0"),
        (["--height", "30"], "multiple of the autoencoder's factor 4"),
        (["--method", "heun"], "method='heun' is not supported; allowed values: ddim, ddpm, dpmpp-2m, euler, euler-a"),
        (["--method", "ddim", "--sigmas", "karras"], "sigmas='karras' applies to methods dpmpp-2m, euler, euler-a"),
        (["--method", "ddpm", "--sigmas", "karras"], "method='ddpm' steps on the timestep grid"),
        (["--method", "euler", "--sigmas", "polyexponential"], "sigmas='polyexponential' is not supported; allowed values: karras"),
        (["--method", "euler", "--eta", "0.5"], "eta=0.5 applies to method='ddim' only; method='euler' has no eta"),
        (["--num-images", "0"], "--num-images 0"),
        (["--out", "x.jpg"], ".png"),
    ],
)
def test_bad_input_is_one_line_exit_2(bundle, extra, words, capsys):
    assert main(["generate", "a koala", "--model", str(bundle), "--steps", "2", "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm generate: error:") and words in err and "\n" not in err


def test_missing_model_or_part_and_no_prompt(bundle, tmp_path, capsys):
    assert main(["generate", "a koala", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    assert main(["generate", "a koala", "--model", str(partial)]) == 2
    assert "lacks unet, vae, text_encoder, tokenizer, scheduler" in capsys.readouterr().err
    assert main(["generate", "--model", str(bundle)]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert main(["sweep", "a koala", "--model", str(bundle), "--guidance", "1,-2", "--out", str(tmp_path / "s")]) == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldm.cli", "generate", "a koala", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_generate_with_loras_records_them_and_regenerates_bit_exactly(bundle, tmp_path, capsys):
    """--lora FILE[:SCALE], twice (ours and its kohya export): the record names each file with its hash and
    scale, --from-png merges them again and remakes the image bit for bit; without them the image differs."""
    import torch
    from peft import LoraConfig

    from ldm.bundle import load_unet
    from ldm.lora import file_hash, save_lora

    unet = load_unet(bundle)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    ours = save_lora(tmp_path / "lora", unet)
    kohya = tmp_path / "kohya.safetensors"
    assert main(["export-lora", str(ours), "--out", str(kohya)]) == 0
    out = tmp_path / "styled.png"
    common = ["--model", str(bundle), "--steps", "3", "--num-images", "2", "--guidance", "3", "--backend", "torch",
              "--quiet"]  # (the ONNX backend with LoRAs: tests/test_lora_interop.py)
    assert main(["generate", "a koala", *common, "--lora", f"{ours}:0.7", "--lora", f"{kohya}:-0.4", "--out", str(out)]) == 0
    assert main(["generate", "a koala", *common, "--out", str(tmp_path / "plain.png")]) == 0
    path = tmp_path / "styled-1.png"
    record = json.loads(Image.open(path).text[PNG_KEY])
    assert record["loras"] == [
        {"file": str(ours), "name": "lora", "hash": file_hash(ours), "scale": 0.7},  # a folder's LoRA file: the folder
        {"file": str(kohya), "name": kohya.name, "hash": file_hash(kohya), "scale": -0.4}]
    parameters = Image.open(path).text["parameters"]  # A1111's text names them as A1111 does
    assert "a koala <lora:lora:0.7> <lora:kohya:-0.4>" in parameters and "Lora hashes" in parameters
    plain = np.asarray(Image.open(tmp_path / "plain-1.png"), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(path), dtype=np.int16) - plain).max() > 10  # the LoRAs changed the image
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(path), "--out", str(again), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert json.loads(Image.open(again).text[PNG_KEY])["loras"] == record["loras"]
    # a recorded LoRA that has gone: one line saying which, and how to point at it
    moved = tmp_path / "moved.safetensors"
    kohya.rename(moved)
    assert main(["generate", "--from-png", str(path), "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert f"names the LoRA file {kohya}, which does not exist" in capsys.readouterr().err
    assert main(["generate", "--from-png", str(path), "--out", str(again), "--quiet",
                 "--lora", f"{ours}:0.7", "--lora", f"{moved}:-0.4"]) == 0
    assert "bit-identical" in capsys.readouterr().out
