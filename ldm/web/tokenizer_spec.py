"""What ``static/tokenizer.js`` needs to give the token ids the Python text encoder gives.

Two tokenizers are supported, the two the text encoders use (``conditioning``):

* ``open_clip``: open_clip's ``SimpleTokenizer``: ftfy's ``fix_text``, ``html.unescape`` twice,
  strip, whitespace collapse, lower case (``clean="lower"``; ``whitespace`` and ``canonicalize``
  too), the pre-split regex with its two special tokens, byte-level BPE, zero padding.
* ``hf``: transformers' ``CLIPTokenizer`` (Stable Diffusion folders): special tokens matched in
  the raw text, NFC, ``\\s+`` -> " ", lower case, the same pre-split and BPE, the pad token.

The page gets the vocabulary and merges, the special ids and the tables the cleaning steps use
(ftfy's ligature, width, control-character and C1 maps, HTML entities, the whitespace sets),
all read here from the Python libraries, so the JavaScript holds only the algorithms. ftfy's
mojibake repair (``fix_encoding``) is not reproduced: text that ftfy would re-decode (e.g.
``"sÃ³"``) tokenizes differently in the page.
"""

from __future__ import annotations

import html
import html.entities
import json


def _py_whitespace() -> str:
    """Characters for which Python's ``str.isspace()`` holds: what ``split()``/``strip()`` remove."""
    return "".join(chr(c) for c in range(0x3100) if chr(c).isspace())


def _regex_whitespace() -> str:
    """Characters ``\\s`` matches in the ``regex`` module (Unicode White_Space), as the pre-split sees them."""
    import regex

    return "".join(chr(c) for c in range(0x3100) if regex.match(r"\s", chr(c)))


def _ftfy_tables() -> dict:
    from ftfy import chardata

    c1 = {chr(c): bytes([c]).decode("sloppy-windows-1252") for c in range(0x80, 0xA0)}
    translate = {}
    for table in (chardata.LIGATURES, chardata.WIDTH_MAP):
        translate.update({chr(k): v for k, v in table.items()})
    return {
        "html_entities": chardata.HTML_ENTITIES,  # ftfy's own, "&name;" -> text
        "c1": c1,
        "translate": [translate, {chr(k): "" for k in chardata.CONTROL_CHARS}],
        "single_quotes": chardata.SINGLE_QUOTE_RE.pattern,
        "double_quotes": chardata.DOUBLE_QUOTE_RE.pattern,
    }


def _html_tables() -> dict:
    """What ``html.unescape`` uses: the HTML5 names and the invalid character references."""
    from html import _invalid_charrefs, _invalid_codepoints  # the tables html.unescape reads

    return {
        "html5": html.entities.html5,
        "invalid_charrefs": {str(k): v for k, v in _invalid_charrefs.items()},
        "invalid_codepoints": sorted(_invalid_codepoints),
    }


def _open_clip_spec(encoder) -> dict:
    tok = encoder.tokenizer
    n = len(tok.encoder)
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    return {
        "kind": "open_clip",
        "clean": encoder.clean,
        "vocab": [tok.decoder[i] for i in range(n)],
        "merges": [" ".join(m) for m in merges],
        "special_tokens": [tok.decoder[i] for i in tok.all_special_ids],
        "unk_id": None,
        "py_whitespace": _py_whitespace(),
        "regex_whitespace": _regex_whitespace(),
        "ftfy": _ftfy_tables(),
        "html": _html_tables(),
    }


# The one transformers CLIPTokenizer pipeline tokenizer.js implements; anything else is refused.
_HF_NORMALIZER = [{"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]
_HF_SPLIT = ("'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+")


def _hf_spec(encoder) -> dict:
    tok = encoder.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tok).__name__} has no tokenizers backend; the browser supports transformers' fast CLIPTokenizer")
    j = json.loads(backend.to_str())
    specials = [a["content"] for a in j.get("added_tokens", []) if a.get("special")]
    norm = j.get("normalizer") or {}
    pre = (j.get("pre_tokenizer") or {}).get("pretokenizers") or []
    split = pre[0]["pattern"]["Regex"] if pre and pre[0].get("type") == "Split" else None
    split_specials = ["<|startoftext|>", "<|endoftext|>"]  # alternatives of CLIP's split regex, not the added tokens
    expected_split = "|".join([s.replace("|", "\\|") for s in split_specials] + [_HF_SPLIT])
    model = j["model"]
    if (norm.get("normalizers") != _HF_NORMALIZER or split != expected_split or len(pre) != 2
            or pre[1].get("type") != "ByteLevel" or model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>"
            or model.get("continuing_subword_prefix") not in ("", None) or model.get("byte_fallback")):
        raise ValueError("this CLIPTokenizer's pipeline (normalizer, pre-tokenizer or BPE model) is not the one "
                         "tokenizer.js implements (NFC, \\s+ -> ' ', lower case, CLIP's split, byte-level BPE with </w>)")
    vocab = dict(model["vocab"])
    for a in j.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    unk = model.get("unk_token")
    return {
        "kind": "hf",
        "clean": "hf",
        "vocab": tokens,
        "merges": merges,
        "special_tokens": specials,
        "split_specials": split_specials,
        "unk_id": vocab.get(unk) if unk is not None else None,
        "regex_whitespace": _regex_whitespace(),
    }


def tokenizer_spec(text_encoder) -> dict:
    """The tokenizer of ``text_encoder`` (a ``conditioning.TextEncoder``) for tokenizer.js, with the
    ids and length that ``text_encoder.tokenize`` uses (start, end and pad tokens, context length)."""
    backend = getattr(text_encoder, "backend", None)
    if backend == "open_clip":
        spec = _open_clip_spec(text_encoder)
    elif backend == "transformers":
        spec = _hf_spec(text_encoder)
    else:
        raise ValueError(f"text encoder backend {backend!r} is not supported in the browser; allowed: open_clip, transformers")
    spec.update(bos_id=int(text_encoder.tokenize([""])[0, 0]), eos_id=int(text_encoder.eos_token_id),
                pad_id=int(text_encoder.pad_token_id), max_length=int(text_encoder.max_length))
    return spec
