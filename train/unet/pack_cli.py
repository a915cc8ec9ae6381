"""Pack a trained bundle for shipping: fp16 weights and a token table cut to the training vocabulary.

  ldm pack runs/ldm-emoji/bundle --out ldm/default_model --vocab-from data/emoji --overwrite

The packed bundle loads into the same pipeline (weights are cast back to the compute dtype).
--vocab-from keeps the token-embedding rows of every token in that data set's captions; all other
tokens share one row (they were never trained, so a small CLIP learned nothing about them). Prints
the size of each part before and after.

--out must be a new or empty folder; --overwrite replaces an earlier bundle there (one holding only a
bundle's files), never the source bundle, a folder around it, or a folder of other files.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="the trained bundle (e.g. runs/ldm-emoji/bundle)")
    parser.add_argument("--out", required=True, help="folder of the packed copy: new or empty (written atomically)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it holds an earlier bundle (never the source bundle or a folder around it)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="storage type of the weights (default float16)")
    parser.add_argument("--vocab-from", action="append", default=[], metavar="DATA",
                        help="captioned data set whose caption tokens keep their own rows (repeatable); "
                             "without it the full token table is kept")
    parser.add_argument("--caption-column", default="text", help="column holding the captions (default text)")


def run(args: argparse.Namespace) -> int:
    from ldm.pack import claim_pack_output, pack_bundle
    from train.data import load_captions

    claim_pack_output(args.bundle, args.out, overwrite=args.overwrite, inputs=args.vocab_from)  # before any loading
    captions = None
    if args.vocab_from:
        captions = [c for path in args.vocab_from for c in load_captions(path, caption_column=args.caption_column)]
    sizes = pack_bundle(args.bundle, args.out, dtype=args.dtype, keep_captions=captions, overwrite=args.overwrite)
    for part in ("unet", "vae", "text_encoder"):
        before, after = sizes.get(f"{part} before", 0), sizes.get(f"{part} after", 0)
        print(f"{part:13s} {before / 1e6:8.2f} MB -> {after / 1e6:8.2f} MB")
    total_before = sum(v for k, v in sizes.items() if k.endswith("before"))
    total_after = sum(v for k, v in sizes.items() if k.endswith("after"))
    print(f"{'total':13s} {total_before / 1e6:8.2f} MB -> {total_after / 1e6:8.2f} MB  ({args.out})")
    return 0
