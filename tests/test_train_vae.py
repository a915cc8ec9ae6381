"""ldm train-vae / eval-vae end to end on a tiny generated data set: the final folder and its scaling
factor, exact resume, checkpoint checks, GAN and LPIPS paths, config errors, bad images."""

import json
import subprocess
import sys
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

from ldm.cli import main
from train.run.checkpoint import list_checkpoints
from train.run.config import load_config
from train.run.log import read_csv
from train.vae.config import VAETrainingConfig
from train.vae.images import load_vae_split, pixels, to_model_range
from train.vae.trainer import train_vae
from vae import load_autoencoder

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "vae" / "tiny.yaml"


def make_data(folder: Path, n_train=24, n_test=8, size=16, seed=0) -> Path:
    """Coloured squares on white, RGBA PNGs (alpha outside the square), with a held-out split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_test):
        img = np.zeros((size, size, 4), np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        s = int(rng.integers(3, size // 2))
        img[y0:y0 + s, x0:x0 + s, :3] = rng.integers(0, 255, 3)
        img[y0:y0 + s, x0:x0 + s, 3] = 255
        Image.fromarray(img, "RGBA").save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a square", "split": "test" if i >= n_train else "train"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config(tmp_path, *overrides):
    data = make_data(tmp_path / "data") if not (tmp_path / "data").exists() else tmp_path / "data"
    return load_config(VAETrainingConfig, TINY, [f"data.path={data}", "model.resolution=16",
                                                 f"train.output_dir={tmp_path / 'run'}", *overrides])


def test_train_writes_a_vae_folder_with_its_scaling_factor(tmp_path):
    cfg = config(tmp_path, "train.max_steps=6", "checkpoint.every=3", "train.scaling_images=20")
    folder = train_vae(cfg, progress=False)
    ae = load_autoencoder(folder)
    assert ae.kind == "vq" and ae.downsample_factor == 4 and ae.num_embeddings == 32
    # scaling_factor is 1 / std of the unscaled latents over the sampled training images
    split = load_vae_split(cfg.data.path, cfg.data.holdout_fraction, progress=False)
    imgs = to_model_range(pixels(split.train, split.train_rows))
    perm = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(cfg.train.seed))[:20]
    with torch.no_grad():
        h = ae.model.encode(imgs[perm]).latents
        assert ae.scaling_factor == pytest.approx(1 / h.double().std().item(), rel=1e-5)
        assert ae.encode(imgs[perm]).double().std().item() == pytest.approx(1.0, rel=1e-4)
    log = (tmp_path / "run" / "logs" / "log.txt").read_text()
    assert "LPIPS off: loss.lpips_weights" in log and "discriminator off" in log
    assert f"scaling_factor = 1 / std(latents) = {ae.scaling_factor:.6g} over 20 training images" in log
    records = read_csv(tmp_path / "run" / "logs" / "train.csv")
    assert [int(r["step"]) for r in records] == [2, 4, 6]
    assert all(0 < float(r["codebook_usage"]) <= 1 and float(r["perplexity"]) >= 1 for r in records)
    assert list(records[0]) == ["step", "loss", "psnr", "codebook_usage", "perplexity", "lr", "restarted_codes",
                                "steps_per_s", "elapsed_s"]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000003", "step-00000006"]
    assert sorted(f.name for f in (tmp_path / "run" / "checkpoints" / "step-00000006").iterdir()) == [
        "codebook.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))


def test_resume_continues_exactly(tmp_path):
    # 3 batches per epoch: the checkpoint at step 2 is mid-epoch, so resuming skips the batches already seen
    straight = train_vae(config(tmp_path, "train.max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=5",
                                f"train.output_dir={tmp_path / 'a'}"), progress=False)
    first = tmp_path / "a" / "checkpoints" / "step-00000002"
    resumed = train_vae(config(tmp_path, "train.max_steps=5", "checkpoint.every=2",
                               f"train.output_dir={tmp_path / 'b'}"), resume=str(first), progress=False)
    a, b = load_file(straight / "diffusion_pytorch_model.safetensors"), load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    ca = load_file(tmp_path / "a" / "checkpoints" / "step-00000005" / "codebook.safetensors")
    cb = load_file(tmp_path / "b" / "checkpoints" / "step-00000005" / "codebook.safetensors")
    for key in ca:
        torch.testing.assert_close(ca[key], cb[key], rtol=0, atol=0, msg=key)
    # --resume latest in a finished run picks step-5 and has nothing left to do
    again = config(tmp_path, "train.max_steps=5", f"train.output_dir={tmp_path / 'b'}")
    train_vae(again, resume="latest", progress=False)
    log = (tmp_path / "b" / "logs" / "log.txt").read_text()
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / 'step-00000005'} at step 5" in log


def test_resume_errors_name_the_checkpoint_and_the_difference(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*checkpoints"):
        train_vae(config(tmp_path), resume="latest", progress=False)
    with pytest.raises(FileNotFoundError, match=r"nowhere: not a checkpoint folder \(expected .*nowhere/state.json\)"):
        train_vae(config(tmp_path), resume=str(tmp_path / "nowhere"), progress=False)
    train_vae(config(tmp_path, "train.max_steps=2", "checkpoint.every=2"), progress=False)
    with pytest.raises(ValueError, match=r"step-00000002/state.json was written for a different setup: "
                                         r"model.num_embeddings is 32 there but 64 here"):
        train_vae(config(tmp_path, "model.num_embeddings=64"), resume="latest", progress=False)
    with pytest.raises(ValueError, match=r"different setup: train.batch_size is 8 there but 4 here"):
        train_vae(config(tmp_path, "train.batch_size=4"), resume="latest", progress=False)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "codebook.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"step-00000002 lacks codebook.safetensors; expected model.safetensors, "
                                                r"optimizer.safetensors, codebook.safetensors, state.json"):
        train_vae(config(tmp_path), resume="latest", progress=False)


def test_gan_and_lpips_paths_run(tmp_path):
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16's, random weights
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    cfg = config(tmp_path, "train.max_steps=2", "loss.disc_weight=0.5", "loss.disc_start=1", "loss.disc_layers=2",
                 "loss.disc_channels=8", f"loss.lpips_weights={lin}", f"loss.vgg_weights={tmp_path / 'vgg16.pth'}",
                 "train.log_every=1")
    train_vae(cfg, progress=False)
    log = (tmp_path / "run" / "logs" / "log.txt").read_text()
    assert "LPIPS on" in log and "discriminator on from step 1" in log
    state = load_file(tmp_path / "run" / "checkpoints" / "step-00000002" / "discriminator.safetensors")
    assert any("main" in k for k in state)
    optimizer = load_file(tmp_path / "run" / "checkpoints" / "step-00000002" / "discriminator_optimizer.safetensors")
    assert optimizer and all(k.startswith("state.") for k in optimizer)  # Adam's moments of the discriminator


def test_kl_autoencoder_trains_with_the_same_loop(tmp_path):
    folder = train_vae(config(tmp_path, "model.kind=kl", "train.max_steps=2"), progress=False)
    assert load_autoencoder(folder).kind == "kl"


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"train.lrate is not a key; allowed keys in train: output_dir"):
        load_config(VAETrainingConfig, TINY, ["train.lrate=1"])
    with pytest.raises(ValueError, match=r"model.channels: expected an integer, got str 'wide'"):
        load_config(VAETrainingConfig, TINY, ["model.channels=wide"])
    with pytest.raises(ValueError, match="train.mixed_precision='fp64' is not allowed; allowed values: 'auto', 'fp32', "
                                         "'bf16', 'fp16'"):
        load_config(VAETrainingConfig, TINY, ["train.mixed_precision=fp64"])
    with pytest.raises(ValueError, match="expected a string, got bool False .YAML reads yes/no/on/off as booleans"):
        load_config(VAETrainingConfig, TINY, ["data.path=no"])
    with pytest.raises(ValueError, match="train.mixed_precision=False is not allowed; allowed values: 'auto', 'fp32'"):
        load_config(VAETrainingConfig, TINY, ["train.mixed_precision=no"])  # full precision is fp32
    with pytest.raises(ValueError, match="must look like key=value or section.key=value"):
        load_config(VAETrainingConfig, TINY, ["train.lr"])
    cfg = load_config(VAETrainingConfig, TINY, ["optim.lr=2e-4", "model.channel_mult=[1,2]", "loss.lpips_weights=null"])
    assert cfg.optim.lr == 2e-4 and cfg.model.channel_mult == [1, 2] and cfg.model.downsample_factor == 2
    for path in (ROOT / "configs" / "vae").glob("*.yaml"):
        load_config(VAETrainingConfig, path)


def test_images_not_divisible_by_f_are_an_error_unless_resized(tmp_path):
    make_data(tmp_path / "data", size=18)
    with pytest.raises(ValueError, match=r"18x18 is not divisible .* f=4"):
        train_vae(config(tmp_path, "train.max_steps=1"), progress=False)
    folder = train_vae(config(tmp_path, "train.max_steps=1", "model.resize_input=true"), progress=False)
    assert folder.is_dir()


def test_cli_train_then_eval(tmp_path, capsys):
    make_data(tmp_path / "data")
    assert main(["train-vae", str(TINY), f"data.path={tmp_path / 'data'}", "model.resolution=16",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "--quiet"]) == 0
    assert main(["eval-vae", "--vae", str(tmp_path / "run" / "vae"), "--data", str(tmp_path / "data"),
                 "--grid", "4", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["images"] == 8 and metrics["split"] == "test" and f"psnr={metrics['psnr']:.4f}" in out
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["codes_used"] == round(metrics["codebook_usage"] * 32)
    assert -1 <= metrics["ssim"] <= 1 and metrics["perplexity"] >= 1
    grid = Image.open(tmp_path / "run" / "eval-vae.png")
    assert grid.size == (4 * 16, 2 * 16)  # originals above reconstructions
    top = np.asarray(grid)[:16, :16]
    first_heldout = Image.open(tmp_path / "data" / "24.png")  # RGBA: transparency composited onto white
    white = Image.new("RGBA", first_heldout.size, (255, 255, 255, 255))
    assert np.array_equal(top, np.asarray(Image.alpha_composite(white, first_heldout).convert("RGB")))


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldm.cli", "eval-vae", "--vae", str(tmp_path / "none"), "--data",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"ldm eval-vae: error: {tmp_path / 'none' / 'config.json'} not found: an autoencoder " \
        "folder needs config.json and diffusion_pytorch_model.safetensors (diffusers layout, _class_name VQModel or " \
        "AutoencoderKL)"


def final_files(run: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensor groups by file stem, state.json) of a run's newest checkpoint."""
    newest = list_checkpoints(run / "checkpoints")[-1]
    return {f.stem: load_file(f) for f in sorted(newest.glob("*.safetensors"))}, json.loads((newest / "state.json").read_text())


CURVE = ("loss", "psnr", "codebook_usage", "perplexity", "lr", "restarted_codes")


@pytest.mark.parametrize("setup", [
    # VQ with dead-code restarts and the GAN switching on at step 3 (after the first stop)
    ["loss.disc_weight=0.5", "loss.disc_start=3", "loss.disc_layers=2", "loss.disc_channels=8"],
    ["model.kind=kl"],  # the posterior sample draws from torch's global generator
], ids=["vq-gan", "kl"])
def test_stopped_and_resumed_twice_equals_uninterrupted(tmp_path, setup):
    # 3 micro-batches of 8 per epoch, 2 per step: steps 2 and 4 end mid-epoch
    common = ["train.max_steps=6", "train.gradient_accumulation_steps=2", "train.log_every=1", "checkpoint.every=2",
              "checkpoint.keep_last=5", *setup]
    straight = train_vae(config(tmp_path, *common, f"train.output_dir={tmp_path / 'a'}"), progress=False)
    cfg = config(tmp_path, *common, f"train.output_dir={tmp_path / 'b'}")
    assert train_vae(cfg, progress=False, stop_at_step=2) is None
    torch.manual_seed(123), np.random.seed(7)  # whatever happens in between is undone by resume
    assert train_vae(cfg, resume="latest", progress=False, stop_at_step=4) is None
    torch.manual_seed(321)
    resumed = train_vae(cfg, resume="latest", progress=False)

    (a, state_a), (b, state_b) = final_files(tmp_path / "a"), final_files(tmp_path / "b")
    assert a.keys() == b.keys() and ("discriminator_optimizer" in a) == ("loss.disc_weight=0.5" in setup)
    for group in a:
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=0, atol=0, msg=f"{group} {k}")
    for key in ("step", "micro_batches", "epoch", "batch_in_epoch", "lr_scheduler", "rng"):
        assert state_a[key] == state_b[key], key
    assert (state_b["epoch"], state_b["batch_in_epoch"]) == (4, 0)
    rows_a, rows_b = read_csv(tmp_path / "a" / "logs" / "train.csv"), read_csv(tmp_path / "b" / "logs" / "train.csv")
    assert [int(r["step"]) for r in rows_b] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [[r[k] for k in CURVE] for r in rows_a] == [[r[k] for k in CURVE] for r in rows_b]
    va = load_file(straight / "diffusion_pytorch_model.safetensors")
    vb = load_file(resumed / "diffusion_pytorch_model.safetensors")
    for k in va:
        torch.testing.assert_close(va[k], vb[k], rtol=0, atol=0, msg=k)
    assert json.loads((straight / "config.json").read_text()) == json.loads((resumed / "config.json").read_text())


def test_old_keys_name_their_new_key(tmp_path):
    for old, new in (("train.out_dir=x", "train.output_dir"), ("train.lr=1e-3", "optim.lr"),
                     ("train.checkpoint_every=5", "checkpoint.every"), ("train.keep_checkpoints=2", "checkpoint.keep_last"),
                     ("train.grad_accum=2", "train.gradient_accumulation_steps"), ("data.split=test", "data.holdout_fraction")):
        with pytest.raises(ValueError, match=f"{old.split('=')[0]} was renamed; use {new}"):
            load_config(VAETrainingConfig, TINY, [old])
    old_file = tmp_path / "old.yaml"
    old_file.write_text(TINY.read_text().replace("  output_dir:", "  out_dir:"))
    with pytest.raises(ValueError, match=r"old.yaml: train.out_dir was renamed; use train.output_dir"):
        load_config(VAETrainingConfig, old_file)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path):
    train_vae(config(tmp_path, "train.max_steps=2", "checkpoint.every=2"), progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"already holds checkpoints of a run; continue it with --resume latest"):
        train_vae(config(tmp_path, "train.max_steps=4"), progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    with pytest.raises(ValueError, match=r"data.path is empty; give the data set to train on"):
        train_vae(load_config(VAETrainingConfig, TINY, [f"train.output_dir={tmp_path / 'other'}"]), progress=False)


def test_trains_on_the_training_rows_of_the_shared_split(tmp_path):
    # no split column: the held-out rule (a hash of each path) picks the rows, the same for every trainer
    data = make_data(tmp_path / "data", n_train=32, n_test=0)
    split = load_vae_split(data, 0.2, progress=False)
    assert split.heldout is split.train and split.heldout_rows and len(split.train_rows) + len(split.heldout_rows) == 32
    from train.data import heldout_keys, load_split

    assert heldout_keys(split) == heldout_keys(load_split(data, 0.2, progress=False, min_size=1))
    train_vae(config(tmp_path, "train.max_steps=1", "data.holdout_fraction=0.2"), progress=False)
    assert f"training on {len(split.train_rows)}" in (tmp_path / "run" / "logs" / "log.txt").read_text()
    assert main(["eval-vae", "--vae", str(tmp_path / "run" / "vae"), "--data", str(data), "--grid", "0",
                 "--json", str(tmp_path / "m.json")]) == 0  # the run's data.holdout_fraction, read from its config.yaml
    assert json.loads((tmp_path / "m.json").read_text())["images"] == len(split.heldout_rows)
