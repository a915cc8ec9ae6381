"""Data parallel training: two CPU processes (gloo) read disjoint shards of each epoch and end with
identical weights."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from train_fakes import make_imagefolder, one_thread  # noqa: F401  (one_thread: autouse fixture)

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, tmp: str, extra: tuple = ()) -> None:
    """One process of the data-parallel run, set up the way `accelerate launch` sets up its workers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from pathlib import Path

    from train.unet.trainer import build_trainer
    from train_fakes import TrainFakeAutoencoder, tiny_text_encoder, tiny_config

    tmp = Path(tmp)
    config = tiny_config(tmp, "validation.prompts=[]", "train.max_steps=6", *extra, data=tmp / "data")
    trainer = build_trainer(config, autoencoder=TrainFakeAutoencoder(), text_encoder=tiny_text_encoder())
    result = trainer.fit(record_rows=True)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    save_file({n: p.detach().contiguous() for n, p in unwrapped.named_parameters()}, tmp / f"rank{rank}.safetensors")
    (tmp / f"rank{rank}.json").write_text(json.dumps({"seen": result.seen, "world": trainer.accelerator.num_processes,
                                                      "backend": str(torch.distributed.get_backend())}))
    trainer.accelerator.end_training()


def test_two_processes_see_different_shards_and_end_identical(tmp_path):
    make_imagefolder(tmp_path / "data")
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    per_epoch = 3 * 4  # 24 training images / (2 processes x batch 4) = 3 micro-batches of 4 per process
    for epoch in range(2):
        shards = [set(r["seen"][epoch * per_epoch : (epoch + 1) * per_epoch]) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == per_epoch
        assert not shards[0] & shards[1]  # disjoint
        assert len(shards[0] | shards[1]) == 24  # together: the whole training split
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors")
    assert all(torch.equal(saved[k], w0[k]) for k in saved)
    assert (tmp_path / "run" / "bundle" / "model_index.json").is_file()


@pytest.mark.slow  # as long as the test above (two spawned processes); tests/test_buckets.py checks BucketOrder's shards fast
def test_two_processes_with_buckets_read_one_bucket_per_step_in_disjoint_shards(tmp_path):
    from train.unet.cache import LatentCache

    make_imagefolder(tmp_path / "data", sizes=[(32, 32), (48, 32), (32, 48)])  # 3 buckets of 8 training images
    mp.spawn(worker, args=(free_port(), str(tmp_path), ("data.buckets.enabled=true",)), nprocs=WORLD, join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text())["seen"] for r in range(WORLD)]
    cache = LatentCache(next((tmp_path / "cache").glob("ldm-*")))
    assert len(cache.buckets) == 3
    per_epoch = 3 * 4  # one global batch of 2 x 4 per bucket: 3 micro-batches of 4 per process
    for epoch in range(2):
        shards = [s[epoch * per_epoch : (epoch + 1) * per_epoch] for s in seen]
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 24
        for i in range(0, per_epoch, 4):  # micro-batch i/4: both processes in one bucket
            assert len(set(cache.bucket_of(shards[0][i : i + 4] + shards[1][i : i + 4]))) == 1
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    """The documented command line on a machine without GPUs: `accelerate launch --multi_gpu --num_processes 2`
    starts the processes with torch.distributed.run and the trainer runs them on CPU with gloo
    (`--cpu --num_processes 2` would need mpirun)."""
    import subprocess
    import sys

    make_imagefolder(tmp_path / "data")
    script = tmp_path / "launch_worker.py"
    script.write_text(
        "import sys, json, torch\n"
        f"sys.path[:0] = [{str(os.getcwd())!r}, {os.path.join(os.getcwd(), 'tests')!r}]\n"
        "torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from train.unet.trainer import build_trainer\n"
        "from train_fakes import TrainFakeAutoencoder, tiny_text_encoder, tiny_config\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        "t = build_trainer(tiny_config(tmp, 'validation.prompts=[]', data=tmp / 'data'), autoencoder=TrainFakeAutoencoder(), text_encoder=tiny_text_encoder())\n"
        "r = t.fit(record_rows=True)\n"
        "(tmp / f'seen{t.accelerator.process_index}.json').write_text(json.dumps(r.seen))\n"
    )
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [set(json.loads((tmp_path / f"seen{r}.json").read_text())[:12]) for r in range(2)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24
