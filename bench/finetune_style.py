"""Does a fine-tune carry a new style to held-out prompts and keep what the prompts ask for?

Compares a base bundle and a fine-tuned one on two sets of prompts "<name>, openmoji style" that
the fine-tune never saw, built by ``ldm data openmoji`` (Twemoji and Noto twins from the emoji set,
``ldm data emoji``). Sets built with ``--variant black`` are asked for as "<name>, outline style" (the
style word of their captions); the measures and files keep the key "openmoji" for the set's style.

* ``heldout``: the held-out split of the fine-tuning set (--data): emoji that neither the base
  model nor the fine-tune was trained on.
* ``other``: emoji of other OpenMoji groups (--other, e.g. built with ``--groups
  objects,travel-places,smileys-emotion``) from the emoji set's train split: the base model knows
  what they look like in its styles, the fine-tune never saw them. ``--other-prompts`` of them,
  evenly spaced by name.

One fixed judge, the base bundle's own CLIP (``conditioning.scorer``), embeds every image:

* Style, ``openmoji_share`` and ``style_margin``: each image's cosine to the three style centroids
  (mean unit embeddings of the real train-split images of --data: OpenMoji, and the Twemoji and
  Noto images of the same emoji, so the centroids differ by style, not content); the margin is the
  cosine to OpenMoji's minus the larger of the other two, and the share is the fraction of images
  whose margin is > 0.
* Content, ``image_match_top1``: the fraction of images whose nearest real Twemoji or Noto image
  of the set's emoji (max cosine over the two styles) is the one of its own emoji; and
  ``name_top1``: the fraction whose own name ranks first among the set's names (each name's text
  embedding is the mean of "<name>, twemoji style" and "<name>, noto style", the styles the CLIP
  knows). The CLIP learnt the names of the emoji set's train split only, so ``name_top1`` means
  something on ``other`` and little on ``heldout``: the reference rows say how much.
* Collapse, ``cross_prompt_cosine``: the mean cosine between images of different prompts drawn
  with the same seed; near 1 when every prompt gives one image.
* Base prompts kept, ``other_twemoji``: the ``other`` emoji asked for in the base model's style
  ("<name>, twemoji style"): ``clip_score`` (100 * cosine with the prompt), ``name_top1``,
  ``image_match_top1`` and ``twemoji_share``.

``reference`` holds the same measures on the real images of each set, per style: what images of
exactly that style and content score.

    PYTHONPATH=. python bench/finetune_style.py --tuned runs/openmoji/bundle --data data/openmoji \
        --other data/openmoji-other --emoji data/emoji --out docs/figures/openmoji [--seeds 0,1]

Two cheaper modes (no images drawn):

* ``--content-check MODEL ...``: how much the U-Net's prediction differs between two prompts that
  differ only in the emoji (consecutive held-out names: "broccoli" / "cockroach", ...), from one
  noise at t = 400 and 100: |eps(a) - eps(b)| / |eps(a)| averaged over the pairs and both t, for
  "X, openmoji style" and "X, twemoji style". The base model gives about 0.075 for both; a fine-tune
  that collapses the new style onto one picture drives the first down (0.040 after 100 steps at
  text.lr 1e-3). The same for the text contexts alone (``openmoji_context``, ``twemoji_context``):
  what of the content the text encoder still passes on (its learnt rows can erase it: every position
  after the new word attends to it in the causal CLIP text tower). MODEL is a bundle or a fine-tune's
  checkpoint folder (its EMA weights, on --base). And ``twemoji_drift``, ``noto_drift``: how far the
  predictions for every tenth "other" emoji in the base styles moved from the base model's
  (|eps - eps_base| / |eps_base|, same noise): the forgetting that base_clip_score shows, without
  drawing an image; ``openmoji_drift`` the same for the new style's prompts: how far the style moved them.
* ``--write-prior DIR``: the prior-preservation set of ``ldm finetune prior.data=DIR``: the Twemoji
  and Noto twins (emoji set, train split) of the train-split emoji of --data, captioned as the emoji
  set captions them ("koala, twemoji style").

Writes ``metrics.json`` and ``grid.png`` (rows: prompts of both sets; columns: the real OpenMoji
and Twemoji images, then the base and the fine-tuned model at each grid seed) into ``--out``. An
image (prompt, seed) is the one ``ldm generate "<prompt>" --seed S --steps 25 --guidance 4`` draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

STYLES = ("openmoji", "twemoji", "noto")  # "openmoji": the fine-tuning set's style, whatever its caption word
KNOWN_STYLES = ("twemoji", "noto")  # the style words the base model and its CLIP were trained on


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def style_word(rows: list[dict]) -> str:
    """The word an OpenMoji set's captions give its style: "openmoji", or "outline" for ``--variant black``."""
    return rows[0].get("style", "openmoji") if rows else "openmoji"


def load_images(folder: Path, rows: list[dict]) -> list[Image.Image]:
    return [Image.open(folder / r["file_name"]).convert("RGB") for r in rows]


def twins(openmoji_rows: list[dict], emoji_rows: list[dict], split: str) -> dict[str, list[dict]]:
    """Rows per style, in one order, of the emoji of ``split`` found in both sets (base images, no skin tone)."""
    ours = {r["base"]: r for r in openmoji_rows if r["split"] == split}
    by_style = {s: {r["base"]: r for r in emoji_rows if r["style"] == s and r["skin_tone"] is None and r["base"] in ours}
                for s in KNOWN_STYLES}
    common = sorted(set(ours).intersection(*by_style.values()), key=lambda b: ours[b]["name"])
    return {"openmoji": [ours[b] for b in common], **{s: [by_style[s][b] for b in common] for s in KNOWN_STYLES}}


@dataclass
class PromptSet:
    """Emoji asked for by name, with their real images in the three styles (one order throughout)."""

    key: str
    names: list[str]
    real: dict[str, list[Image.Image]]  # style -> images
    real_emb: dict[str, torch.Tensor]  # style -> (N, E)
    name_emb: torch.Tensor  # (N, E): mean of the names' twemoji and noto captions
    word: str = "openmoji"  # the caption word of the set's own style

    def prompts(self, style: str) -> list[str]:
        return [f"{n}, {self.word if style == 'openmoji' else style} style" for n in self.names]


class Judge:
    """The base bundle's CLIP and the style centroids of the fine-tuning set's train split."""

    def __init__(self, scorer, openmoji_dir: Path, emoji_rows: list[dict], emoji_dir: Path):
        self.scorer, self.emoji_rows, self.emoji_dir = scorer, emoji_rows, emoji_dir
        train = twins(read_rows(openmoji_dir), emoji_rows, "train")
        self.train_count = len(train["openmoji"])
        self.centroids = torch.stack([F.normalize(self.embed(self.images(openmoji_dir, s, train[s])).mean(0), dim=0)
                                      for s in STYLES])  # (3, E)

    def images(self, openmoji_dir: Path, style: str, rows: list[dict]) -> list[Image.Image]:
        return load_images(openmoji_dir if style == "openmoji" else self.emoji_dir, rows)

    def embed(self, images: list[Image.Image], batch: int = 64) -> torch.Tensor:
        return torch.cat([self.scorer.encode_image(images[i : i + batch]) for i in range(0, len(images), batch)])

    def prompt_set(self, key: str, openmoji_dir: Path, split: str, count: int = 0) -> PromptSet:
        all_rows = read_rows(openmoji_dir)
        rows = twins(all_rows, self.emoji_rows, split)
        if count and count < len(rows["openmoji"]):  # evenly spaced by name
            keep = [round(i * (len(rows["openmoji"]) - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]
            rows = {s: [r[i] for i in keep] for s, r in rows.items()}
        real = {s: self.images(openmoji_dir, s, rows[s]) for s in STYLES}
        names = [r["name"] for r in rows["openmoji"]]
        per_style = self.scorer.encode_text([f"{n}, {s} style" for s in KNOWN_STYLES for n in names])
        name_emb = F.normalize(per_style.view(len(KNOWN_STYLES), len(names), -1).mean(0), dim=-1)  # (N, E)
        return PromptSet(key, names, real, {s: self.embed(real[s]) for s in STYLES}, name_emb, style_word(all_rows))

    def measure(self, images: list[Image.Image], ps: PromptSet, seeds: list[int], style: str,
                prompts: list[str] | None = None) -> dict:
        """The measures of images in (name, seed) order that should show ``ps``'s emoji in ``style``."""
        emb = self.embed(images)  # (N*S, E)
        own = torch.arange(len(ps.names)).repeat_interleave(len(seeds))  # (N*S,)
        to_centroid = emb @ self.centroids.T  # (N*S, 3)
        i = STYLES.index(style)
        margin = to_centroid[:, i] - torch.cat([to_centroid[:, :i], to_centroid[:, i + 1:]], 1).max(-1).values
        to_real = torch.stack([emb @ ps.real_emb[s].T for s in KNOWN_STYLES]).max(0).values  # (N*S, N)
        out = {f"{style}_share": float((margin > 0).float().mean()), "style_margin": float(margin.mean()),
               "image_match_top1": float((to_real.argmax(-1) == own).float().mean()),
               "name_top1": float(((emb @ ps.name_emb.T).argmax(-1) == own).float().mean())}
        if len(seeds) * len(ps.names) == len(images) and len(ps.names) > 1 and prompts is not None:
            per_seed = emb.view(len(ps.names), len(seeds), -1).transpose(0, 1)  # (S, N, E)
            cos = per_seed @ per_seed.transpose(1, 2)  # (S, N, N)
            out["cross_prompt_cosine"] = float(cos[:, ~torch.eye(len(ps.names), dtype=torch.bool)].mean())
            text = self.scorer.encode_text([p for p in prompts for _ in seeds])  # (N*S, E)
            out["clip_score"] = float(100 * (emb * text).sum(-1).clamp(min=0).mean())
        return out

    def reference(self, ps: PromptSet) -> dict:
        """The measures on the real images of ``ps``, per style."""
        return {s: self.measure(ps.real[s], ps, [0], s, ps.prompts(s)) for s in STYLES}


def write_prior(openmoji_dir: Path, emoji_dir: Path, out: Path) -> int:
    """The Twemoji and Noto twins of ``openmoji_dir``'s train emoji as an imagefolder at ``out``; returns its size."""
    import shutil

    from ldm_io import atomic_path, write_text

    rows = twins(read_rows(openmoji_dir), read_rows(emoji_dir), "train")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for style in KNOWN_STYLES:
        for r in rows[style]:
            name = f"images/{style}-{Path(r['file_name']).name}"
            with atomic_path(out / name) as tmp:
                shutil.copyfile(emoji_dir / r["file_name"], tmp)
            lines.append(json.dumps({"file_name": name, "text": r["text"], "split": "train"}))
    write_text(out / "metadata.jsonl", "".join(line + "\n" for line in lines))
    return len(lines)


def load_model(path: Path, base: Path):
    """A pipeline from a bundle, or from a fine-tune checkpoint folder: ``base`` with the checkpoint's EMA weights
    (LoRA as the run's config.yaml set it, and learnt token rows), as the run's bundle would hold them."""
    from ldm.pipeline import Text2ImagePipeline

    path = Path(path)
    if not (path / "ema.safetensors").is_file():
        return Text2ImagePipeline.from_pretrained(path)
    import yaml
    from safetensors.torch import load_file

    from train.unet.config import LoRAConfig
    from train.unet.finetune import add_lora

    pipe = Text2ImagePipeline.from_pretrained(base)
    lora = yaml.safe_load((path.parent.parent / "config.yaml").read_text(encoding="utf-8"))["lora"]
    add_lora(pipe.unet, LoRAConfig(**lora))
    unet, text = dict(pipe.unet.named_parameters()), dict(pipe.text_encoder.named_parameters())
    with torch.no_grad():
        for name, value in load_file(path / "ema.safetensors").items():
            if name.startswith("text_encoder."):
                text[name[len("text_encoder."):]].copy_(value)
            else:
                unet[name].copy_(value)
    pipe.text_encoder.clear_cache()
    return pipe


@torch.no_grad()
def context_spread(pipe, names: list[str], style: str) -> float:
    """Mean |c(a) - c(b)| / |c(a)| of the text contexts (B, L, D) of consecutive pairs of ``names`` in ``style``."""
    pairs = [(names[i], names[i + 1]) for i in range(0, len(names) - 1, 2)]
    a = pipe.text_encoder([f"{x}, {style} style" for x, _ in pairs])[0]  # (P, L, D)
    b = pipe.text_encoder([f"{y}, {style} style" for _, y in pairs])[0]
    return float(((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean())


@torch.no_grad()
def content_spread(pipe, names: list[str], style: str, timesteps=(400, 100), seed: int = 0) -> float:
    """Mean |eps(a) - eps(b)| / |eps(a)| over consecutive pairs of ``names`` ("<name>, <style> style"), one noise."""
    pairs = [(names[i], names[i + 1]) for i in range(0, len(names) - 1, 2)]
    a = pipe.text_encoder([f"{x}, {style} style" for x, _ in pairs])[0]  # (P, L, D)
    b = pipe.text_encoder([f"{y}, {style} style" for _, y in pairs])[0]
    generator = torch.Generator().manual_seed(seed)
    shape = (len(pairs), pipe.unet.config.in_channels, pipe.sample_size, pipe.sample_size)
    values = []
    for t in timesteps:
        x = torch.randn(shape, generator=generator)  # (P, C, h, w)
        tt = torch.full((len(pairs),), t)
        pa, pb = pipe.model(x, tt, a), pipe.model(x, tt, b)
        values.append(((pa - pb).flatten(1).norm(dim=1) / pa.flatten(1).norm(dim=1)).mean())
    return float(torch.stack(values).mean())


@torch.no_grad()
def drift(pipe, base, names: list[str], style: str, timesteps=(400, 100), seed: int = 0) -> float:
    """Mean |eps(p) - eps_base(p)| / |eps_base(p)| over the prompts "<name>, <style> style", one noise: how far the
    fine-tune moved the predictions of prompts it was not trained on (the base style's: forgetting)."""
    prompts = [f"{n}, {style} style" for n in names]
    c, c0 = pipe.text_encoder(prompts)[0], base.text_encoder(prompts)[0]  # (N, L, D)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(names), pipe.unet.config.in_channels, pipe.sample_size, pipe.sample_size)
    values = []
    for t in timesteps:
        x = torch.randn(shape, generator=generator)
        tt = torch.full((len(names),), t)
        p, p0 = pipe.model(x, tt, c), base.model(x, tt, c0)
        values.append(((p - p0).flatten(1).norm(dim=1) / p0.flatten(1).norm(dim=1)).mean())
    return float(torch.stack(values).mean())


def draw(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float) -> tuple[list, float]:
    from ldm.sweep import run_sweep

    start = time.perf_counter()
    result = run_sweep(pipe, prompts, [guidance], seeds, steps=steps, method="ddim", batch_size=32)
    return result.images[result.cells[0]], time.perf_counter() - start


def grid(rows: list[str], columns: list[tuple[str, list[Image.Image]]], *, cell: int = 96) -> Image.Image:
    """Rows: prompts (full text in a label column); columns: (title, one image per row)."""
    label_w, header_h = 190, 30
    out = Image.new("RGB", (label_w + cell * len(columns), header_h + cell * len(rows)), "white")
    pen = ImageDraw.Draw(out)
    for c, (title, images) in enumerate(columns):
        for i, line in enumerate(title.split("\n")):
            pen.text((label_w + c * cell + 4, 2 + 12 * i), line, fill="black")
        for r, im in enumerate(images):
            out.paste(im.resize((cell, cell), Image.NEAREST), (label_w + c * cell, header_h + r * cell))
    for r, text in enumerate(rows):
        pen.text((4, header_h + r * cell + cell // 2 - 6), text, fill="black")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="base bundle or packaged model name (default: default)")
    parser.add_argument("--tuned", default=None, help="the fine-tuned bundle (without it: the base model alone)")
    parser.add_argument("--data", type=Path, required=True, help="the fine-tuning set (ldm data openmoji)")
    parser.add_argument("--other", type=Path, required=True,
                        help="OpenMoji emoji of other groups (ldm data openmoji --groups ...): the 'other' prompts")
    parser.add_argument("--emoji", type=Path, required=True, help="the emoji set (ldm data emoji): the other styles")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and grid.png")
    parser.add_argument("--models", default="base,tuned",
                        help="which models to draw: base,tuned (default), base or tuned; the grid shows those drawn")
    parser.add_argument("--other-prompts", type=int, default=24, help="'other' emoji to draw (default 24)")
    parser.add_argument("--seeds", default="0,1", help="seeds per prompt for the measures (default 0,1)")
    parser.add_argument("--grid-rows", default="4,4", help="prompts of heldout,other shown in the grid (default 4,4)")
    parser.add_argument("--grid-names", default=None, metavar="NAME,...",
                        help="the emoji the grid shows, by name, in order (instead of --grid-rows' evenly spaced ones)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--guidance", type=float, default=4.0, help="guidance weight (default 4)")
    parser.add_argument("--content-check", nargs="+", type=Path, default=None, metavar="MODEL",
                        help="only the U-Net content check of these bundles or checkpoint folders (see above)")
    parser.add_argument("--write-prior", type=Path, default=None, metavar="DIR",
                        help="only write the prior-preservation set (Twemoji and Noto twins of --data's train emoji)")
    args = parser.parse_args(argv)

    from conditioning.scorer import load_clip_scorer
    from ldm.generate_cli import model_path
    from ldm.pipeline import Text2ImagePipeline
    from ldm_io import save_image, write_text

    seeds = [int(s) for s in args.seeds.split(",")]
    base = model_path(Path(args.base))
    if args.write_prior is not None:
        print(f"{write_prior(args.data, args.emoji, args.write_prior)} images in {args.write_prior}", file=sys.stderr)
        return 0
    if args.content_check:
        rows = read_rows(args.data)
        names = sorted(r["name"] for r in rows if r["split"] == "test")
        other = sorted(r["name"] for r in read_rows(args.other) if r["split"] == "train")[:: 10]
        words = {s: style_word(rows) if s == "openmoji" else s for s in STYLES}  # key -> caption word
        base_pipe, checks = Text2ImagePipeline.from_pretrained(base), {}
        for model in args.content_check:
            pipe = load_model(model, base)
            checks[str(model)] = {**{s: round(content_spread(pipe, names, words[s]), 4) for s in ("openmoji", "twemoji")},
                                  **{f"{s}_context": round(context_spread(pipe, names, words[s]), 3) for s in ("openmoji", "twemoji")},
                                  **{f"{s}_drift": round(drift(pipe, base_pipe, other, words[s]), 4) for s in STYLES}}
            print(f"{model}: {json.dumps(checks[str(model)])}", file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "content-check.json", json.dumps(checks, indent=2) + "\n")
        return 0
    wanted = [m.strip() for m in args.models.split(",")]
    if not wanted or not set(wanted) <= {"base", "tuned"} or ("tuned" in wanted and not args.tuned):
        parser.error(f"--models {args.models}: give base, tuned or base,tuned (tuned needs --tuned)")
    models = [(label, bundle) for label, bundle in (("base", base), ("tuned", Path(args.tuned or "")))
              if label in wanted]
    judge = Judge(load_clip_scorer(base), args.data, read_rows(args.emoji), args.emoji)
    sets = [judge.prompt_set("heldout", args.data, "test"), judge.prompt_set("other", args.other, "train", args.other_prompts)]
    chosen = [n.strip() for n in args.grid_names.split(",")] if args.grid_names else None
    missing = sorted(set(chosen or ()) - {n for ps in sets for n in ps.names})
    if missing:
        parser.error(f"--grid-names {', '.join(missing)}: not among the prompts drawn (the held-out names and "
                     f"--other-prompts evenly spaced names of --other)")
    print(f"prompts: {len(sets[0].names)} heldout, {len(sets[1].names)} other; style centroids from "
          f"{judge.train_count} train emoji per style", file=sys.stderr)
    results = {"settings": {"base": str(args.base), "tuned": str(args.tuned), "seeds": seeds, "steps": args.steps,
                            "guidance": args.guidance, **{ps.key: ps.prompts("openmoji") for ps in sets}},
               "reference": {ps.key: judge.reference(ps) for ps in sets}}
    drawn = {}
    jobs = [(ps, "openmoji") for ps in sets] + [(sets[1], "twemoji")]
    for label, bundle in models:
        results[label], pipe = {}, Text2ImagePipeline.from_pretrained(bundle)
        for ps, style in jobs:
            images, seconds = draw(pipe, ps.prompts(style), seeds, steps=args.steps, guidance=args.guidance)
            key = ps.key if style == "openmoji" else f"{ps.key}_{style}"
            results[label][key] = {**judge.measure(images, ps, seeds, style, ps.prompts(style)),
                                   "sampling_seconds": round(seconds, 1)}
            drawn[label, key] = images
            print(f"{label} {key}: {json.dumps(results[label][key])}", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "metrics.json", json.dumps(results, indent=2) + "\n")
    rows, columns = [], {"OpenMoji\n(real)": [], "Twemoji\n(real)": []}
    grid_seeds = seeds[:2]
    for ps, count in zip(sets, (int(n) for n in args.grid_rows.split(","))):
        shown = list(range(0, len(ps.names), max(1, len(ps.names) // max(count, 1))))[:count]
        if chosen:
            shown = [ps.names.index(n) for n in chosen if n in ps.names]
        rows += [f"{ps.names[i]}, {ps.word} style" + (" *" if ps.key == "heldout" else "") for i in shown]
        columns["OpenMoji\n(real)"] += [ps.real["openmoji"][i] for i in shown]
        columns["Twemoji\n(real)"] += [ps.real["twemoji"][i] for i in shown]
        for label, _ in models:
            for s in grid_seeds:
                title = f"{'base' if label == 'base' else 'fine-tuned'}\nseed {s}"
                columns.setdefault(title, []).extend(drawn[label, ps.key][i * len(seeds) + seeds.index(s)] for i in shown)
    save_image(grid(rows, list(columns.items())), args.out / "grid.png")
    print(json.dumps({k: results[k] for k in ("reference", *(label for label, _ in models))}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
