"""Typed configs of the latent diffusion trainer (``ldm train``) and of fine-tuning (``ldm finetune``).

Each section is a dataclass with commented fields; a YAML file sets any of them and ``key=value``
overrides on the command line set dotted keys (``optim.lr=3e-4``). Unknown keys and wrong types
are errors. The config a run used is saved beside its checkpoints and in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ldm.unet import UNetConfig
from train.run.sections import CheckpointConfig, EMAConfig, OptimConfig, RunConfig

DEFAULT_VALIDATION_PROMPTS = ["koala, twemoji style", "red apple, noto style"]


@dataclass
class EncodersConfig:
    """The frozen first stage and text encoder; used to build the cache and for validation images."""

    autoencoder: str = ""  # folder of the autoencoder (VQModel or AutoencoderKL; vae.load_autoencoder)
    text_encoder: str = ""  # folder holding text_encoder/ and tokenizer/ (conditioning.load_text_encoder)


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (``train.data.buckets``): each image goes to the bucket of nearest aspect ratio, about
    data.resolution^2 pixels, is resized to cover it and centre-cropped; every batch comes from one bucket."""

    # auto: on when the images fall in more than one bucket (mixed aspect ratios), else off (square crops); true; false.
    # ldm train: false; ldm finetune: auto
    enabled: Union[bool, Literal["auto"]] = False
    # the buckets as "WIDTHxHEIGHT" (e.g. ["512x768", "768x512", "512x512"]); empty = made from step/min_side/max_side
    sizes: list[str] = field(default_factory=list)
    step: int = 0  # bucket sides are multiples of this (px); 0 = the model's granularity (autoencoder factor x 2^downsamplings)
    min_side: int = 0  # shortest bucket side (px); 0 = data.resolution / 2
    max_side: int = 0  # longest bucket side (px); 0 = 2 x data.resolution

    def __post_init__(self):
        for name in ("step", "min_side", "max_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.buckets.{name}={getattr(self, name)} must be >= 0 (0 = the default)")
        if self.min_side and self.max_side and self.min_side > self.max_side:
            raise ValueError(f"data.buckets.min_side={self.min_side} is above data.buckets.max_side={self.max_side}")
        if self.sizes:
            from train.data.buckets import parse_size

            for size in self.sizes:
                parse_size(size)  # the format here; divisibility by the model's granularity where it is known


@dataclass
class DataConfig:
    """The captioned image data set."""

    # a folder or file of train.data.sources.FORMATS (imagefolder with metadata.jsonl, ...), or a stream
    # (train.data.streams): webdataset .tar shards (paths, {00000..00099}.tar patterns, URLs) or hf:NAME
    path: str = ""
    # images are resized (shorter side) and centre-cropped to this size, then encoded (with buckets: to a bucket
    # of about this size squared in pixels); 0 in fine-tuning = the model's own size (U-Net sample_size x the autoencoder's factor)
    resolution: int = 64
    caption_column: str = "text"  # metadata column holding the caption
    # share of images held out for the validation loss when the data has no split column ("test" rows are held out)
    holdout_fraction: float = 0.05
    # read images outside the data set's folder (absolute paths, "..", symlinks out of it); off, such rows are skipped
    allow_outside_paths: bool = False
    buckets: BucketConfig = field(default_factory=BucketConfig)  # aspect-ratio buckets for images of mixed shapes

    def __post_init__(self):
        if self.resolution != 0 and self.resolution < 8:
            raise ValueError(f"data.resolution={self.resolution} must be >= 8 (or 0 in fine-tuning: the model's size)")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"data.holdout_fraction={self.holdout_fraction} must be in [0, 1)")


@dataclass
class CacheConfig:
    """Latents and caption contexts, computed once with the frozen encoders and read by every step."""

    dir: str = "runs/cache"  # shared by runs; each (encoders, data, resolution) gets its own sub-folder
    batch_size: int = 64  # images per autoencoder call while building the cache
    context_dtype: Literal["float32", "float16", "bfloat16"] = "float16"  # storage type of the contexts
    shard_size: int = 10000  # data rows per cache shard: the unit a stopped build resumes from
    # what keys the cache to the data: each file's name, size and modification time (manifest), or every byte (content)
    verify: Literal["manifest", "content"] = "manifest"

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"cache.shard_size={self.shard_size} and cache.batch_size={self.batch_size} must be >= 1")


@dataclass
class ScheduleConfig:
    """The training noise schedule (written to the bundle's scheduler config)."""

    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012


@dataclass
class ObjectiveConfig:
    """What the U-Net learns to predict and how the per-sample losses are weighted."""

    # eps (noise) or v (Salimans & Ho 2022); null in fine-tuning = the base model's
    prediction: Optional[Literal["eps", "v"]] = "eps"
    # min-SNR-gamma weighting (Hang et al. 2023), 5.0 in the paper; null = plain MSE
    min_snr_gamma: Optional[float] = None
    noise_offset: float = 0.0  # add noise_offset * N(0, 1) per (sample, channel) to the noise (0.05-0.1 typical)
    p_uncond: float = 0.1  # caption dropout: probability of training on the empty prompt's context

    def __post_init__(self):
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"objective.min_snr_gamma={self.min_snr_gamma} must be > 0 or null")
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(f"objective.p_uncond={self.p_uncond} must be a probability in [0, 1]")
        if self.noise_offset < 0:
            raise ValueError(f"objective.noise_offset={self.noise_offset} must be >= 0")


@dataclass
class UNetRunConfig(RunConfig):
    """The loop (``train``): the shared settings plus what the U-Net's trainer adds."""

    output_dir: str = "runs/ldm"  # checkpoints/, logs/, samples/, bundle/
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # attention product (softmax(QK^T)V) in float32 under bf16 autocast (ldm.unet.FP32AttentionProcessor):
    # null = on a CPU only, where torch's bf16 attention kernels are slower than its float32 ones
    fp32_attention: Optional[bool] = None
    # non-finite losses in a row after which training stops (each such step is skipped and counted)
    max_consecutive_nonfinite: int = 10
    # run the U-Net's forward and backward through torch.compile (inductor): the first steps wait for the compile,
    # later ones run faster on a GPU (bench/gpu/run.sh measures it); checkpoints and the bundle are stored as eager's
    compile: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"train.max_consecutive_nonfinite={self.max_consecutive_nonfinite} must be >= 1")


@dataclass
class ValidationConfig:
    """Images for fixed prompts and seeds with the EMA weights, and the loss on the held-out split."""

    every: int = 500  # optimizer steps between validations (and one at the end); 0 = only at the end
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # every prompt is drawn with every seed
    steps: int = 25  # DDIM steps
    guidance: float = 4.0
    batch_size: int = 16  # images per sampler call
    heldout_batches: int = 8  # held-out batches per loss evaluation (fixed t and noise); 0 = all
    at_start: bool = False  # also validate before the first step (step 0): the starting weights' images and scores


@dataclass
class LoRAConfig:
    """Fine-tuning method: LoRA adapters on the U-Net's attention projections, or all weights."""

    method: Literal["lora", "full"] = "lora"
    # 4: at lr 1e-4 rank 8 lost 15.9 base_clip_score points in 700 steps, rank 4 lost 4.3, for a held-out loss
    # 0.0017 higher (FINETUNE_MEASUREMENTS in FinetuneOptimConfig); the adapter of the default model is half the size
    rank: int = 4
    alpha: float = 4.0  # the update is scaled by alpha / rank (1 at the defaults, as measured)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class TrainingSections:
    """The sections training and fine-tuning share."""

    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: UNetRunConfig = field(default_factory=UNetRunConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class LDMTrainConfig(TrainingSections):
    """``ldm train``: a U-Net from scratch on frozen encoders."""

    model: UNetConfig = field(default_factory=UNetConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class FinetuneBucketConfig(BucketConfig):
    """BucketConfig whose buckets are on when the images have mixed aspect ratios."""

    enabled: Union[bool, Literal["auto"]] = "auto"


@dataclass
class FinetuneDataConfig(DataConfig):
    """DataConfig whose resolution defaults to the model's own size and whose buckets are on for mixed shapes."""

    resolution: int = 0
    buckets: FinetuneBucketConfig = field(default_factory=FinetuneBucketConfig)


@dataclass
class FinetuneObjectiveConfig(ObjectiveConfig):
    """ObjectiveConfig whose prediction type defaults to the model's."""

    prediction: Optional[Literal["eps", "v"]] = None


@dataclass
class FinetuneRunConfig(UNetRunConfig):
    """The loop of a fine-tune: its own folder and length."""

    output_dir: str = "runs/finetune"  # checkpoints/, logs/, samples/, bundle/
    # Chosen from FINETUNE_MEASUREMENTS (below): the held-out loss gains little after ~400-500 steps of batch 16
    # (0.1655 at 300, 0.1646 at 500, 0.1632 at 700) while base_clip_score falls faster beyond 500 (-2.2 at 500,
    # -4.3 at 700)
    max_steps: int = 500
    batch_size: int = 16  # as the run; every measurement below used it
    log_every: int = 20


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """OptimConfig with a fine-tune's learning rate and a short warm-up."""

    # FINETUNE_MEASUREMENTS: fine-tunes of the packaged default model on 360 hue-rotated Twemoji images captioned
    # "<name>, inkmoji style" (a style and a word it has not seen), batch 16, 700 steps, validation every 100
    # (H200, fp32): base_clip_score of 12 of its training prompts (seed 0), from 64.9 at step 0, at step 700:
    #   lr 3e-4, warm-up 500, rank 8, text frozen (the run): 27.0 (collapse: every prompt the same blue shape)
    #   lr 3e-4, warm-up 500, rank 8, new_words 31.6 | lr 1e-4 rank 8 frozen 34.4 | lr 1e-4 rank 8 new_words 49.0
    #   lr 5e-5 rank 8 new_words 61.8 | lr 1e-4 rank 4 new_words 60.6 (62.7 at step 500)
    # and the held-out loss (style learnt) ended within 0.005 of each other (0.1596-0.1642). On this CPU (batch 8,
    # 150 steps, warm-up 10) the same order: lr 3e-4 frozen 65.0 -> 45.7, lr 3e-4 new_words 51.0, lr 1e-4 new_words 63.2.
    lr: float = 1e-4  # with lora.rank 4: the least forgetting for the held-out loss reached (above)
    # a short ramp: the trainer's 500 steps never reach the peak in a 500-step fine-tune (not swept separately)
    warmup_steps: int = 20


@dataclass
class FinetuneValidationConfig(ValidationConfig):
    """Validation of a fine-tune: the user's own held-out captions, and how well the base model's own prompts
    are still followed (their CLIP score with the bundle's CLIP, logged as base_clip_score)."""

    every: int = 100  # 5 validations in the default 500 steps, plus step 0
    # null = drawn from the data: up to 4 held-out captions (training captions when none is held out), then
    # the first 2 base prompts, to show forgetting beside learning
    prompts: Optional[list[str]] = None
    # prompts the base model was trained on, scored (CLIP score, the base bundle's CLIP) at every validation;
    # null = the base bundle's own validation prompts (its training_config.yaml), [] = none
    base_prompts: Optional[list[str]] = None
    base_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every base prompt with every seed
    at_start: bool = True  # step 0: the base model's images and scores, the baseline of every later validation


@dataclass
class TextTrainingConfig:
    """What of the text encoder a fine-tune trains. Frozen, the contexts come from the cache."""

    # frozen: nothing. new_words: only the token-table rows of the caption tokens the encoder does not know (a
    # packed bundle's table shares one row among every token its own captions lacked, so a new style word reads
    # as any other unknown word): each gets its own row, trained (textual inversion); nothing else of the
    # encoder changes, and with no unknown word this is frozen. full: every weight of the text tower.
    # new_words by default: it kept 14.6 more base_clip_score points than frozen at lr 1e-4 and 4.6 at lr 3e-4 after 700
    # steps, at an equal or lower held-out loss (FINETUNE_MEASUREMENTS in FinetuneOptimConfig)
    train: Literal["frozen", "new_words", "full"] = "new_words"
    # peak learning rate of those weights (AdamW without weight decay, under optim's schedule). Measured on the default
    # model and OpenMoji (docs/finetune-openmoji.md), 200 steps: how much the U-Net's prediction at t = 400 and 100
    # still differs between two prompts of the new style (content kept) was 0.070 before, 0.033 at 1e-3 (one picture
    # for every prompt: the learnt row drowns the content words), 0.059 at 1e-4, 0.062 at 3e-5, 0.066 frozen; for
    # the base style's prompts 0.069 before, 0.070 / 0.067 / 0.066 / 0.065. 1e-4 keeps content while still learning
    # the rows (the 700-step base_clip_score runs above used 1e-3).
    lr: float = 1e-4
    init_std: float = 0.02  # new_words: a new row starts as the shared row plus N(0, init_std^2) noise (open_clip's init)
    # optimizer steps the text weights train for, from the start; after them they stay as they are (lr 0) while the
    # U-Net goes on learning. 0 = every step. The longer learnt rows train, the more of the content words' context
    # they take over: the CLIP text tower is causal, so a new word's row moves every position after it, the padding
    # the U-Net attends to included. Measured (docs/finetune-openmoji.md, default model on OpenMoji, 500 steps,
    # held-out prompts): rows trained all 500 steps at 1e-4 drew one picture for every prompt (cross-prompt cosine
    # 0.56, real OpenMoji images 0.44; name top-1 0.20, base model 0.50); rows trained the first 100 steps kept the
    # prompts apart (0.41; name top-1 0.40) with the new style still reaching them (OpenMoji share 0.67, base 0.43).
    steps: int = 100

    def __post_init__(self):
        if not self.lr > 0 or self.init_std < 0:
            raise ValueError(f"text.lr={self.lr} must be > 0 and text.init_std={self.init_std} >= 0")
        if self.steps < 0:
            raise ValueError(f"text.steps={self.steps} must be >= 0 (0 = the text weights train every step)")


@dataclass
class PriorConfig:
    """Prior preservation (DreamBooth's class images, sd-scripts' reg_data_dir): a share of every batch comes from a
    second captioned data set in what the base model already draws (its own training images, or its own samples),
    and its loss is added with a weight, so the fine-tune keeps what those captions drew while it learns the new data."""

    data: str = ""  # imagefolder with metadata.jsonl, as data.path (its "test" rows are left out); "" = off
    share: float = 0.25  # of train.batch_size's rows, drawn from the prior set (at least 1); the rest from data.path
    weight: float = 1.0  # loss = mean loss of the data rows + weight x mean loss of the prior rows (diffusers' prior_loss_weight)

    def __post_init__(self):
        if not 0 < self.share < 1:
            raise ValueError(f"prior.share={self.share} must be in (0, 1): the share of each batch drawn from prior.data")
        if not self.weight >= 0:
            raise ValueError(f"prior.weight={self.weight} must be >= 0")


@dataclass
class FinetuneCheckpointConfig(CheckpointConfig):
    """CheckpointConfig at fine-tuning's scale: with 500 steps in all, one every 100 (as the validations), so a
    stopped fine-tune resumes from at most 100 steps back rather than from the start."""

    every: int = 100


@dataclass
class FinetuneCacheConfig(CacheConfig):
    """CacheConfig at fine-tuning's scale: a few hundred captions, so the contexts are kept in float32 (the half
    size saves little there) and equal the pipeline's bit for bit."""

    context_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclass
class FinetuneConfig(TrainingSections):
    """``ldm finetune``: a bundle's U-Net (its encoders and schedule come from the bundle)."""

    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    cache: FinetuneCacheConfig = field(default_factory=FinetuneCacheConfig)
    checkpoint: FinetuneCheckpointConfig = field(default_factory=FinetuneCheckpointConfig)
    objective: FinetuneObjectiveConfig = field(default_factory=FinetuneObjectiveConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)
    validation: FinetuneValidationConfig = field(default_factory=FinetuneValidationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    text: TextTrainingConfig = field(default_factory=TextTrainingConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
