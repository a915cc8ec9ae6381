"""The emoji builder: emoji.json parsing, caption cleaning, the held-out split, and a build from fake tarballs.

tests/fixtures/emoji_mini.json holds 13 entries copied from emoji-datasource 16.0.0's emoji.json
(no images), with two flags changed to exercise has_img_*: KOALA has no Google image and the
dark-skin WAVING HAND SIGN no Twitter image.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from train.data import emoji
from train.data import load_captioned_images

FIXTURE = Path(__file__).parent / "fixtures" / "emoji_mini.json"


@pytest.fixture(scope="module")
def entries():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def captions(entries, image_set, style):
    return {im.unified: im.caption(style) for im in emoji.parse_emoji_json(entries, image_set)}


def test_captions_name_skin_tone_and_style(entries):
    twitter = captions(entries, "twitter", "twemoji")
    assert twitter["1F428"] == "koala, twemoji style"
    assert twitter["1F44B"] == "waving hand sign, twemoji style"
    assert twitter["1F44B-1F3FD"] == "waving hand sign, medium skin tone, twemoji style"
    assert twitter["1F44B-1F3FB"] == "waving hand sign, light skin tone, twemoji style"
    # two people, two tones; the same tone twice is named once
    assert twitter["1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF"] == "people holding hands, light skin tone, dark skin tone, twemoji style"
    assert twitter["1F9D1-1F3FC-200D-1F91D-200D-1F9D1-1F3FC"] == "people holding hands, medium-light skin tone, twemoji style"
    assert captions(entries, "google", "noto")["1F44B-1F3FF"] == "waving hand sign, dark skin tone, noto style"


def test_misleading_legacy_names_replaced_from_short_names(entries):
    names = {e["name"]: emoji.clean_name(e) for e in entries}
    assert names["BLACK SUN WITH RAYS"] == "sunny"  # a yellow sun
    assert names["BLACK SCISSORS"] == "scissors"  # red
    assert names["HEAVY BLACK HEART"] == "heart"  # red
    assert names["WHITE MEDIUM STAR"] == "star"  # yellow
    assert names["WHITE UP POINTING BACKHAND INDEX"] == "point up"  # short name point_up_2, number dropped
    assert names["EIGHT POINTED BLACK STAR"] == "eight pointed star"  # RENAMED: its short name repeats "black"
    # names whose colour word is true (the short name says it too) stay
    assert names["BLACK CAT"] == "black cat"
    assert names["WHITE FLAG"] == "white flag"
    assert names["KOALA"] == "koala"
    assert names["MAN: WHITE HAIR"] == "man: white hair"
    assert names["Côte d’Ivoire Flag"] == "côte d'ivoire flag"


def test_has_img_flags_decide_which_images_a_set_has(entries):
    twitter = captions(entries, "twitter", "twemoji")
    google = captions(entries, "google", "noto")
    # 13 base images (12 for google: no koala); skin tones: point up 5, man: white hair 5 (held out),
    # waving hand 4 of 5 for twitter (5 for google), people holding hands 25 tone pairs
    assert len(twitter) == 13 + 5 + 5 + 4 + 25 and len(google) == 12 + 5 + 5 + 5 + 25
    assert "1F428" not in google and "1F44B-1F3FF" not in twitter


@pytest.mark.parametrize("image_set", ["apple", "facebook", "twemoji"])
def test_only_twitter_and_google_sets(entries, image_set):
    with pytest.raises(ValueError, match="twitter, google"):
        emoji.parse_emoji_json(entries, image_set)


def test_held_out_split_is_about_5_percent_and_keeps_an_emoji_together(entries):
    rng = np.random.default_rng(0)
    codes = [f"{c:X}" for c in rng.choice(np.arange(0x1F000, 0x10FFFF), 20000, replace=False)]
    fraction = np.mean([emoji.is_held_out(c) for c in codes])
    assert 0.045 < fraction < 0.055
    assert emoji.is_held_out("1f44b") == emoji.is_held_out("1F44B")  # case does not matter
    # the split is decided by the base emoji: every skin tone of an entry has the entry's code points as base
    base_of = {e["unified"]: e["unified"] for e in entries}
    base_of.update({v["unified"]: e["unified"] for e in entries for v in (e.get("skin_variations") or {}).values()})
    for image_set in ("twitter", "google"):
        assert all(im.base == base_of[im.unified] for im in emoji.parse_emoji_json(entries, image_set))


def _rgba_png(colour, alpha) -> bytes:
    pixels = np.zeros((64, 64, 4), np.uint8)
    pixels[16:48, 16:48] = (*colour, alpha)  # a square; the rest is fully transparent
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def _fake_tarball(cache: Path, emoji_set: emoji.EmojiSet, entries) -> None:
    """A tarball laid out like the npm package: package/emoji.json and package/img/<set>/64/*.png."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{emoji_set.package}-{emoji.VERSION}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(entries).encode())
        add("package/LICENSE", b"MIT")
        for im in emoji.parse_emoji_json(entries, emoji_set.key):
            add(f"package/img/{emoji_set.key}/64/{im.image}", _rgba_png((200, 0, 0), 128))


@pytest.fixture(scope="module")
def built(entries, tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    cache = root / "cache"
    for emoji_set in emoji.SETS:
        _fake_tarball(cache, emoji_set, entries)
    out = root / "data" / "emoji"
    assert main(["data", "emoji", "--out", str(out), "--cache", str(cache)]) == 0
    return out, cache, entries


def test_build_writes_an_imagefolder_with_captions_split_and_licences(built):
    out, _, entries = built
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    styles = [r["style"] for r in rows]
    assert styles.count("twemoji") == 52 and styles.count("noto") == 52
    assert {r["text"] for r in rows} >= {"koala, twemoji style", "sunny, noto style",
                                          "waving hand sign, medium skin tone, noto style"}
    for r in rows:
        assert (out / r["file_name"]).is_file()
        assert r["split"] == ("test" if emoji.is_held_out(r["base"]) else "train")
        assert r["text"].endswith(f", {r['style']} style")
    # man: white hair is held out: its 6 images in each style
    assert sorted(r["unified"] for r in rows if r["split"] == "test") == sorted(
        (["1F468-200D-1F9B3"] + [f"1F468-{t}-200D-1F9B3" for t in emoji.SKIN_TONES]) * 2)
    # licences written by us: CC-BY 4.0 for Twemoji, the Apache 2.0 text for Noto
    attribution = (out / "ATTRIBUTION.txt").read_text()
    assert "CC-BY 4.0" in attribution and "Twitter" in attribution and "Apache License" in attribution
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in (out / "LICENSE-APACHE-2.0.txt").read_text()
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary folders left


def test_build_composites_on_white(built):
    out, _, _ = built
    row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    image = Image.open(out / row["file_name"])
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image).astype(int)
    assert (pixels[0, 0] == 255).all()  # transparent -> white
    # (200, 0, 0) at alpha 128 over white: 200*a + 255*(1-a)
    a = 128 / 255
    assert np.abs(pixels[32, 32] - np.round([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])).max() <= 1


def test_built_set_loads_with_the_split(built):
    out, _, _ = built
    train = load_captioned_images(out, split="train", count_tokens=lambda s: len(s.split()), progress=False)
    test = load_captioned_images(out, split="test", count_tokens=lambda s: len(s.split()), progress=False)
    assert (len(train), len(test)) == (104 - 12, 12) and train.summary().total_skipped == 0
    assert {test.caption(i) for i in range(len(test))} >= {"man: white hair, dark skin tone, noto style"}


def test_build_refuses_a_non_empty_out_and_names_the_fix(built, capsys):
    out, cache, _ = built
    assert main(["data", "emoji", "--out", str(out), "--cache", str(cache)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_missing_npm_is_a_clear_error_with_the_manual_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="npm pack emoji-datasource-twitter@16.0.0 emoji-datasource-google@16.0.0"):
        emoji.fetch_tarball("emoji-datasource-twitter", tmp_path / "cache")
    assert main(["data", "emoji", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "npm is not installed" in err and str(tmp_path / "cache") in err
    assert not (tmp_path / "out").exists()
