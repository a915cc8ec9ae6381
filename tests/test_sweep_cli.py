"""`ldm sweep` end to end on a tiny bundle: axes and prompt sources, --reference, the records in the PNGs, one-line
errors, --resume after a stop, and two processes (gloo on the CPU) giving the metrics of one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from ldm.cli import main
from ldm.generate_cli import PNG_KEY
from ldm.testing import build_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A captioned set of 8 flat-colour 32 px images, 3 of them held out (split "test")."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for k, (name, colour) in enumerate([("red", (220, 30, 30)), ("green", (30, 160, 40)), ("blue", (30, 60, 220)),
                                        ("yellow", (240, 200, 0)), ("purple", (150, 40, 180)), ("cyan", (0, 190, 200)),
                                        ("grey", (128, 128, 128)), ("black", (10, 10, 10))]):
        Image.new("RGB", (32, 32), colour).save(root / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "text": f"a {name} square", "split": "test" if k % 3 == 0 else "train"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def sweep(bundle, out, *extra):
    return ["sweep", "--model", str(bundle), "--steps", "2", "--backend", "torch", "--quiet", "--out", str(out), *extra]


def record(path):
    return json.loads(Image.open(path).text[PNG_KEY])


def test_two_methods_three_weights_and_a_reference(bundle, data, tmp_path, capsys):
    """The issue's done-when on the tiny bundle: metrics with intervals, pareto.png and the suggestion; every
    image carries its record and `ldm generate --from-png` remakes it bit for bit (from its batch of mixed w)."""
    out = tmp_path / "s"
    assert main(sweep(bundle, out, "a koala", "a cat", "--guidance", "1,2,4", "--guidance-method", "cfg,apg",
                      "--seeds", "0,1", "--reference", str(data), "--bootstrap", "50")) == 0
    printed = capsys.readouterr().out
    assert "suggestion: guidance method = " in printed and "rule: best fidelity (lowest KID)" in printed
    for name in ("grid.png", "metrics.csv", "metrics.json", "metrics.png", "pareto.png", "suggestion.txt", "sweep.json"):
        assert (out / name).is_file(), name
    cells = json.loads((out / "metrics.json").read_text())["cells"]
    assert [(c["guidance_method"][:3], c["guidance"]) for c in cells] == [
        ("cfg", 1.0), ("cfg", 2.0), ("cfg", 4.0), ("apg", 1.0), ("apg", 2.0), ("apg", 4.0)]
    for c in cells:
        m = c["metrics"]
        for name in ("kid", "fd", "cmmd", "clip_score", "diversity"):
            assert np.isfinite(m[name]) and m[f"{name}_low"] <= m[f"{name}_high"], name
        assert m["kid_n_generated"] == 4 and m["kid_n_reference"] == 3 and m["clip_score_n"] == 4  # held-out split
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 6 * 4
    rec = record(out / "images" / "apg-eta=0-r=15-beta=-0.5_w4_ddim_2" / "00001-seed1.png")
    assert (rec["prompt"], rec["seed"], rec["guidance"], rec["guidance_method"]) == ("a cat", 1, 4.0, "apg:eta=0,r=15,beta=-0.5")
    assert sorted(set(rec["batch_guidances"])) == [2.0, 4.0]  # made in one batch with the w = 2 cell
    again = tmp_path / "again.png"
    path = out / "images" / "apg-eta=0-r=15-beta=-0.5_w4_ddim_2" / "00001-seed1.png"
    assert main(["generate", "--from-png", str(path), "--out", str(again), "--quiet"]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_prompts_from_a_file_and_from_a_data_sets_heldout_captions(bundle, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a koala\n\n  a cat  \n")
    assert main(sweep(bundle, tmp_path / "a", "--prompts", str(prompts), "--guidance", "2", "--seeds", "0")) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["prompts"] == ["a koala", "a cat"]
    assert main(sweep(bundle, tmp_path / "b", "--prompts-from", str(data), "--guidance", "2", "--seeds", "0")) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["prompts"] == [
        "a red square", "a yellow square", "a grey square"]  # the held-out split, in file order
    assert main(sweep(bundle, tmp_path / "c", "--prompts-from", str(data), "--split", "train", "--limit", "2",
                      "--guidance", "2", "--seeds", "0")) == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["prompts"] == ["a green square", "a black square"]


@pytest.mark.parametrize("extra, words", [
    ([], "give prompts as arguments, --prompts FILE or --prompts-from DATA"),
    (["a koala", "--prompts", "p.txt"], "give prompts one way, not prompt arguments and --prompts"),
    (["a koala", "--limit", "3"], "--limit applies to --prompts-from DATA"),
    (["a koala", "--method", "ddpm", "--eta", "0.5"], "eta 0.5 applies to the ddim sampler only"),
    (["a koala", "--guidance-method", "cfg,magic"], "guidance method 'magic' is unknown; allowed: cfg, rescale"),
    (["a koala", "--steps", "2,x"], "--steps='2,x' must be a comma-separated list of int values"),
    (["a koala", "--method", "ddim,heun"], "method='heun' is not supported"),
    (["a koala", "--reference", "no-such-folder"], "reference no-such-folder does not exist"),
    (["a koala", "--resume", "--overwrite"], "--resume continues the sweep in"),
    (["a koala", "--seeds", "0,0"], "repeat a seed"),
])
def test_bad_input_is_one_line_exit_2_before_any_image(bundle, tmp_path, monkeypatch, capsys, extra, words):
    monkeypatch.chdir(tmp_path)
    assert main(sweep(bundle, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm sweep: error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "out" / "images").exists()


def test_a_stopped_sweep_resumed_gives_the_metrics_of_an_unbroken_one(bundle, tmp_path, monkeypatch, capsys):
    import ldm.sweep

    args = ["a koala", "a cat", "--guidance", "0,1,3,5", "--seeds", "0,1,2", "--batch-size", "4", "--bootstrap", "20"]
    assert main(sweep(bundle, tmp_path / "whole", *args)) == 0
    whole = (tmp_path / "whole" / "metrics.json").read_text()

    real, calls = ldm.sweep.generate_batch, []

    def stop_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ldm.sweep, "generate_batch", stop_after_two)
    out = tmp_path / "stopped"
    assert main(sweep(bundle, out, *args)) == 130
    written = sorted(p.relative_to(out) for p in (out / "images").rglob("*.png"))
    # the plan: w = 0 (6 images: a batch of 4, one of 2), w = 1 (the same), w = 3 and 5 together (3 batches of 4)
    assert len(written) == 6 and not (out / "metrics.json").exists()
    monkeypatch.setattr(ldm.sweep, "generate_batch", real)
    capsys.readouterr()
    assert main(sweep(bundle, out, *args[:2], "--guidance", "0,1,3", *args[4:], "--resume")) == 2
    assert "was started with other cells" in capsys.readouterr().err
    assert main(sweep(bundle, out, *args, "--resume")) == 0
    assert "resumed: 5 batch(es) made here" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == whole
    for p in written:  # the images written before the stop were kept, not made again
        assert np.array_equal(np.asarray(Image.open(out / p)), np.asarray(Image.open(tmp_path / "whole" / p)))


def test_resume_refuses_images_of_another_request(bundle, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["a koala", "--guidance", "2,3", "--seeds", "0", "--batch-size", "1"]
    assert main(sweep(bundle, out, *args)) == 0
    a, b = out / "images" / "cfg_w2_ddim_2" / "00000-seed0.png", out / "images" / "cfg_w3_ddim_2" / "00000-seed0.png"
    a.write_bytes(b.read_bytes())  # an image of another cell under this cell's name
    capsys.readouterr()
    assert main(sweep(bundle, out, *args, "--resume")) == 2
    assert "was not made by this sweep (guidance=3.0 where this sweep asks 2.0)" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(rank: int, port: int, argv: list, log: str) -> None:
    """One process of `accelerate launch --multi_gpu --num_processes 2 -m ldm.cli sweep ...`, set up as its
    launcher sets up its workers; it notes which batches it made."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import ldm.sweep

    real = ldm.sweep.generate_batch

    def noted(pipe, spec, batch, progress=None):
        with open(f"{log}.{rank}", "a") as f:
            f.write(json.dumps(list(batch.rows())) + "\n")
        return real(pipe, spec, batch, progress)

    ldm.sweep.generate_batch = noted
    assert main(argv) == 0


@pytest.mark.slow  # two spawned interpreters import torch, diffusers and the model (~25 s on an idle machine)
def test_two_processes_split_the_batches_and_give_the_metrics_of_one(bundle, tmp_path):
    args = ["a koala", "a cat", "--guidance", "1,2,4", "--guidance-method", "cfg,rescale:0.7", "--seeds", "0,1",
            "--batch-size", "3", "--bootstrap", "20"]
    assert main(sweep(bundle, tmp_path / "one", *args)) == 0
    log = str(tmp_path / "made")
    mp.spawn(rank_worker, args=(free_port(), sweep(bundle, tmp_path / "two", *args), log), nprocs=2, join=True)
    made = [[tuple(map(tuple, json.loads(line))) for line in open(f"{log}.{r}")] for r in (0, 1)]
    assert made[0] and made[1] and not set(made[0]) & set(made[1])  # each rank made its own batches
    assert (tmp_path / "two" / "metrics.json").read_text() == (tmp_path / "one" / "metrics.json").read_text()


@pytest.mark.slow  # starts accelerate's launcher and two fresh interpreters (~40 s here)
def test_accelerate_launch_runs_the_sweep_on_two_cpu_processes(bundle, tmp_path):
    args = ["a koala", "--guidance", "1,3", "--seeds", "0,1", "--batch-size", "2", "--bootstrap", "20"]
    assert main(sweep(bundle, tmp_path / "one", *args)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), "-m", "ldm.cli",
                           *sweep(bundle, tmp_path / "two", *args)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "metrics.json").read_text() == (tmp_path / "one" / "metrics.json").read_text()


@pytest.mark.slow  # a real process killed with SIGKILL mid-sweep, then resumed (~40 s here)
def test_a_killed_sweep_resumed_gives_the_metrics_of_an_unbroken_one(bundle, tmp_path):
    args = ["a koala", "a cat", "--guidance", "1,2,3,4,5,6", "--seeds", "0,1,2", "--batch-size", "1", "--bootstrap", "20"]
    assert main(sweep(bundle, tmp_path / "whole", *args)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli", *sweep(bundle, out, *args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((out / "images").rglob("*.png"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = len(list((out / "images").rglob("*.png")))
    assert proc.returncode == -signal.SIGKILL and 5 <= n < 36 and not (out / "metrics.json").exists()
    assert main(sweep(bundle, out, *args, "--resume")) == 0
    assert (out / "metrics.json").read_text() == (tmp_path / "whole" / "metrics.json").read_text()


def test_the_batch_size_is_as_large_as_memory_allows(bundle, monkeypatch):
    """The largest power of two whose memory estimate (ldm.pipeline.memory_estimate) fits the share of free memory
    a run may claim, at most 64 on a CPU and the largest group of rows that can share a batch."""
    import argparse

    from ldm import generate_cli
    from ldm.bundle import read_geometry
    from ldm.pipeline import memory_estimate
    from ldm.sweep import SweepSpec, make_cells
    from ldm.sweep_cli import auto_batch_size

    args = argparse.Namespace(height=None, width=None, device="cpu")
    spec = SweepSpec([f"p{k}" for k in range(10)], list(range(10)), make_cells([2, 3], ["cfg", "apg"]))  # 200-row groups
    monkeypatch.setattr(generate_cli, "available_memory", lambda device: (1 << 40, "this machine has"))
    assert auto_batch_size(args, bundle, spec) == 64
    g = read_geometry(bundle)
    need16 = memory_estimate(g, num_images=16, batch_size=16, height=32, width=32).total
    monkeypatch.setattr(generate_cli, "available_memory", lambda device: ((need16 - 1) / generate_cli.MEMORY_SHARE, ""))
    assert auto_batch_size(args, bundle, spec) == 8
    small = SweepSpec(["p"], [0, 1, 2], make_cells([2, 3]))  # 6 rows can share a batch
    monkeypatch.setattr(generate_cli, "available_memory", lambda device: (1 << 40, "this machine has"))
    assert auto_batch_size(args, bundle, small) == 6


def test_a_reference_without_splits_needs_split_all(bundle, tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("red", "blue"):
        Image.new("RGB", (32, 32), name).save(ref / f"{name}.png")
    (ref / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "text": n}) + "\n"
                                                for n in ("red", "blue")))
    assert main(sweep(bundle, tmp_path / "s", "a koala", "--reference", str(ref))) == 2
    assert "(--split all uses every image)" in capsys.readouterr().err
    assert main(sweep(bundle, tmp_path / "s", "a koala", "--reference", str(ref), "--split", "all", "--seeds", "0")) == 2
    assert "need 2 or more images per set; the reference has 2, each cell 1" in capsys.readouterr().err
    assert main(sweep(bundle, tmp_path / "s", "a koala", "--reference", str(ref), "--split", "all", "--guidance", "2",
                      "--seeds", "0,1", "--bootstrap", "0")) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())["cells"][0]["metrics"]
    assert m["kid_n_reference"] == 2 and m["kid_n_generated"] == 2 and m["kid_low"] is None  # --bootstrap 0: no interval
