"""Build or check a captioned image data set.

  ldm data emoji --out DIR          Twemoji + Noto emoji (npm packages, 64x64, captions from emoji.json)
  ldm data openmoji --out DIR [--groups G,...] [--variant color|black]
                                    OpenMoji emoji (npm package openmoji, CC BY-SA 4.0), 64x64, captions
                                    "<name>, openmoji style" named like the emoji set's; 376 images by default;
                                    --variant black: its line-art drawings, "<name>, outline style"
  ldm data shapes --out DIR [--size 32|64] [--n N] [--seed S]
                                    procedural shapes with exact captions ("a small red circle at the top left")
  ldm data check PATH [--allow-outside]
                                    load PATH as training would and print the summary: kept, skipped and
                                    why, captions over 77 tokens; exit 0 when at least one pair is usable.
                                    Rows whose image lies outside PATH's folder (an absolute path, "..", a
                                    symlink out of it) are skipped unless --allow-outside (in the trainers'
                                    configs: data.allow_outside_paths=true)

Formats `check` (and training) read: a folder with metadata.jsonl or metadata.csv (imagefolder),
a folder of images with .txt/.caption sidecars, a .csv/.jsonl file of (path, caption), a
save_to_disk folder, parquet files; and streams (train.data.streams): webdataset .tar shards (a path,
a brace pattern such as "shards/{00000..00099}.tar", a URL, a folder of .tar files) and hf:NAME (a
Hugging Face data set, hub name or local folder, read with streaming=True).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{emoji,openmoji,shapes,check}", required=True)

    emoji = sub.add_parser("emoji", help="build the emoji set from the npm packages (needs npm or cached tarballs)")
    emoji.add_argument("--out", required=True, help="output folder: new or empty")
    emoji.add_argument("--cache", default=None, help="where the npm tarballs are kept (default $LDM_CACHE/npm or ~/.cache/ldm-toolkit/npm)")
    emoji.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier data set (and nothing else)")

    openmoji = sub.add_parser(
        "openmoji", help="build the OpenMoji set from the npm package (needs npm or cached tarballs)",
        description="Render the OpenMoji colour SVGs (npm openmoji@17.0.0, CC BY-SA 4.0) at 64x64 on white, "
                    "captioned \"<name>, openmoji style\" with the emoji set's name for the same emoji "
                    "(from emoji-datasource-twitter@16.0.0's emoji.json), held out by the emoji set's rule.")
    openmoji.add_argument("--out", required=True, help="output folder: new or empty")
    openmoji.add_argument("--groups", default=None,
                          help="comma-separated OpenMoji groups whose base emoji (no skin tones) to take "
                               "(default animals-nature,food-drink,activities: 376 images)")
    openmoji.add_argument("--variant", choices=("color", "black"), default="color",
                          help="which of OpenMoji's SVG sets to render: color (default; captions \"<name>, openmoji "
                               "style\") or black, its black line-art drawings (captions \"<name>, outline style\")")
    openmoji.add_argument("--cache", default=None, help="where the npm tarballs are kept (default $LDM_CACHE/npm or ~/.cache/ldm-toolkit/npm)")
    openmoji.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier data set (and nothing else)")

    shapes = sub.add_parser("shapes", help="generate the procedural shapes set")
    shapes.add_argument("--out", required=True, help="output folder: new or empty")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels: 32 or 64 (default 64)")
    shapes.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shapes.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier data set (and nothing else)")

    check = sub.add_parser("check", help="print the data summary of a data set")
    check.add_argument("path", help="data folder or file, webdataset shards (path, {00000..00099}.tar pattern, URL) or hf:NAME")
    check.add_argument("--caption-column", default="text", help="column holding the captions (default text)")
    check.add_argument("--image-column", default=None, help="column holding images or paths (default: detected)")
    check.add_argument("--format", default=None, help="force a format: imagefolder, sidecar, csv, jsonl, disk, parquet")
    check.add_argument("--split", default=None, help="only rows of this split (e.g. train, test)")
    check.add_argument("--min-size", type=int, default=32, help="skip images whose shorter side is smaller (default 32)")
    check.add_argument("--allow-outside", action="store_true",
                       help="read images outside the data folder (absolute paths, '..', symlinks out of it); "
                            "without it such rows are skipped and counted (trainers: data.allow_outside_paths=true)")


def _emoji(args: argparse.Namespace) -> int:
    from train.data.emoji import build_emoji_dataset

    counts = build_emoji_dataset(args.out, cache_dir=args.cache, overwrite=args.overwrite)
    print(f"wrote {counts['total']} images to {args.out}: {counts['twemoji']} twemoji, {counts['noto']} noto; "
          f"{counts['test']} held out (split test)")
    return 0


def _openmoji(args: argparse.Namespace) -> int:
    from train.data.openmoji import GROUPS, build_openmoji_dataset

    groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups is not None else GROUPS
    counts = build_openmoji_dataset(args.out, cache_dir=args.cache, overwrite=args.overwrite, groups=groups,
                                    variant=args.variant)
    per_group = ", ".join(f"{n} {group}" for group, n in counts["groups"].items())
    print(f"wrote {counts['total']} images to {args.out}: {per_group}; {counts['test']} held out (split test)")
    return 0


ROW_BYTES = 1024  # memory per image while the set is built (its metadata row: about 430 bytes, measured)
LONG_BUILD = 120  # seconds: a longer build says its estimate first


def _check_shapes_size(args: argparse.Namespace) -> None:
    """Time and size a few images, then refuse an --n whose files cannot fit on the disk (bytes rounded up to
    the file system's blocks, and inodes) or whose rows cannot fit in memory; say the time of a long build."""
    import io
    import os
    import sys
    import time

    from ldm import shapes
    from ldm.generate_cli import MEMORY_SHARE, available_memory, duration_text, size_text

    if args.n < 1 or args.size not in (32, 64):
        return  # build_shapes_dataset says what is allowed
    sample = min(args.n, 32)
    start, written = time.perf_counter(), 0
    for image, _, _ in shapes.generate(sample, args.size, args.seed):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        written += len(buffer.getvalue())
    seconds = (time.perf_counter() - start) / sample
    folder = Path(args.out).resolve().parent
    while not folder.is_dir():
        folder = folder.parent
    fs = os.statvfs(folder)
    block = fs.f_frsize or 4096
    disk = args.n * (-(-written // sample // block) * block + 200)  # each file's blocks, its metadata line
    memory = args.n * ROW_BYTES
    free_memory, where = available_memory("cpu")
    what = f"--n {args.n} images of {args.size} px"
    if disk > fs.f_bavail * fs.f_frsize or (fs.f_files and args.n > fs.f_favail):
        raise ValueError(f"{what} need about {size_text(disk)} and {args.n} files on the disk of {folder}, which has "
                         f"{size_text(fs.f_bavail * fs.f_frsize)} and {fs.f_favail} files free; give a smaller --n")
    if memory > MEMORY_SHARE * free_memory:
        raise ValueError(f"{what} need about {size_text(memory)} of memory while the set is built and {where} "
                         f"{size_text(free_memory)} free; give a smaller --n")
    if args.n * seconds >= LONG_BUILD:
        print(f"note: {what}: about {duration_text(args.n * seconds)} and {size_text(disk)} of disk", file=sys.stderr)


def _shapes(args: argparse.Namespace) -> int:
    from train.data.shapes import build_shapes_dataset

    _check_shapes_size(args)
    n = build_shapes_dataset(args.out, side=args.size, n=args.n, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {n} shapes images ({args.size} px, seed {args.seed}) to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from train.data import load_captioned_images
    from train.data.streams import check_stream, stream_format

    if stream_format(args.path) is not None:
        summary = check_stream(args.path, caption_column=args.caption_column, image_column=args.image_column,
                               min_size=args.min_size, allow_outside_paths=args.allow_outside)
        print(summary)
        if summary.kept == 0:
            raise ValueError(f"{args.path} has no usable image-caption pair (see the reasons above)")
        return 0
    data = load_captioned_images(args.path, caption_column=args.caption_column, image_column=args.image_column,
                                 format=args.format, split=args.split, min_size=args.min_size,
                                 allow_outside_paths=args.allow_outside)
    print(data.summary())
    if len(data) == 0:
        raise ValueError(f"{args.path} has no usable image-caption pair (see the reasons above)")
    return 0


def run(args: argparse.Namespace) -> int:
    commands = {"emoji": _emoji, "openmoji": _openmoji, "shapes": _shapes, "check": _check}
    try:
        return commands[args.data_command](args)
    except FileExistsError as exc:  # a non-empty --out: the user's to fix
        raise ValueError(str(exc)) from None
