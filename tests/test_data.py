"""The captioned-image loader: every input format, bad data skipped and counted, RGB conversion,
per-epoch captions, the transform, the summary and ``ldm data check``."""

import io
import json
import struct
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ldm.cli import main
from train.data import CaptionedImages, clip_token_count, load_captioned_images, load_captions
from train.data.images import ImageTransform, decode_image, to_rgb


def words(caption: str) -> int:
    return len(caption.split())


def load(path, **kw) -> CaptionedImages:
    kw.setdefault("count_tokens", words)
    return load_captioned_images(path, progress=False, **kw)


# Four good images of different colours and sizes, and their captions.
GOOD = [((200, 30, 30), (40, 48), "a red block"), ((30, 200, 30), (64, 64), "a green block"),
        ((30, 30, 200), (48, 40), "a blue block"), ((20, 20, 20), (33, 90), "a black block")]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def write_good_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (colour, size, _) in enumerate(GOOD):
        Image.new("RGB", size, colour).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def pairs_of(data: CaptionedImages):
    """{caption: (mean colour, size)} of every kept pair, through the raw stream."""
    return {cap: (tuple(np.asarray(im).reshape(-1, 3).mean(0).round().astype(int)), im.size) for im, cap in data.pairs()}


EXPECTED = {cap: (colour, size) for colour, size, cap in GOOD}


def make_imagefolder_jsonl(tmp):
    names = write_good_images(tmp)
    (tmp / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": g[2]}) + "\n" for n, g in zip(names, GOOD)))
    return tmp


def make_imagefolder_csv(tmp):
    names = write_good_images(tmp)
    pd.DataFrame({"file_name": names, "text": [g[2] for g in GOOD]}).to_csv(tmp / "metadata.csv", index=False)
    return tmp


def make_sidecar(tmp):
    names = write_good_images(tmp / "10_blocks")  # kohya's "<repeats>_<name>" folders
    for i, (n, g) in enumerate(zip(names, GOOD)):
        ext = ".txt" if i % 2 else ".caption"
        (tmp / "10_blocks" / n).with_suffix(ext).write_text(g[2] + "\n")
    return tmp


def make_csv(tmp):
    names = write_good_images(tmp / "imgs")
    pd.DataFrame({"path": [f"imgs/{n}" for n in names], "text": [g[2] for g in GOOD]}).to_csv(tmp / "pairs.csv", index=False)
    return tmp / "pairs.csv"


def make_jsonl(tmp):
    names = write_good_images(tmp / "imgs")
    rows = [{"image": str(tmp / "imgs" / n), "text": g[2]} for n, g in zip(names, GOOD)]  # absolute paths work too
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "pairs.jsonl"


def hf_images():
    return [{"bytes": png_bytes(Image.new("RGB", size, colour)), "path": None} for colour, size, _ in GOOD]


def make_disk(tmp):
    ds = datasets.Dataset.from_dict({"image": hf_images(), "text": [g[2] for g in GOOD]})
    ds = ds.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp / "saved"))
    return tmp / "saved"


def make_parquet_images(tmp):
    ds = datasets.Dataset.from_dict({"image": hf_images(), "text": [g[2] for g in GOOD]}).cast_column("image", datasets.Image())
    (tmp / "pq").mkdir()
    ds.select([0, 1]).to_parquet(str(tmp / "pq" / "part-0.parquet"))
    ds.select([2, 3]).to_parquet(str(tmp / "pq" / "part-1.parquet"))
    return tmp / "pq"


def make_parquet_bytes(tmp):
    raw = [png_bytes(Image.new("RGB", size, colour)) for colour, size, _ in GOOD]
    pd.DataFrame({"img": raw, "text": [g[2] for g in GOOD]}).to_parquet(tmp / "raw.parquet")
    return tmp / "raw.parquet"


@pytest.mark.parametrize("make,fmt", [
    (make_imagefolder_jsonl, "imagefolder"), (make_imagefolder_csv, "imagefolder"), (make_sidecar, "sidecar"),
    (make_csv, "csv"), (make_jsonl, "jsonl"), (make_disk, "disk"), (make_parquet_images, "parquet"),
    (make_parquet_bytes, "parquet"),
])
def test_every_format_gives_the_same_pairs(tmp_path, make, fmt):
    path = make(tmp_path)
    data = load(path)
    assert data.summary().format == fmt
    assert data.summary().total_skipped == 0
    assert pairs_of(data) == EXPECTED
    assert sorted(load_captions(path)) == sorted(EXPECTED)  # the captions alone, without the images


def test_caption_column_is_configurable_and_a_wrong_one_names_the_columns(tmp_path):
    names = write_good_images(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "caption": g[2]}) + "\n" for n, g in zip(names, GOOD)))
    assert pairs_of(load(tmp_path, caption_column="caption")) == EXPECTED
    with pytest.raises(ValueError, match="caption_column='text'.*caption, file_name"):
        load(tmp_path)


def make_bad_folder(tmp):
    """An imagefolder with every kind of bad data next to good images of unusual modes."""
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(name, caption="a thing", **extra):
        rows.append({"file_name": name, "text": caption, **extra})

    good = Image.new("RGB", (48, 48), (10, 120, 200))
    full = png_bytes(good)
    (tmp / "truncated.png").write_bytes(full[: len(full) // 2]); add("truncated.png")
    (tmp / "text.png").write_text("this is not an image"); add("text.png")
    (tmp / "zero.png").write_bytes(b""); add("zero.png")
    add("gone.png")  # a row whose file does not exist
    good.save(tmp / "no_caption_row.png")  # no metadata row at all
    good.save(tmp / "null_caption.png"); add("null_caption.png", None)
    good.save(tmp / "empty.png"); add("empty.png", "   ")
    good.save(tmp / "empty_list.png"); add("empty_list.png", ["", " "])
    Image.new("RGB", (4, 4), "red").save(tmp / "tiny.png"); add("tiny.png")
    # usable images in awkward modes
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp / "cmyk.jpg", quality=95); add("cmyk.jpg", "cmyk red")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(tmp / "grey16.png"); add("grey16.png", "16 bit white")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp / "palette.png", transparency=1); add("palette.png", "transparent palette")
    Image.new("LA", (40, 40), (0, 0)).save(tmp / "la.png"); add("la.png", "transparent black")
    Image.new("RGBA", (40, 40), (0, 0, 255, 255)).save(tmp / "rgba.png"); add("rgba.png", ["opaque blue", "blue"])
    with open(tmp / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"text": "a row with no file_name"}) + "\n")
    return tmp


def test_bad_data_is_skipped_and_counted(tmp_path):
    data = load(make_bad_folder(tmp_path))
    summary = data.summary()
    assert summary.skipped == {
        "truncated or corrupt": 1, "not an image": 1, "empty file": 1, "missing file": 1,
        "missing caption": 2, "empty caption": 2, "too small": 1, "bad metadata row": 2}
    assert summary.kept == len(data) == 5 and summary.captions == 6
    got = {data.captions(i)[0]: tuple(np.asarray(data.image(i))[20, 20]) for i in range(len(data))}
    assert got["16 bit white"] == (255, 255, 255)  # 65535 / 257
    assert got["transparent palette"] == (255, 255, 255)  # composited on white
    assert got["transparent black"] == (255, 255, 255)
    assert got["opaque blue"] == (0, 0, 255)
    red = np.array(got["cmyk red"], int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    # the captions alone: the kept rows' and those of rows skipped for their image; not empty or bad rows
    kept = [c for i in range(len(data)) for c in data.captions(i)]
    assert sorted(load_captions(tmp_path)) == sorted(kept + ["a thing"] * 5)  # truncated, text, zero, gone, tiny
    images = torch.stack([data[i][0] for i in range(len(data))])
    assert images.shape == (5, 3, 40, 40) and images.min() >= -1 and images.max() <= 1


def test_modes_become_rgb_with_transparency_on_white():
    half_red = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    assert to_rgb(half_red).getpixel((0, 0)) == (255, 127, 127)  # 255*a + 255*(1-a), 255*(1-a)
    assert to_rgb(Image.new("LA", (2, 2), (0, 255))).getpixel((0, 0)) == (0, 0, 0)
    grey16 = Image.fromarray(np.array([[0, 32896], [65535, 257]], np.uint16))
    assert grey16.mode == "I;16"
    assert [to_rgb(grey16).getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 1]
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((1, 1)) == (255, 255, 255)
    # a 16-bit RGB PNG written by hand decodes to 8-bit RGB
    assert decode_image(png16_rgb()).getpixel((0, 0)) == (255, 128, 0)


def png16_rgb() -> bytes:
    """A 1x1 16-bit RGB PNG (Pillow cannot write one) with the pixel (65535, 32896, 0)."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + struct.pack(">HHH", 65535, 32896, 0))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_one_caption_per_epoch_from_a_list(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    options = ["one", "two", "three", "four"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": options}) + "\n")
    data = load(tmp_path, seed=3)
    assert data.captions(0) == options
    per_epoch = [data.caption(0, epoch) for epoch in range(40)]
    assert set(per_epoch) == set(options)  # every caption gets its turn
    assert per_epoch == [data.caption(0, epoch) for epoch in range(40)]  # deterministic
    data.set_epoch(7)
    assert data[0][1] == per_epoch[7]
    # DataLoader workers draw the same caption as the main process
    loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=1)
    assert list(next(iter(loader))[1]) == [per_epoch[7]]


def gradient(width, height) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], 2).round().astype(np.uint8), "RGB")


def test_transform_resizes_crops_and_scales_to_minus_one_one():
    t = ImageTransform(32)
    out = t(Image.new("RGB", (80, 40), (255, 0, 51)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[:, 5, 5], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))
    # centre crop of a wide image keeps its middle: left and right halves of a half red / half blue image
    halves = np.zeros((40, 80, 3), np.uint8)
    halves[:, :40] = (255, 0, 0)
    halves[:, 40:] = (0, 0, 255)
    out = t(Image.fromarray(halves))
    assert out[0, :, 0].min() > 0.9 and out[2, :, -1].min() > 0.9
    assert ImageTransform((16, 24))(gradient(50, 50)).shape == (3, 16, 24)
    assert ImageTransform(None)(gradient(50, 30)).shape == (3, 30, 50)


def test_random_crop_moves_and_flip_is_off_unless_asked():
    image = gradient(96, 32)  # the red channel rises to the right
    g = torch.Generator().manual_seed(0)
    lefts = {float(ImageTransform(32, crop="random", generator=g)(image)[0, 0, 0]) for _ in range(20)}
    assert len(lefts) > 5  # different windows
    centre = ImageTransform(32)
    assert all(torch.equal(centre(image), centre(image)) for _ in range(5))
    never = ImageTransform(32, crop="center")
    assert all(never(image)[0, 0, 0] < never(image)[0, 0, -1] for _ in range(20))  # never flipped
    flips = ImageTransform(32, hflip=True, generator=g)
    orientation = {bool(flips(image)[0, 0, 0] > flips(image)[0, 0, -1]) for _ in range(40)}
    assert orientation == {True, False}
    with pytest.raises(ValueError, match="crop='middle'; allowed: center, random"):
        ImageTransform(32, crop="middle")


def test_dataloader_batches_tensors_and_strings(tmp_path):
    data = load(make_imagefolder_jsonl(tmp_path), size=24, crop="random")
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2)
    images, captions = next(iter(loader))
    assert images.shape == (4, 3, 24, 24) and sorted(captions) == sorted(g[2] for g in GOOD)


def test_split_by_column_and_by_subfolder(tmp_path):
    names = write_good_images(tmp_path / "col")
    (tmp_path / "col" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": n, "text": g[2], "split": "test" if i == 0 else "train"}) + "\n"
        for i, (n, g) in enumerate(zip(names, GOOD))))
    assert len(load(tmp_path / "col", split="train")) == 3 and len(load(tmp_path / "col", split="test")) == 1
    for split in ("train", "test"):
        make_imagefolder_jsonl(tmp_path / "sub" / split)
    assert len(load(tmp_path / "sub")) == 8 and len(load(tmp_path / "sub", split="test")) == 4


def test_summary_counts_long_captions_with_the_given_or_the_clip_tokenizer(tmp_path):
    import open_clip

    long = " ".join(["word"] * 80)
    for text in ["a small red circle at the top left", "koala, twemoji style", long]:
        reference = int((open_clip.tokenize([text], context_length=200)[0] != 0).sum())
        assert clip_token_count(text) == reference
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": [long, "short"]}) + "\n" + json.dumps({"file_name": "b.png", "text": "short"}) + "\n")
    summary = load_captioned_images(tmp_path, progress=False).summary()
    assert (summary.captions, summary.long_captions, summary.longest) == (3, 1, 82)
    assert "captions over 77 tokens: 1 of 3" in str(summary)
    assert load(tmp_path, count_tokens=lambda s: 100).summary().long_captions == 3


def test_check_command_prints_the_summary_and_exits_0_or_2(tmp_path, capsys):
    assert main(["data", "check", str(make_bad_folder(tmp_path / "mixed"))]) == 0
    out = capsys.readouterr().out
    assert "kept: 5 image-caption pairs" in out and "truncated or corrupt: 1" in out and "captions over 77 tokens" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    (bad / "x.txt").write_text("a caption")
    assert main(["data", "check", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "skipped: 1 (not an image: 1)" in captured.out
    last = captured.err.strip().splitlines()[-1]  # after the progress bar, one error line
    assert last.startswith("ldm data: error:") and "no usable image-caption pair" in last
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("make", [make_csv, make_jsonl])
def test_a_rows_file_given_by_a_relative_path_outside_the_working_directory(tmp_path, make, monkeypatch):
    """`ldm data check tab/pairs.csv` from tab's parent: image paths join the file's folder once."""
    path = make(tmp_path / "tab")
    monkeypatch.chdir(tmp_path)
    data = load(Path("tab") / path.name)
    assert data.summary().total_skipped == 0 and pairs_of(data) == EXPECTED


def test_text_files_in_other_encodings(tmp_path):
    """Byte-order marks are honoured (UTF-16 from PowerShell, UTF-8 with BOM from Excel); a caption whose
    bytes are not UTF-8 is skipped and counted, never trained on with replacement characters."""
    from train.data.sources import NOT_UTF8

    side = tmp_path / "side"
    names = write_good_images(side)
    (side / names[0]).with_suffix(".txt").write_bytes("a red block, caf\u00e9".encode("utf-16"))
    (side / names[1]).with_suffix(".txt").write_bytes("a green block\n".encode("utf-8-sig"))
    (side / names[2]).with_suffix(".txt").write_bytes("a blue block, caf\u00e9".encode("latin-1"))
    (side / names[3]).with_suffix(".txt").write_text("a black block")
    data = load(side)
    assert sorted(c for i in range(len(data)) for c in data.captions(i)) == [
        "a black block", "a green block", "a red block, caf\u00e9"]
    assert data.summary().skipped == {NOT_UTF8: 1}

    excel = tmp_path / "excel"
    names = write_good_images(excel)
    text = "file_name,text\n" + "".join(f"{n},{g[2]}\n" for n, g in zip(names, GOOD))
    (excel / "metadata.csv").write_bytes(text.encode("utf-8-sig"))  # the BOM must not end up in "file_name"
    assert pairs_of(load(excel)) == EXPECTED

    shell = tmp_path / "shell"
    names = write_good_images(shell)
    lines = [json.dumps({"file_name": n, "text": g[2]}, ensure_ascii=False) for n, g in zip(names, GOOD)]
    lines[0] = lines[0].replace("a red block", "a red block \u2028 caf\u00e9")  # U+2028 inside a string: one row
    (shell / "metadata.jsonl").write_bytes("\n".join(lines).encode("utf-16"))
    data = load(shell)
    assert len(data) == 4 and data.summary().total_skipped == 0

    latin = tmp_path / "latin"
    names = write_good_images(latin)
    cafe = " caf\u00e9"
    rows = "file_name,text\n" + "".join(f"{n},{g[2]}{cafe if i == 1 else ''}\n" for i, (n, g) in enumerate(zip(names, GOOD)))
    (latin / "metadata.csv").write_bytes(rows.encode("latin-1"))
    data = load(latin)
    assert data.summary().skipped == {NOT_UTF8: 1} and len(data) == 3  # its image is not also "missing caption"


def make_outside_rows(tmp, fmt):
    """A data set in ``fmt`` whose rows name: two images inside (one by its absolute path), one by
    ``..``, one by an absolute path outside, one through a symlink out of the folder, one through a
    symlink inside it. Returns (the path to load, the folder)."""
    folder = tmp / "set"
    names = write_good_images(folder)
    Image.new("RGB", (40, 40), "white").save(tmp / "out.png")
    (folder / "link_out.png").symlink_to(tmp / "out.png")
    (folder / "link_in.png").symlink_to(names[0])
    paths = [names[0], str((folder / names[2]).resolve()), "../out.png", str((tmp / "out.png").resolve()),
             "link_out.png", "link_in.png"]
    captions = [f"row {i}" for i in range(len(paths))]
    if fmt == "imagefolder":
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": p, "text": c}) + "\n"
                                                       for p, c in zip(paths, captions)))
        for n in (names[1], names[3]):  # no image without a row ("missing caption")
            (folder / n).unlink()
        return folder, folder
    if fmt == "csv":
        pd.DataFrame({"path": paths, "text": captions}).to_csv(folder / "rows.csv", index=False)
        return folder / "rows.csv", folder
    pd.DataFrame({"image": paths, "text": captions}).to_parquet(folder / "rows.parquet")
    return folder / "rows.parquet", folder


@pytest.mark.parametrize("fmt", ["imagefolder", "csv", "parquet"])
def test_paths_out_of_the_data_folder_are_skipped_unless_allowed(tmp_path, fmt):
    from train.data.sources import OUTSIDE

    path, folder = make_outside_rows(tmp_path, fmt)
    data = load(path)
    assert sorted(c for i in range(len(data)) for c in data.captions(i)) == ["row 0", "row 1", "row 5"]
    assert data.summary().skipped == {OUTSIDE: 3}
    assert "allow_outside_paths" in OUTSIDE and "--allow-outside" in OUTSIDE
    assert len(load(path, allow_outside_paths=True)) == 6
    # a symlink that now leads out: refused when read, as at the scan
    (folder / "link_in.png").unlink()
    (folder / "link_in.png").symlink_to(tmp_path / "out.png")
    index = [data.captions(i) for i in range(len(data))].index(["row 5"])
    with pytest.raises(Exception, match="outside the data folder"):
        data.image(index)


def test_sidecars_and_metadata_linked_from_outside_are_not_read(tmp_path):
    from train.data.sources import OUTSIDE

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("a secret caption")
    side = tmp_path / "side"
    names = write_good_images(side)
    for n, g in zip(names[1:], GOOD[1:]):
        (side / n).with_suffix(".txt").write_text(g[2])
    (side / names[0]).with_suffix(".txt").symlink_to(elsewhere / "secret.txt")
    assert load(side).summary().skipped == {OUTSIDE: 1}
    assert "a secret caption" not in load_captions(side)
    assert "a secret caption" in load_captions(side, allow_outside_paths=True)

    meta = tmp_path / "meta"
    write_good_images(meta / "imgs")
    (elsewhere / "metadata.jsonl").write_text(json.dumps({"file_name": "../meta/imgs/img0.png", "text": "x"}) + "\n")
    (meta / "metadata.jsonl").symlink_to(elsewhere / "metadata.jsonl")
    summary = load(meta).summary()
    assert summary.kept == 0 and summary.skipped[OUTSIDE] == 1


def test_check_command_allow_outside(tmp_path, capsys):
    path, _ = make_outside_rows(tmp_path, "csv")
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "kept: 3 image-caption pairs" in out and "outside the data folder (allow with data.allow_outside_paths=true" in out
    assert main(["data", "check", str(path), "--allow-outside"]) == 0
    assert "kept: 6 image-caption pairs" in capsys.readouterr().out
