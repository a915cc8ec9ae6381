"""ldm train-clip: a tiny CLIP trained on a generated shapes set retrieves held-out images far above
chance; checkpoints are atomic and resume exactly; the output folder is a loadable text encoder and
CLIP scorer."""

import json
import random
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conditioning import load_clip_scorer, load_text_encoder
from conditioning.clip_model import build_open_clip_model
from ldm.cli import main
from train.run.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from train.data import heldout_keys, load_split
from train.run.log import read_csv
from train_fakes import read_checkpoint, one_thread  # noqa: F401  (one_thread: autouse fixture)
from train.clip.config import load_train_config
from train.clip.data import load_pair_sets
from train.clip.eval import retrieval_metrics
from train.clip.model import encode_text_trimmed

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/clip/tiny.yaml")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def make_shapes(folder: Path, per_caption: int, held_out: int, size: int = 32, seed: int = 0) -> None:
    """Coloured shapes of random size and place on white; 12 captions "a <colour> <shape>"."""
    folder.mkdir(parents=True)
    rng, rows = random.Random(seed), []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(per_caption):
                im = Image.new("RGB", (size, size), (255, 255, 255))
                draw = ImageDraw.Draw(im)
                r = rng.uniform(0.2, 0.35) * size
                cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
                box = [cx - r, cy - r, cx + r, cy + r]
                if shape == "circle":
                    draw.ellipse(box, fill=rgb)
                elif shape == "square":
                    draw.rectangle(box, fill=rgb)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
                name = f"{colour}-{shape}-{k}.png"
                im.save(folder / name)
                rows.append({"file_name": name, "text": f"a {colour} {shape}", "split": "test" if k < held_out else "train"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes(folder, per_caption=20, held_out=4)  # 192 training pairs, 48 held out
    return folder


def test_retrieval_on_shapes_beats_chance_by_a_wide_margin(shapes, tmp_path):
    out = tmp_path / "run"
    assert main(["train-clip", CONFIG, f"data.path={shapes}", f"train.output_dir={out}", "train.max_steps=60",
                 "train.progress=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["n"] == 48
    assert metrics["chance_text_to_image_top1"] == pytest.approx(1 / 12)  # 4 of the 48 images match each caption
    assert metrics["text_to_image_top1"] >= 3 * metrics["chance_text_to_image_top1"]
    assert metrics["image_to_text_top1"] >= 3 * metrics["chance_image_to_text_top1"]
    assert metrics["image_to_text_top5"] >= metrics["chance_image_to_text_top5"] + 0.3

    encoder = load_text_encoder(out)  # the run folder is a bundle's text encoder ...
    context, pooled = encoder(["a red circle", "a blue square"])
    assert context.shape == (2, 77, 32) and pooled.shape == (2, 32)
    scorer = load_clip_scorer(out)  # ... and the CLIP scorer
    red_circle = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(red_circle).ellipse([6, 6, 26, 26], fill=COLOURS["red"])
    scores = scorer.score([red_circle] * 3, ["a red circle", "a blue circle", "a green square"])
    assert scores[0] > scores[1] and scores[0] > scores[2]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000050", "step-00000060"]  # keep 2


def test_stopped_and_resumed_twice_ends_with_the_same_weights(shapes, tmp_path):
    # 48 pairs in micro-batches of 16, two per optimizer step: 6 steps cross 3 epochs; crops and flips
    # draw from the augmentation generator, so every position and random state must come back on resume
    common = [CONFIG, f"data.path={shapes}", "train.max_steps=6", "train.batch_size=16", "optim.warmup_steps=2",
              "checkpoint.every=2", "train.progress=false", "data.min_crop_scale=0.7", "data.flip=true",
              "data.max_images=48", "train.gradient_accumulation_steps=2", "train.log_every=1"]
    stopped = [*common, f"train.output_dir={tmp_path / 'stopped'}"]
    # the uninterrupted run also evaluates after every step: that must not touch training's randomness
    assert main(["train-clip", *common, f"train.output_dir={tmp_path / 'straight'}", "validation.every=1"]) == 0
    assert main(["train-clip", *stopped, "train.stop_at=3"]) == 0
    assert not (tmp_path / "stopped/text_encoder").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "stopped/checkpoints")] == ["step-00000002", "step-00000003"]
    torch.manual_seed(123), random.seed(5), np.random.seed(7)  # whatever happens in between is undone by resume
    assert main(["train-clip", *stopped, "train.stop_at=5", "--resume", "latest"]) == 0
    assert not (tmp_path / "stopped/text_encoder").exists()
    assert main(["train-clip", *stopped, "--resume", "latest"]) == 0
    a = load_file(tmp_path / "straight/text_encoder/model.safetensors")
    b = load_file(tmp_path / "stopped/text_encoder/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (ta, sa), (tb, sb) = (read_checkpoint(tmp_path / run / "checkpoints/step-00000006") for run in ("straight", "stopped"))
    for group in ("model", "optimizer"):
        assert ta[group].keys() == tb[group].keys() and all(torch.equal(ta[group][k], tb[group][k]) for k in ta[group])
    for key in ("epoch", "batch_in_epoch", "lr_scheduler", "rng"):
        assert sa[key] == sb[key], key
    assert sa["epoch"] == 3 and sa["lr_scheduler"]["last_epoch"] == 6
    # one training curve, each step once, equal step by step; held-out retrieval in logs/val.csv
    rows_a, rows_b = (read_csv(tmp_path / run / "logs/train.csv") for run in ("straight", "stopped"))
    assert [int(r["step"]) for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for column in ("loss", "lr", "logit_scale"):
        assert [r[column] for r in rows_a] == [r[column] for r in rows_b], column
    assert float(rows_b[0]["lr"]) == 0 and float(rows_b[2]["lr"]) == pytest.approx(2e-3)  # warm-up, then the peak
    assert [int(r["step"]) for r in read_csv(tmp_path / "straight/logs/val.csv")] == [1, 2, 3, 4, 5, 6]
    assert [int(r["step"]) for r in read_csv(tmp_path / "stopped/logs/val.csv")] == [6]
    assert "resumed from" in (tmp_path / "stopped/logs/log.txt").read_text()
    assert json.loads((tmp_path / "stopped/metrics.json").read_text())["step"] == 6


def test_cli_errors_are_one_line(shapes, tmp_path, capsys):
    def run(*args):
        code = main(["train-clip", CONFIG, *args])
        return code, capsys.readouterr().err.strip()

    code, err = run(f"data.path={shapes}", "optim.lr=fast")
    assert code == 2 and "optim.lr: expected a number, got str 'fast'" in err and "\n" not in err
    code, err = run(f"data.path={shapes}", "optim.momentum=0.9")
    assert code == 2 and "optim.momentum is not a key" in err
    code, err = run(f"data.path={tmp_path}", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and "holds no images" in err
    code, err = run(f"data.path={shapes}", f"train.output_dir={tmp_path}", "--resume", "latest")
    assert code == 2 and "no checkpoint in" in err
    (tmp_path / "checkpoints/step-00000001").mkdir(parents=True)
    (tmp_path / "checkpoints/step-00000001/state.json").write_text("{}")
    code, err = run(f"data.path={shapes}", f"train.output_dir={tmp_path}")
    assert code == 2 and "already holds checkpoints of a run; continue it with --resume latest" in err
    code, err = run(f"data.path={shapes}", f"run.output_dir={tmp_path}")  # the old dialect's key
    assert code == 2 and "was renamed; use train" in err and "train.output_dir" in err
    code, err = run(f"data.folder={shapes}")
    assert code == 2 and "data.folder was renamed; use data.path" in err


def test_config_needs_a_data_folder():
    with pytest.raises(ValueError, match="data.path is not set"):
        load_train_config(CONFIG)


def test_trimmed_text_encoding_equals_open_clip_encode_text():
    torch.manual_seed(0)
    cfg = load_train_config(CONFIG, ["data.path=x"]).model.to_open_clip()
    model = build_open_clip_model(cfg).eval()
    tokens = open_clip.tokenize(["a red circle", "koala, twemoji style with a much longer caption", "hi!!"])
    with torch.no_grad():  # attention over the trimmed length: other shapes, other rounding; values ~3
        torch.testing.assert_close(encode_text_trimmed(model, tokens), model.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_checkpoints_are_atomic_and_restore_model_and_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, {"micro": 5})
    (tmp_path / ".step-00000002.abc.tmp").mkdir()  # a write killed half-way
    (tmp_path / "step-00000003").mkdir()  # a folder without state.json
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    state = load_checkpoint(tmp_path / "step-00000001", model2, opt2)
    assert state == {"step": 1, "micro": 5}
    assert torch.equal(model.weight, model2.weight)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][i][k], s2["state"][i][k]) for i in s1["state"] for k in s1["state"][i])
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_retrieval_metrics_on_analytic_cases():
    captions = ["a", "b", "a", "c"]
    emb = torch.eye(4)
    text = torch.stack([emb[0], emb[1], emb[0], emb[3]])
    image = torch.stack([emb[0], emb[1], -emb[0], emb[3]])  # image 2 ("a") points away from "a"
    m = retrieval_metrics(text, image, captions, ks=(1, 2))
    assert m["text_to_image_top1"] == 1.0  # queries a, b, c each find a matching image first
    assert m["image_to_text_top1"] == 0.75  # image 2 is nearest to "b" or "c"
    assert m["chance_text_to_image_top1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    assert m["chance_text_to_image_top2"] == pytest.approx(((1 - 1 / 6) + 0.5 + 0.5) / 3)  # 1 - C(N-m,k)/C(N,k)
    assert m["chance_image_to_text_top1"] == pytest.approx(1 / 3)


def test_pairs_come_through_train_data_with_a_caption_drawn_per_epoch(tmp_path):
    rows = []
    for k in range(40):
        Image.new("RGB", (40, 48), (6 * k, 0, 0)).save(tmp_path / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "text": [f"image {k}", f"picture {k}"]})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "broken.png").write_bytes(b"not a png")  # skipped and counted by train.data
    cfg = load_train_config(CONFIG, [f"data.path={tmp_path}", "train.batch_size=8", "data.holdout_fraction=0.25"])
    lines = []
    train, test = load_pair_sets(cfg, open_clip.tokenize, progress=False, log=lines.append)
    assert "kept: 40" in lines[0]
    assert len(train) + len(test) == 40 and 4 <= len(test) <= 16  # a fixed fraction held out: no split in the data
    # the one held-out rule: the images the VAE and the U-Net of this data set hold out
    assert [test.data.key(r) for r in test.rows] == heldout_keys(load_split(tmp_path, 0.25, progress=False))
    assert train.images.shape == (len(train), 3, 32, 32) and train.images.dtype == torch.uint8  # resized, centre-cropped
    held = {c for c in test.first_captions()}
    assert not held & {c for c in train.first_captions()}
    index = torch.arange(len(train))
    drawn = {tuple(train.tokens(index, epoch)[0].tolist()) for epoch in range(8)}
    assert drawn == {tuple(open_clip.tokenize([c])[0].tolist()) for c in train.captions[0]}  # both captions get drawn
    assert torch.equal(train.tokens(index), open_clip.tokenize(train.first_captions()))  # evaluation: the first caption
    again, _ = load_pair_sets(cfg, open_clip.tokenize, progress=False, log=lines.append)
    assert again.first_captions() == train.first_captions()  # the same split on every run
