"""The sharded latent cache at scale, against the cache it replaced, side by side in one run (issue 20, point 3).

    nice python bench/bench_data_scale.py --small /work/scale/shapes-10k --large /work/scale/shapes-100k \\
        --work /work/scale/bench [--steps 8] [--rounds 3] [--read-batches 400] [--old-rev 1193c82] [--reuse]

Data: two sets made by ``ldm data shapes --size 64`` (10,000 and 100,000 images). For each set and each
cache, the sharded one (train/unet/cache.py) and the one it replaced (train/unet/cache.py at
``--old-rev``, loaded from git: one ``.npy`` per array, contexts in float32, keyed by reading every
byte), it measures:

  - build: images/s of building the cache from nothing (the scan of every image included);
  - disk: bytes per image of the cache folder plus the context files it uses;
  - start: seconds to find the finished cache again (the key: a manifest of names, sizes and times
    against reading every byte);
  - reading (each in a fresh process): resident memory, anonymous (the process's own) and
    file-backed (mapped cache pages, reclaimable), after opening and at the end of reading
    ``--read-batches`` random batches of 64 (the trainer's order) and then training ``--steps`` steps;
    images/s of the reads alone and of the training steps (read + U-Net step);
  - loss: the shipped shapes model's mean training loss on the same 256 images, t and noise, with its
    contexts stored in float16 against float32.

Every images/s ratio is new / old in the same round; rounds alternate which cache goes first. The old
cache is built and read on the 10,000-image set only unless ``--old-on-large`` (its 100k build is slow on
shared cores; what must hold at 100k is the new cache's memory).

Models: a tiny AutoencoderKL (f = 4, block_out_channels (4, 8, 8): 16x16x4 latents from 64 px),
the tiny open_clip text encoder of ldm/testing.py (77 x 16 contexts) and a small U-Net (block_out_channels
(32, 64)), random weights: what is measured is the cache, and a small model leaves its share visible.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BATCH = 64


def encoders():
    import vae
    from ldm import testing

    ae = vae.Autoencoder(testing.kl_autoencoder(seed=0, channels=(4, 8, 8), sample_size=64)).eval()
    return ae, testing.text_encoder(0)


def old_cache_module(rev: str):
    """train/unet/cache.py as it was at ``rev``, imported as its own module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:train/unet/cache.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"old_cache_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configs(data: Path, cache_dir: Path, kind: str):
    from train.unet.config import CacheConfig, DataConfig

    dtype = "float16" if kind == "new" else "float32"  # each cache's default
    return CacheConfig(dir=str(cache_dir), batch_size=128, context_dtype=dtype), DataConfig(path=str(data), resolution=64)


def module_for(kind: str, rev: str):
    if kind == "new":
        import train.unet.cache as module

        return module
    return old_cache_module(rev)


def folder_bytes(folder: Path, kind: str) -> int:
    """The cache folder's bytes plus those of the context files it reads."""
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    if kind == "new":
        names = {json.loads(p.read_text())["contexts"] for p in folder.glob("shard-*/shard.json")}
    else:
        names = {json.loads((folder / "meta.json").read_text())["contexts"]}
    return total + sum((folder.parent / "contexts" / n).stat().st_size for n in names if n)


def memory() -> dict:
    """This process's resident memory (MiB): anonymous, file-backed, and the peak of the total."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def read_and_train(kind: str, folder: str, rev: str, read_batches: int, steps: int) -> dict:
    """In a fresh process: open the cache, read random batches as the trainer orders them, then train."""
    from ldm import testing
    from ldm.schedule import NoiseSchedule
    from train.run.order import DataOrder
    from train.unet.objective import noised_batch, weighted_mse

    torch.set_num_threads(1)
    out = {"before": memory()}
    cache = module_for(kind, rev).LatentCache(Path(folder))
    out["opened"] = memory()
    order = DataOrder(cache.train_indices, BATCH, 1, 0, seed=0)
    t0 = time.perf_counter()
    for i in range(read_batches):  # every batch a fresh random draw over the whole set
        rows = order.batch(i // order.batches_per_epoch, i % order.batches_per_epoch)
        cache.latents(rows), cache.contexts(rows, epoch=0)
    out["read_img_s"] = read_batches * BATCH / (time.perf_counter() - t0)
    out["read"] = memory()
    unet = testing.unet((32, 64), layers_per_block=1, cross_attention_dim=16, sample_size=16, seed=0).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    schedule = NoiseSchedule("scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(steps):
        rows = order.batch(0, i % order.batches_per_epoch)
        batch = noised_batch(cache.latents(rows), schedule, prediction="eps", min_snr_gamma=None, noise_offset=0.0,
                             generator=g)
        loss = weighted_mse(unet(batch.z_t, batch.t, encoder_hidden_states=cache.contexts(rows)).sample, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["train_img_s"] = steps * BATCH / (time.perf_counter() - t0)
    out["trained"] = memory()
    return out


def child(kind: str, folder: Path, rev: str, read_batches: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(folder), "--old-rev", rev,
               "--read-batches", str(read_batches), "--steps", str(steps)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def loss_fp16_vs_fp32(data: Path, images: int = 256) -> tuple[float, float, float]:
    """The shipped shapes model (ldm/shapes_model, trained at 32 px) on ``images`` of ``data`` at 32 px: its mean
    training loss on the same batches (t, noise) with its contexts rounded to float16 and in float32, and the
    largest relative change of a context value."""
    import conditioning
    import vae
    from diffusers import UNet2DConditionModel
    from ldm.schedule import NoiseSchedule
    from train.data import load_captioned_images
    from train.unet.objective import noised_batch, weighted_mse

    bundle = ROOT / "ldm" / "shapes_model"
    ae, te = vae.load_autoencoder(bundle / "vae"), conditioning.load_text_encoder(bundle)
    unet = UNet2DConditionModel.from_pretrained(bundle / "unet").eval()
    config = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule(config["beta_schedule"], num_train_timesteps=config["num_train_timesteps"],
                             beta_start=config["beta_start"], beta_end=config["beta_end"])
    rows = load_captioned_images(data, size=32, progress=False)
    losses = {"float32": [], "float16": []}
    change = 0.0
    with torch.no_grad():
        for start in range(0, images, BATCH):
            pairs = [rows[i] for i in range(start, start + BATCH)]
            z0 = ae.encode(torch.stack([image for image, _ in pairs]))  # (B, 4, 8, 8)
            ctx = te([caption for _, caption in pairs])[0]  # (B, 77, D) float32
            half = ctx.half().float()
            change = max(change, float(((half - ctx).abs() / ctx.abs().clamp_min(1e-3)).max()))
            for name, c in (("float32", ctx), ("float16", half)):
                batch = noised_batch(z0, schedule, prediction="eps", min_snr_gamma=None, noise_offset=0.0,
                                     generator=torch.Generator().manual_seed(start))
                losses[name].append(float(weighted_mse(unet(batch.z_t, batch.t, encoder_hidden_states=c).sample, batch)))
    return float(np.mean(losses["float32"])), float(np.mean(losses["float16"])), change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=Path, help="the 10,000-image shapes set (ldm data shapes --n 10000 --size 64)")
    parser.add_argument("--large", type=Path, help="the 100,000-image shapes set")
    parser.add_argument("--work", type=Path, default=Path("/work/scale/bench"), help="where the caches go (removed first)")
    parser.add_argument("--old-rev", default="1193c82", help="the git revision whose train/unet/cache.py is the old cache")
    parser.add_argument("--read-batches", type=int, default=400, help="random batches of 64 read per measurement")
    parser.add_argument("--steps", type=int, default=8, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (old, new) training measurements per set")
    parser.add_argument("--old-on-large", action="store_true", help="build and read the old cache of --large too "
                        "(the default compares the caches on --small only: on shared cores each 100k build takes long)")
    parser.add_argument("--reuse", action="store_true", help="keep the caches already in --work (their build is "
                        "then not timed again): to measure the reads again")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(read_and_train(args.child[0], args.child[1], args.old_rev, args.read_batches, args.steps)))
        return
    torch.set_num_threads(1)
    ae, te = encoders()
    if not args.reuse:
        shutil.rmtree(args.work, ignore_errors=True)
    results = {}
    print(f"bench_data_scale: old cache = train/unet/cache.py at {args.old_rev}; torch threads 1; shared machine load "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    for name, data in (("10k", args.small), ("100k", args.large)):
        kinds = ("old", "new") if name == "10k" or args.old_on_large else ("new",)
        for kind in kinds:
            module = module_for(kind, args.old_rev)
            cache_cfg, data_cfg = configs(data, args.work / kind, kind)
            t0 = time.perf_counter()
            folder, built = module.build_cache(cache_cfg, data_cfg, ae, te, progress=False)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            again, built_again = module.build_cache(cache_cfg, data_cfg, ae, te, progress=False)
            start = time.perf_counter() - t0
            assert (built or args.reuse) and not built_again and again == folder
            n = len(module.LatentCache(folder))
            results[name, kind] = {"folder": folder, "n": n, "build_img_s": n / build, "build_s": build,
                                   "bytes_per_image": folder_bytes(folder, kind) / n, "start_s": start, "reads": []}
            r = results[name, kind]
            print(f"{name} {kind}: {n} images {'cached' if built else 'found (not timed: --reuse)'} in {build:.0f} s "
                  f"({r['build_img_s']:.0f} img/s), "
                  f"{r['bytes_per_image']:.0f} bytes/image, found again in {start:.2f} s", flush=True)
        for round_ in range(args.rounds):
            for kind in (kinds if round_ % 2 == 0 else kinds[::-1]):
                m = child(kind, results[name, kind]["folder"], args.old_rev, args.read_batches, args.steps)
                results[name, kind]["reads"].append(m)
                print(f"  round {round_} {kind}: read {m['read_img_s']:.0f} img/s, train {m['train_img_s']:.1f} img/s, "
                      f"anon MiB opened/read/trained {m['opened']['RssAnon']:.0f}/{m['read']['RssAnon']:.0f}/"
                      f"{m['trained']['RssAnon']:.0f}, file-backed at the end {m['trained']['RssFile']:.0f}", flush=True)

    print("\n| set | cache | build img/s | bytes/image | start s | read img/s | train img/s | anon MiB opened | anon MiB after reading | file-backed MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, kind), r in results.items():
        med = lambda key: statistics.median(m[key] for m in r["reads"])  # noqa: E731
        anon = lambda when: statistics.median(m[when]["RssAnon"] for m in r["reads"])  # noqa: E731
        print(f"| {name} | {kind} | {r['build_img_s']:.0f} | {r['bytes_per_image']:.0f} | {r['start_s']:.2f} | "
              f"{med('read_img_s'):.0f} | {med('train_img_s'):.1f} | {anon('opened'):.0f} | {anon('read'):.0f} | "
              f"{statistics.median(m['trained']['RssFile'] for m in r['reads']):.0f} |")
    print("\nratios new / old (median over rounds of same-round ratios):")
    for name in ("10k", "100k"):
        if (name, "old") not in results:
            continue
        old, new = results[name, "old"], results[name, "new"]
        for key in ("read_img_s", "train_img_s"):
            ratios = [n[key] / o[key] for o, n in zip(old["reads"], new["reads"])]
            print(f"  {name} {key}: {statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})")
        print(f"  {name} build img/s: {new['build_img_s'] / old['build_img_s']:.2f}x; bytes/image: "
              f"{new['bytes_per_image'] / old['bytes_per_image']:.2f}x; start: {old['start_s'] / new['start_s']:.0f}x faster")
    for kind in ("old", "new"):
        if (("100k", kind)) not in results:
            continue
        a = statistics.median(m["trained"]["RssAnon"] for m in results["10k", kind]["reads"])
        b = statistics.median(m["trained"]["RssAnon"] for m in results["100k", kind]["reads"])
        print(f"anonymous memory after training, 100k / 10k, {kind}: {b:.0f} / {a:.0f} MiB = {b / a:.2f}x")
    f32, f16, change = loss_fp16_vs_fp32(args.small)
    print(f"shapes model, 256 images: loss with float16 contexts {f16:.6f} vs float32 {f32:.6f}: "
          f"{abs(f16 - f32) / f32:.2e} relative (contexts moved by at most {change:.1e} of their value)")


if __name__ == "__main__":
    main()
