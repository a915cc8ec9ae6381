"""Sweeps in memory: cells (axes), shared starting noise, the batch plan, metrics with intervals, the grids, the
Pareto front and the suggestion."""

import csv
import json
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.sweep import Cell, SweepResult, SweepSpec, bootstrap_mean, clip_metrics, make_cells, plan_batches, run_sweep
from ldm.sweep_report import grid_plan, labelled_grid, pareto_front, suggest, write_outputs
from test_pipeline import make_pipe


class MeanColourScorer:
    """A stand-in CLIP: images embed as their mean colour, texts as a fixed direction."""

    def encode_image(self, images):
        x = torch.stack([torch.tensor(list(im.resize((1, 1)).getpixel((0, 0))), dtype=torch.float32) + 1 for im in images])
        return x / x.norm(dim=-1, keepdim=True)

    def encode_text(self, texts):
        x = torch.ones(len(texts), 3)
        return x / x.norm(dim=-1, keepdim=True)


def pixels(im):
    return np.asarray(im, dtype=int)


def test_seeds_share_noise_across_weights_and_match_generate():
    pipe = make_pipe()
    result = run_sweep(pipe, ["a koala", "a cat"], [1.0, 3.0], [5, 9], steps=3, batch_size=3)
    assert result.cells == [Cell(1.0, steps=3), Cell(3.0, steps=3)]
    assert all(len(v) == 4 for v in result.images.values())
    for i, (prompt, seed) in enumerate([("a koala", 5), ("a koala", 9), ("a cat", 5), ("a cat", 9)]):
        alone = pipe(prompt, steps=3, guidance=3.0, seed=seed)[0]
        diff = np.abs(pixels(alone) - pixels(result.images[Cell(3.0, steps=3)][i]))
        assert diff.max() <= 1  # same x_T and same maths; at most a rounding flip from batch composition


def test_every_axis_makes_the_images_of_generate_with_that_setting():
    """Each cell of a sweep over guidance method, steps, sampler and eta is the image the pipeline makes alone
    with that cell's settings from the same seed: one x_T (and noise stream) per seed, whatever the cell."""
    pipe = make_pipe()
    result = run_sweep(pipe, ["a koala"], [0.0, 1.0, 2.5], [3, 4], guidance_methods=["cfg", "rescale:0.7"],
                       steps=[2, 3], method=["ddim", "ddpm", "euler-a"], eta=[0.0, 0.5], batch_size=5)
    # ddim gets both etas, the other samplers eta 0 only: 2 methods x 2 steps x (2 + 1 + 1) x 3 weights
    assert len(result.cells) == 2 * 2 * 4 * 3 and len(set(result.cells)) == len(result.cells)
    assert result.axes == ["guidance_method", "steps", "method", "eta", "guidance"]
    for cell in result.cells[::5] + result.cells[-1:]:
        for k, seed in enumerate([3, 4]):
            alone = pipe("a koala", steps=cell.steps, method=cell.method, eta=cell.eta, guidance=cell.guidance,
                         guidance_method=cell.guidance_method, seed=seed)[0]
            assert np.abs(pixels(alone) - pixels(result.images[cell][k])).max() <= 1, cell


def test_make_cells_gives_eta_to_ddim_only_and_refuses_what_cannot_run():
    cells = make_cells([1, 4], ["cfg"], [10], ["ddim", "ddpm"], [0.0, 0.5])
    assert [(c.method, c.eta, c.guidance) for c in cells] == [
        ("ddim", 0.0, 1.0), ("ddim", 0.0, 4.0), ("ddim", 0.5, 1.0), ("ddim", 0.5, 4.0), ("ddpm", 0.0, 1.0),
        ("ddpm", 0.0, 4.0)]
    with pytest.raises(ValueError, match="eta 0.5 applies to the ddim sampler only"):
        make_cells([1], ["cfg"], [10], ["ddpm"], [0.5])
    with pytest.raises(ValueError, match="guidance weight -1"):
        make_cells([-1])
    with pytest.raises(ValueError, match="repeat a seed"):
        SweepSpec(["a"], [0, 0], make_cells([1]))


def test_batch_plan_covers_every_image_once_and_shares_batches_only_where_one_sampler_run_can():
    cells = make_cells([0, 1, 2, 4, 8], ["cfg", "apg:eta=0,r=15,beta=-0.5"], [5, 10], ["ddim", "euler"])
    spec = SweepSpec(["a", "b", "c"], [0, 1], cells, batch_size=7)
    batches = plan_batches(spec)
    rows = [r for b in batches for r in b.rows()]
    assert sorted(rows) == sorted(product(range(len(cells)), range(3), range(2)))  # each image exactly once
    assert all(1 <= len(b.cells) <= 7 for b in batches)
    for b in batches:
        settings = {(cells[c].guidance_method, cells[c].steps, cells[c].method, cells[c].eta) for c in b.cells}
        assert len(settings) == 1  # one sampler run: one method, step count, eta and guidance method
        ws = {cells[c].guidance for c in b.cells}
        assert ws <= {0.0} or ws <= {1.0} or not ws & {0.0, 1.0}  # half-size calls (w 0, 1) batched apart
    assert any(len({cells[c].guidance for c in b.cells}) > 1 for b in batches)  # weights share batches
    assert plan_batches(spec) == batches  # a function of the request


def test_outputs_grid_csv_json_plots_and_suggestion(tmp_path):
    result = run_sweep(make_pipe(), ["a koala"], [0.0, 1.0, 4.0], [0, 1, 2], steps=2)
    clip_metrics(result, MeanColourScorer())
    paths = write_outputs(result, tmp_path)
    assert {"grid.png", "metrics.csv", "metrics.json", "metrics.png", "pareto.png", "suggestion.txt"} <= set(paths)
    grid = Image.open(paths["grid.png"])
    assert grid.size == (70 + 3 * 32, 28 + 3 * 32)
    rows = list(csv.DictReader(open(paths["metrics.csv"])))
    assert [float(r["guidance"]) for r in rows] == [0.0, 1.0, 4.0] and {r["guidance_method"] for r in rows} == {"cfg"}
    for name in ("clip_score", "diversity"):
        for r in rows:  # every metric with its interval and the images behind it
            assert float(r[f"{name}_low"]) <= float(r[name]) <= float(r[f"{name}_high"]) and r[f"{name}_n"] == "3"
    record = json.loads(paths["metrics.json"].read_text())
    assert record["seeds"] == [0, 1, 2] and [c["guidance"] for c in record["cells"]] == [0.0, 1.0, 4.0]
    m = record["cells"][1]["metrics"]
    assert 0 < m["clip_score"] <= 100 and m["diversity"] >= 0
    assert record["suggestion"]["alignment"] == "clip_score" and record["suggestion"]["fidelity"] == "diversity"
    assert "rule:" in paths["suggestion.txt"].read_text()
    assert Image.open(paths["metrics.png"]).size[0] > 100 and Image.open(paths["pareto.png"]).size[0] > 100


def test_grid_places_weight_rows_and_seed_columns():
    result = run_sweep(make_pipe(), ["a koala"], [1.0, 2.0], [0, 1], steps=2)
    grid = labelled_grid(result)
    crop = grid.crop((70 + 32, 28 + 32, 70 + 64, 28 + 64))  # row w=2, column seed 1
    assert np.array_equal(np.asarray(crop), np.asarray(result.images[Cell(2.0, steps=2)][1]))


def test_two_axis_grids_one_per_axis_pair_and_prompt_subset_with_every_word():
    from ldm.sweep_report import wrap_label

    cells = make_cells([1.0, 3.0], ["cfg", "interval:0.5-inf"], [4, 8])
    colours = {c: (40 * i, 255 - 20 * i, 0) for i, c in enumerate(cells)}
    prompts = [f"prompt number {k} with a long tail of words" for k in range(5)]
    images = {c: [Image.new("RGB", (16, 16), colours[c])] * (5 * 3) for c in cells}
    result = SweepResult(cells, prompts, [0, 1, 2], images)
    plan = grid_plan(result)
    pairs = {(r, c) for r, c, _, _ in plan}
    assert pairs == {("guidance", "guidance_method"), ("guidance", "steps"), ("guidance_method", "steps")}
    assert {tuple(p) for r, c, p, _ in plan if (r, c) == ("guidance", "steps")} == {(0, 1, 2, 3), (4,)}  # 4 a grid
    assert all(s == [0, 1] for *_, s in plan)  # two seeds per prompt in a two-axis grid
    rows, cols, prompt_ix, seeds = plan[0]
    grid = labelled_grid(result, rows, cols, prompt_ix, seeds)
    # the columns of prompt 0: interval (second value of the column axis), seed 1; row w = 3; steps fixed at 4
    cell = Cell(3.0, "interval:0.5-inf", 4)
    header = grid.size[1] - 2 * 16
    x = grid.size[0] - len(prompt_ix) * 2 * 2 * 16 + (1 * 2 + 1) * 16
    assert grid.getpixel((x + 8, header + 16 + 8)) == colours[cell]
    draw = __import__("PIL.ImageDraw", fromlist=["ImageDraw"]).Draw(Image.new("RGB", (1, 1)))
    assert "".join(wrap_label(draw, "interval:0.5-inf", 28)) == "interval:0.5-inf"  # broken, never cut


def test_shapes_prompts_get_exact_attribute_accuracy_with_intervals():
    from ldm import shapes
    from ldm.sweep import shapes_metrics

    prompts = ["a small red circle at the top left", "a large blue square at the centre"]
    truth = [shapes.render(shapes.parse_caption(p)) for p in prompts]
    wrong = shapes.render(shapes.parse_caption("a large green triangle at the bottom right"))
    # w=1: one of the two seeds per prompt is right; w=2: all right
    result = SweepResult([1.0, 2.0], prompts, [0, 1], {1.0: [truth[0], wrong, truth[1], wrong], 2.0: [truth[0], truth[0], truth[1], truth[1]]})
    assert shapes_metrics(result)
    m1, m2 = result.metrics[Cell(1.0)], result.metrics[Cell(2.0)]
    assert m1["all_acc"] == 0.5 and m2["all_acc"] == 1.0 and m1["all_acc_n"] == 4
    assert m1["colour_acc"] == 0.5 and m2["position_acc"] == 1.0
    # both prompts score 0.5 at w=1: every resample of prompts has mean 0.5; w=2 is right everywhere
    assert (m1["all_acc_low"], m1["all_acc_high"]) == (0.5, 0.5) and (m2["all_acc_low"], m2["all_acc_high"]) == (1, 1)
    assert not shapes_metrics(SweepResult([1.0], ["koala, twemoji style"], [0], {1.0: [truth[0]]}))


def test_bootstrap_interval_of_a_mean_over_prompts():
    """The percentile interval of the resampled mean of P prompts' values: for P = 400 draws the resampled mean
    is close to normal with sd = std(values) / sqrt(P) (population std), so the 95% interval is mean +- 1.96 sd.
    5% on the width: B = 20000 resamples put the 2.5% quantiles' own noise well below that."""
    values = np.random.default_rng(1).exponential(size=(400, 3))  # 400 prompts x 3 seeds
    mean, low, high = bootstrap_mean(values, bootstrap=20000)
    sd = values.mean(axis=1).std() / np.sqrt(400)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high and (high - low) == pytest.approx(2 * 1.959964 * sd, rel=0.05)
    assert bootstrap_mean(values, bootstrap=200) == bootstrap_mean(values, bootstrap=200)  # seeded
    assert bootstrap_mean(np.full((5, 2), 3.0)) == (3.0, 3.0, 3.0)  # nothing varies: no width
    one_prompt = bootstrap_mean(np.array([[0.0, 1.0, 1.0, 0.0]]))  # one prompt: its seeds are resampled
    assert one_prompt[0] == 0.5 and one_prompt[1] < 0.5 < one_prompt[2]


def test_pareto_front_and_the_suggestion_rule():
    cells = make_cells([1.0, 2.0, 4.0, 8.0], ["cfg", "apg:eta=0,r=15,beta=-0.5"])
    # (alignment = CLIP score, fidelity = KID, lower is better)
    table = {1.0: (50.0, 0.010), 2.0: (60.0, 0.020), 4.0: (64.0, 0.050), 8.0: (64.5, 0.090)}
    apg = {1.0: (50.0, 0.010), 2.0: (58.0, 0.012), 4.0: (64.2, 0.030), 8.0: (63.0, 0.031)}
    result = SweepResult(cells, ["p"], [0], {c: [] for c in cells})
    for c in cells:
        align, kid = (table if c.guidance_method == "cfg" else apg)[c.guidance]
        result.metrics[c] = {"clip_score": align, "kid": kid}
    front = pareto_front(result, "clip_score", "kid")
    keys = {(c.guidance_method[:3], c.guidance) for c in front}
    # cfg w=8 (best alignment), apg w=4 (64.2, .030), cfg w=2 (60, .020), apg w=2 (58, .012), w=1 of both (least
    # KID, a tie); not cfg w=4 (64, .050: apg w=4 beats it on both) nor apg w=8 (63, .031: the same)
    assert keys == {("cfg", 8.0), ("apg", 4.0), ("cfg", 2.0), ("apg", 2.0), ("cfg", 1.0), ("apg", 1.0)}
    s = suggest(result)
    # within 1% of 64.5 (>= 63.855): cfg w=4 (64, .05), cfg w=8 (.09), apg w=4 (64.2, .03): apg w=4 has the least KID
    assert (s["cell"]["guidance_method"], s["cell"]["guidance"]) == ("apg:eta=0,r=15,beta=-0.5", 4.0)
    assert s["on_pareto_front"] and "within 1% of the best" in s["rule"]
    result.metrics[Cell(8.0)]["kid"] = 0.030  # a tie on KID goes to the lower w
    assert suggest(result)["cell"]["guidance"] == 4.0


def test_pipeline_takes_one_weight_per_row():
    """A batch of rows with their own weights gives each row exactly what a batch of the same rows with that one
    weight gives (the same shapes, so the same kernels; a row's arithmetic never sees another row's w)."""
    from ldm.pipeline import GenerationRequest

    pipe = make_pipe()
    req = GenerationRequest(["a koala", "a cat", "a koala", "a cat"], [None] * 4, [1, 2, 3, 4])
    for method, invariant in product(("cfg", "apg", "rescale:0.7"), (True, False)):
        pipe.unet.batches.clear()
        mixed = pipe.generate_latents(req, steps=3, guidance=[2.0, 5.0, 2.0, 5.0], guidance_method=method,
                                      batch_invariant=invariant)
        # one U-Net call per image and step on its [uncond, cond] pair, or one per step on the whole batch
        assert pipe.unet.batches == ([2] * 4 * 3 if invariant else [8] * 3)
        for w, rows in ((2.0, [0, 2]), (5.0, [1, 3])):
            alone = pipe.generate_latents(req, steps=3, guidance=w, guidance_method=method, batch_invariant=invariant)
            assert torch.equal(mixed[rows], alone[rows]), (method, w, invariant)
    with pytest.raises(ValueError, match="got 3 guidance weights for 4 rows"):
        pipe.generate_latents(req, steps=2, guidance=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="guidance=-1.0 must be a finite number >= 0"):
        pipe.generate_latents(req, steps=2, guidance=[1.0, 2.0, 3.0, -1.0])
