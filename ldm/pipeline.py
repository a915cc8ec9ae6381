"""Text-to-image: prompt -> contexts -> guided sampling in latent space -> decoded images.

    pipe = Text2ImagePipeline.from_pretrained("path/to/bundle")
    images = pipe("a koala", steps=50, method="ddim", guidance=7.5, seed=0, num_images=4)

Image i of a call (counting prompts, then images per prompt) is made from seed + i alone: its
starting noise and the noise of its stochastic sampler steps come from its own generator, its prompts
are encoded alone, the U-Net sees it alone (one call on its [uncond, cond] pair) and it is decoded
alone, so ``pipe(p, seed=s + i, num_images=1)`` makes that image again, bit for bit, whatever the batch
size: a batch's composition never changes how a row's numbers are blocked in a kernel. The sampler's
arithmetic is ``ldm.runtime.steps.apply_step`` on every backend (and in the torch-free runner).

The U-Net and the decoder run through the pipeline's backend (``ldm.backends``: torch, or ONNX
Runtime), an object the pipeline is given when it is built.

LoRA files (``ldm.lora``: ours or kohya's) are merged into the U-Net's weights (and the text encoder's, for
LoRAs that carry text-encoder updates) when the pipeline is built, W + sum_i scale_i (alpha_i / r_i) B_i A_i,
so every backend runs the merged weights as a plain U-Net:

    pipe = Text2ImagePipeline.from_pretrained("path/to/bundle", loras=[("style.safetensors", 0.8)])
    styled = pipe.with_loras([("other.safetensors", 0.5)])   # a copy of the U-Net; ``pipe`` is unchanged
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from PIL import Image

from ldm.backends import Backend, TorchBackend, make_backend
from ldm.bundle import Geometry, load_parts
from ldm.guidance import GuidanceMethod, make_guidance, parse_guidance_method
from ldm.runtime.images import image_grid  # noqa: F401  (re-exported)
from ldm.runtime.steps import apply_step
from ldm.samplers import check_method, randn
from ldm.schedule import NoiseSchedule, SamplingConfig, inference_timesteps

Prompts = Union[str, Sequence[str]]
# progress(done_steps, total_steps) after every sampler step of every batch
Progress = Callable[[int, int], None]


@dataclass
class GenerationRequest:
    """One call's images: prompt i of ``prompts`` goes with ``negatives[i]`` and ``seeds[i]``."""

    prompts: list[str]
    negatives: list[Optional[str]]
    seeds: list[int]


def _as_prompt_list(prompt: Prompts, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if prompts is None or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError(f"{name} is an empty list; give at least one prompt")
    return prompts


def check_sampling(num_train_timesteps: int, sampling: SamplingConfig, *, steps: int, method: str, eta: float,
                   guidance: float, batch_size: int, sigmas: Optional[str] = None) -> None:
    """Raise ValueError for sampler options that a model trained on ``num_train_timesteps`` cannot run;
    needs no model, so a command checks them before loading one."""
    check_method(method, eta, sigmas)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    inference_timesteps(num_train_timesteps, steps, sampling.timestep_spacing, sampling.steps_offset)  # 1..T steps
    for name, value in (("eta", eta), ("guidance", guidance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name}={value!r} must be a finite number >= 0"
                             + (" (1 disables guidance)" if name == "guidance" else ""))


def image_size(height: Optional[int], width: Optional[int], *, factor: int, granularity: int,
               sample_size: int) -> tuple[int, int]:
    """(height, width) in pixels: the model's own size where None; each must be a positive multiple of
    ``granularity`` (the autoencoder's factor times the U-Net's downsampling), else a ValueError says so."""
    sizes = []
    for name, v in (("height", height), ("width", width)):
        v = sample_size * factor if v is None else v
        if isinstance(v, bool) or not isinstance(v, int) or v < granularity or v % granularity:
            g = f"the autoencoder's factor {factor}"
            if granularity != factor:
                g += f" times the U-Net's downsampling {granularity // factor}, i.e. of {granularity}"
            near = max(granularity, round(v / granularity) * granularity) if isinstance(v, (int, float)) else sample_size * factor
            raise ValueError(f"{name}={v!r} must be a positive multiple of {g} (e.g. {near})")
        sizes.append(v)
    return sizes[0], sizes[1]


@dataclass
class MemoryEstimate:
    """Bytes a generation needs at its peak (float32): ``model`` (the weights) and ``batch`` (the larger of
    one batch's U-Net activations, on [uncond, cond], and its decoder activations), on the pipeline's
    device, and ``images`` (every image's latents, decoded tensor, pixels, and the grid), held to the end."""

    model: int
    batch: int
    images: int

    @property
    def total(self) -> int:
        return self.model + self.batch + self.images


def memory_estimate(g: Geometry, *, num_images: int, batch_size: int, height: int, width: int,
                    grid: bool = False) -> MemoryEstimate:
    """What ``num_images`` images of ``height`` x ``width``, made ``batch_size`` at a time, need (see
    ``MemoryEstimate``). Calibrated on the CPU against the peak RSS of the shipped and tiny models at 64 to
    1024 px (within about 40% from 256 px up): activations of the widest layers dominate a batch, the images a long run."""
    b = min(batch_size, num_images)
    h, w = height // g.factor, width // g.factor
    # U-Net: each resolution's skip activations (layers + 1 of them) plus a few working tensors at the finest
    levels = [c * h * w / 4 ** i for i, c in enumerate(g.unet_channels)]
    unet = 2 * b * 4 * ((g.layers_per_block + 1) * sum(levels) + 4 * levels[0])
    # decoder: about six tensors at its widest layer (each level's channels at the resolution it upsamples to)
    rev, n = g.vae_channels[::-1], len(g.vae_channels)
    widest = max(c * height * width / 4 ** max(n - 2 - j, 0) for j, c in enumerate(rev))
    decoder = b * 4 * 6 * widest
    pixels = height * width * 3
    per_image = 4 * g.latent_channels * h * w + 4 * pixels + 2 * pixels  # latents, float images, uint8 + PIL
    grid_bytes = pixels * 8 * -(-num_images // 8) if grid and num_images > 1 else 0
    return MemoryEstimate(g.weights_bytes, int(max(unet, decoder)), int(num_images * per_image + grid_bytes))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (rounded as diffusers' ``numpy_to_pil`` does)."""
    arr = ((images.float().clamp(-1, 1) / 2 + 0.5) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


class Text2ImagePipeline:
    """A U-Net, an autoencoder, a text encoder and a noise schedule, put together for sampling.

    Args:
        unet: a conditional denoiser; ``unet(x_t, t, encoder_hidden_states=context).sample``
            (diffusers' ``UNet2DConditionModel``).
        autoencoder: ``decode(latents) -> images`` in [-1, 1], ``downsample_factor``, ``latent_channels``
            (``vae.Autoencoder``).
        text_encoder: ``text_encoder(prompts) -> (context, pooled)`` and ``empty_context(batch)``
            (``conditioning.TextEncoder``).
        schedule: the training noise schedule.
        sampling: prediction type and timestep conventions of the model.
        sample_size: the latent size the U-Net was trained at (default height = width = sample_size * f).
        backend: what runs the U-Net and the decoder (``ldm.backends``); default ``TorchBackend(unet, autoencoder)``.
            The pipeline calls only the backend for them; ``unet`` and ``autoencoder`` stay the torch
            modules (moved by ``to``, read for sizes and for export).
        loras: the LoRA files merged into ``unet`` and their scales, in order (``from_pretrained``, ``with_loras``).
    """

    def __init__(
        self,
        unet,
        autoencoder,
        text_encoder,
        schedule: NoiseSchedule,
        sampling: SamplingConfig = SamplingConfig(),
        *,
        sample_size: int = 8,
        backend: Optional[Backend] = None,
        name_or_path: Optional[str] = None,
        loras: Sequence[tuple[Path, float]] = (),
    ):
        self.unet = unet
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.schedule = schedule
        self.sampling = sampling
        self.sample_size = sample_size
        self.backend = backend if backend is not None else TorchBackend(unet, autoencoder)
        self.name_or_path = name_or_path
        self.loras = list(loras)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, backend: str = "torch",
                        loras: Optional[Iterable] = None, compile: bool = False) -> "Text2ImagePipeline":
        """Load our bundle or a Stable Diffusion 1.x/2.x folder in diffusers layout (see ``ldm.bundle``).
        A Stable Diffusion 1.x/2.x single .safetensors file loads through the bundle it is converted into, once
        (``ldm.single_file``). ``backend``: torch, onnx (fp32, CPU) or auto (onnx where it applies); see ``ldm.backends``.
        ``loras``: ``[(file, scale) or file, ...]``, LoRA files (ours or kohya's, ``ldm.lora``) merged into the
        U-Net in that order; the files are read and checked before the model loads. ``compile``: the torch
        backend calls the U-Net through ``torch.compile`` (``ldm.backends.TorchBackend``)."""
        from ldm.lora import merge_loras, read_loras

        read = read_loras(loras)
        if os.path.isfile(path):
            from ldm.single_file import cached_bundle

            path = cached_bundle(path)
        parts = load_parts(path)
        merge_loras(parts.unet, read, parts.text_encoder)
        runner = make_backend(backend, parts.unet, parts.autoencoder, parts.text_encoder, bundle=str(parts.root),
                              device=device, dtype=dtype, variant="lora" if read else None, compile=compile)
        pipe = cls(parts.unet, parts.autoencoder, parts.text_encoder, parts.schedule, parts.sampling,
                   sample_size=parts.sample_size, backend=runner, name_or_path=str(parts.root),
                   loras=[(lora.path, scale) for lora, scale in read])
        return pipe.to(device or "cpu", dtype or torch.float32)

    def with_backend(self, backend: Backend) -> "Text2ImagePipeline":
        """A pipeline over the same parts that runs the U-Net and the decoder through ``backend``."""
        pipe = type(self)(self.unet, self.autoencoder, self.text_encoder, self.schedule, self.sampling,
                          sample_size=self.sample_size, backend=backend, name_or_path=self.name_or_path,
                          loras=self.loras)
        pipe.device, pipe.dtype = self.device, self.dtype
        return pipe

    def with_loras(self, loras: Iterable) -> "Text2ImagePipeline":
        """A pipeline whose U-Net is a copy of this one's with ``loras`` (``[(file, scale) or file, ...]``) merged
        in, after any merged already; its backend is of the same kind (an ONNX one exports the merged
        weights' graphs apart from the bundle's). This pipeline is unchanged."""
        from ldm.lora import merge_loras, read_loras

        read = read_loras(loras)
        text_encoder = copy.deepcopy(self.text_encoder) if any(lora.text_modules for lora, _ in read) else self.text_encoder
        unet = merge_loras(copy.deepcopy(self.unet), read, text_encoder)
        if self.backend.name == "torch":
            runner = TorchBackend(unet, self.autoencoder, compile=getattr(self.backend, "compiled", None) is not None)
        else:
            runner = make_backend(self.backend.name, unet, self.autoencoder, text_encoder, bundle=self.name_or_path,
                                  device=self.device, dtype=self.dtype, variant="lora")
        pipe = type(self)(unet, self.autoencoder, text_encoder, self.schedule, self.sampling,
                          sample_size=self.sample_size, backend=runner, name_or_path=self.name_or_path,
                          loras=[*self.loras, *((lora.path, scale) for lora, scale in read)])
        pipe.device, pipe.dtype = self.device, self.dtype
        return pipe

    def to(self, device=None, dtype=None) -> "Text2ImagePipeline":
        """Move every part to ``device``; ``dtype`` applies to the U-Net (the sampler stays float32)."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for part in (self.unet, self.autoencoder, self.text_encoder):
            if isinstance(part, torch.nn.Module):
                part.to(device=self.device)
        if isinstance(self.unet, torch.nn.Module) and next(self.unet.parameters()).dtype != self.dtype:
            self.unet.to(dtype=self.dtype)
        return self

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    # -- sampling --------------------------------------------------------------------------

    def model(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The conditional denoiser the sampler drives: (B, C, h, w), (B,), (B, L, D) -> (B, C, h, w) float32."""
        return self.backend.unet(x_t.to(self.dtype), t, context.to(self.dtype)).float()

    def request(self, prompt: Prompts, negative_prompt: Optional[Prompts], seed: int, num_images: int) -> GenerationRequest:
        """Expand prompts x images into one row per image with its negative prompt and seed."""
        prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negatives: list[Optional[str]] = [None] * len(prompts)
        else:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give 1 or {len(prompts)}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images={num_images!r} must be an integer >= 1")
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        rows = [(p, n) for p, n in zip(prompts, negatives) for _ in range(num_images)]
        return GenerationRequest([p for p, _ in rows], [n for _, n in rows], [seed + i for i in range(len(rows))])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Contexts (B, L, D), each distinct prompt encoded alone (its row is the same in any batch)."""
        alone = {p: self.text_encoder([p])[0] for p in dict.fromkeys(prompts)}  # prompt -> (1, L, D)
        return torch.cat([alone[p] for p in prompts])

    def _contexts(self, prompts: list[str], negatives: list[Optional[str]], guidance: float):
        """(cond, uncond) contexts (B, L, D); with guidance 1 the unconditional one is never used."""
        cond = self._encode(prompts)  # (B, L, D)
        if all(w == 1 for w in (guidance if isinstance(guidance, list) else [guidance])):
            uncond = cond
        elif all(n is None for n in negatives):
            uncond = self.text_encoder.empty_context(len(prompts))  # the one empty prompt of conditioning
        else:
            uncond = self._encode([n if n is not None else "" for n in negatives])
        return cond.to(self.device), uncond.to(self.device)

    @property
    def granularity(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor times the U-Net's downsampling."""
        channels = getattr(getattr(self.unet, "config", None), "block_out_channels", (0,))
        return self.downsample_factor * 2 ** (len(channels) - 1)

    def latent_shape(self, height: Optional[int], width: Optional[int]) -> tuple[int, int, int]:
        f = self.downsample_factor
        height, width = image_size(height, width, factor=f, granularity=self.granularity, sample_size=self.sample_size)
        return self.autoencoder.latent_channels, height // f, width // f

    @torch.no_grad()
    def generate_latents(
        self,
        req: GenerationRequest,
        *,
        steps: int = 50,
        method: str = "ddim",
        eta: float = 0.0,
        guidance: Union[float, Sequence[float]] = 7.5,
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: int = 8,
        variance: str = "fixed_small",
        progress: Optional[Progress] = None,
        sigmas: Optional[str] = None,
        guidance_method: Union[str, GuidanceMethod, None] = "cfg",
        batch_invariant: bool = True,
    ) -> torch.Tensor:
        """Latents z0 (N, C, h, w) for every row of ``req``, sampled ``batch_size`` rows at a time. ``guidance``: one
        weight, or one per row of ``req`` (a sweep batching cells of several weights). ``batch_invariant=False``
        makes one U-Net call per step on the whole batch ([uncond x B, cond x B]) instead of one per image:
        faster (1.3x to 2.6x on a CPU), but a row's rounding then depends on the batch's size (``ldm sweep``,
        whose batches are fixed by its request, uses it)."""
        guidance_method = parse_guidance_method(guidance_method)
        per_row = not isinstance(guidance, (int, float))
        weights = list(guidance) if per_row else [guidance] * len(req.prompts)
        if len(weights) != len(req.prompts):
            raise ValueError(f"got {len(weights)} guidance weights for {len(req.prompts)} rows; give one or one per row")
        for w in dict.fromkeys(weights):
            check_sampling(self.schedule.T, self.sampling, steps=steps, method=method, eta=eta, guidance=w,
                           batch_size=batch_size, sigmas=sigmas)
        rows = self.step_rows(method=method, steps=steps, eta=eta, variance=variance, sigmas=sigmas)
        shape = self.latent_shape(height, width)
        n = len(req.prompts)
        done, total = 0, steps * -(-n // batch_size)
        out = []
        for start in range(0, n, batch_size):
            batch = slice(start, start + batch_size)
            w = weights[batch] if per_row else guidance
            cond, uncond = self._contexts(req.prompts[batch], req.negatives[batch], w)
            generators = [torch.Generator().manual_seed(s) for s in req.seeds[batch]]
            x = randn((len(generators), *shape), generators, torch.float32, self.device)  # x_T (B, C, h, w)
            # one guided U-Net call per image, on its [uncond, cond] pair; one guide per image and run (APG's
            # momentum is per run)
            if batch_invariant:
                guides = [make_guidance(guidance_method, self.model, cond[i : i + 1], uncond[i : i + 1],
                                        weights[start + i], schedule=self.schedule, prediction=self.sampling.prediction)
                          for i in range(len(generators))]
            else:  # one guide over the batch, each row with its own w
                guides = [make_guidance(guidance_method, self.model, cond, uncond, w, schedule=self.schedule,
                                        prediction=self.sampling.prediction)]
            x0_prev = None
            for i, row in enumerate(rows):
                t = torch.full((1 if batch_invariant else len(generators),), row[0], device=self.device,
                               dtype=torch.long if isinstance(row[0], int) else torch.float32)  # (1,) or (B,)
                if batch_invariant:
                    output = torch.cat([guide(x[j : j + 1], t) for j, guide in enumerate(guides)])  # (B, C, h, w)
                else:
                    output = guides[0](x, t)  # (B, C, h, w)
                noise = randn(x.shape, generators, x.dtype, x.device) if row[1] else None
                x, x0_prev = apply_step(row, x, output, noise, x0_prev, self.sampling.clip_x0, torch.clamp)
                if progress is not None:
                    progress(done + i + 1, total)
            out.append(x)
            done += steps
        return torch.cat(out)

    def step_rows(self, *, method: str, steps: int, eta: float = 0.0, variance: str = "fixed_small",
                  sigmas: Optional[str] = None) -> list[list]:
        """The sampler's per-step coefficients for this model's schedule and conventions
        (``ldm.web.coefficients.step_rows``), which ``ldm.runtime.steps.apply_step`` applies."""
        from ldm.web.coefficients import step_rows

        return step_rows(self.schedule, method=method, steps=steps, eta=eta, prediction=self.sampling.prediction,
                         timestep_spacing=self.sampling.timestep_spacing, steps_offset=self.sampling.steps_offset,
                         variance=variance, sigmas=sigmas)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, batch_invariant: bool = True) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], float32; each image decoded alone, or with
        ``batch_invariant=False`` all in one call."""
        if not batch_invariant:
            return self.backend.decode(latents).float().clamp(-1, 1)
        return torch.cat([self.backend.decode(latents[i : i + 1]).float().clamp(-1, 1) for i in range(len(latents))])

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompts,
        negative_prompt: Optional[Prompts] = None,
        *,
        steps: int = 50,
        method: str = "ddim",
        eta: float = 0.0,
        guidance: float = 7.5,
        seed: int = 0,
        num_images: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: int = 8,
        variance: str = "fixed_small",
        progress: Optional[Progress] = None,
        output: str = "pil",
        sigmas: Optional[str] = None,
        guidance_method: Union[str, GuidanceMethod, None] = "cfg",
    ):
        """Images for each prompt (``num_images`` each), as PIL images (``output="pil"``) or a
        tensor (B, 3, H, W) in [-1, 1] (``output="tensor"``). Arguments as in ``ldm.samplers.sample``
        (``method`` ddim, ddpm, dpmpp-2m, euler or euler-a; ``sigmas`` None or "karras");
        ``guidance`` is the classifier-free guidance weight w (1 = off, 0 = unconditional); ``guidance_method``
        how it is applied, a spec or ``GuidanceMethod`` (``ldm.guidance``: cfg, rescale:PHI, interval:LO-HI, apg)."""
        if output not in ("pil", "tensor"):
            raise ValueError(f"output={output!r}; allowed: pil, tensor")
        req = self.request(prompt, negative_prompt, seed, num_images)
        latents = self.generate_latents(
            req, steps=steps, method=method, eta=eta, guidance=guidance, height=height, width=width,
            batch_size=batch_size, variance=variance, progress=progress, sigmas=sigmas, guidance_method=guidance_method,
        )
        images = self.decode(latents)  # (B, 3, H, W)
        return to_pil(images) if output == "pil" else images
