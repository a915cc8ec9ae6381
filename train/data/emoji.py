"""The emoji data set: Twemoji and Noto 64x64 images with captions from emoji.json.

``build_emoji_dataset(out)`` (``ldm data emoji --out DIR``) fetches two npm tarballs with the npm
client, ``emoji-datasource-twitter@16.0.0`` (Twemoji, CC-BY 4.0) and
``emoji-datasource-google@16.0.0`` (Noto Emoji, Apache 2.0), takes their 64x64 PNGs
(``package/img/<set>/64/<image>``, 3,786 per set: base emoji plus skin tones), composites them on
white and writes a Hugging Face imagefolder::

    DIR/metadata.jsonl           one row per image, see below
    DIR/twemoji/<image>.png      RGB, 64x64
    DIR/noto/<image>.png
    DIR/LICENSE.txt, DIR/ATTRIBUTION.txt, DIR/LICENSE-APACHE-2.0.txt, DIR/README.md

The Apple and Facebook sets are never used: their images are not licensed for this.

Rows of metadata.jsonl: ``file_name``, ``text`` (the caption), ``split`` ("train" or "test"),
``style`` ("twemoji" or "noto"), ``unified`` (the image's code points), ``base`` (the code points of
the emoji without skin tone), ``name`` and ``skin_tone`` (null without one).

Captions: ``"<name>[, <skin tone>], <style> style"``, e.g. "koala, twemoji style",
"waving hand, medium skin tone, noto style". The style words are ``twemoji`` and ``noto``. The
name is emoji.json's ``name`` in lower case, except for legacy Unicode names that call a glyph
"black" or "white" for its fill in old fonts ("black sun with rays" is a yellow sun, "black
scissors" are red, "white medium star" is yellow): when a name says black or white and no short
name does, the first short name replaces it (underscores to spaces, a trailing number dropped:
"sunny", "scissors", "star", "heart", "point up"). ``RENAMED`` fixes the one name whose short names
repeat the error. Skin tones are the CLDR names of the Fitzpatrick modifiers; two-person emoji with two
tones get both ("light skin tone, dark skin tone").

Held-out split: an emoji goes to ``test`` when the first 8 hex digits of the SHA-256 of its base
code points (e.g. "1F44B" for every waving hand), read as an integer, are below 5% of 16^8. All
skin tones and both styles of one emoji therefore land on the same side, and the split does not
change when emoji are added. In 16.0.0 it holds out 91 of the 1,911 base emoji (4.8%) and 392 of
the 7,572 images (5.2%, 196 per style).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from tqdm import tqdm

from train.data import emoji_licences
from train.data.imagefolder import atomic_output_dir, write_metadata

VERSION = "16.0.0"
HELD_OUT_FRACTION = 0.05
IMAGE_SIZE = 64


@dataclass(frozen=True)
class EmojiSet:
    """One image set of emoji-datasource."""

    key: str  # the set's name in emoji-datasource: img/<key>/64/, has_img_<key>
    package: str  # npm package
    style: str  # the style word in captions and the output folder's name


SETS = (
    EmojiSet("twitter", "emoji-datasource-twitter", "twemoji"),
    EmojiSet("google", "emoji-datasource-google", "noto"),
)

# Fitzpatrick modifiers -> CLDR names.
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}

# unified -> caption name, where the short names repeat a misleading legacy name.
RENAMED = {"2734-FE0F": "eight pointed star"}  # "eight pointed black star": black in Twemoji, orange in Noto

_COLOUR_WORDS = ("black", "white")


@dataclass(frozen=True)
class EmojiImage:
    """One image of a set: where it is in the tarball and what its caption says."""

    unified: str  # the image's code points, e.g. "1F44B-1F3FD"
    base: str  # the emoji's code points without skin tone, e.g. "1F44B"
    image: str  # file name under package/img/<set>/64/
    name: str  # cleaned name, e.g. "waving hand"
    skin_tone: Optional[str]  # e.g. "medium skin tone", None without one

    def caption(self, style: str) -> str:
        parts = [self.name] + ([self.skin_tone] if self.skin_tone else []) + [f"{style} style"]
        return ", ".join(parts)


def _short_name_words(short_name: str) -> str:
    words = short_name.replace("_", " ").split()
    if len(words) > 1 and words[-1].isdigit():  # "point_up_2" -> "point up"
        words = words[:-1]
    return " ".join(words)


def clean_name(entry: dict) -> str:
    """The caption name of an emoji.json entry: its lower-case name, or a short name where the name misleads."""
    if entry.get("unified") in RENAMED:
        return RENAMED[entry["unified"]]
    short_names = [s.lower() for s in entry.get("short_names") or [entry.get("short_name") or ""]]
    name = (entry.get("name") or "").lower().replace("\u2019", "'")
    if not name:
        return _short_name_words(short_names[0])
    words = re.split(r"[\s:,-]+", name)
    for colour in _COLOUR_WORDS:
        if colour in words and not any(colour in s.split("_") for s in short_names):
            return _short_name_words(short_names[0])
    return name


def skin_tone_name(key: str) -> str:
    """'1F3FD' -> 'medium skin tone'; '1F3FB-1F3FF' -> 'light skin tone, dark skin tone'; '1F3FB-1F3FB' -> 'light skin tone'."""
    tones = []
    for part in key.upper().split("-"):
        if part not in SKIN_TONES:
            raise ValueError(f"unknown skin tone modifier {part!r} in {key!r}; known: {', '.join(SKIN_TONES)}")
        if part not in tones:
            tones.append(part)
    return ", ".join(SKIN_TONES[t] for t in tones)


def parse_emoji_json(entries: Iterable[dict], image_set: str) -> list[EmojiImage]:
    """The images of one set (``"twitter"`` or ``"google"``) listed in emoji.json, skin tones included.

    Entries and skin variations whose ``has_img_<set>`` flag is false are left out.
    """
    allowed = [s.key for s in SETS]
    if image_set not in allowed:
        raise ValueError(f"image_set={image_set!r}; allowed: {', '.join(allowed)} (never apple or facebook)")
    flag = f"has_img_{image_set}"
    images = []
    for entry in entries:
        name = clean_name(entry)
        base = entry["unified"].upper()
        if entry.get(flag):
            images.append(EmojiImage(base, base, entry["image"], name, None))
        for key, variation in sorted((entry.get("skin_variations") or {}).items()):
            if variation.get(flag):
                images.append(EmojiImage(variation["unified"].upper(), base, variation["image"], name, skin_tone_name(key)))
    return images


def is_held_out(base: str) -> bool:
    """Whether the emoji with base code points ``base`` belongs to the held-out ``test`` split."""
    digest = hashlib.sha256(base.upper().encode("ascii")).hexdigest()
    return int(digest[:8], 16) < HELD_OUT_FRACTION * 16**8


def default_cache_dir() -> Path:
    """Where npm tarballs are kept: $LDM_CACHE/npm, else ~/.cache/ldm-toolkit/npm."""
    root = os.environ.get("LDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldm-toolkit")
    return Path(root) / "npm"


def _manual_step(cache_dir: Path, specs: Optional[Iterable[str]] = None) -> str:
    specs = " ".join(specs or [f"{s.package}@{VERSION}" for s in SETS])
    return f"on a machine with Node.js run `npm pack {specs}` and copy the .tgz files into {cache_dir}"


def fetch_tarball(package: str, cache_dir: Path, *, version: str = VERSION, specs: Optional[Iterable[str]] = None) -> Path:
    """The npm tarball of ``package@version`` in ``cache_dir``, fetched with ``npm pack`` if absent.

    ``specs``: the ``package@version`` list the error's manual step names (default: the emoji set's two).
    """
    cache_dir = Path(cache_dir)
    specs = list(specs) if specs is not None else None
    path = cache_dir / f"{package}-{version}.tgz"
    if path.is_file():
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"npm is not installed (needed to fetch {package}@{version}); {_manual_step(cache_dir, specs)}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        proc = subprocess.run([npm, "pack", f"{package}@{version}", "--pack-destination", tmp],
                              capture_output=True, text=True)
        fetched = Path(tmp) / path.name
        if proc.returncode != 0 or not fetched.is_file():
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FileNotFoundError(f"`npm pack {package}@{version}` failed ({detail}); {_manual_step(cache_dir, specs)}")
        os.replace(fetched, path)
    return path


def _read_set(tarball: Path, image_set: str) -> tuple[list[dict], dict[str, bytes]]:
    """emoji.json and the 64 px PNGs (file name -> bytes) of one tarball, in one pass over it."""
    prefix = f"package/img/{image_set}/{IMAGE_SIZE}/"
    entries, pngs = None, {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                entries = json.load(tar.extractfile(member))
            elif member.isfile() and member.name.startswith(prefix) and member.name.endswith(".png"):
                pngs[member.name[len(prefix):]] = tar.extractfile(member).read()
    if entries is None:
        raise ValueError(f"{tarball} has no package/emoji.json; is it an emoji-datasource tarball?")
    return entries, pngs


def on_white(png: bytes):
    """A PNG's pixels composited on white, as a PIL RGB image."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def _write_texts(root: Path, counts: dict[str, int], held_out: int, total: int) -> None:
    (root / "LICENSE-APACHE-2.0.txt").write_text(emoji_licences.APACHE_2_0)
    (root / "ATTRIBUTION.txt").write_text(
        emoji_licences.TWEMOJI + "\n" + emoji_licences.NOTO + "\n" + emoji_licences.CHANGES + "\n")
    (root / "LICENSE.txt").write_text(
        "The images in this folder are not ldm-toolkit's: each set keeps its own licence.\n\n"
        "twemoji/: CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), see ATTRIBUTION.txt.\n"
        "noto/: Apache License 2.0, see LICENSE-APACHE-2.0.txt and ATTRIBUTION.txt.\n"
        "metadata.jsonl (captions) is derived from emoji-datasource's emoji.json (MIT, Copyright (c) 2013 Cal Henderson).\n")
    per_style = ", ".join(f"{n} {style}" for style, n in counts.items())
    (root / "README.md").write_text(
        f"# Emoji (ldm-toolkit, emoji-datasource {VERSION})\n\n"
        f"{total} RGB 64x64 images ({per_style}) in Hugging Face imagefolder layout: metadata.jsonl has "
        "file_name, text (caption), split, style, unified, base, name, skin_tone.\n\n"
        f"Captions: \"<name>[, <skin tone>], <style> style\", style twemoji or noto.\n"
        f"Held-out split: split == \"test\" for {held_out} images, the emoji whose SHA-256 of the base code points "
        f"falls in the first {HELD_OUT_FRACTION:.0%} of its range; skin tones and styles of one emoji share a side.\n\n"
        "Built by `ldm data emoji`. Licences: LICENSE.txt, ATTRIBUTION.txt.\n")


def build_emoji_dataset(out: Path, *, cache_dir: Optional[Path] = None, overwrite: bool = False) -> dict:
    """Build the emoji imagefolder in ``out`` (written in a temporary folder, renamed into place).

    Returns counts: ``{"twemoji": n, "noto": n, "test": n, "total": n}``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with atomic_output_dir(Path(out), overwrite=overwrite, inputs=[cache_dir]) as tmp:
        tarballs = {s.key: fetch_tarball(s.package, cache_dir) for s in SETS}
        rows, counts = [], {}
        for emoji_set in SETS:
            entries, pngs = _read_set(tarballs[emoji_set.key], emoji_set.key)
            images = parse_emoji_json(entries, emoji_set.key)
            missing = [im.image for im in images if im.image not in pngs]
            if missing:
                raise ValueError(f"{tarballs[emoji_set.key].name} lacks {len(missing)} images listed in emoji.json, e.g. {missing[0]}")
            (tmp / emoji_set.style).mkdir()
            for im in tqdm(images, desc=f"emoji {emoji_set.style}", unit="img"):
                file_name = f"{emoji_set.style}/{im.image}"
                on_white(pngs[im.image]).save(tmp / file_name)
                rows.append({"file_name": file_name, "text": im.caption(emoji_set.style),
                             "split": "test" if is_held_out(im.base) else "train", "style": emoji_set.style,
                             "unified": im.unified, "base": im.base, "name": im.name, "skin_tone": im.skin_tone})
            counts[emoji_set.style] = len(images)
        write_metadata(tmp, rows)
        held_out = sum(r["split"] == "test" for r in rows)
        _write_texts(tmp, counts, held_out, len(rows))
    return {**counts, "test": held_out, "total": len(rows)}
