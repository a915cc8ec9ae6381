"""CLIP's byte-level BPE vocabulary, from the file open_clip ships, as transformers' tokenizer files.

OpenAI's CLIP tokenizer, open_clip's ``SimpleTokenizer`` and transformers'
``CLIPTokenizer`` share one vocabulary: the 256 byte symbols, the same 256 with
the end-of-word mark ``</w>``, one token per BPE merge (48,894 merges in
``bpe_simple_vocab_16e6.txt.gz``) and the two special tokens, 49,408 ids in
all. ``write_clip_tokenizer_files`` writes that vocabulary as ``vocab.json`` +
``merges.txt`` so that ``CLIPTokenizer.from_pretrained(folder)`` works offline;
``num_merges`` keeps only the first merges, for tiny test tokenizers.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path
from typing import Optional

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
FULL_NUM_MERGES = 49152 - 256 - 2  # what open_clip's SimpleTokenizer reads from the file


def _bpe_file() -> str:
    from open_clip.tokenizer import default_bpe

    return default_bpe()


@functools.lru_cache(maxsize=None)
def _all_merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : FULL_NUM_MERGES + 1])


def _bytes_to_unicode() -> dict[int, str]:
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def clip_bpe_vocab(num_merges: Optional[int] = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) of CLIP's tokenizer; the first ``num_merges`` merges only when given."""
    merges = list(_all_merges())
    if num_merges is not None:
        if not 0 <= num_merges <= len(merges):
            raise ValueError(f"num_merges={num_merges} must be in 0..{len(merges)}")
        merges = merges[:num_merges]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(
    folder: str | os.PathLike,
    num_merges: Optional[int] = None,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = 77,
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` loadable by ``CLIPTokenizer``.

    ``pad_token``: ``"<|endoftext|>"`` as in OpenAI's CLIP and Stable Diffusion 1.x, or ``"!"``
    (id 0) as in Stable Diffusion 2 and open_clip, which pads with zeros.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab(num_merges)
    if pad_token not in vocab:
        raise ValueError(f"pad_token={pad_token!r} is not in the vocabulary; use {EOS_TOKEN!r} or '!'")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "model_max_length": model_max_length,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
