"""Issue 15, classes 2-4: devices and environment, inputs that are not what they claim, and sizes that
cannot finish. Each is one line ``ldm <command>: error: ...`` with exit code 2, no traceback, before any
model is loaded or any output written, and nothing outside the output changed."""

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

import ldm.generate_cli
from ldm.cli import main
from ldm.generate_cli import PNG_KEY
from ldm.testing import build_bundle, build_sd_folder
from ldm_io.weights import WeightsError, check_safetensors, find_weights

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {"bundle": build_bundle(base / "bundle"), "sd": build_sd_folder(base / "sd")}


@pytest.fixture(scope="module")
def png(folders, tmp_path_factory):
    """A PNG that ldm generate wrote, with its record."""
    out = tmp_path_factory.mktemp("png") / "made.png"
    assert main(["generate", "a koala", "--model", str(folders["bundle"]), "--steps", "2", "--out", str(out),
                 "--quiet", "--backend", "torch"]) == 0
    return out


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ldm {command}: error:"), err
    assert "\n" not in err and "Traceback" not in err
    return err


def generate(model, *extra):
    return ["generate", "a koala", "--model", str(model), "--steps", "2", "--quiet", *extra]


def sweep(model, *extra, out="sweep-out"):
    return ["sweep", "a koala", "--model", str(model), "--steps", "2", "--guidance", "1,2", "--seeds", "0,1",
            "--quiet", "--out", out, *extra]


COMMANDS = {"generate": generate, "sweep": sweep}


# -- class 2: devices and environment -----------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device, cuda, count, words", [
    ("cuda", False, 0, "no cuda device is available on this machine; use --device cpu"),
    ("cuda:5", True, 1, "this machine has 1 cuda device(s), cuda:0 to cuda:0"),
    ("foo", False, 0, "--device 'foo' is not a torch device; use cpu, cuda, cuda:N or mps"),
])
def test_a_device_this_machine_lacks_is_one_line(folders, tmp_path, monkeypatch, capsys, command, device, cuda, count,
                                                 words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert main(COMMANDS[command](folders["bundle"], "--device", device)) == 2
    assert words in one_line(capsys, command)
    assert list(tmp_path.iterdir()) == []


def test_onnx_backend_off_the_cpu_is_one_line(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(generate(folders["bundle"], "--device", "cuda", "--backend", "onnx")) == 2
    assert "--backend onnx runs on the CPU only" in one_line(capsys, "generate")


@pytest.fixture
def site(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["--port", "-1"], "port -1 is not a TCP port; give 1024..65535"),
    (["--port", "70000"], "port 70000 is not a TCP port"),
    (["--host", "no-such-host.invalid"], "cannot be resolved"),
    (["--host", "192.0.2.1"], "192.0.2.1 is not an address of this machine"),  # TEST-NET-1: never local
])
def test_serve_web_bad_port_or_host_is_one_line(site, args, words, capsys):
    assert main(["serve-web", str(site), *args]) == 2
    assert words in one_line(capsys, "serve-web")


def test_serve_web_port_in_use_is_one_line(site, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve-web", str(site), "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is already in use" in one_line(capsys, "serve-web")


# -- class 3: inputs that are not what they claim: PNG records ------------------------------------


def with_record(src: Path, dst: Path, text: str) -> Path:
    info = PngInfo()
    info.add_text(PNG_KEY, text)
    Image.open(src).save(dst, pnginfo=info)
    return dst


def edited(png: Path, tmp_path: Path, change) -> Path:
    rec = json.loads(Image.open(png).text[PNG_KEY])
    change(rec)
    return with_record(png, tmp_path / "edited.png", json.dumps(rec))


@pytest.mark.parametrize("make, words", [
    (lambda png, d: (d / "x.png").write_text("not an image") and d / "x.png", "is not a readable image"),
    (lambda png, d: (d / "x.png").write_bytes(png.read_bytes()[:200]) and d / "x.png", "is not a readable image"),
    (lambda png, d: Image.new("RGB", (8, 8)).save(d / "x.png") or d / "x.png", "has no 'ldm-toolkit' metadata"),
    (lambda png, d: with_record(png, d / "x.png", "{not json"), "edited or damaged (it is not JSON"),
    (lambda png, d: with_record(png, d / "x.png", "[1, 2]"), "(it is a JSON list, not an object)"),
    (lambda png, d: edited(png, d, lambda r: r.pop("steps")), "(it lacks steps)"),
    (lambda png, d: edited(png, d, lambda r: r.update(steps="abc")), "(steps='abc' is not int)"),
    (lambda png, d: edited(png, d, lambda r: r.update(batch_index=99)), "do not describe a batch"),
    (lambda png, d: edited(png, d, lambda r: r.update(steps=10**9)), "steps=1000000000 must be an integer in 1..1000"),
    (lambda png, d: edited(png, d, lambda r: r.update(method="foo")), "method='foo' is not supported"),
    (lambda png, d: edited(png, d, lambda r: r.update(height=100000, width=100000)), "of memory"),
])
def test_from_png_that_is_not_what_it_claims_is_one_line(png, tmp_path, make, words, capsys):
    bad = make(png, tmp_path)
    before = tree_hash(tmp_path)
    assert main(["generate", "--from-png", str(bad), "--quiet"]) == 2
    assert words in one_line(capsys, "generate")
    assert tree_hash(tmp_path) == before  # no -again.png, nothing changed


# -- class 3: weights that are not what they claim ---------------------------------------------------


def truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def overwrite(f: Path):
    f.write_bytes(b"\x17" * 1000)


@pytest.mark.parametrize("damage", [truncate, overwrite])
@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("kind", ["bundle", "sd"])
def test_a_corrupt_weight_file_is_one_line_naming_it(folders, tmp_path, monkeypatch, capsys, kind, part, damage):
    model = shutil.copytree(folders[kind], tmp_path / "model")
    weights = next((model / part).glob("*.safetensors"))
    damage(weights)
    before = tree_hash(model)
    monkeypatch.chdir(tmp_path)
    assert main(generate(model)) == 2
    err = one_line(capsys, "generate")
    assert f"{weights} is truncated or corrupt" in err
    assert "copy or download the model folder again" in err
    assert tree_hash(model) == before and not (tmp_path / "out.png").exists()


def to_variant(folder: Path, variant: str) -> Path:
    """Every part's weights only as <stem>.<variant>.safetensors in float16, as diffusers writes them."""
    for f in folder.glob("*/*.safetensors"):
        save_file({k: v.half() for k, v in load_file(f).items()}, f.with_name(f"{f.stem}.{variant}.safetensors"))
        f.unlink()
    return folder


def to_bin(folder: Path) -> Path:
    """Every part's weights only as pickles: diffusion_pytorch_model.bin, and transformers' pytorch_model.bin."""
    for f in folder.glob("*/*.safetensors"):
        name = "pytorch_model.bin" if f.parent.name == "text_encoder" else f"{f.stem}.bin"
        torch.save(load_file(f), f.with_name(name))
        f.unlink()
    return folder


@pytest.mark.parametrize("convert", [lambda d: to_variant(d, "fp16"), to_bin], ids=["fp16-variant", "bin"])
def test_a_stable_diffusion_folder_with_only_fp16_or_bin_weights_loads(folders, tmp_path, convert, capsys):
    model = convert(shutil.copytree(folders["sd"], tmp_path / "model"))
    assert main(generate(model, "--out", str(tmp_path / "out.png"), "--backend", "torch")) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 32)
    from ldm.bundle import load_parts

    parts = load_parts(model)
    assert all(p.dtype == torch.float32 for m in (parts.unet, parts.autoencoder, parts.text_encoder)
               for p in m.parameters())


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("part", PARTS)
def test_a_bin_that_weights_only_refuses_is_one_line_and_never_runs(folders, tmp_path, monkeypatch, capsys, part):
    model = to_bin(shutil.copytree(folders["sd"], tmp_path / "model"))
    Payload.marker = str(tmp_path / "pwned")
    weights = next((model / part).glob("*.bin"))
    torch.save({"x": Payload()}, weights)
    monkeypatch.chdir(tmp_path)
    assert main(generate(model)) == 2
    err = one_line(capsys, "generate")
    assert f"{weights} cannot be loaded with torch.load(weights_only=True)" in err and "convert" in err
    assert not (tmp_path / "pwned").exists()


def test_weights_are_found_preferred_and_checked(tmp_path):
    state = {"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.float16)}
    save_file(state, tmp_path / "m.fp16.safetensors")
    assert find_weights(tmp_path, "m").variant == "fp16"
    save_file(state, tmp_path / "m.safetensors")
    w = find_weights(tmp_path, "m")
    assert (w.files, w.variant, w.safetensors) == ((tmp_path / "m.safetensors",), None, True)
    check_safetensors(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="tensors need 34 bytes of data but the file holds 35"):
        find_weights(tmp_path, "m")
    shard = tmp_path / "sharded"
    shard.mkdir()
    save_file(state, shard / "m-00001-of-00001.safetensors")
    (shard / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-00001-of-00001.safetensors"}}))
    assert find_weights(shard, "m").files == (shard / "m-00001-of-00001.safetensors",)
    with pytest.raises(FileNotFoundError, match="m.safetensors not found"):
        find_weights(tmp_path / "nothing", "m")


def test_a_malformed_config_is_one_line_naming_it(folders, tmp_path, monkeypatch, capsys):
    model = shutil.copytree(folders["bundle"], tmp_path / "model")
    (model / "unet" / "config.json").write_text('{"block_out_channels": [8, 16')
    monkeypatch.chdir(tmp_path)
    assert main(generate(model)) == 2
    assert f"{model / 'unet' / 'config.json'} is not valid JSON" in one_line(capsys, "generate")


# -- class 4: sizes that cannot finish -----------------------------------------------------------


@pytest.fixture
def sixteen_gib(monkeypatch):
    """Every command sees 16 GiB free, whatever the machine has."""
    monkeypatch.setattr(ldm.generate_cli, "available_memory", lambda device: (16 << 30, "this machine has"))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("extra, words", [
    (["--height", "100000", "--width", "100000"], "use a smaller --height/--width (the model's own size is 32)"),
    (["--height", "36"], "height=36 must be a positive multiple of the autoencoder's factor 4 times the U-Net's "
                         "downsampling 2, i.e. of 8 (e.g. 32)"),
    (["--width", "0"], "width=0 must be a positive multiple"),
    (["--steps", "1000000000"], "steps=1000000000 must be an integer in 1..1000"),
    (["--eta", "nan"], "eta=nan must be a finite number >= 0"),
    (["--batch-size", "0"], "batch_size=0 must be an integer >= 1"),
])
def test_sizes_and_options_are_checked_before_loading(folders, tmp_path, monkeypatch, sixteen_gib, capsys, command,
                                                      extra, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ldm.generate_cli.load", lambda *a: pytest.fail("loaded a model for a request it refuses"))
    assert main(COMMANDS[command](folders["bundle"], *extra)) == 2
    assert words in one_line(capsys, command)
    assert list(tmp_path.iterdir()) == []


def test_more_images_than_memory_is_one_line(folders, tmp_path, monkeypatch, sixteen_gib, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(generate(folders["bundle"], "--num-images", "1000000")) == 2
    err = one_line(capsys, "generate")
    assert "1000000 image(s) of 32x32 need about" in err and "16 GiB this machine has free" in err
    assert "ask for fewer --num-images per command" in err
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_larger_than_the_disk_or_memory_is_one_line(folders, tmp_path, monkeypatch, sixteen_gib, capsys):
    """A sweep writes every image and reads them all back to measure them: disk and memory bound it."""
    monkeypatch.chdir(tmp_path)
    seeds = ",".join(map(str, range(100000)))  # 2 cells x 100,000 seeds of 32x32: about 1.34 GiB on disk, 586 MiB read back
    monkeypatch.setattr("ldm.sweep_cli.disk_free", lambda path: 1 << 30)
    assert main(sweep(folders["bundle"], "--seeds", seeds)) == 2
    err = one_line(capsys, "sweep")
    assert "200000 images of 32x32 (2 cell(s) x 1 prompt(s) x 100000 seed(s)) need about 1.34 GiB of disk under sweep-out, " \
           "which has 1 GiB free: ask for fewer prompts, --seeds or --guidance weights" in err
    monkeypatch.setattr("ldm.sweep_cli.disk_free", lambda path: 1 << 40)
    monkeypatch.setattr(ldm.generate_cli, "available_memory", lambda device: (512 << 20, "this machine has"))
    assert main(sweep(folders["bundle"], "--seeds", seeds)) == 2
    assert "reads them all back: about 586 MiB of memory, and this machine has 512 MiB free" in one_line(capsys, "sweep")
    assert list(tmp_path.iterdir()) == []


def test_a_long_run_says_its_estimate_and_goes(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ldm.generate_cli, "LONG_RUN", 0)
    assert main(generate(folders["bundle"], "--steps", "3", "--out", str(tmp_path / "o.png"), "--backend", "torch")) == 0
    err = capsys.readouterr().err
    assert "note: about" in err and "(3 sampler steps of" in err and "memory about" in err
    assert (tmp_path / "o.png").is_file()


def test_memory_estimate_grows_with_the_request(folders):
    from ldm.bundle import read_geometry
    from ldm.pipeline import memory_estimate

    g = read_geometry(folders["bundle"])
    assert (g.factor, g.unet_factor, g.granularity, g.sample_size) == (4, 2, 8, 8)
    small = memory_estimate(g, num_images=1, batch_size=1, height=32, width=32)
    assert memory_estimate(g, num_images=1, batch_size=1, height=64, width=64).batch == pytest.approx(4 * small.batch, rel=0.01)
    assert memory_estimate(g, num_images=8, batch_size=8, height=32, width=32).batch == pytest.approx(8 * small.batch, rel=0.01)
    assert memory_estimate(g, num_images=100, batch_size=1, height=32, width=32, grid=True).images > 100 * small.images


def test_export_web_too_many_seeds_is_one_line(folders, tmp_path, sixteen_gib, capsys):
    out = tmp_path / "site"
    assert main(["export-web", "--model", str(folders["bundle"]), "--out", str(out), "--seeds", "1000000"]) == 2
    err = one_line(capsys, "export-web")
    assert "noise.bin would be 47.7 GiB (--seeds 1000000 x --max-steps 50 latents of 32x32)" in err
    assert "give fewer --seeds" in err and not out.exists()


def test_data_shapes_too_many_images_is_one_line(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--n", "1000000000"]) == 2
    err = one_line(capsys, "data")
    assert "--n 1000000000 images of 64 px need about" in err and "give a smaller --n" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, config", [("train", "ldm/tiny.yaml"), ("train-vae", "vae/tiny.yaml"),
                                             ("train-clip", "clip/tiny.yaml")])
def test_max_steps_beyond_what_checkpoints_can_count_is_one_line(tmp_path, capsys, command, config):
    out = tmp_path / "run"
    assert main([command, str(ROOT / "configs" / config), "train.max_steps=1000000000", f"train.output_dir={out}"]) == 2
    err = one_line(capsys, command)
    assert "train.max_steps=1000000000 is more steps than a run can count" in err and "at most 99999999" in err
    assert not out.exists()
