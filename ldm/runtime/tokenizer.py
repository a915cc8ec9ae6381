"""open_clip's ``SimpleTokenizer`` without torch or open_clip: the same ids for the same text.

The text cleaning (ftfy's ``fix_text``, ``html.unescape`` twice, whitespace collapse, lower case for
``clean="lower"``), the pre-split regex with its two special tokens and the byte-level BPE are open_clip's
(``open_clip/tokenizer.py``), read from the vocabulary file open_clip ships, found without importing it.
tests/test_runtime.py checks the ids against open_clip's on ordinary and awkward prompts.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # the merges open_clip reads from its file (conditioning.bpe.FULL_NUM_MERGES)
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
CLEANS = ("lower", "whitespace")


def bpe_file() -> Path:
    """open_clip's bpe_simple_vocab_16e6.txt.gz, located without running open_clip's ``__init__`` (it imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; its BPE vocabulary file is needed")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (open_clip's ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class SimpleTokenizer:
    """``encode(text) -> ids`` (no start/end tokens), ``sot_token_id``, ``eot_token_id``, as open_clip's."""

    def __init__(self, clean: str = "lower"):
        import regex

        if clean not in CLEANS:
            raise ValueError(f"clean={clean!r} is not supported here; allowed: {', '.join(CLEANS)}")
        self.clean = clean
        lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in SPECIAL_TOKENS}
        self.pat = regex.compile("|".join(SPECIAL_TOKENS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.vocab_size = len(self.encoder)
        self.sot_token_id, self.eot_token_id = (self.encoder[t] for t in SPECIAL_TOKENS)

    def _clean(self, text: str) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = " ".join(text.split()).strip()
        return text.lower() if self.clean == "lower" else text

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        byte_encoder = bytes_to_unicode()
        ids = []
        for token in self.pat.findall(self._clean(text)):
            token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids


@functools.lru_cache(maxsize=2)
def simple_tokenizer(clean: str) -> SimpleTokenizer:
    return SimpleTokenizer(clean)


def token_ids(tokenizer: SimpleTokenizer, prompt: str, length: int, pad_id: int = 0) -> list[int]:
    """Start, the prompt's ids, end, cut to ``length`` with the end token kept, padded with ``pad_id``
    (``conditioning.TextEncoder.tokenize``; it also warns about the cut, which the torch path does)."""
    ids = [tokenizer.sot_token_id] + tokenizer.encode(prompt) + [tokenizer.eot_token_id]
    if len(ids) > length:
        ids = ids[: length - 1] + [tokenizer.eot_token_id]
    return ids + [pad_id] * (length - len(ids))
