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
from train_fakes import make_imagefolder, reset_accelerate, one_thread  # noqa: F401

# the base model's own captions: what ``ldm pack`` keeps; "purple" and "sketch" are words it never saw
BASE_CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "bar")]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


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
    distinct = cache.meta["distinct_captions"]  # sorted; the cache encoded them in one batch (cache.batch_size 64)
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
    assert (result.bundle / "unet_lora").is_dir()
