"""Guidance sweeps: shared starting noise across weights, the grid, metrics and output files."""

import csv
import json

import numpy as np
import torch
from PIL import Image

from ldm.sweep import clip_metrics, labelled_grid, run_sweep, write_outputs
from test_pipeline import make_pipe


class MeanColourScorer:
    """A stand-in CLIP: images embed as their mean colour, texts as a fixed direction."""

    def encode_image(self, images):
        x = torch.stack([torch.tensor(list(im.resize((1, 1)).getpixel((0, 0))), dtype=torch.float32) + 1 for im in images])
        return x / x.norm(dim=-1, keepdim=True)

    def encode_text(self, texts):
        x = torch.ones(len(texts), 3)
        return x / x.norm(dim=-1, keepdim=True)


def test_seeds_share_noise_across_weights_and_match_generate():
    pipe = make_pipe()
    result = run_sweep(pipe, ["a koala", "a cat"], [1.0, 3.0], [5, 9], steps=3, batch_size=3)
    assert list(result.images) == [1.0, 3.0] and all(len(v) == 4 for v in result.images.values())
    for i, (prompt, seed) in enumerate([("a koala", 5), ("a koala", 9), ("a cat", 5), ("a cat", 9)]):
        alone = pipe(prompt, steps=3, guidance=3.0, seed=seed)[0]
        diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(result.images[3.0][i], dtype=int))
        assert diff.max() <= 1  # same x_T and same maths; at most a rounding flip from batch composition


def test_outputs_grid_csv_json_plot(tmp_path):
    result = run_sweep(make_pipe(), ["a koala"], [0.0, 1.0, 4.0], [0, 1, 2], steps=2)
    clip_metrics(result, MeanColourScorer())
    paths = write_outputs(result, tmp_path)
    grid = Image.open(paths["grid.png"])
    assert grid.size == (70 + 3 * 32, 28 + 3 * 32)
    rows = list(csv.DictReader(open(paths["metrics.csv"])))
    assert [float(r["guidance"]) for r in rows] == [0.0, 1.0, 4.0]
    assert {"clip_score", "diversity"} <= set(rows[0])
    record = json.loads(paths["metrics.json"].read_text())
    assert record["seeds"] == [0, 1, 2] and set(record["metrics"]) == {"0.0", "1.0", "4.0"}
    assert 0 < record["metrics"]["1.0"]["clip_score"] <= 100 and record["metrics"]["1.0"]["diversity"] >= 0
    assert Image.open(paths["metrics.png"]).size[0] > 100


def test_grid_places_weight_rows_and_seed_columns():
    result = run_sweep(make_pipe(), ["a koala"], [1.0, 2.0], [0, 1], steps=2)
    grid = labelled_grid(result)
    crop = grid.crop((70 + 32, 28 + 32, 70 + 64, 28 + 64))  # row w=2, column seed 1
    assert np.array_equal(np.asarray(crop), np.asarray(result.images[2.0][1]))


def test_shapes_prompts_get_exact_attribute_accuracy():
    from ldm import shapes
    from ldm.sweep import SweepResult, shapes_metrics

    prompts = ["a small red circle at the top left", "a large blue square at the centre"]
    truth = [shapes.render(shapes.parse_caption(p)) for p in prompts]
    wrong = shapes.render(shapes.parse_caption("a large green triangle at the bottom right"))
    # w=1: one of the two seeds per prompt is right; w=2: all right
    result = SweepResult([1.0, 2.0], prompts, [0, 1], {1.0: [truth[0], wrong, truth[1], wrong], 2.0: [truth[0], truth[0], truth[1], truth[1]]})
    assert shapes_metrics(result)
    assert result.metrics[1.0]["all_acc"] == 0.5 and result.metrics[2.0]["all_acc"] == 1.0
    assert result.metrics[1.0]["colour_acc"] == 0.5 and result.metrics[2.0]["position_acc"] == 1.0
    assert not shapes_metrics(SweepResult([1.0], ["koala, twemoji style"], [0], {1.0: [truth[0]]}))
