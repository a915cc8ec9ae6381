"""LoRA files that open in other tools: a fine-tune's LoRA (diffusers' layout) loads with diffusers'
StableDiffusionPipeline.load_lora_weights and gives our images; `ldm export-lora` writes kohya's layout,
which diffusers' kohya loader reads back to the same images; several LoRAs with scales agree with
diffusers' set_adapters; the ONNX backend runs the merged weights from graphs of its own; a LoRA for
another base or a file that is no LoRA is a one-line error; a LoRA fine-tune of a packed bundle keeps the
base as packed; bundles that kept their LoRA in unet_lora/ still load.

Tolerances: diffusers runs a LoRA unmerged, base(x) + s B(A x), we run it merged, (W + s B A) x; both are
float32, so they differ by rounding (~1e-7 relative per product), carried through 5 DDIM steps and the
decoder. 1e-4 on images in [0, 1] is what test_bundle uses for the same two pipelines without a LoRA;
the LoRAs here move the images by more than 1e-2, so the comparison cannot pass by accident.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.bundle import load_parts, save_bundle
from ldm.cli import main
from ldm.lora import (LORA_FILE, AdapterBase, LoraError, file_hash, find_lora_file, merge_loras, parse_lora_spec, read_lora,
                      save_lora)
from ldm.pipeline import Text2ImagePipeline
from ldm.testing import build_bundle, build_sd_folder, unet as tiny_unet
from train.unet.config import LoRAConfig
from train.unet.finetune import add_lora
from train_fakes import make_imagefolder, one_thread, reset_accelerate  # noqa: F401  (one_thread: autouse)

PROMPTS = ["a koala wearing a hat", "a red apple"]
TOL = dict(rtol=1e-4, atol=1e-4)  # see the module docstring


def with_random_lora(unet, *, rank, alpha, seed, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """``unet`` with a peft adapter added as ``ldm finetune`` adds it (train.unet.finetune.add_lora), its A and B
    drawn at random (B = 0 after init would make it the base model)."""
    add_lora(unet, LoRAConfig(rank=rank, alpha=alpha, target_modules=list(targets)), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return unet


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", "tiny")


@pytest.fixture(scope="module")
def lora_bundle(sd_folder, tmp_path_factory):
    """A fine-tuned bundle of the SD folder, saved as the trainer saves one (save_bundle with unet_lora and base)."""
    parts = load_parts(sd_folder)
    adapted = with_random_lora(parts.unet, rank=4, alpha=8.0, seed=1)  # alpha / r = 2
    return save_bundle(tmp_path_factory.mktemp("ft") / "bundle", unet=AdapterBase(adapted), unet_lora=adapted,
                       autoencoder=parts.autoencoder, text_encoder=parts.text_encoder, schedule=parts.schedule,
                       sampling=parts.sampling, base=sd_folder)


@pytest.fixture(scope="module")
def second_lora(sd_folder, tmp_path_factory):
    """Another LoRA file in diffusers' layout: rank 2, alpha 1, also on the cross-attention's proj_in/out."""
    adapted = with_random_lora(load_parts(sd_folder).unet, rank=2, alpha=1.0, seed=2,
                               targets=("to_q", "to_v", "proj_in", "proj_out"))
    folder = tmp_path_factory.mktemp("lora2")
    return save_lora(folder, adapted)


def diffusers_pipe(sd_folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    out = pipe(PROMPTS, num_inference_steps=5, guidance_scale=7.5, generator=gens, output_type="np", height=32, width=32)
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]


def our_images(pipe) -> torch.Tensor:
    return pipe(PROMPTS, steps=5, guidance=7.5, seed=0, height=32, width=32, output="tensor") / 2 + 0.5


def test_the_adapter_base_is_the_base_weights_without_a_copy(sd_folder, tmp_path):
    """What the trainer saves as a LoRA bundle's unet/: the adapted module's own weights less the adapter, equal
    to the base's; written as a plain U-Net where the base's files cannot be copied (save_pretrained)."""
    base = load_parts(sd_folder).unet.state_dict()
    view = AdapterBase(with_random_lora(load_parts(sd_folder).unet, rank=4, alpha=8.0, seed=1))
    state = view.state_dict()
    assert state.keys() == base.keys() and all(torch.equal(state[k], v) for k, v in base.items())
    view.save_pretrained(tmp_path / "unet")
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], v) for k, v in base.items())


def test_finetuned_bundle_lora_loads_in_diffusers_and_gives_our_images(sd_folder, lora_bundle):
    assert (lora_bundle / LORA_FILE).is_file() and not (lora_bundle / "unet_lora").exists()
    keys = load_file(lora_bundle / LORA_FILE).keys()
    assert keys and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    theirs = diffusers_pipe(sd_folder)
    theirs.load_lora_weights(lora_bundle)  # the bundle folder itself, as a user would pass it
    assert theirs.unet.peft_config[theirs.get_active_adapters()[0]].lora_alpha == 8.0  # the config came along
    ours = Text2ImagePipeline.from_pretrained(lora_bundle)
    got, ref = our_images(ours), diffusers_images(theirs)
    torch.testing.assert_close(got, ref, **TOL)
    base = our_images(Text2ImagePipeline.from_pretrained(sd_folder))
    assert (got - base).abs().max() > 1e-2  # the LoRA changes the images far beyond the tolerance


def test_export_lora_writes_kohya_keys_that_diffusers_reads_back_to_the_same_images(sd_folder, lora_bundle, tmp_path,
                                                                                   capsys):
    out = tmp_path / "style.safetensors"
    assert main(["export-lora", str(lora_bundle), "--out", str(out)]) == 0
    assert "kohya" in capsys.readouterr().out
    state = load_file(out)
    pattern = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in state), [k for k in state if not pattern.match(k)][:3]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert state[f"{name}.alpha"].item() == 8.0 and state[f"{name}.lora_down.weight"].shape[0] == 4
    ours_bundle = read_lora(lora_bundle).modules["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"]
    assert torch.equal(state[f"{name}.lora_up.weight"], ours_bundle.up)
    # diffusers' own kohya loader (load_lora_weights -> _convert_non_diffusers_lora_to_diffusers)
    theirs = diffusers_pipe(sd_folder)
    theirs.load_lora_weights(out)
    ours = Text2ImagePipeline.from_pretrained(lora_bundle)
    torch.testing.assert_close(diffusers_images(theirs), our_images(ours), **TOL)
    # ours, the base with the kohya file: the same tensors merged the same way, so the very same numbers
    kohya = Text2ImagePipeline.from_pretrained(sd_folder, loras=[out])
    torch.testing.assert_close(our_images(kohya), our_images(ours), rtol=0, atol=0)
    # an earlier export is replaced; another file is not
    assert main(["export-lora", str(lora_bundle / LORA_FILE), "--out", str(out)]) == 0
    (tmp_path / "mine.safetensors").write_bytes(b"not ours")
    assert main(["export-lora", str(lora_bundle), "--out", str(tmp_path / "mine.safetensors")]) == 2
    assert "was not written by ldm export-lora" in capsys.readouterr().err


def test_several_loras_with_scales_agree_with_diffusers_set_adapters(sd_folder, lora_bundle, second_lora):
    loras = [(lora_bundle, 0.5), (second_lora, -0.75)]
    ours = Text2ImagePipeline.from_pretrained(sd_folder, loras=loras)
    # the weights: W + sum_i s_i (alpha_i / r_i) B_i A_i, computed here in float64
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    base = dict(load_parts(sd_folder).unet.named_parameters())[f"{name}.weight"].double()
    a, b = read_lora(lora_bundle).modules[name], read_lora(second_lora).modules[name]
    expected = base + 0.5 * (8 / 4) * a.up.double() @ a.down.double() - 0.75 * (1 / 2) * b.up.double() @ b.down.double()
    torch.testing.assert_close(dict(ours.unet.named_parameters())[f"{name}.weight"].double(), expected,
                               rtol=1e-6, atol=1e-6)  # float32 rounding of a sum of a few terms of size ~1
    # LoRAs already read stand for their files (what `ldm generate --lora` passes on: each file read once)
    read = [(read_lora(path), scale) for path, scale in loras]
    assert [lora.hash for lora, _ in read] == [file_hash(find_lora_file(path)) for path, _ in loras]
    again = Text2ImagePipeline.from_pretrained(sd_folder, loras=read)
    assert again.loras == ours.loras and all(torch.equal(p, q) for p, q in zip(again.unet.parameters(), ours.unet.parameters()))
    # diffusers: two adapters, weighted
    theirs = diffusers_pipe(sd_folder)
    theirs.load_lora_weights(lora_bundle, adapter_name="a")
    theirs.load_lora_weights(second_lora.parent, adapter_name="b")
    theirs.set_adapters(["a", "b"], adapter_weights=[0.5, -0.75])
    torch.testing.assert_close(our_images(ours), diffusers_images(theirs), **TOL)
    # with_loras: the same merge on a copy; the pipeline it came from is unchanged
    plain = Text2ImagePipeline.from_pretrained(sd_folder)
    before = plain.unet.state_dict()[f"{name}.weight"].clone()
    styled = plain.with_loras(loras)
    assert styled.loras == [(lora_bundle / LORA_FILE, 0.5), (second_lora, -0.75)]
    torch.testing.assert_close(our_images(styled), our_images(ours), rtol=0, atol=0)
    assert torch.equal(plain.unet.state_dict()[f"{name}.weight"], before) and plain.loras == []


TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def with_text_updates(sd_folder, state: dict, *, rank=2, alpha=1.0, seed=3) -> dict:
    """``state`` (a kohya state dict) plus random kohya updates of every attention and MLP projection of the SD
    folder's text encoder (``lora_te_text_model_encoder_layers_<i>_...``), as sd-scripts writes them."""
    g = torch.Generator().manual_seed(seed)
    state = dict(state)
    for name, m in load_parts(sd_folder).text_encoder.model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(TEXT_TARGETS):
            base = "lora_te_" + name.replace(".", "_")
            state[f"{base}.lora_down.weight"] = 0.3 * torch.randn(rank, m.in_features, generator=g)
            state[f"{base}.lora_up.weight"] = 0.3 * torch.randn(m.out_features, rank, generator=g)
            state[f"{base}.alpha"] = torch.tensor(alpha)
    return state


def test_kohya_lora_with_text_encoder_updates_gives_diffusers_images(sd_folder, lora_bundle, tmp_path):
    """Most LoRAs from model sites carry text-encoder updates beside the U-Net's: they merge into the text encoder
    and give the images diffusers' kohya loader gives; diffusers' own layout of the same LoRA gives them too."""
    from peft.utils import get_peft_model_state_dict

    unet_only = tmp_path / "unet.safetensors"
    assert main(["export-lora", str(lora_bundle), "--out", str(unet_only)]) == 0
    both = tmp_path / "both.safetensors"
    save_file(with_text_updates(sd_folder, load_file(unet_only)), str(both))
    lora = read_lora(both)
    assert len(lora.text_modules) == 6 * load_parts(sd_folder).text_encoder.model.config.num_hidden_layers
    theirs = diffusers_pipe(sd_folder)
    theirs.load_lora_weights(both)  # diffusers' kohya converter, text encoder included
    ours = Text2ImagePipeline.from_pretrained(sd_folder, loras=[both])
    got = our_images(ours)
    torch.testing.assert_close(got, diffusers_images(theirs), **TOL)
    assert (got - our_images(Text2ImagePipeline.from_pretrained(sd_folder, loras=[unet_only]))).abs().max() > 1e-2
    # with_loras merges into a copy of the text encoder: the pipeline it came from is unchanged
    plain = Text2ImagePipeline.from_pretrained(sd_folder)
    before = our_images(plain)
    torch.testing.assert_close(our_images(plain.with_loras([both])), got, rtol=0, atol=0)
    torch.testing.assert_close(our_images(plain), before, rtol=0, atol=0)
    # diffusers' layout (text_encoder.<module>.lora_A/B.weight), as diffusers saves the adapters it loaded
    folder = tmp_path / "diffusers-layout"
    name = theirs.get_active_adapters()[0]
    theirs.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(theirs.unet, adapter_name=name),
                             text_encoder_lora_layers=get_peft_model_state_dict(theirs.text_encoder, adapter_name=name),
                             unet_lora_adapter_metadata=theirs.unet.peft_config[name].to_dict(),
                             text_encoder_lora_adapter_metadata=theirs.text_encoder.peft_config[name].to_dict())
    assert any(k.startswith("text_encoder.") for k in load_file(folder / LORA_FILE))
    torch.testing.assert_close(our_images(Text2ImagePipeline.from_pretrained(sd_folder, loras=[folder])), got, **TOL)


def test_onnx_backend_runs_the_merged_weights_from_graphs_of_its_own(sd_folder, lora_bundle, tmp_path):
    model = shutil.copytree(sd_folder, tmp_path / "sd")  # its onnx/ cache is this test's
    base = Text2ImagePipeline.from_pretrained(model, backend="onnx")
    base_images = our_images(base)
    stamp = model / "onnx" / "unet-8x8.json"
    base_key = json.loads(stamp.read_text())["weights"]
    styled = Text2ImagePipeline.from_pretrained(model, backend="onnx", loras=[lora_bundle])
    got = our_images(styled)
    lora_key = json.loads((model / "onnx" / "lora" / "unet-8x8.json").read_text())["weights"]
    assert lora_key != base_key and json.loads(stamp.read_text())["weights"] == base_key  # the base's graph is kept
    # ONNX Runtime runs the same fp32 maths fused (agreement to ~1e-6, see ldm.onnx_backend)
    torch.testing.assert_close(got, our_images(Text2ImagePipeline.from_pretrained(lora_bundle, backend="torch")), **TOL)
    assert (got - base_images).abs().max() > 1e-2
    # with_loras on an ONNX pipeline: the merged graphs too
    torch.testing.assert_close(our_images(base.with_loras([lora_bundle])), got, **TOL)
    torch.testing.assert_close(our_images(base), base_images, rtol=0, atol=0)


def test_bad_lora_arguments_are_one_line_errors(sd_folder, lora_bundle, tmp_path, capsys):
    not_lora = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"\x80\x04")
    # a LoRA for another base: a U-Net whose cross-attention takes 32 features, not 16
    other = with_random_lora(tiny_unet(cross_attention_dim=32), rank=2, alpha=2.0, seed=3)
    other_file = save_lora(tmp_path / "other", other)
    # a kohya file naming a module this U-Net lacks
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_7_attn_to_q.lora_down.weight": torch.ones(1, 8),
               "lora_unet_down_blocks_7_attn_to_q.lora_up.weight": torch.ones(8, 1)}, str(kohya))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1, 8),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 1)}, str(sdxl))
    cases = [
        (f"{lora_bundle}:abc", "scale 'abc' is not a number"),
        (f"{lora_bundle}:inf", "must be a finite number"),
        (str(tmp_path / "nope.safetensors"), "does not exist"),
        (str(not_lora), "is not a LoRA in a known layout"),
        (str(text), "truncated or corrupt"),
        (str(pickled), "only safetensors LoRA files are read"),
        (str(tmp_path), "holds no pytorch_lora_weights.safetensors"),
        (str(other_file), "attn2.to_k.lora_A.weight gives an update of shape (8, 32) but the U-Net's "
                          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight has shape (8, 16)"),
        (str(kohya), "key lora_unet_down_blocks_7_attn_to_q.lora_down.weight is for a module"),
        (str(sdxl), "an SDXL LoRA"),
    ]
    for spec, words in cases:
        code = main(["generate", "a koala", "--model", str(sd_folder), "--lora", spec, "--steps", "1",
                     "--backend", "torch", "--quiet", "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers may draw a loading bar before it)
        assert code == 2 and err.startswith("ldm generate: error:") and words in err, (spec, err)
    assert not (tmp_path / "x.png").exists()
    # a failed merge leaves the U-Net as it was
    unet = load_parts(sd_folder).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(LoraError):
        merge_loras(unet, [(read_lora(lora_bundle), 1.0), (read_lora(other_file), 1.0)])
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_parse_lora_spec(tmp_path):
    assert parse_lora_spec("style.safetensors") == (tmp_path.__class__("style.safetensors"), 1.0)
    assert parse_lora_spec("runs/ft/bundle:0.8") == (tmp_path.__class__("runs/ft/bundle"), 0.8)
    assert parse_lora_spec("a.safetensors:-1e-1")[1] == -0.1
    odd = tmp_path / "x:2"
    odd.mkdir()
    assert parse_lora_spec(str(odd)) == (odd, 1.0)  # an existing path with a colon is taken whole
    assert parse_lora_spec("dir:1/file.safetensors")[1] == 1.0


def test_bundles_with_unet_lora_folder_still_load_and_export(sd_folder, lora_bundle, tmp_path):
    """Bundles made before kept the adapter in unet_lora/ (save_lora_adapter: unprefixed keys and config)."""
    old = shutil.copytree(lora_bundle, tmp_path / "old")
    (old / LORA_FILE).unlink()
    adapted = with_random_lora(load_parts(sd_folder).unet, rank=4, alpha=8.0, seed=1)  # the fixture's adapter again
    adapted.save_lora_adapter(old / "unet_lora", safe_serialization=True)
    assert not any(k.startswith("unet.") for k in load_file(old / "unet_lora" / LORA_FILE))
    torch.testing.assert_close(our_images(Text2ImagePipeline.from_pretrained(old)),
                               our_images(Text2ImagePipeline.from_pretrained(lora_bundle)), rtol=0, atol=0)
    assert main(["export-lora", str(old), "--out", str(tmp_path / "old.safetensors")]) == 0
    new = tmp_path / "new.safetensors"
    assert main(["export-lora", str(lora_bundle), "--out", str(new)]) == 0
    a, b = load_file(tmp_path / "old.safetensors"), load_file(new)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_finetune_of_a_packed_bundle_keeps_the_base_as_packed(tmp_path):
    from ldm.pack import pack_bundle
    from train.run.config import load_config
    from train.unet.config import FinetuneConfig
    from train.unet.finetune import finetune

    data = make_imagefolder(tmp_path / "data", n=8)
    packed = tmp_path / "packed"
    pack_bundle(build_bundle(tmp_path / "bundle"), packed, keep_captions=["a red square", "a blue circle"])
    weights = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
               "text_encoder": "text_encoder/model.safetensors"}

    def run(method, out):
        reset_accelerate()
        config = load_config(FinetuneConfig, None, [
            f"data.path={data}", f"train.output_dir={out}", f"cache.dir={tmp_path / 'cache'}", f"lora.method={method}",
            "train.max_steps=2", "train.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=0", "validation.prompts=[]",
            "ema.enabled=false", "text.train=frozen"])  # (new words' learned rows: test_pack's packed-base test)
        return finetune(packed, config).bundle

    lora = run("lora", tmp_path / "ft-lora")
    for part, rel in weights.items():  # the base as packed (fp16, compact token table), byte for byte
        assert (lora / rel).read_bytes() == (packed / rel).read_bytes(), part
    size = sum(f.stat().st_size for f in lora.rglob("*") if f.is_file())
    packed_size = sum(f.stat().st_size for f in packed.rglob("*") if f.is_file())
    assert size < packed_size + 2 * (lora / LORA_FILE).stat().st_size
    # the bundle is the packed model with its adapter merged
    a = Text2ImagePipeline.from_pretrained(lora, backend="torch")("a red square", steps=3, seed=0, output="tensor")
    b = Text2ImagePipeline.from_pretrained(packed, backend="torch", loras=[lora])("a red square", steps=3, seed=0,
                                                                                    output="tensor")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a full fine-tune writes its new U-Net; the frozen parts are still copied as packed
    full = run("full", tmp_path / "ft-full")
    assert (full / weights["unet"]).read_bytes() != (packed / weights["unet"]).read_bytes()
    for part in ("vae", "text_encoder"):
        assert (full / weights[part]).read_bytes() == (packed / weights[part]).read_bytes(), part
    reset_accelerate()


def test_text_encoder_updates_for_an_open_clip_model_are_a_one_line_error(sd_folder, tmp_path, capsys):
    bundle = build_bundle(tmp_path / "ours")  # our bundles' text encoder is open_clip's
    te_only = tmp_path / "te.safetensors"
    save_file(with_text_updates(sd_folder, {}), str(te_only))
    code = main(["generate", "a koala", "--model", str(bundle), "--lora", str(te_only), "--steps", "1",
                 "--backend", "torch", "--quiet", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "holds text-encoder weights" in err and "this model's text encoder is open_clip" in err, err
    assert not (tmp_path / "x.png").exists()


def test_lora_on_the_resnet_convolutions_loads_in_diffusers_both_layouts(sd_folder, tmp_path):
    """A LoRA that also adapts the ResNet convolutions (conv1, conv2: kohya's LoCon; what a style far from the
    base's needs, docs/finetune-openmoji.md) gives diffusers' images from our layout and from the kohya export."""
    parts = load_parts(sd_folder)
    adapted = with_random_lora(parts.unet, rank=4, alpha=4.0, seed=3, targets=("to_q", "to_v", "conv1", "conv2"))
    bundle = save_bundle(tmp_path / "bundle", unet=AdapterBase(adapted), unet_lora=adapted,
                         autoencoder=parts.autoencoder, text_encoder=parts.text_encoder, schedule=parts.schedule,
                         sampling=parts.sampling, base=sd_folder)
    conv = read_lora(bundle).modules["down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape[2:] == (3, 3) and conv.up.shape[2:] == (1, 1)  # a 3x3 conv A, a 1x1 B
    ours = our_images(Text2ImagePipeline.from_pretrained(bundle))
    assert (ours - our_images(Text2ImagePipeline.from_pretrained(sd_folder))).abs().max() > 1e-2
    theirs = diffusers_pipe(sd_folder)
    theirs.load_lora_weights(bundle)
    torch.testing.assert_close(diffusers_images(theirs), ours, **TOL)
    out = tmp_path / "locon.safetensors"
    assert main(["export-lora", str(bundle), "--out", str(out)]) == 0
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in load_file(out)
    theirs = diffusers_pipe(sd_folder)
    theirs.load_lora_weights(out)
    torch.testing.assert_close(diffusers_images(theirs), ours, **TOL)
    torch.testing.assert_close(our_images(Text2ImagePipeline.from_pretrained(sd_folder, loras=[out])), ours, rtol=0, atol=0)
