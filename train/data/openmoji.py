"""The OpenMoji data set: 64x64 OpenMoji images with captions named like the emoji set's.

``build_openmoji_dataset(out)`` (``ldm data openmoji --out DIR``) fetches the npm tarball
``openmoji@17.0.0`` (graphics CC BY-SA 4.0) with the emoji builder's npm fetching, renders the colour
SVGs (``package/color/svg/<hexcode>.svg``, 72x72 view box) at 64x64 with cairosvg, composites them on
white and writes a Hugging Face imagefolder::

    DIR/metadata.jsonl               one row per image, see below
    DIR/openmoji/<hexcode>.png       RGB, 64x64
    DIR/LICENSE.txt, DIR/LICENSE-CC-BY-SA-4.0.txt, DIR/ATTRIBUTION.txt, DIR/README.md

Which images: the base emoji (no skin tones) of OpenMoji's groups ``animals-nature``, ``food-drink``
and ``activities`` (``GROUPS``; ``groups=`` picks others), 376 images in 17.0.0. The OpenMoji extras
(``extras-openmoji``, ``extras-unicode``: not Unicode emoji, so the emoji set has no twin) are left out.

Captions: ``"<name>, openmoji style"``. Where the emoji is in the emoji set (emoji-datasource 16.0.0's
emoji.json, read from ``emoji-datasource-twitter@16.0.0``, the tarball ``ldm data emoji`` fetches; the
same code points once variation selectors FE0F are dropped), the name is the emoji set's
(``emoji.clean_name``), so "koala, openmoji style" is the twin of "koala, twemoji style". Otherwise it
is OpenMoji's annotation in lower case (in 17.0.0 and the default groups one emoji: "orca").

Held-out split: the emoji set's rule (``emoji.is_held_out``) on the emoji set's base code points (its
``unified``, FE0F included where emoji.json has it; OpenMoji's hexcode for an emoji it lacks), so an
emoji held out of the emoji set is held out here too. In 17.0.0 with the default groups it holds out
15 of the 376 images.

``variant="black"`` (``--variant black``) renders OpenMoji's other set of the same drawings instead,
``package/black/svg/``: black line art with no fill, a style the default model has never seen either;
captions ``"<name>, outline style"`` (one token the default model lacks, so a fine-tune learns one row for it
and shares nothing with "twemoji"), images in ``DIR/outline/``.

Rows of metadata.jsonl: ``file_name``, ``text`` (the caption), ``split`` ("train" or "test"),
``style`` ("openmoji", or "outline"), ``hexcode`` (OpenMoji's), ``base`` (the held-out key above), ``name``,
``group`` and ``author`` (the OpenMoji designer, for attribution).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from tqdm import tqdm

from train.data import emoji
from train.data.imagefolder import atomic_output_dir, write_metadata

PACKAGE = "openmoji"
VERSION = "17.0.0"
NAMES_PACKAGE = emoji.SETS[0].package  # emoji-datasource-twitter: its emoji.json names the emoji set's captions
STYLE = "openmoji"
# OpenMoji's two renderings (package/<variant>/svg/) and the style word of their captions and image folder:
# "color", flat colours inside a black outline; "black", the same drawings as black line art, no fill.
VARIANTS = {"color": STYLE, "black": "outline"}
GROUPS = ("animals-nature", "food-drink", "activities")
IMAGE_SIZE = emoji.IMAGE_SIZE
SPECS = (f"{PACKAGE}@{VERSION}", f"{NAMES_PACKAGE}@{emoji.VERSION}")  # what the manual step asks to `npm pack`
VARIATION_SELECTOR = "FE0F"


@dataclass(frozen=True)
class OpenMojiImage:
    """One OpenMoji emoji: where its SVG is and what its caption says."""

    hexcode: str  # OpenMoji's code points, e.g. "1F428"; the SVG is package/color/svg/<hexcode>.svg
    base: str  # held-out key: the emoji set's unified code points (e.g. "2615"), else the hexcode
    name: str  # e.g. "koala"
    group: str  # OpenMoji's group, e.g. "animals-nature"
    author: str  # OpenMoji's openmoji_author

    def caption(self, style: str = STYLE) -> str:
        return f"{self.name}, {style} style"


def code_points_key(codes: str) -> str:
    """Code points without variation selector 16: '2615-FE0F' and '2615' -> '2615'."""
    return "-".join(p for p in codes.upper().split("-") if p != VARIATION_SELECTOR)


def select_images(openmoji_entries: Iterable[dict], emoji_entries: Iterable[dict],
                  groups: Iterable[str] = GROUPS) -> list[OpenMojiImage]:
    """The base emoji (no skin tone) of ``groups`` in openmoji.json, named and keyed like the emoji set."""
    openmoji_entries = list(openmoji_entries)
    groups = list(groups)
    known = sorted({e.get("group", "") for e in openmoji_entries})
    unknown = [g for g in groups if g not in known]
    if unknown or not groups:
        raise ValueError(f"OpenMoji group(s) {', '.join(unknown) or '(none given)'}; allowed: {', '.join(known)}")
    twins = {code_points_key(e["unified"]): e for e in emoji_entries}
    images = []
    for entry in openmoji_entries:
        if entry.get("group") not in groups or entry.get("skintone"):
            continue
        twin = twins.get(code_points_key(entry["hexcode"]))
        if twin is not None:
            name, base = emoji.clean_name(twin), twin["unified"].upper()
        else:
            name, base = entry["annotation"].lower().replace("\u2019", "'"), entry["hexcode"].upper()
        images.append(OpenMojiImage(entry["hexcode"].upper(), base, name, entry["group"],
                                    entry.get("openmoji_author") or "OpenMoji"))
    return images


def read_emoji_json(tarball: Path) -> list[dict]:
    """emoji.json of an emoji-datasource tarball (read up to it: it is near the start)."""
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                return json.load(tar.extractfile(member))
    raise ValueError(f"{tarball} has no package/emoji.json; is it an emoji-datasource tarball?")


def read_openmoji(tarball: Path, variant: str = "color") -> tuple[list[dict], dict[str, bytes], str]:
    """openmoji.json, the SVGs of ``variant`` (hexcode -> bytes) and LICENSE.txt of the openmoji tarball, in one pass."""
    prefix = f"package/{variant}/svg/"
    entries, svgs, licence = None, {}, None
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.name == "package/data/openmoji.json":
                entries = json.load(tar.extractfile(member))
            elif member.name == "package/LICENSE.txt":
                licence = tar.extractfile(member).read().decode("utf-8")
            elif member.isfile() and member.name.startswith(prefix) and member.name.endswith(".svg"):
                svgs[member.name[len(prefix):-len(".svg")].upper()] = tar.extractfile(member).read()
    if entries is None:
        raise ValueError(f"{tarball} has no package/data/openmoji.json; is it the openmoji tarball?")
    if licence is None or "Attribution-ShareAlike 4.0" not in licence:
        raise ValueError(f"{tarball} lacks the CC BY-SA 4.0 text in package/LICENSE.txt; is it openmoji@{VERSION}?")
    return entries, svgs, licence


def svg_renderer():
    """cairosvg, or an error saying how to install it (checked before any work)."""
    try:
        import cairosvg
    except (ImportError, OSError) as exc:  # OSError: cairocffi finds no libcairo
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OSError(f"cannot render OpenMoji's SVGs: cairosvg does not load ({first}); `pip install cairosvg` "
                      "and the system's cairo library (Debian: apt-get install libcairo2)") from None
    return cairosvg


def render(svg: bytes, size: int = IMAGE_SIZE):
    """An SVG drawn at ``size`` x ``size`` and composited on white, as a PIL RGB image."""
    return emoji.on_white(svg_renderer().svg2png(bytestring=svg, output_width=size, output_height=size))


def attribution(variant: str = "color") -> str:
    """ATTRIBUTION.txt of a data set rendered from ``variant``'s SVGs."""
    what = {"color": "colour SVG images", "black": "black line-art SVG images"}[variant]
    return f"""OpenMoji graphics (folder {VARIANTS[variant]}/)

All emojis designed by OpenMoji - the open-source emoji and icon project (https://openmoji.org/).
License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); the licence text is in
LICENSE-CC-BY-SA-4.0.txt. Each image's designer is in metadata.jsonl (column author).
Source: the npm package openmoji@{VERSION} (https://github.com/hfg-gmuend/openmoji).

Changes made by ldm-toolkit: the {what} (package/{variant}/svg/) were rendered at
{IMAGE_SIZE}x{IMAGE_SIZE} pixels with cairosvg, composited on a white background (alpha removed) and
saved as RGB PNG files; captions were written from emoji-datasource {emoji.VERSION}'s emoji.json (MIT,
Copyright (c) 2013 Cal Henderson) and OpenMoji's openmoji.json. These images are adaptations of
OpenMoji and are shared under the same licence, CC BY-SA 4.0.
"""


def _write_texts(root: Path, licence: str, count: int, held_out: int, groups: list[str], variant: str) -> None:
    style = VARIANTS[variant]
    (root / "LICENSE-CC-BY-SA-4.0.txt").write_text(licence)
    (root / "ATTRIBUTION.txt").write_text(attribution(variant))
    (root / "LICENSE.txt").write_text(
        "The images in this folder are not ldm-toolkit's: they are adaptations of OpenMoji graphics,\n"
        "licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/), see ATTRIBUTION.txt and\n"
        "LICENSE-CC-BY-SA-4.0.txt. metadata.jsonl (captions) is derived from openmoji.json and\n"
        "emoji-datasource's emoji.json (MIT, Copyright (c) 2013 Cal Henderson).\n")
    (root / "README.md").write_text(
        f"# OpenMoji (ldm-toolkit, openmoji {VERSION}, {variant} SVGs)\n\n"
        f"{count} RGB {IMAGE_SIZE}x{IMAGE_SIZE} images on white, the base emoji (no skin tones) of the OpenMoji "
        f"groups {', '.join(groups)}, in Hugging Face imagefolder layout: metadata.jsonl has file_name, text "
        "(caption), split, style, hexcode, base, name, group, author.\n\n"
        f"Captions: \"<name>, {style} style\", with the emoji set's name (`ldm data emoji`) for the same code "
        f"points, so \"koala, {style} style\" is the twin of \"koala, twemoji style\".\n"
        f"Held-out split: split == \"test\" for {held_out} images, by the emoji set's rule on the same base code "
        "points (an emoji held out there is held out here).\n\n"
        "Built by `ldm data openmoji`. Licences: LICENSE.txt, ATTRIBUTION.txt.\n")


def build_openmoji_dataset(out: Path, *, cache_dir: Optional[Path] = None, overwrite: bool = False,
                           groups: Iterable[str] = GROUPS, variant: str = "color") -> dict:
    """Build the OpenMoji imagefolder in ``out`` (written in a temporary folder, renamed into place).

    ``variant`` "black" renders OpenMoji's line-art SVGs instead, captioned "<name>, outline style" in a folder
    ``outline/``. Returns counts: ``{"total": n, "test": n, "groups": {group: n}}``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"OpenMoji variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    style = VARIANTS[variant]
    svg_renderer()
    cache_dir = Path(cache_dir) if cache_dir is not None else emoji.default_cache_dir()
    groups = list(groups)
    with atomic_output_dir(Path(out), overwrite=overwrite, inputs=[cache_dir]) as tmp:
        openmoji_tarball = emoji.fetch_tarball(PACKAGE, cache_dir, version=VERSION, specs=SPECS)
        names_tarball = emoji.fetch_tarball(NAMES_PACKAGE, cache_dir, version=emoji.VERSION, specs=SPECS)
        entries, svgs, licence = read_openmoji(openmoji_tarball, variant)
        images = select_images(entries, read_emoji_json(names_tarball), groups)
        missing = [im.hexcode for im in images if im.hexcode not in svgs]
        if missing:
            raise ValueError(f"{openmoji_tarball.name} lacks {len(missing)} SVGs listed in openmoji.json, e.g. {missing[0]}")
        (tmp / style).mkdir()
        rows, per_group = [], {g: 0 for g in groups}
        for im in tqdm(images, desc="openmoji", unit="img"):
            file_name = f"{style}/{im.hexcode}.png"
            render(svgs[im.hexcode]).save(tmp / file_name)
            rows.append({"file_name": file_name, "text": im.caption(style),
                         "split": "test" if emoji.is_held_out(im.base) else "train", "style": style,
                         "hexcode": im.hexcode, "base": im.base, "name": im.name, "group": im.group,
                         "author": im.author})
            per_group[im.group] += 1
        write_metadata(tmp, rows)
        held_out = sum(r["split"] == "test" for r in rows)
        _write_texts(tmp, licence, len(rows), held_out, groups, variant)
    return {"total": len(rows), "test": held_out, "groups": per_group}
