"""Generate images from a prompt.

Each PNG carries, in its text chunks, everything needed to make it again: prompt, negative
prompt, seed, steps, method, sigmas, eta, guidance weight and method, size, the model's path and hash, the LoRA files
with their hashes and scales, the batch it was made in, and package versions.
`ldm generate --from-png FILE` reads them back and regenerates the image; on the same machine
the result is bit-identical.

On the CPU, once the model's ONNX graphs are exported (by a first run), images are made without torch
(numpy + ONNX Runtime, ldm.runtime), which starts in a fraction of the time; --runtime torch always
uses the torch pipeline. Image i of a batch is the image made alone from seed + i, bit for bit.

--lora FILE[:SCALE] (repeatable) merges a LoRA into the model's U-Net, W + SCALE * (alpha/r) B A,
in the order given: a bundle written by `ldm finetune` (or its pytorch_lora_weights.safetensors,
diffusers' layout) or a kohya/A1111 file (lora_unet_*.lora_down/lora_up.weight); SCALE defaults to 1.
Text-encoder updates in the file (lora_te_*) merge into a Stable Diffusion model's CLIP text encoder.

examples:
  ldm generate "koala, twemoji style"
  ldm generate "a small red circle at the top left" --model shapes --guidance 4 --num-images 8 --out circles.png
  ldm generate "koala, twemoji style" --lora runs/finetune/bundle:0.8 --lora other_style.safetensors:0.5
  ldm generate "koala, twemoji style" --method dpmpp-2m --sigmas karras --steps 15
  ldm generate "koala, twemoji style" --guidance 12 --guidance-method apg:eta=0,r=15,beta=-0.5
  ldm generate --from-png circles-3.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ldm.errors import UsageError

if TYPE_CHECKING:
    from ldm.lora import Lora

PNG_KEY = "ldm-toolkit"  # the PNG text chunk holding our JSON record
LONG_RUN = 120  # seconds: a run estimated to take longer says so after its second step
MEMORY_SHARE = 0.8  # the most of the free memory a run's estimate may claim
RUNTIMES = ("auto", "torch")  # --runtime
FAST_RUNNER = "numpy+onnxruntime"  # the record's "runner" for images the torch-free runner made (ldm.runtime)
FAST_MAX_IMAGES = 16  # larger requests take the torch path, which checks their memory first


def add_model_arguments(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Options shared by generate and sweep: the model and how to run it. ``sweep``: leave out --steps, --method
    and --eta (a sweep's are lists) and --batch-size's default (a sweep's is as large as memory allows)."""
    p.add_argument("--model", type=Path, default=None, help="model bundle folder, a Stable Diffusion 1.x/2.x single .safetensors file (converted once, then cached), or the name of a model shipped in the package: default (emoji, 64 px) or shapes (32 px); default: default")
    if not sweep:
        p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
        p.add_argument("--method", default="ddim",
                       help="sampler: ddim, ddpm, dpmpp-2m (DPM-Solver++ 2M), euler or euler-a (Euler ancestral) (default ddim)")
    p.add_argument("--sigmas", default=None,
                   help="noise levels for dpmpp-2m, euler and euler-a: karras (Karras et al. 2022, rho 7; A1111's "
                        "\"Karras\" schedule type); default: the model's timestep grid, as ddim and ddpm use")
    if not sweep:
        p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like; ddim only (default 0)")
    p.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of the autoencoder's factor")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of the autoencoder's factor")
    p.add_argument("--batch-size", type=int, default=None if sweep else 8,
                   help="images per batched U-Net call (default: " + ("as large as memory allows, up to 64 on a CPU and "
                                                                      "256 on a GPU)" if sweep else "8)"))
    p.add_argument("--backend", default="auto",
                   help="torch, onnx (ONNX Runtime, fp32 CPU; graphs exported once, cached beside the model), "
                        "openvino (OpenVINO f32 over the same graphs; pip install 'ldm-toolkit[openvino]') "
                        "or auto: onnx on the CPU, torch elsewhere (default auto)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--compile", action="store_true",
                   help="run the U-Net through torch.compile (torch backend; --backend auto becomes torch): the first "
                        "batch waits for the compile (tens of seconds), later steps run faster on a GPU; images equal "
                        "eager ones to float tolerance, not bitwise")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the text prompt")
    add_model_arguments(p)
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance weight w >= 0; 1 = off (default 7.5)")
    p.add_argument("--guidance-method", default="cfg", metavar="SPEC",
                   help="how the weight is applied: cfg (classifier-free guidance); rescale[:PHI] (CFG rescaled to the "
                        "conditional prediction's std, Lin et al. 2023; PHI in [0, 1], default 0.7); interval:LO-HI (CFG only "
                        "at noise levels sigma in (LO, HI], the conditional model elsewhere, Kynkaanniemi et al. 2024; "
                        "sigma = sqrt((1 - abar_t) / abar_t), 0.03 to 14.6 on the shipped models, e.g. interval:0.3-5, HI may "
                        "be inf); "
                        "apg[:eta=E,r=R,beta=B] (adaptive projected guidance, Sadat et al. 2024: parallel-part weight "
                        "E in [0, 1], norm threshold R > 0 or inf, momentum -1 < B < 1; default eta=0,r=15,beta=-0.5) "
                        "(default cfg)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i (default 0)")
    p.add_argument("--num-images", type=int, default=1, help="how many images (default 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="output PNG (default out.png); with several images NAME-i.png, plus NAME-grid.png")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA into the U-Net with this scale (default 1): a bundle written by ldm finetune, its "
                        "pytorch_lora_weights.safetensors, or a kohya/A1111 .safetensors; repeat for several (with "
                        "--from-png: these replace the recorded files)")
    p.add_argument("--from-png", type=Path, default=None, help="regenerate the image recorded in this PNG's metadata")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="auto: on the CPU, once the model's ONNX graphs are exported (by a first run), generate without "
                        "torch (numpy + ONNX Runtime; starts at once), else through the torch pipeline; torch: always "
                        "the torch pipeline (for comparison) (default auto)")


def model_path(model: Optional[Path]) -> Path:
    """The bundle folder for ``--model``: a folder, an SD single file (its cached bundle: ``ldm.single_file``),
    a packaged model's name (default, shapes) or None (default)."""
    from ldm.bundle import PACKAGED_MODELS, check_bundle

    name = "default" if model is None else str(model)
    if name in PACKAGED_MODELS and not Path(name).exists():
        if not PACKAGED_MODELS[name].is_dir():
            raise UsageError(f"no {name} model is installed (expected {PACKAGED_MODELS[name]}); give --model DIR")
        model = PACKAGED_MODELS[name]
    if model is not None and Path(model).is_file():  # a Stable Diffusion single file: its bundle, converted once
        from ldm.single_file import cached_bundle

        return cached_bundle(model)
    return check_bundle(model)


def lora_arguments(specs: list[str]) -> list[tuple["Lora", float]]:
    """``--lora FILE[:SCALE]`` values -> [(LoRA, scale)], each file read (once: the pipeline merges what is
    read here) and so checked to be a LoRA (``ldm.lora``) before any model loads."""
    if not specs:
        return []  # (ldm.lora imports torch)
    from ldm.lora import parse_lora_spec, read_lora

    return [(read_lora(path), scale) for path, scale in map(parse_lora_spec, specs)]


def lora_records(loras: list[tuple["Lora", float]]) -> list[dict]:
    """The PNG record's entries for the LoRAs merged, in order: file, name, hash (the file's sha256, 16 hex
    digits; ``ldm.infotext`` writes them as A1111's ``<lora:NAME:SCALE>`` and ``Lora hashes``) and scale."""
    return [{"file": str(lora.path), "name": lora_name(lora.path), "hash": lora.hash, "scale": scale}
            for lora, scale in loras]


def lora_name(path: Path) -> str:
    """The name other tools show for a LoRA: its file's; for a bundle's LoRA file, the run's folder
    (runs/koala-ft/bundle/pytorch_lora_weights.safetensors -> koala-ft)."""
    from ldm.lora import LORA_FILE

    if path.name != LORA_FILE:
        return path.name
    folders = [p.name for p in path.resolve().parents if p.name and p.name != "bundle"]
    return folders[0] if folders else path.name


def check_device(device: str, backend: str = "torch") -> None:
    """Raise UsageError unless ``device`` names a torch device this machine has and ``backend`` runs on it."""
    import torch

    from ldm.backends import resolve_backend

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if d.type != "cpu":
        module = torch.backends.mps if d.type == "mps" else getattr(torch, d.type, None)
        if not getattr(module, "is_available", lambda: False)():
            why = " (this torch was built without CUDA)" if d.type == "cuda" and torch.version.cuda is None else ""
            raise UsageError(f"--device {device}: no {d.type} device is available on this machine{why}; use --device cpu")
        count = getattr(module, "device_count", lambda: 1)()
        if d.index is not None and d.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} {d.type} device(s), "
                             f"{d.type}:0 to {d.type}:{count - 1}")
    if resolve_backend(backend, device) == "onnx" and d.type != "cpu":
        raise UsageError(f"--backend onnx runs on the CPU only; use --backend torch (or auto) with --device {device}")


def check_compile_option(args: argparse.Namespace) -> None:
    """Raise UsageError when --compile cannot apply: the onnx backend, or a Python where torch.compile does not run."""
    from ldm.backends import check_compile

    if not getattr(args, "compile", False):
        return
    if args.backend == "onnx":
        raise UsageError("--compile applies to the torch backend (torch.compile of the U-Net); --backend onnx runs "
                         "ONNX Runtime's own graph: use --backend torch (or auto) with --compile, or drop --compile")
    try:
        check_compile(True)
    except ValueError as exc:
        raise UsageError(f"--compile: {exc}") from None


def available_memory(device: str) -> tuple[int, str]:
    """(bytes free for a run, where): the GPU's free memory for a CUDA device, else the host's available RAM."""
    import torch

    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.mem_get_info(d)[0], f"{device} has"
    try:
        import psutil

        return psutil.virtual_memory().available, "this machine has"
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine has"


def size_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def check_request(args: argparse.Namespace, model: Path, num_images: int, *, grid: bool, fewer: str,
                  guidances: Optional[list[float]] = None, origin: str = ""):
    """Check every option against the model's configs and the memory at hand before anything is loaded:
    device, sampler options, image size (a multiple of the model's granularity), and that the images fit
    in memory (``ldm.pipeline.memory_estimate``). Returns the estimate and the memory free, for ``with_estimate``.
    ``fewer`` says how to ask for fewer images (e.g. "fewer --num-images"); ``origin`` prefixes the messages
    about options that came from elsewhere than the command line (a PNG's record)."""
    from ldm.bundle import load_schedule, read_geometry
    from ldm.guidance import parse_guidance_method
    from ldm.pipeline import check_sampling, image_size, memory_estimate

    check_device(args.device, args.backend)
    if isinstance(getattr(args, "guidance_method", None), str):
        try:
            parse_guidance_method(args.guidance_method)
        except ValueError as exc:
            raise UsageError(f"{origin}--guidance-method: {exc}") from None
    check_compile_option(args)
    geometry = read_geometry(model)
    _, sampling = load_schedule(model)
    try:
        for guidance in guidances or [args.guidance]:
            check_sampling(geometry.num_train_timesteps, sampling, steps=args.steps, method=args.method, eta=args.eta,
                           guidance=guidance, batch_size=args.batch_size, sigmas=args.sigmas)
        height, width = image_size(args.height, args.width, factor=geometry.factor, granularity=geometry.granularity,
                                   sample_size=geometry.sample_size)
    except ValueError as exc:
        raise UsageError(f"{origin}{exc}") from None
    est = memory_estimate(geometry, num_images=num_images, batch_size=args.batch_size, height=height, width=width,
                          grid=grid)
    free, where = available_memory(args.device)
    limit = MEMORY_SHARE * free  # the estimate is good to about 40%; leave the rest to the machine
    if est.total > limit:
        b = min(args.batch_size, num_images)
        if est.images > est.batch:
            advice = f"ask for {fewer} per command"
        elif b > 1 and est.total - est.batch + est.batch / b <= limit:
            advice = f"lower --batch-size (now {args.batch_size})"
        else:
            advice = f"use a smaller --height/--width (the model's own size is {geometry.sample_size * geometry.factor})"
        raise UsageError(f"{num_images} image(s) of {width}x{height} need about {size_text(est.total)} of memory "
                         f"(weights {size_text(est.model)}, a batch of {b} {size_text(est.batch)}, the images "
                         f"{size_text(est.images)}), more than {MEMORY_SHARE:.0%} of the {size_text(free)} {where} free; "
                         f"{advice}")
    return est, free


def with_estimate(progress, est, free: int):
    """``progress`` (or None), wrapped: the second step's time, times the steps left, is the run's estimate;
    when that is LONG_RUN seconds or more, a note on stderr says it, and the memory the run was estimated
    to need (``check_request``). The first step is not timed: it includes warm-up (ONNX graph export)."""
    import time

    from tqdm import tqdm

    marks: list[float] = []

    def step(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if len(marks) < 2:
            marks.append(time.perf_counter())
            seconds = marks[-1] - marks[0]
            if len(marks) == 2 and (total - done) * seconds >= LONG_RUN:
                tqdm.write(f"note: about {duration_text((total - done) * seconds)} to go ({total} sampler steps of "
                           f"{seconds:.2g} s here, then decoding); memory about {size_text(est.total)} of "
                           f"{size_text(free)} free", file=sys.stderr)

    return step


def progress_bar(quiet: bool, desc: str):
    """A progress(done, total) callback drawing a tqdm bar on stderr, or None when quiet."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="step", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress, bar.close


def versions() -> dict:
    """The package versions a record names, as ``torch.__version__`` and ``diffusers.__version__`` say them,
    read without importing either (the torch-free runner records them too)."""
    import re
    from importlib.metadata import version
    from importlib.util import find_spec

    from ldm import __version__

    torch_version = None
    try:  # torch.__version__ keeps the build's local part (e.g. 2.14.1+cu130), which the metadata drops
        text = (Path(list(find_spec("torch").submodule_search_locations)[0]) / "version.py").read_text()
        torch_version = re.search(r"^__version__ = '([^']+)'", text, re.M).group(1)
    except (AttributeError, TypeError, IndexError, OSError):
        torch_version = version("torch")
    return {"ldm-toolkit": __version__, "torch": torch_version, "diffusers": version("diffusers")}


def save_png(image, path: Path, record: dict) -> None:
    """Write ``image`` with ``record`` as JSON in a text chunk, and as A1111's ``parameters`` text, atomically."""
    from PIL.PngImagePlugin import PngInfo

    from ldm.infotext import a1111_parameters
    from ldm_io import save_image

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    info.add_text("parameters", a1111_parameters(record))
    save_image(image, path, format="PNG", pnginfo=info)


# The record's fields that --from-png reads, and their JSON types.
RECORD_FIELDS = {"model": str, "model_hash": str, "steps": int, "method": str, "eta": (int, float),
                 "guidance": (int, float), "height": int, "width": int, "batch_size": int, "backend": str,
                 "negative_prompt": (str, type(None)), "batch_prompts": list, "batch_seeds": list, "batch_index": int}


def read_record(path: Path) -> dict:
    """The JSON record in ``path``'s PNG text chunk, with every field --from-png needs there and of its type;
    anything else (not an image, no record, an edited or damaged one) is a UsageError saying which."""
    from PIL import Image

    from ldm.guidance import parse_guidance_method

    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()  # reads the text chunks (and checks the file is whole)
            text = getattr(im, "text", {}) or {}
    except (OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable image ({exc}); give a PNG written by ldm generate") from None
    if PNG_KEY not in text:
        raise UsageError(f"{path} has no '{PNG_KEY}' metadata; it was not written by ldm generate")
    damaged, fix = f"the record in {path} was edited or damaged", "use a PNG as ldm generate wrote it"
    try:
        rec = json.loads(text[PNG_KEY])
    except json.JSONDecodeError as exc:
        raise UsageError(f"{damaged} (it is not JSON: {exc}); {fix}") from None
    if not isinstance(rec, dict):
        raise UsageError(f"{damaged} (it is a JSON {type(rec).__name__}, not an object); {fix}")
    if not isinstance(rec.get("sigmas"), (str, type(None))):  # optional: records before Karras sigmas lack it
        raise UsageError(f"{damaged} (sigmas={rec['sigmas']!r} is not str); {fix}")
    method = rec.setdefault("guidance_method", "cfg")  # records made before guidance methods were: cfg
    try:
        parse_guidance_method(method)
    except ValueError as exc:
        raise UsageError(f"{damaged} ({exc}); {fix}") from None
    missing = [k for k in RECORD_FIELDS if k not in rec]
    if missing:
        raise UsageError(f"{damaged} (it lacks {', '.join(missing)}); {fix}")
    for key, kind in RECORD_FIELDS.items():
        if isinstance(rec[key], bool) or not isinstance(rec[key], kind):
            raise UsageError(f"{damaged} ({key}={rec[key]!r} is not {getattr(kind, '__name__', 'a number')}); {fix}")
    loras = rec.setdefault("loras", [])  # records made before LoRAs were: none
    if not isinstance(loras, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("hash"), str)
            and isinstance(e.get("scale"), (int, float)) and not isinstance(e.get("scale"), bool) for e in loras):
        raise UsageError(f"{damaged} (loras={loras!r} is not a list of {{file, hash, scale}}); {fix}")
    n = len(rec["batch_prompts"])
    if not (n and n == len(rec["batch_seeds"]) and 0 <= rec["batch_index"] < n
            and all(isinstance(p, str) for p in rec["batch_prompts"])
            and all(isinstance(s, int) and not isinstance(s, bool) for s in rec["batch_seeds"])):
        raise UsageError(f"{damaged} (batch_prompts, batch_seeds and batch_index do not describe a batch); {fix}")
    return rec


def output_paths(out: Optional[Path], n: int) -> list[Path]:
    out = out or Path("out.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must be a .png file name")
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(n)]


def marked_png_info():
    """PNG text chunks that tell a later run this image is ldm generate's (so it may be replaced)."""
    from PIL.PngImagePlugin import PngInfo

    from ldm_io.outputs import software_text

    info = PngInfo()
    info.add_text(*software_text("generate"))
    return info


def grid_path(paths: list[Path]) -> Path:
    """NAME-grid.png beside NAME-0.png ... (several images)."""
    return paths[0].with_name(paths[0].stem.rsplit("-", 1)[0] + "-grid.png")


def regenerate_path(args: argparse.Namespace) -> Path:
    """Where --from-png's image goes: --out, else FILE-again.png beside it."""
    return args.out or args.from_png.with_name(args.from_png.stem + "-again.png")


def claim_outputs(args: argparse.Namespace) -> list[Path]:
    """Every PNG this command will write, checked before the model loads: a file name (not a folder)
    in a writable place, and where it exists, a PNG an ldm command wrote (replaced); never --from-png."""
    from ldm_io import claim_output_file
    from ldm_io.outputs import written_by_ldm

    if args.from_png is not None:
        paths = [regenerate_path(args)]
        if paths[0].resolve() == args.from_png.resolve():
            raise UsageError(f"--out {paths[0]} is the --from-png file; write the remade image to another file")
    else:
        paths = output_paths(args.out, max(args.num_images, 1))
        paths += [grid_path(paths)] if len(paths) > 1 else []
    for i, path in enumerate(paths):
        # every path is in the first one's folder, so only the first and those that exist need a check of their own
        # (a million --num-images stay a quick one-line error, not a million writability probes)
        if i == 0 or os.path.lexists(path):
            claim_output_file(path, command="ldm generate", ours=written_by_ldm, inputs=[args.from_png])
    return paths


def run(args: argparse.Namespace) -> int:
    claim_outputs(args)
    args.loras = lora_arguments(args.lora)
    if args.from_png is not None:
        return regenerate(args)
    if not args.prompt:
        raise UsageError("give a prompt, e.g. ldm generate \"koala, twemoji style\", or --from-png FILE")
    if args.num_images < 1:
        raise UsageError(f"--num-images {args.num_images} must be >= 1")
    made = generate_fast(args, [args.prompt], args.seed, args.num_images)
    images, records = made if made is not None else generate(args, [args.prompt], args.seed, args.num_images)
    clock = time.perf_counter()
    paths = output_paths(args.out, len(images))
    for image, record, path in zip(images, records, paths):
        save_png(image, path, record)
    if len(images) > 1:
        from ldm.runtime.images import image_grid
        from ldm_io import save_image

        cols = min(len(images), 8)
        rows = -(-len(images) // cols)
        filler = [images[0].copy().point(lambda _: 255)] * (rows * cols - len(images))
        grid = image_grid(images + filler, rows, cols)
        save_image(grid, grid_path(paths), pnginfo=marked_png_info())
    TIMINGS["png"] = time.perf_counter() - clock
    report_timings()
    print("\n".join(str(p) for p in paths))
    return 0


# phase -> seconds of this process's run, printed to stderr as one JSON line when LDM_TIMINGS=1
# (bench/bench_coldstart.py reads it): imports, loading, text encoding, sampling, decoding, png
TIMINGS: dict[str, float] = {}


def report_timings() -> None:
    if os.environ.get("LDM_TIMINGS") == "1":
        print("timings: " + json.dumps({k: round(v, 4) for k, v in TIMINGS.items()}), file=sys.stderr)


def load(args: argparse.Namespace, model: Path):
    clock = time.perf_counter()
    import diffusers.models.unets  # noqa: F401  (the torch path's imports, timed apart from loading)

    import conditioning  # noqa: F401
    from ldm.pipeline import Text2ImagePipeline

    TIMINGS["imports"] = time.perf_counter() - clock
    clock = time.perf_counter()
    pipe = Text2ImagePipeline.from_pretrained(model, device=args.device, backend=args.backend,
                                              loras=getattr(args, "loras", None), compile=getattr(args, "compile", False))
    TIMINGS["loading"] = time.perf_counter() - clock
    return pipe


def recorded_guidance_method(args: argparse.Namespace) -> str:
    """The record's canonical --guidance-method spec (``ldm.guidance``, which imports torch, for any but cfg)."""
    method = getattr(args, "guidance_method", None)
    if method in (None, "cfg"):
        return "cfg"
    from ldm.guidance import format_guidance_method, parse_guidance_method

    return format_guidance_method(parse_guidance_method(method))


def image_records(args: argparse.Namespace, images, prompts: list[str], seeds: list[int], source: Path,
                  model_hash: str, backend: str, extra: Optional[dict] = None) -> list[dict]:
    """The PNG records of images made for rows ``prompts``/``seeds``: the request's options, the model, and the
    batch each image was made in (so ``--from-png`` can remake it exactly)."""
    common = {
        "negative_prompt": args.negative, "steps": args.steps, "method": args.method, "sigmas": args.sigmas,
        "eta": args.eta,
        "guidance": args.guidance, "guidance_method": recorded_guidance_method(args),
        "width": images[0].size[0], "height": images[0].size[1],
        "model": str(source), "model_hash": model_hash, "device": args.device,
        "backend": backend, "compile": getattr(args, "compile", False),
        "batch_size": args.batch_size, "versions": versions(), "loras": lora_records(args.loras), **(extra or {}),
    }
    records = []
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        first = i - i % args.batch_size  # the batch this image was made in, so it can be remade exactly
        batch = slice(first, first + args.batch_size)
        records.append({**common, "prompt": p, "seed": s, "batch_prompts": prompts[batch],
                        "batch_seeds": seeds[batch], "batch_index": i - first})
    return records


def fast_runner(args: argparse.Namespace, model_arg: Optional[Path]):
    """(runner, bundle folder, bundle hash) of the torch-free runner (``ldm.runtime.runner``) for this request,
    or None where it does not apply: --runtime torch, not the CPU, not ONNX, LoRAs, a guidance other than
    CFG, a single file, or the model's graphs and settings not exported yet (a torch run exports them)."""
    if (getattr(args, "runtime", "auto") != "auto" or args.device != "cpu" or args.backend not in ("auto", "onnx")
            or getattr(args, "compile", False) or args.loras or getattr(args, "guidance_method", None) not in (None, "cfg")
            or (model_arg is not None and Path(model_arg).is_file())):
        return None
    from ldm.bundle import bundle_hash
    from ldm.runtime.runner import Runner, Unsupported

    try:
        model = model_path(model_arg)
        digest = bundle_hash(model)
        return Runner(model, digest), model, digest
    except (Unsupported, OSError):  # the torch path says what is wrong with the model
        return None


def run_fast(args: argparse.Namespace, found, prompts: list[str], seeds: list[int], progress=None):
    """uint8 images from the torch-free runner ``found`` (``fast_runner``), or None where it cannot make them."""
    from ldm.runtime.runner import TIMINGS as RUNNER_TIMINGS
    from ldm.runtime.runner import Unsupported

    runner = found[0]
    try:
        arrays = runner.generate(prompts, [args.negative] * len(prompts), seeds, steps=args.steps, method=args.method,
                                 eta=args.eta, sigmas=args.sigmas, guidance=args.guidance, height=args.height,
                                 width=args.width, batch_size=args.batch_size, progress=progress)
    except Unsupported:
        return None
    TIMINGS.update(RUNNER_TIMINGS)
    return arrays


def generate_fast(args: argparse.Namespace, batch_prompts: list[str], seed: int, num_images: int):
    """``generate``'s (images, records) made without torch (``fast_runner``), or None: then ``generate`` runs."""
    n = len(batch_prompts) * num_images
    found = fast_runner(args, args.model) if n <= FAST_MAX_IMAGES else None
    if found is None:
        return None
    from PIL import Image

    prompts = [p for p in batch_prompts for _ in range(num_images)]
    seeds = [seed + i for i in range(n)]
    progress, close = progress_bar(args.quiet, "generate")
    try:
        arrays = run_fast(args, found, prompts, seeds, progress)
    finally:
        close()
    if arrays is None:
        return None
    clock = time.perf_counter()
    images = [Image.fromarray(a) for a in arrays]
    source = Path(args.model).resolve() if args.model is not None and Path(args.model).is_file() else found[1]
    records = image_records(args, images, prompts, seeds, source, found[2], "onnx", {"runner": FAST_RUNNER})
    TIMINGS["png"] = time.perf_counter() - clock
    return images, records


def generate(args: argparse.Namespace, batch_prompts: list[str], seed: int, num_images: int, model: Optional[Path] = None):
    """Images and their metadata records for prompts x num_images, seeds from ``seed``."""
    from ldm.backends import resolve_backend
    from ldm.bundle import bundle_hash
    from ldm.pipeline import to_pil
    from ldm.runtime.runner import prepare

    given = model or args.model
    model = model_path(given)
    # a single file is recorded as itself (its cached bundle may be gone when the PNG is replayed)
    source = Path(given).resolve() if given is not None and Path(given).is_file() else model
    n = len(batch_prompts) * num_images
    est, free = check_request(args, model, n, grid=n > 1, fewer="fewer --num-images")
    pipe = load(args, model)
    progress, close = progress_bar(args.quiet, "generate")
    progress = with_estimate(progress, est, free)
    req = pipe.request(batch_prompts, args.negative, seed, num_images)
    clock = time.perf_counter()
    try:
        latents = pipe.generate_latents(req, steps=args.steps, method=args.method, eta=args.eta, sigmas=args.sigmas,
                                        guidance=args.guidance, height=args.height, width=args.width,
                                        batch_size=args.batch_size, progress=progress,
                                        guidance_method=args.guidance_method)
    finally:
        close()
    TIMINGS["sampling (with text encoding)"] = time.perf_counter() - clock
    clock = time.perf_counter()
    images = to_pil(pipe.decode(latents))
    TIMINGS["decoding"] = time.perf_counter() - clock
    if getattr(args, "runtime", "auto") == "auto" and getattr(args, "guidance_method", None) in (None, "cfg"):
        # what the torch-free runner needs to make this kind of request next time (graphs, coefficients)
        prepare(pipe, method=args.method, steps=args.steps, eta=args.eta, sigmas=args.sigmas)
    return images, image_records(args, images, req.prompts, req.seeds, source, bundle_hash(model),
                                 resolve_backend(args.backend, args.device, compile=getattr(args, "compile", False)))


def recorded_loras(args: argparse.Namespace, rec: dict) -> list[tuple["Lora", float]]:
    """The LoRAs to merge for --from-png: the record's files and scales, or those of --lora when given
    (a moved file); a file whose hash differs from the record's is warned about, as the model is."""
    recorded = rec["loras"]
    if not recorded and not args.lora:
        return []
    from ldm.lora import read_lora

    if args.lora:
        loras = args.loras
        if len(loras) != len(recorded):
            print(f"warning: --lora gives {len(loras)} LoRA(s); {args.from_png} was made with {len(recorded)}",
                  file=sys.stderr)
    else:
        loras = []
        for entry in recorded:
            path = Path(entry["file"])
            if not path.is_file():
                raise UsageError(f"the record in {args.from_png} names the LoRA file {path}, which does not exist; "
                                 f"give --lora FILE[:SCALE] for each recorded LoRA, in order")
            loras.append((read_lora(path), float(entry["scale"])))
    for (lora, _), entry in zip(loras, recorded):
        if lora.hash != entry["hash"]:
            print(f"warning: LoRA {lora.path} differs from the one that made {args.from_png} (hash {entry['hash']})",
                  file=sys.stderr)
    return loras


def regenerate(args: argparse.Namespace) -> int:
    """Remake the image recorded in --from-png, in the same batch it was made in, by the runner that made it."""
    from ldm.bundle import bundle_hash

    rec = read_record(args.from_png)
    model = model_path(args.model or Path(rec["model"]))
    if bundle_hash(model) != rec["model_hash"]:
        print(f"warning: model {model} differs from the one that made {args.from_png} (hash {rec['model_hash']})", file=sys.stderr)
    for key in ("steps", "method", "eta", "guidance", "height", "width", "batch_size", "backend"):
        setattr(args, key, rec[key])
    args.loras = recorded_loras(args, rec)
    if args.lora:
        rec = {**rec, "loras": lora_records(args.loras)}  # the remade image records the files it was made with
    args.negative = rec["negative_prompt"]
    args.sigmas = rec.get("sigmas")
    args.compile = bool(rec.get("compile", False))  # optional: records made before --compile lack it
    args.guidance_method = rec["guidance_method"]
    out = regenerate_path(args)
    n = len(rec["batch_prompts"])
    if rec.get("runner") == FAST_RUNNER:  # made without torch: remade the same way, where the runner can
        found = fast_runner(args, args.model or Path(rec["model"]))
        progress, close = progress_bar(args.quiet, "regenerate")
        try:
            arrays = run_fast(args, found, rec["batch_prompts"], rec["batch_seeds"], progress) if found else None
        finally:
            close()
        if arrays is not None:
            from PIL import Image

            return compare_saved(args, Image.fromarray(arrays[rec["batch_index"]]), out, rec)
        print(f"warning: {args.from_png} was made by the torch-free runner, which cannot remake it here; the torch "
              f"pipeline's image may differ from it by a few levels in a few pixels (docs: ldm.runtime.noise)",
              file=sys.stderr)
    from ldm.pipeline import GenerationRequest, to_pil

    est, free = check_request(args, model, n, grid=False, fewer="a PNG from a smaller batch",
                              origin=f"the record in {args.from_png}: ")
    pipe = load(args, model)
    req = GenerationRequest(rec["batch_prompts"], [args.negative] * n, rec["batch_seeds"])
    invariant = rec.get("batch_invariant", True) is not False  # ldm sweep's batched calls: remade batched
    progress, close = progress_bar(args.quiet, "regenerate")
    progress = with_estimate(progress, est, free)
    try:
        latents = pipe.generate_latents(req, steps=args.steps, method=args.method, eta=args.eta, sigmas=args.sigmas,
                                        guidance=args.guidance, guidance_method=args.guidance_method,
                                        height=args.height, width=args.width, batch_size=args.batch_size, progress=progress,
                                        batch_invariant=invariant)
    finally:
        close()
    i = rec["batch_index"]
    image = pipe.decode(latents[i : i + 1]) if invariant else pipe.decode(latents, batch_invariant=False)[i : i + 1]
    return compare_saved(args, to_pil(image)[0], out, rec)


def compare_saved(args: argparse.Namespace, image, out: Path, rec: dict) -> int:
    """Save the remade ``image`` with ``rec`` at ``out`` and say how it compares with --from-png."""
    import numpy as np
    from PIL import Image

    save_png(image, out, rec)
    with Image.open(args.from_png) as original:
        diff = np.abs(np.asarray(original.convert("RGB"), dtype=np.int16) - np.asarray(image, dtype=np.int16))
    print(f"{out}: {'bit-identical to' if diff.max() == 0 else f'max pixel difference {diff.max()} from'} {args.from_png}")
    return 0
