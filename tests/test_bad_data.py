"""Bad data in every reader of user data: one data set with one of every bad kind (tests/bad_data_fakes.py),
read by `ldm data check`, `train-vae`, `eval-vae`, `train-clip`, `train`, `finetune` and `pack --vocab-from`:
each finishes and its data summary counts the skipped rows by reason. Paths out of the data folder are
never opened unless allowed; an image that changes on disk after the scan is left out and counted;
`serve-web` serves nothing outside its site."""

import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest

import train.data.captioned as captioned
from bad_data_fakes import KEPT_AWKWARD, OUTSIDE, bomb_png, expected_skips, grey_png, make_bad_data_set
from ldm.cli import main
from train.data import load_captioned_images, load_captions, load_split
from train.data.captioned import CHANGED
from train.data.images import MAX_PIXELS, TOO_LARGE, VECTOR, ImageError, decode_image
from train.data.sources import OUTSIDE as OUTSIDE_REASON
from train_fakes import make_imagefolder, reset_accelerate, one_thread  # noqa: F401  (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
N_GOOD = 24


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    return make_bad_data_set(tmp_path_factory.mktemp("bad"), n_good=N_GOOD)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from ldm.testing import build_bundle

    return build_bundle(tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def assert_counted(text: str) -> None:
    """``text`` holds a data summary with the bad data set's rows, skipped by reason."""
    skips = expected_skips()
    assert f"kept: {N_GOOD + KEPT_AWKWARD} image-caption pairs" in text
    assert f"skipped: {sum(skips.values())} (" in text
    for reason, n in skips.items():
        assert f"{reason}: {n}" in text, reason


def test_every_bad_kind_is_skipped_and_counted_and_nothing_outside_is_opened(bad, monkeypatch):
    opened = []
    real = captioned.decode_image
    monkeypatch.setattr(captioned, "decode_image", lambda ref, *a, **k: opened.append(ref) or real(ref, *a, **k))
    data = load_captioned_images(bad, progress=False)
    assert data.summary().skipped == expected_skips()
    assert len(data) == N_GOOD + KEPT_AWKWARD
    folder = bad.resolve()
    assert all(isinstance(ref, Path) and ref.resolve().is_relative_to(folder) for ref in opened)
    assert not any("passwd" in str(ref) or "outside" in str(ref) or "link_out" in str(ref) for ref in opened)
    pixels = {data.captions(i)[0]: np.asarray(data.image(i))[16, 16].tolist() for i in range(len(data))}
    assert pixels["a blue animation"] == [0, 0, 255]  # an animated GIF: its first frame
    assert pixels["a white 16 bit"] == [255, 255, 255]
    assert pixels["a transparent palette"] == [255, 255, 255]
    assert pixels["a linked red square"] == pixels["a red square"]  # a symlink inside the folder is followed
    assert pixels["a cmyk red"][0] > 200 and max(pixels["a cmyk red"][1:]) < 60
    # the captions alone (pack --vocab-from): not those of a row that is not UTF-8
    assert not any("caf" in c for c in load_captions(bad))


def test_outside_paths_are_read_when_allowed(bad):
    data = load_captioned_images(bad, progress=False, allow_outside_paths=True)
    assert OUTSIDE_REASON not in data.summary().skipped
    assert len(data) == N_GOOD + KEPT_AWKWARD + OUTSIDE - 1  # /etc/passwd is no image
    keys = {data.key(i) for i in range(len(data))}
    assert str((bad.parent / "outside.png").resolve()) in keys


def trainer_commands(bad: Path, bundle: Path, out: Path) -> dict[str, list[str]]:
    return {
        "data check": ["data", "check", str(bad)],
        "train-vae": ["train-vae", str(ROOT / "configs/vae/tiny.yaml"), f"data.path={bad}", "model.resize_input=true",
                      "train.max_steps=1", "train.batch_size=4", f"train.output_dir={out}", "--quiet"],
        "eval-vae": ["eval-vae", "--vae", str(bundle / "vae"), "--data", str(bad), "--grid", "0",
                     "--holdout-fraction", "0.2"],
        "train-clip": ["train-clip", str(ROOT / "configs/clip/tiny.yaml"), f"data.path={bad}", "train.batch_size=4",
                       "train.max_steps=1", f"train.output_dir={out}", "train.progress=false"],
        "train": ["train", str(ROOT / "configs/ldm/tiny.yaml"), f"data.path={bad}", f"encoders.autoencoder={bundle / 'vae'}",
                  f"encoders.text_encoder={bundle}", f"train.output_dir={out}", f"cache.dir={out / 'cache'}",
                  "train.max_steps=1", "validation.every=0"],
        "finetune": ["finetune", "--model", str(bundle), "--data", str(bad), f"train.output_dir={out}",
                     f"cache.dir={out / 'cache'}", "train.max_steps=1", "train.batch_size=4", "validation.every=0"],
        "pack": ["pack", str(bundle), "--out", str(out / "packed"), "--vocab-from", str(bad)],
    }


@pytest.mark.parametrize("command", ["data check", "train-vae", "eval-vae", "train-clip", "train", "finetune", "pack"])
def test_every_trainer_finishes_on_bad_data_and_counts_it(bad, bundle, tmp_path, capsys, command):
    args = trainer_commands(bad, bundle, tmp_path / "run")[command]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if command == "pack":  # captions only: those of the rows that are text
        assert (tmp_path / "run" / "packed" / "model_index.json").is_file()
        return
    log = tmp_path / "run" / "logs" / "log.txt"
    assert_counted(captured.out + captured.err + (log.read_text() if command in ("train-vae", "train-clip") else ""))


@pytest.mark.parametrize("command,flag", [("data check", "--allow-outside"), ("eval-vae", "--allow-outside"),
                                          ("train-vae", "data.allow_outside_paths=true"),
                                          ("train-clip", "data.allow_outside_paths=true"),
                                          ("train", "data.allow_outside_paths=true")])
def test_every_trainer_reads_outside_paths_when_allowed(bad, bundle, tmp_path, capsys, command, flag):
    args = trainer_commands(bad, bundle, tmp_path / "run")[command]
    assert main([*args, flag]) == 0
    captured = capsys.readouterr()
    log = tmp_path / "run" / "logs" / "log.txt"
    text = captured.out + captured.err + (log.read_text() if command in ("train-vae", "train-clip") else "")
    assert f"kept: {N_GOOD + KEPT_AWKWARD + OUTSIDE - 1} image-caption pairs" in text  # /etc/passwd: no image
    assert OUTSIDE_REASON not in text


def corrupt_after_scan(monkeypatch, victim: Path) -> None:
    """The first scan that finds rows is followed by ``victim`` becoming a zero-byte file."""
    real = captioned.load_captioned_images

    def scan_then_change(*args, **kwargs):
        data = real(*args, **kwargs)
        if len(data):
            victim.write_bytes(b"")
        return data

    monkeypatch.setattr(captioned, "load_captioned_images", scan_then_change)


@pytest.mark.parametrize("command", ["train-vae", "eval-vae", "train-clip", "train"])
def test_an_image_that_changes_after_the_scan_is_left_out_and_counted(bundle, tmp_path, capsys, monkeypatch, command):
    data = make_imagefolder(tmp_path / "data", n=16, heldout_every=0)
    corrupt_after_scan(monkeypatch, data / "0003.png")
    out = tmp_path / "run"
    args = trainer_commands(data, bundle, out)[command]
    if command == "eval-vae":  # every row evaluated, 0003 among them
        args[args.index("0.2")] = "0"
        args += ["--split", "train"]
    if command == "train-vae":  # every row trained on (the others read the held-out rows too)
        args.append("data.holdout_fraction=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err + ((out / "logs" / "log.txt").read_text() if (out / "logs" / "log.txt").is_file() else "")
    assert f"{CHANGED}: 1" in text and "kept: 15 image-caption pairs" in text


def test_changed_rows_leave_every_reader_consistent(tmp_path):
    from train.clip.data import PairSet
    from train.vae.images import pixels

    data = make_imagefolder(tmp_path / "data", n=12, heldout_every=0)
    split = load_split(data, 0.0, size=32, progress=False)
    (data / "0005.png").write_text("not any more")
    with pytest.warns(UserWarning, match="no longer"):
        images = pixels(split.train, split.train_rows)
    assert images.shape == (11, 3, 32, 32)
    pairs = PairSet(split.train, split.train_rows, 32, open_clip.tokenize)  # dropped once, counted once
    assert len(pairs) == 11 and "0005.png" not in [split.train.key(r) for r in pairs.rows]
    assert [c[0] for c in pairs.captions] == [split.train.captions(r)[0] for r in pairs.rows]
    assert split.train.summary().skipped == {CHANGED: 1} and split.train.summary().kept == 11
    assert "training on 11" in split.summary()
    for image in data.glob("*.png"):
        image.write_bytes(b"")
    with pytest.raises(ValueError, match="no images to read"):
        pixels(split.train, split.train_rows)
    with pytest.raises(ValueError, match="none of its images can be read any more"):
        split.train[0]


def test_the_pixel_limit_is_checked_before_decoding():
    for png, size in ((bomb_png(), "1600000000 pixels"), (grey_png(8200, 8200), "8200x8200")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning either
            with pytest.raises(ImageError, match=size) as info:
                decode_image(png)
        assert info.value.reason == TOO_LARGE
    assert MAX_PIXELS == 8192 * 8192 and "8192x8192" in TOO_LARGE
    assert decode_image(grey_png(300, 200), max_pixels=300 * 200).size == (300, 200)
    with pytest.raises(ImageError, match="301x200"):
        decode_image(grey_png(301, 200), max_pixels=300 * 200)


def test_svg_is_named_as_a_vector_image(tmp_path):
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'
    with pytest.raises(ImageError) as info:
        decode_image(svg)
    assert info.value.reason == VECTOR
    (tmp_path / "a.svg").write_bytes(svg)
    (tmp_path / "a.txt").write_text("a drawing")
    assert main(["data", "check", str(tmp_path)]) == 2  # listed, counted, and nothing usable
    with pytest.raises(ImageError) as info:
        decode_image(tmp_path / "a.txt")
    assert info.value.reason == "not an image"


def test_serve_web_serves_nothing_outside_the_site(tmp_path):
    from ldm.web.serve import make_server

    site, secret = tmp_path / "site", tmp_path / "private"
    site.mkdir()
    secret.mkdir()
    (site / "index.html").write_text("<html>site</html>")
    (site / "model.json").write_text("{}")
    (secret / "key.txt").write_text("secret")
    (site / "private").symlink_to(secret)  # a folder link out of the site
    (site / "key.txt").symlink_to(secret / "key.txt")  # a file link out of the site
    (site / "alias.json").symlink_to("model.json")  # a link inside it
    (site / "sub").mkdir()
    (site / "sub" / "index.html").symlink_to(secret / "key.txt")  # a folder whose index file leads out
    server = make_server(site, 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def status(path):
        try:
            with urllib.request.urlopen(base + path) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""

    try:
        assert status("/") == (200, b"<html>site</html>")
        assert status("/alias.json") == (200, b"{}")
        for path in ("/private/", "/private/key.txt", "/key.txt", "/sub/", "/%2e%2e/private/key.txt", "/../private/key.txt"):
            assert status(path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()
