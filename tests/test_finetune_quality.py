"""Prompt-following survives fine-tuning: what the fine-tune conditions on is what the pipeline samples with
(cached contexts, the packed token table, the empty prompt), and the weights the trainer validates are
the weights the bundle loads."""

import pytest
import torch

import conditioning
from conditioning.clip_model import FALLBACK, KEPT_IDS, TOKEN_TABLE
from ldm.pack import pack_bundle
from ldm.pipeline import Text2ImagePipeline
from ldm.testing import build_bundle
from train.run.config import load_config
from train.unet.cache import LatentCache
from train.unet.config import FinetuneConfig
from train_fakes import make_imagefolder
from train_fakes import fresh_accelerate, one_thread  # noqa: F401  (autouse fixtures)

# the base model's own captions: what ``ldm pack`` keeps; "purple" and "sketch" are words it never saw
BASE_CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "bar")]



@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(full bundle, the same packed with BASE_CAPTIONS' tokens only), tiny, random weights."""
    root = tmp_path_factory.mktemp("bundles")
    full = build_bundle(root / "full")
    pack_bundle(full, root / "packed", keep_captions=BASE_CAPTIONS)
    return full, root / "packed"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shapes whose captions the base knows ("a red circle"), plus rows in a new style ("..., purple sketch")."""
    folder = make_imagefolder(tmp_path_factory.mktemp("data") / "shapes", n=16)
    import json

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for r in rows[::2]:
        r["text"] += ", purple sketch"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def finetune_cache(model, data, tmp_path, *overrides) -> LatentCache:
    """The cache a real `finetune` run of ``model`` on ``data`` builds (one step, no validation images)."""
    from train.unet.finetune import finetune

    config = load_config(FinetuneConfig, None, [f"data.path={data}", f"train.output_dir={tmp_path / 'ft'}",
                                                f"cache.dir={tmp_path / 'cache'}", "train.max_steps=1", "train.batch_size=4",
                                                "validation.prompts=[]", "validation.base_prompts=[]", *overrides])
    finetune(model, config)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("ldm-")]
    return LatentCache(folder)


def test_cached_contexts_are_the_pipelines_bit_for_bit(bundles, data, tmp_path):
    _, packed = bundles
    cache = finetune_cache(packed, data, tmp_path)
    pipe = Text2ImagePipeline.from_pretrained(packed)
    distinct = cache.shard_info(0)["distinct_captions"]  # one shard; sorted, encoded in one batch (cache.batch_size 64)
    cond, uncond = pipe._contexts(distinct, [None] * len(distinct), guidance=4.0)  # what sampling feeds the U-Net
    for i in range(len(cache)):
        (caption,) = cache.captions[i]
        ctx = cache.contexts([i])  # (1, L, D)
        assert ctx.dtype == cond.dtype == torch.float32
        # the same tokenizer, the same expanded table, the same encoder call: equal bit for bit
        assert torch.equal(ctx[0], cond[distinct.index(caption)]), caption
        # one prompt alone (a batch of 1 at sampling) differs only by the reduction order of a batched matmul:
        # float32 rounding of values of size ~1-4 over a 16-wide dot product, far below 1e-5
        torch.testing.assert_close(ctx, pipe._contexts([caption], [None], 4.0)[0], rtol=1e-5, atol=1e-5)
    # caption dropout trains on exactly the empty context the unconditional branch samples with
    assert torch.equal(cache.empty, uncond[:1]) and torch.equal(cache.empty, pipe.text_encoder.empty_context(1))


def test_packed_token_table_expands_to_the_full_tables_rows(bundles):
    from safetensors.torch import load_file

    full, packed = bundles
    a, b = conditioning.load_text_encoder(full), conditioning.load_text_encoder(packed)
    assert torch.equal(a.tokenize(BASE_CAPTIONS), b.tokenize(BASE_CAPTIONS))  # one tokenizer
    stored = load_file(packed / "text_encoder" / "model.safetensors")
    kept = stored[KEPT_IDS]
    ids = {int(i) for i in a.tokenize(BASE_CAPTIONS + [""]).unique()}
    assert set(kept.tolist()) == ids  # exactly the captions' tokens (start, end and padding included)
    ta, tb = a.model.token_embedding.weight, b.model.token_embedding.weight  # (V, D) both
    # the kept rows sit at their own ids, as the full table's rows rounded to fp16 (the packed storage type)
    assert torch.equal(tb[kept], ta[kept].half().float())
    # every other id shares the one fallback row
    others = torch.ones(len(tb), dtype=torch.bool)
    others[kept] = False
    assert torch.equal(tb[others], stored[FALLBACK].float().expand(int(others.sum()), -1))
    assert stored[TOKEN_TABLE].shape[0] == len(kept)
    # so a new word is indistinguishable from any other new word to the packed encoder, not to the full one
    new = ["a red circle, purple sketch", "a red circle, orange doodle"]
    assert torch.equal(b(new)[0][0], b(new)[0][1]) and not torch.equal(a(new)[0][0], a(new)[0][1])


def text_table(folder) -> torch.Tensor:
    return conditioning.load_text_encoder(folder).model.token_embedding.weight  # (V, D) expanded


@pytest.mark.parametrize("mode", ["frozen", "new_words", "full"])
def test_text_option_trains_only_what_it_says(bundles, data, tmp_path, mode):
    from safetensors.torch import load_file

    from train.unet.finetune import finetune

    _, packed = bundles
    config = load_config(FinetuneConfig, None, [
        f"data.path={data}", f"train.output_dir={tmp_path / 'ft'}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=3",
        "train.batch_size=4", "optim.warmup_steps=0", "optim.lr=1e-2", f"text.train={mode}", "text.lr=1e-1",
        "validation.prompts=[]", "validation.base_prompts=[]", "validation.at_start=false", "ema.enabled=false"])
    result = finetune(packed, config)
    log = (tmp_path / "ft" / "logs" / "log.txt").read_text()
    # the data summary names the words the packed table lacks (in how many distinct captions)
    assert "2 caption words are unknown to the text encoder" in log and "purple (in 6 captions), sketch (in 6 captions)" in log
    before, after = text_table(packed), text_table(result.bundle)
    enc = conditioning.load_text_encoder(packed)
    new = sorted({int(i) for i in enc.tokenize(["purple", "sketch", ","]).flatten()} - {int(i) for i in enc.tokenize([""]).flatten()})
    changed = (before != after).any(dim=1)  # (V,) rows that moved
    w0 = load_file(packed / "text_encoder" / "model.safetensors")
    w1 = load_file(result.bundle / "text_encoder" / "model.safetensors")
    tower = [k for k in w1 if not k.startswith(("visual.", "token_embedding", "logit_scale"))]
    tower_moved = any(not torch.equal(w0[k].float(), w1[k]) for k in tower)
    visual_same = all(torch.equal(w0[k].float(), w1[k]) for k in w1 if k.startswith("visual."))
    assert visual_same  # the image tower (the CLIP score's) never trains
    if mode == "frozen":
        assert not changed.any() and not tower_moved
    elif mode == "new_words":
        assert changed.nonzero().flatten().tolist() == new and not tower_moved  # exactly the unknown words' rows
    else:
        assert tower_moved  # the whole text tower (token rows of the captions' tokens too)
    # the U-Net's LoRA trained in every mode
    assert (result.bundle / "pytorch_lora_weights.safetensors").is_file()


def test_grid_labels_keep_every_word(tmp_path):
    from PIL import Image, ImageDraw

    from ldm.sweep import SweepResult
    from ldm.sweep_report import labelled_grid, wrap_label

    prompts = ["grinning face with smiling eyes, twemoji style", "grinning face with smiling eyes, noto style",
               "supercalifragilisticexpialidocious"]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for p in prompts:
        lines = wrap_label(draw, p, 60)
        # nothing cut: the lines put back together are the prompt, each fits the column (60 px = 64 - margins)
        assert "".join(lines).replace(" ", "") == p.replace(" ", "") and all(draw.textlength(x) <= 60 for x in lines)
    assert wrap_label(draw, prompts[0], 60)[-1] != wrap_label(draw, prompts[1], 60)[-1]  # the differing word shows
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    one = labelled_grid(SweepResult([4.0], ["a koala"], [0], {4.0: images[:1]}))
    three = labelled_grid(SweepResult([4.0], prompts, [0], {4.0: images}))
    assert one.size == (70 + 64, 28 + 64)  # a one-line label keeps the old 28 px header
    assert three.size[1] > one.size[1]  # the header grows to hold the wrapped lines
    assert three.getpixel((70 + 64 + 10, three.size[1] - 10)) == (0, 128, 0)  # images below the header


# The base model's own training captions (emoji set, train split), scored with its CLIP before and after a fine-tune.
BASE_PROMPTS = ["koala, twemoji style", "red apple, noto style", "large red circle, twemoji style", "eye, noto style",
                "aubergine, noto style", "llama, twemoji style", "confetti ball, noto style", "fire, twemoji style"]


STEPS = 100  # batch 8: enough for the settings to lose a third of the score (below)
# MARGIN, in CLIP-score points (100 x cosine) of the mean over the 8 prompts. This very run, on this CPU: the finetune
# defaults 61.2 -> 59.1 (-2.1), the settings (optim.lr=3e-4 lora.rank=8 lora.alpha=8 text.train=frozen)
# 61.2 -> 36.8 (-24.4). 5 points lie far from the second and leave the first room for another machine's float32
# rounding (same seeds; images move by a level or two of 255)
MARGIN = 5.0


@pytest.mark.slow
def test_default_finetune_keeps_the_base_models_prompts(tmp_path):
    """A fine-tune of the packaged default model on other data (shapes) with the finetune defaults: the CLIP score
    of the base model's own prompts (fixed seeds, logged at step 0 and at the end) falls by less than MARGIN."""
    from ldm.generate_cli import model_path
    from pathlib import Path
    from train.data.shapes import build_shapes_dataset
    from train.run.log import read_csv
    from train.unet.finetune import finetune

    build_shapes_dataset(tmp_path / "shapes", n=64, seed=0)
    out = tmp_path / "ft"
    config = load_config(FinetuneConfig, None, [
        f"data.path={tmp_path / 'shapes'}", f"train.output_dir={out}", f"cache.dir={tmp_path / 'cache'}",
        f"train.max_steps={STEPS}", "train.batch_size=8", f"validation.every={STEPS}", "validation.prompts=[]",
        "validation.base_seeds=[0]"])
    config.validation.base_prompts = list(BASE_PROMPTS)  # (commas inside prompts: set here, not as key=value)
    finetune(model_path(Path("default")), config)
    rows = read_csv(out / "logs" / "val.csv")
    assert [int(r["step"]) for r in rows] == [0, STEPS]
    before, after = float(rows[0]["base_clip_score"]), float(rows[-1]["base_clip_score"])
    assert after > before - MARGIN, (before, after)


def test_validation_images_are_the_bundles(bundles, data, tmp_path):
    """The grid the trainer saves comes from the weights the bundle loads: EMA of the LoRA and of the learned
    token rows, LoRA scale alpha / rank (2 here) kept through unet_lora/ and fused on loading."""
    import numpy as np
    import yaml
    from PIL import Image

    from train.unet.finetune import finetune
    from train.unet.validation import sample_grid

    import json

    _, packed = bundles
    config = load_config(FinetuneConfig, None, [
        f"data.path={data}", f"train.output_dir={tmp_path / 'ft'}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=3",
        "train.batch_size=4", "optim.warmup_steps=0", "optim.lr=1e-2", "text.lr=1e-1", "lora.rank=4", "lora.alpha=8",
        "validation.seeds=[0]", "validation.steps=4", "validation.base_prompts=[]", "ema.warmup=false", "ema.decay=0.5"])
    config.validation.prompts = None  # drawn from the data's held-out captions
    result = finetune(packed, config)
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["validation"]["prompts"]
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert saved == [r["text"] for r in rows if r["split"] == "test"]  # the held-out captions (no base prompts here)
    assert any("purple sketch" in p for p in saved)  # one of them needs the learned rows
    v = config.validation
    grid = np.asarray(Image.open(tmp_path / "ft" / "samples" / "step-00000003.png"), dtype=np.int16)
    again = sample_grid(Text2ImagePipeline.from_pretrained(result.bundle), saved, v.seeds, steps=v.steps,
                        guidance=v.guidance, batch_size=v.batch_size)
    # fused (W + 2 BA) against unfused adapters: float32 rounding only, under one 8-bit level per pixel
    assert np.abs(grid - np.asarray(again, dtype=np.int16)).max() <= 1
    base = sample_grid(Text2ImagePipeline.from_pretrained(packed), saved, v.seeds, steps=v.steps, guidance=v.guidance,
                       batch_size=v.batch_size)
    assert np.abs(grid - np.asarray(base, dtype=np.int16)).max() > 8  # and the training changed them


def prior_run(bundle, data, prior, tmp_path, name, *overrides):
    """A 6-step fine-tune with prior preservation (batches of 4: 3 rows of ``data``, 1 of ``prior``)."""
    return load_config(FinetuneConfig, None, [
        f"data.path={data}", f"prior.data={prior}", "prior.share=0.25", f"train.output_dir={tmp_path / name}",
        f"cache.dir={tmp_path / 'cache'}", "train.max_steps=6", "train.batch_size=4", "optim.warmup_steps=0",
        "optim.lr=1e-2", "text.lr=1e-1", "validation.prompts=[]", "validation.base_prompts=[]",
        "validation.at_start=false", "validation.every=0", "checkpoint.every=3", *overrides])


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """The base style's images (no "purple sketch"): 8 shapes, rows 0 and 4 held out."""
    return make_imagefolder(tmp_path_factory.mktemp("prior") / "shapes", n=8, heldout_every=4)


def test_prior_rows_take_their_share_of_every_batch(bundles, data, prior, tmp_path, monkeypatch):
    from train.unet.finetune import FinetuneTrainer, finetune

    _, packed = bundles
    seen, caches = [], []
    original = FinetuneTrainer._loss

    def spy(self, rows, epoch):
        caches[:] = [self.prior_cache]
        ctx = self._contexts_of(self.prior_cache, self.prior_rows, epoch)
        seen.append((list(rows), list(self.prior_rows), [self.prior_cache.captions[int(i)][0] for i in self.prior_rows], ctx))
        return original(self, rows, epoch)

    monkeypatch.setattr(FinetuneTrainer, "_loss", spy)
    finetune(packed, prior_run(packed, data, prior, tmp_path, "ft"))
    (cache,) = caches
    assert len(cache) == 8 and len(seen) == 6 and all(len(r) == 3 and len(p) == 1 for r, p, _, _ in seen)
    picked = [p[0] for _, p, _, _ in seen]
    # the prior set's 6 train rows, each once in its first epoch (6 batches of 1), never a held-out row
    assert sorted(picked) == sorted(cache.train_indices.tolist())
    # the prior rows' own captions and contexts, not the data's: the encoder (its new rows training) gives what the
    # prior cache holds, to float32 rounding of a batch of 1 against the cache's batched call (as above: < 1e-5)
    for _, p, captions, ctx in seen:
        assert captions == [cache.captions[p[0]][0]] and "purple" not in captions[0]
        torch.testing.assert_close(ctx, cache.contexts(p), rtol=1e-5, atol=1e-5)


def test_prior_rows_resume_where_they_stopped(bundles, data, prior, tmp_path, monkeypatch):
    """Stopped after step 3 and resumed, a fine-tune with a prior set reads the same data and prior rows as an
    uninterrupted run (the prior set's position follows from the data's, so the checkpoint needs nothing more)."""
    from safetensors.torch import load_file

    from train.unet.finetune import FinetuneTrainer, finetune

    _, packed = bundles
    seen = []
    original = FinetuneTrainer._loss

    def spy(self, rows, epoch):
        seen.append((rows.tolist(), self.prior_rows.tolist()))
        return original(self, rows, epoch)

    monkeypatch.setattr(FinetuneTrainer, "_loss", spy)
    straight = finetune(packed, prior_run(packed, data, prior, tmp_path, "a", "train.max_steps=9"))
    expected = list(seen)
    seen.clear()
    finetune(packed, prior_run(packed, data, prior, tmp_path, "b", "train.max_steps=9"), stop_at_step=4)  # mid-epoch
    finetune(packed, prior_run(packed, data, prior, tmp_path, "b", "train.max_steps=9"), resume="latest")
    assert len(expected) == 9 and seen == expected[:4] + expected[3:]  # checkpoint at 3: step 4 is read again
    # the prior changed the result: the same run without it ends with other weights
    config = prior_run(packed, data, prior, tmp_path, "c", "train.max_steps=9")
    config.prior.data = ""
    a = load_file(straight.bundle / "pytorch_lora_weights.safetensors")
    c = load_file(finetune(packed, config).bundle / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("override, message", [("prior.share=1", "prior.share=1"), ("prior.weight=-1", "prior.weight=-1")])
def test_prior_settings_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(FinetuneConfig, None, ["data.path=x", "prior.data=y", override])


def test_learnt_rows_change_only_the_contexts_after_the_new_word(bundles, data, tmp_path):
    """Where the new style's content goes (docs/finetune-openmoji.md): the CLIP text tower is causal, so a learnt row
    for a new word leaves every context position before it as it was and changes every position after it (the
    rest of the caption, the end token and the padding the U-Net also attends to)."""
    from train.unet.finetune import finetune

    _, packed = bundles
    config = load_config(FinetuneConfig, None, [
        f"data.path={data}", f"train.output_dir={tmp_path / 'ft'}", f"cache.dir={tmp_path / 'cache'}", "train.max_steps=3",
        "train.batch_size=4", "optim.warmup_steps=0", "text.train=new_words", "text.lr=1e-1",
        "validation.prompts=[]", "validation.base_prompts=[]", "validation.at_start=false", "ema.enabled=false"])
    result = finetune(packed, config)
    before, after = conditioning.load_text_encoder(packed), conditioning.load_text_encoder(result.bundle)
    prompt = "a red circle, purple sketch"
    ids = before.tokenize([prompt])[0].tolist()
    from train.unet.finetune import shared_token_ids

    unknown = shared_token_ids(before)  # the packed table lacks ",", "purple" and "sketch"
    first_new = next(i for i, t in enumerate(ids) if t in unknown)  # the comma, after "a red circle"
    assert first_new == 4
    c0, c1 = before([prompt])[0][0], after([prompt])[0][0]  # (L, D)
    assert torch.equal(c0[:first_new], c1[:first_new])  # the same weights and inputs before it: bit for bit
    assert ((c0[first_new:] - c1[first_new:]).abs().amax(-1) > 0).all()  # every later position moved
    # a caption without a new word keeps its whole context
    assert torch.equal(before(["a red circle"])[0], after(["a red circle"])[0])


def test_text_steps_train_the_rows_first_then_keep_them(bundles, data, tmp_path):
    """text.steps=N: the learnt rows train for the first N optimizer steps and stay as they were from then on, while
    the U-Net's LoRA goes on learning; N = 0 trains them every step."""
    from safetensors.torch import load_file

    from train.unet.finetune import finetune

    _, packed = bundles

    def run(name, steps, text_steps):
        config = load_config(FinetuneConfig, None, [
            f"data.path={data}", f"train.output_dir={tmp_path / name}", f"cache.dir={tmp_path / 'cache'}",
            f"train.max_steps={steps}", "train.batch_size=4", "optim.warmup_steps=0", "text.train=new_words",
            "text.lr=1e-1", f"text.steps={text_steps}", "validation.prompts=[]", "validation.base_prompts=[]",
            "validation.at_start=false", "ema.enabled=false"])
        bundle = finetune(packed, config).bundle
        return text_table(bundle), load_file(bundle / "pytorch_lora_weights.safetensors")

    rows2, lora2 = run("two", 2, 2)
    rows4, lora4 = run("four", 4, 2)
    rows_all, _ = run("all", 4, 0)
    assert (rows2 != text_table(packed)).any()  # the rows learnt in the first two steps
    assert torch.equal(rows4, rows2)  # and stayed so for steps 3 and 4
    assert any(not torch.equal(lora2[k], lora4[k]) for k in lora2)  # while the U-Net went on
    assert not torch.equal(rows_all, rows2)  # text.steps=0: the rows train on


def test_text_steps_must_not_be_negative():
    with pytest.raises(ValueError, match="text.steps=-1 must be >= 0"):
        load_config(FinetuneConfig, None, ["data.path=x", "text.steps=-1"])
