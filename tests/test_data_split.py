"""The one held-out rule and caption rule (train.data.split): the same rows for every trainer."""

import json

from PIL import Image

from train.data import heldout_keys, load_split
from train.data.split import caption_index, heldout_flags


def make_folder(folder, n, split=False, captions=1):
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 7 % 256, 0, 0)).save(folder / f"{i}.png")
        text = [f"image {i} take {k}" for k in range(captions)] if captions > 1 else f"image {i}"
        rows.append({"file_name": f"{i}.png", "text": text} | ({"split": "test" if i % 5 == 0 else "train"} if split else {}))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_test_split_is_the_held_out_set(tmp_path):
    split = load_split(make_folder(tmp_path / "d", 20, split=True), 0.05, progress=False)
    assert sorted(heldout_keys(split)) == sorted(f"{i}.png" for i in range(0, 20, 5))
    assert len(split.train_rows) == 16


def test_without_a_split_the_rows_follow_their_paths_not_their_order(tmp_path):
    a = load_split(make_folder(tmp_path / "a", 200), 0.1, progress=False)
    assert 8 <= len(a.heldout_rows) <= 35
    # the same images listed in another order, plus new ones: the old images keep their side
    b_dir = make_folder(tmp_path / "b", 260)
    rows = (b_dir / "metadata.jsonl").read_text().splitlines()
    (b_dir / "metadata.jsonl").write_text("\n".join(reversed(rows)) + "\n")
    b = load_split(b_dir, 0.1, progress=False)
    assert set(heldout_keys(a)) == {k for k in heldout_keys(b) if int(k.split(".")[0]) < 200}


def test_a_handful_of_images_still_holds_one_out(tmp_path):
    split = load_split(make_folder(tmp_path / "d", 4), 0.05, progress=False)
    assert len(split.heldout_rows) == 1 and len(split.train_rows) == 3
    assert heldout_flags(["only one"], 0.05) == [False]  # one image: nothing to hold out
    assert heldout_flags([f"k{i}" for i in range(4)], 0.0) == [False] * 4  # holdout_fraction 0: none


def test_the_caption_draw_is_keyed_by_the_image_not_its_position(tmp_path):
    split = load_split(make_folder(tmp_path / "d", 12, captions=3), 0.05, progress=False)
    data = split.train
    draws = [[data.caption(i, epoch) for epoch in range(6)] for i in range(len(data))]
    for i, options in enumerate(draws):
        key = data.key(i)
        assert options == [data.captions(i)[caption_index(3, 0, e, key)] for e in range(6)]
    assert any(len(set(d)) > 1 for d in draws)  # epochs really draw different captions
