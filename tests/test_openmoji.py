"""The OpenMoji builder: names shared with the emoji set, the emoji set's held-out rule, a build from fake tarballs.

tests/fixtures/openmoji_mini.json holds, under "openmoji", 12 entries copied from openmoji 17.0.0's
data/openmoji.json: koala, black cat, rosette, orca (animals-nature); hot beverage (food-drink); soccer
ball (activities); waving hand, its medium skin tone, man: white hair (people-body); sun, scissors; one
extras-openmoji glyph. Under "emoji" it holds emoji-datasource 16.0.0's ROSETTE entry, added to
tests/fixtures/emoji_mini.json (see tests/test_emoji.py) to make the fake emoji.json; hot beverage
and soccer ball are not in it.
"""

import io
import sys
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from train.data import emoji, load_captioned_images, openmoji

FIXTURES = Path(__file__).parent / "fixtures"
GROUPS = ["animals-nature", "people-body", "travel-places", "objects"]
RED, OPACITY = (200, 0, 0), 0.5
# A square from 18 to 54 in OpenMoji's 72-unit view box: pixels 16..47 at 64 px.
SVG = (f'<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><rect x="18" y="18" width="36" height="36" '
       f'fill="rgb{RED}" fill-opacity="{OPACITY}"/></svg>').encode()
# The same square as OpenMoji's black line-art variant draws it: a black outline of 4 units, no fill.
BLACK_SVG = (b'<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><rect x="20" y="20" width="32" height="32" '
             b'fill="none" stroke="#000000" stroke-width="4"/></svg>')


@pytest.fixture(scope="module")
def entries():
    mini = json.loads((FIXTURES / "openmoji_mini.json").read_text(encoding="utf-8"))
    emoji_entries = json.loads((FIXTURES / "emoji_mini.json").read_text(encoding="utf-8")) + mini["emoji"]
    return mini["openmoji"], emoji_entries


def by_hexcode(entries, groups=GROUPS):
    return {im.hexcode: im for im in openmoji.select_images(*entries, groups)}


def test_captions_take_the_emoji_sets_names_for_the_same_code_points(entries):
    images = by_hexcode(entries)
    twemoji = {im.base: im.caption("twemoji") for im in emoji.parse_emoji_json(entries[1], "twitter") if not im.skin_tone}
    assert images["1F428"].caption() == "koala, openmoji style"
    # OpenMoji writes 2600 and 2702 without the variation selector that emoji.json's 2600-FE0F has;
    # the names are the emoji set's cleaned ones, not OpenMoji's annotations ("sun", "scissors")
    assert images["2600"].caption() == "sunny, openmoji style"
    assert images["2702"].caption() == "scissors, openmoji style"
    assert images["1F44B"].caption() == "waving hand sign, openmoji style"  # OpenMoji: "waving hand"
    # every emoji the emoji set has: the same caption with the other style word
    for im in images.values():
        if im.base in twemoji:
            assert im.caption().replace("openmoji style", "twemoji style") == twemoji[im.base]
    # not in emoji.json: OpenMoji's own annotation
    assert images["1FACD"].name == "orca" and "1FACD" not in twemoji


def test_only_base_emoji_of_the_chosen_groups(entries):
    assert set(by_hexcode(entries)) == {"1F428", "1F408-200D-2B1B", "1F3F5", "1FACD", "1F44B", "1F468-200D-1F9B3",
                                        "2600", "2702"}  # no skin tone, no extras-openmoji
    assert set(by_hexcode(entries, openmoji.GROUPS)) == {"1F428", "1F408-200D-2B1B", "1F3F5", "1FACD", "2615", "26BD"}


def test_held_out_by_the_emoji_sets_rule_on_its_code_points(entries):
    images = by_hexcode(entries)
    bases = {im.base: im for im in emoji.parse_emoji_json(entries[1], "twitter")}
    for im in images.values():
        if im.hexcode != "1FACD":
            assert im.base in bases  # the emoji set's base key, so both sets hold out the same emoji
    # rosette: emoji.json says 1F3F5-FE0F (held out), OpenMoji 1F3F5 (would not be): the emoji set's key decides
    assert images["1F3F5"].base == "1F3F5-FE0F"
    assert emoji.is_held_out("1F3F5-FE0F") and not emoji.is_held_out("1F3F5")
    assert emoji.is_held_out(images["1F468-200D-1F9B3"].base)  # held out in test_emoji.py's build too


def test_unknown_group_names_the_allowed_ones(entries):
    allowed = "activities, animals-nature, extras-openmoji, food-drink, objects, people-body, travel-places"  # the fixture's
    with pytest.raises(ValueError, match=f"group\\(s\\) people, food; allowed: {allowed}$"):
        openmoji.select_images(*entries, ["animals-nature", "people", "food"])
    with pytest.raises(ValueError, match="none given"):
        openmoji.select_images(*entries, [])


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _fake_tarballs(cache: Path, entries, skip_svg=()) -> None:
    """Tarballs laid out like the npm packages: openmoji's data/openmoji.json, LICENSE.txt and color/svg/,
    and emoji-datasource-twitter's emoji.json."""
    cache.mkdir(parents=True, exist_ok=True)
    openmoji_entries, emoji_entries = entries
    with tarfile.open(cache / f"openmoji-{openmoji.VERSION}.tgz", "w:gz") as tar:
        _add(tar, "package/LICENSE.txt", b"Attribution-ShareAlike 4.0 International\n\n(the licence text)\n")
        _add(tar, "package/data/openmoji.json", json.dumps(openmoji_entries).encode())
        for entry in openmoji_entries:
            if entry["hexcode"] not in skip_svg:
                _add(tar, f"package/color/svg/{entry['hexcode']}.svg", SVG)
                _add(tar, f"package/black/svg/{entry['hexcode']}.svg", BLACK_SVG)
    with tarfile.open(cache / f"emoji-datasource-twitter-{emoji.VERSION}.tgz", "w:gz") as tar:
        _add(tar, "package/emoji.json", json.dumps(emoji_entries).encode())


@pytest.fixture(scope="module")
def built(entries, tmp_path_factory):
    root = tmp_path_factory.mktemp("openmoji")
    cache = root / "cache"
    _fake_tarballs(cache, entries)
    out = root / "data" / "openmoji"
    assert main(["data", "openmoji", "--out", str(out), "--cache", str(cache), "--groups", ",".join(GROUPS)]) == 0
    return out, cache


def read_rows(out):
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def test_build_writes_an_imagefolder_with_captions_split_and_licences(built, entries):
    out, _ = built
    rows = read_rows(out)
    assert sorted(r["hexcode"] for r in rows) == sorted(by_hexcode(entries))
    for r in rows:
        assert (out / r["file_name"]).is_file() and r["file_name"] == f"openmoji/{r['hexcode']}.png"
        assert r["split"] == ("test" if emoji.is_held_out(r["base"]) else "train")
        assert r["text"] == f"{r['name']}, openmoji style" and r["style"] == "openmoji" and r["author"]
    assert sorted(r["text"] for r in rows if r["split"] == "test") == ["man: white hair, openmoji style",
                                                                       "rosette, openmoji style"]
    assert "Attribution-ShareAlike 4.0" in (out / "LICENSE-CC-BY-SA-4.0.txt").read_text()  # the tarball's text
    attribution = (out / "ATTRIBUTION.txt").read_text()
    assert "OpenMoji" in attribution and "CC BY-SA 4.0" in attribution and "Changes made" in attribution
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary folders left


def test_black_variant_renders_the_line_art_with_its_own_style_word(entries, built, tmp_path):
    _, cache = built
    out = tmp_path / "outline"
    assert main(["data", "openmoji", "--variant", "black", "--out", str(out), "--cache", str(cache),
                 "--groups", ",".join(GROUPS)]) == 0
    rows, colour = read_rows(out), read_rows(built[0])
    assert [(r["hexcode"], r["split"], r["name"]) for r in rows] == [(r["hexcode"], r["split"], r["name"]) for r in colour]
    for r in rows:
        assert r["text"] == f"{r['name']}, outline style" and r["style"] == "outline"
        assert r["file_name"] == f"outline/{r['hexcode']}.png"
    pixels = np.asarray(Image.open(out / rows[0]["file_name"])).astype(int)  # (64, 64, 3)
    # the outline covers units 18..22 and 50..54 (pixels 16 to 19.6 and 44.4 to 48): black on the whole pixels
    # there (cairo's antialiasing blends the two cut ones), white inside and out
    assert (pixels[16:48, 16:19] <= 3).all() and (pixels[16:48, 45:48] <= 3).all()
    assert (pixels[21:43, 21:43] == 255).all() and (pixels[:15] == 255).all()
    assert "black line-art SVG images (package/black/svg/)" in (out / "ATTRIBUTION.txt").read_text()
    assert '"<name>, outline style"' in (out / "README.md").read_text()


def test_unknown_variant_is_a_one_line_error(built, tmp_path, capsys):
    _, cache = built
    with pytest.raises(SystemExit) as exc:
        main(["data", "openmoji", "--variant", "grey", "--out", str(tmp_path / "x"), "--cache", str(cache)])
    assert exc.value.code == 2 and "invalid choice: 'grey'" in capsys.readouterr().err


def test_build_renders_the_72_unit_view_box_at_64_px_on_white(built):
    out, _ = built
    pixels = np.asarray(Image.open(out / read_rows(out)[0]["file_name"]))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    # the square covers pixels 16..47 exactly (18 and 54 units * 64/72), so edge pixels are not blended
    expected = np.array(RED) * OPACITY + 255 * (1 - OPACITY)
    # cairo stores the half alpha as 127 or 128 of 255 and premultiplies in 8 bits, PIL composites in 8
    # bits: three roundings of at most one level each
    assert np.abs(pixels[16:48, 16:48].astype(float) - expected).max() <= 3
    assert (pixels[:16] == 255).all() and (pixels[48:] == 255).all() and (pixels[:, :16] == 255).all()


def test_built_set_loads_with_the_split(built):
    out, _ = built
    count = lambda s: len(s.split())  # noqa: E731
    train = load_captioned_images(out, split="train", count_tokens=count, progress=False)
    test = load_captioned_images(out, split="test", count_tokens=count, progress=False)
    assert (len(train), len(test)) == (6, 2) and train.summary().total_skipped == 0


def test_rebuild_needs_overwrite_and_then_replaces(built, capsys):
    out, cache = built
    args = ["data", "openmoji", "--out", str(out), "--cache", str(cache)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0  # default groups now
    assert sorted(r["name"] for r in read_rows(out)) == ["black cat", "hot beverage", "koala", "orca", "rosette",
                                                         "soccer ball"]


def test_bad_group_and_missing_svg_are_one_line_errors(entries, tmp_path, capsys):
    cache = tmp_path / "cache"
    _fake_tarballs(cache, entries, skip_svg={"1F428"})
    assert main(["data", "openmoji", "--out", str(tmp_path / "a"), "--cache", str(cache), "--groups", "animals"]) == 2
    err = capsys.readouterr().err
    assert "OpenMoji group(s) animals; allowed: activities, animals-nature," in err and "Traceback" not in err
    assert main(["data", "openmoji", "--out", str(tmp_path / "b"), "--cache", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "lacks 1 SVGs listed in openmoji.json, e.g. 1F428" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_npm_is_a_clear_error_with_the_manual_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    assert main(["data", "openmoji", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "npm is not installed (needed to fetch openmoji@17.0.0)" in err
    assert "npm pack openmoji@17.0.0 emoji-datasource-twitter@16.0.0" in err and str(tmp_path / "cache") in err
    assert not (tmp_path / "out").exists()


def test_missing_svg_renderer_is_a_one_line_error_naming_the_install(entries, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    _fake_tarballs(cache, entries)
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # as if cairosvg were not installed
    assert main(["data", "openmoji", "--out", str(tmp_path / "out"), "--cache", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm data: error: cannot render OpenMoji's SVGs: cairosvg does not load")  # before any work
    assert "libcairo2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
