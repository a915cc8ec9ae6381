"""Stable Diffusion single-file checkpoints: a tiny SD folder -> `ldm export-single-file` -> the file loads in
our pipeline (through its cached bundle) and in diffusers' from_single_file, giving the folder's images;
the configs derived from the file's shapes are the folder's; files of other kinds are one-line errors.

Images are compared bitwise: the file holds the folder's float32 tensors, renamed (and for SD 2 the q, k, v
projections concatenated, then split again), so the same computation runs on the same numbers.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conditioning.bpe import write_clip_tokenizer_files
from ldm.cli import main
from ldm.generate_cli import PNG_KEY
from ldm.single_file import (METADATA_KEY, config_differences, derive_configs, export_single_file, read_header,
                             single_file_state)
from ldm.testing import build_bundle, build_sd_folder

PROMPTS = ["a koala", "A small RED circle at the top-left!"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Every conversion of this module goes to a cache of its own ($LDM_CACHE), never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("LDM_CACHE", str(root))
        yield root


def build_sd2_folder(folder: Path) -> Path:
    """build_sd_folder made SD 2-style: OpenCLIP-like text encoder (gelu, 23 layers: diffusers' SD 2 text encoder
    keeps 23 of OpenCLIP's 24), tokenizer padding with "!", linear transformer projections, v-prediction."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = build_sd_folder(folder)
    torch.manual_seed(1)
    config = UNet2DConditionModel.load_config(folder / "unet")
    UNet2DConditionModel.from_config({**config, "use_linear_projection": True}).save_pretrained(folder / "unet")
    CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=23, num_attention_heads=2,
                                 hidden_act="gelu", max_position_embeddings=77, vocab_size=714)).save_pretrained(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")
    write_clip_tokenizer_files(folder / "tokenizer", num_merges=200, pad_token="!")
    DDIMScheduler.from_pretrained(folder / "scheduler", prediction_type="v_prediction").save_pretrained(folder / "scheduler")
    return folder


def build_sd_convention_folder(folder: Path) -> Path:
    """A small SD 1 folder whose every config value the shapes cannot give is Stable Diffusion's own (8 U-Net heads,
    32 groups, 64 channels per text head, scaling 0.18215, 512 px, CLIP's full vocabulary), so a file of it
    needs no metadata."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True)
    torch.manual_seed(2)
    UNet2DConditionModel(sample_size=256, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                         attention_head_dim=8).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, sample_size=512, scaling_factor=0.18215).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                                 max_position_embeddings=77)).save_pretrained(folder / "text_encoder")
    write_clip_tokenizer_files(folder / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  clip_sample=False).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(folder, file): a tiny SD 1 folder and the single file `ldm export-single-file` writes of it."""
    root = tmp_path_factory.mktemp("sd1")
    folder = build_sd_folder(root / "folder")
    out = root / "tiny.safetensors"
    assert main(["export-single-file", str(folder), "--out", str(out)]) == 0
    return folder, out


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    folder = build_sd2_folder(root / "folder")
    return folder, export_single_file(folder, root / "tiny-v.safetensors")


def our_images(model, **kw):
    from ldm.pipeline import Text2ImagePipeline

    pipe = Text2ImagePipeline.from_pretrained(model)
    return np.stack([np.asarray(im) for im in pipe(PROMPTS, steps=4, seed=3, guidance=5.0, **kw)])


def diffusers_images(pipe):
    return pipe(PROMPTS, num_inference_steps=3, height=32, width=32, guidance_scale=5.0, output_type="np",
                generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]).images


def test_our_pipeline_gives_the_folders_images_from_the_file(sd1):
    folder, file = sd1
    assert np.array_equal(our_images(file), our_images(folder))


def test_the_file_holds_the_original_layout(sd1):
    folder, file = sd1
    keys = set(load_file(str(file)))
    # the keys A1111 / ComfyUI / diffusers look for to tell an SD 1.x checkpoint
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
            "first_stage_model.decoder.mid.attn_1.q.weight", "first_stage_model.quant_conv.weight"} <= keys
    assert all(k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model") for k in keys)
    assert load_file(str(file))["first_stage_model.encoder.mid.attn_1.k.weight"].ndim == 4  # LDM's 1x1 convs


def test_diffusers_from_single_file_gives_diffusers_folder_images(sd1):
    from diffusers import StableDiffusionPipeline

    folder, file = sd1
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True, safety_checker=None)
    assert np.array_equal(diffusers_images(pipe), diffusers_images(ref))


def test_sd2_openclip_layout_and_v_prediction_round_trip(sd2):
    from diffusers import StableDiffusionPipeline

    folder, file = sd2
    header = read_header(file)
    assert header.version == "sd2" and "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in header.shapes
    assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" in header.shapes  # the 24th, unread layer
    assert derive_configs(header).scheduler["prediction_type"] == "v_prediction"
    assert np.array_equal(our_images(file), our_images(folder))
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True, safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert np.array_equal(diffusers_images(pipe), diffusers_images(ref))


@pytest.mark.parametrize("bias, prediction", [(-2.0, "v_prediction"), (0.5, "epsilon")])
def test_an_sd2_files_prediction_type_is_asked_of_its_u_net(bias, prediction, tmp_path):
    """SD 2's v-models (768 px) and eps-models (512-px base) have the same shapes, and a safetensors file does not say
    which it is (diffusers' from_single_file then takes v, wrongly for the base models). Without our metadata's
    answer, the conversion asks the U-Net as A1111 does: on 0.5 everywhere at t = 999, a mean of output minus input
    below -1 is a v-model. Here the U-Net's last convolution returns a constant, once far below the input, once
    equal to it."""
    from ldm.single_file import cached_bundle

    folder = build_sd2_folder(tmp_path / "folder")
    state, meta = single_file_state(folder)
    state["model.diffusion_model.out.2.weight"] = torch.zeros_like(state["model.diffusion_model.out.2.weight"])
    state["model.diffusion_model.out.2.bias"] = torch.full_like(state["model.diffusion_model.out.2.bias"], bias)
    del meta["scheduler"]["prediction_type"]  # as a file from another tool: the rest keeps the tiny model's shapes
    file = tmp_path / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={METADATA_KEY: json.dumps(meta)})
    assert not derive_configs(read_header(file)).prediction_given
    bundle = cached_bundle(file)
    assert json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction


def _parts(folder):
    from ldm.bundle import load_parts

    parts = load_parts(folder)
    return parts.unet, parts.autoencoder.model, parts.text_encoder, (parts.schedule, parts.sampling)


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_derived_configs_are_the_folders(which, request):
    folder, file = request.getfixturevalue(which)
    configs = derive_configs(read_header(file))
    unet, vae, text, schedule = _parts(folder)
    assert config_differences(configs, unet, vae, text, schedule) == []
    # the fields read off the shapes alone, spelled out
    assert configs.unet["block_out_channels"] == [8, 16] and configs.unet["cross_attention_dim"] == 16
    assert configs.unet["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert configs.unet["use_linear_projection"] == (which == "sd2")
    assert configs.vae["block_out_channels"] == [8, 16, 16] and configs.vae["latent_channels"] == 4
    assert configs.text_encoder["num_hidden_layers"] == (23 if which == "sd2" else 1)
    assert configs.num_merges == 200 and configs.pad_token == ("!" if which == "sd2" else "<|endoftext|>")


def test_without_metadata_stable_diffusions_own_values_are_used(tmp_path):
    """A file with no metadata (as A1111 and ComfyUI write) is read with SD's conventions: exact for a model that
    follows them; a tiny model that does not (4 heads, 4 groups) is told apart by its differences."""
    folder = build_sd_convention_folder(tmp_path / "folder")
    state, _ = single_file_state(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    header = read_header(tmp_path / "plain.safetensors")
    assert header.metadata.get(METADATA_KEY) is None
    assert config_differences(derive_configs(header), *_parts(folder)) == []
    assert np.array_equal(our_images(tmp_path / "plain.safetensors", height=64, width=64),
                          our_images(folder, height=64, width=64))

    tiny = build_sd_folder(tmp_path / "tiny")
    state, _ = single_file_state(tiny)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "tiny.safetensors"))
    differences = config_differences(derive_configs(read_header(tmp_path / "tiny.safetensors")), *_parts(tiny))
    assert {d.split(":")[0] for d in differences} >= {"unet.attention_head_dim", "unet.norm_num_groups",
                                                       "vae.norm_num_groups", "vae.scaling_factor"}


def test_the_tokenizer_is_clips(tmp_path):
    """The tokenizer a full-vocabulary file gets tokenizes as open_clip's (OpenAI's) SimpleTokenizer, the
    reference implementation; SD 1 pads with <|endoftext|>, SD 2 with "!" (id 0), as open_clip pads with 0."""
    import open_clip
    from transformers import CLIPTokenizer

    from ldm.single_file import cached_bundle

    folder = build_sd_convention_folder(tmp_path / "folder")
    export_single_file(folder, tmp_path / "full.safetensors")
    tok = CLIPTokenizer.from_pretrained(cached_bundle(tmp_path / "full.safetensors") / "tokenizer")
    prompts = ["koala, twemoji style", "A photo of an astronaut riding a horse on Mars, 4k, (masterpiece:1.2)",
               "caf\u00e9 na\u00efve \u00fcber  multiple   spaces\tand\ttabs", "emoji \U0001F600 and CJK \u732b", "123 4.5 6,789 #tag @user",
               "don't can't it's", ""]
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref = open_clip.tokenize(prompts)
    for a, b in zip(ours, ref):
        n = int(b.argmax()) + 1  # up to <|endoftext|> (the largest id); after it, open_clip pads with 0
        assert torch.equal(a[:n], b[:n]) and (a[n:] == tok.pad_token_id).all()
    assert len(tok) == 49408 and tok.pad_token == "<|endoftext|>" and tok.model_max_length == 77


def test_a_file_is_converted_once_and_cached_by_its_content(sd1, sd2, tmp_path, cache, capsys):
    from ldm.single_file import cached_bundle

    first = cached_bundle(sd1[1])
    capsys.readouterr()
    copy = tmp_path / "renamed.safetensors"
    shutil.copy(sd1[1], copy)
    assert cached_bundle(copy) == first and first.parent.parent == cache  # the same content: the same bundle
    assert "converting" not in capsys.readouterr().err
    shutil.copy(sd2[1], copy)  # new content under a path already hashed: a new hash, another bundle
    assert cached_bundle(copy) == cached_bundle(sd2[1]) != first


def test_generate_and_export_cli_take_single_files(sd1, tmp_path, capsys):
    folder, file = sd1
    common = ["a koala", "--steps", "3", "--quiet", "--backend", "torch"]
    assert main(["generate", *common, "--model", str(file), "--out", str(tmp_path / "file.png")]) == 0
    assert main(["generate", *common, "--model", str(folder), "--out", str(tmp_path / "folder.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "file.png")), np.asarray(Image.open(tmp_path / "folder.png")))
    assert json.loads(Image.open(tmp_path / "file.png").text[PNG_KEY])["model"] == str(file.resolve())  # not the cache
    shutil.rmtree(cache_dir := tmp_path / "empty-cache", ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:  # the cached bundle gone: the replay converts the file again
        mp.setenv("LDM_CACHE", str(cache_dir))
        capsys.readouterr()
        assert main(["generate", "--from-png", str(tmp_path / "file.png"), "--out", str(tmp_path / "re.png"), "--quiet"]) == 0
        assert "bit-identical" in capsys.readouterr().out
    again = tmp_path / "again.safetensors"
    assert main(["export-single-file", str(file), "--out", str(again), "--half"]) == 0  # a file's bundle, in fp16
    assert all(v.dtype == torch.float16 for v in load_file(str(again)).values())
    from ldm.pipeline import Text2ImagePipeline

    half = Text2ImagePipeline.from_pretrained(again)  # float16 weights load into the float32 models
    assert all(p.dtype == torch.float32 for p in half.unet.parameters()) and half("a koala", steps=2)[0].size == (32, 32)
    assert main(["export-single-file", str(folder), "--out", str(again)]) == 0  # ours: replaced
    capsys.readouterr()


def _write(path, tensors, metadata=None):
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("kind, words", [
    ("lora", "is a LoRA file"),
    ("random", "has no model.diffusion_model.* and no first_stage_model.*"),
    ("truncated", "truncated or corrupt"),
    ("ckpt", "not a .safetensors file"),
    ("sdxl", "SDXL"),
    ("unet only", "has no first_stage_model.* and no cond_stage_model"),
    ("bad metadata", "metadata"),
])
def test_a_file_of_another_kind_is_a_one_line_error(kind, words, sd1, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    if kind == "lora":
        _write(path, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (8, 4),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()})
    elif kind == "random":
        _write(path, {"weight": (3, 3), "bias": (3,)})
    elif kind == "truncated":
        path.write_bytes(sd1[1].read_bytes()[:5000])
    elif kind == "ckpt":
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"\x80\x02}q\x00.")
    elif kind == "sdxl":
        _write(path, {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                      "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768)})
    elif kind == "unet only":
        _write(path, {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)})
    else:
        tensors = load_file(str(sd1[1]))
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps({"unet": {"norm_num_groups": "four"}})})
    assert main(["generate", "a koala", "--model", str(path), "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert kind in ("truncated", "bad metadata") or "a Stable Diffusion 1.x/2.x single file" in err  # what is expected


@pytest.mark.parametrize("what, words", [("vq", "KL autoencoder"), ("open_clip", "CLIPTextModel")])
def test_export_of_a_bundle_it_cannot_express_is_a_one_line_error(what, words, tmp_path, capsys):
    bundle = build_bundle(tmp_path / "ours")  # a VQ autoencoder and an open_clip text encoder
    if what == "open_clip":  # give it a KL autoencoder: then the text encoder is what stops it
        from ldm.testing import kl_autoencoder

        shutil.rmtree(bundle / "vae")
        kl_autoencoder().save_pretrained(bundle / "vae")
    assert main(["export-single-file", str(bundle), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and not (tmp_path / "x.safetensors").exists()
    assert os.listdir(tmp_path) == ["ours"]  # no temporary file left beside --out


def test_finetune_takes_a_single_file_as_generate_does(sd1, tmp_path, monkeypatch):
    from ldm.single_file import cached_bundle
    from train.unet import finetune

    seen = []
    monkeypatch.setattr(finetune, "finetune", lambda model, config, resume=None: seen.append(model) or _Done())
    assert main(["finetune", "--model", str(sd1[1]), "--data", str(tmp_path / "data"),
                 f"train.output_dir={tmp_path / 'run'}"]) == 0
    assert seen == [cached_bundle(sd1[1])]


class _Done:
    bundle = None
