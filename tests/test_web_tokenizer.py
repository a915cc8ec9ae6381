"""static/tokenizer.js gives the token ids of the Python text encoders (run with node)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ldm.web.tokenizer_spec import tokenizer_spec

STATIC = Path(__file__).resolve().parents[1] / "ldm" / "web" / "static"

PROMPTS = [
    "koala, twemoji style",
    "",
    "   ",
    "Hello,   World!!! 123 4.56 3.14e-10 1,000,000",
    "don't stop: it's 'quoted', “curly” and ‘single’ quotes; we'll, they've, I'm, you'd, you're",
    "café naïve résumé ÜNÏCÖDÉ Ελληνικά ΟΔΟΣ Σ straße İstanbul",
    "日本語のテキスト 中文 한국어 ｶﾀｶﾅ",
    "emoji 😀🐨👩‍👩‍👧 flags 🇫🇷 ♥️ ✨",
    "ﬁne ﬂour ＦＵＬＬＷＩＤＴＨ　ideographic space",
    "&amp; &lt;b&gt; &eacute; &EACUTE; &#233; &#x1F600; &#128; &#0; &notin &nosuch; &amp;amp;",
    "x < y &amp; z",
    "tabs\tand\nnew\r\nlines\u2028sep\u00a0nbsp \x85 next",
    "\x07bell \x1b[31mred\x1b[0m \ufeffbom zero\u200bwidth e\u0301 combining",
    "under_score CamelCase ALLCAPS snake-case kebab/slash back\\slash @#$%^*()[]{}",
    "<start_of_text> <end_of_text> <|endoftext|> <|startoftext|> <|ENDOFTEXT|>! <START_OF_TEXT>",
    " ".join(f"word{i}" for i in range(120)),  # longer than 77 tokens: cut, end token kept
    "a " * 80,
]


def node_ids(spec: dict, prompts: list[str], tmp_path: Path) -> list[list[int]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; tokenizer.js is tested with it (apt-get install nodejs)")
    shutil.copy(STATIC / "tokenizer.js", tmp_path / "tokenizer.mjs")
    (tmp_path / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    script = tmp_path / "run.mjs"
    script.write_text(
        "import { readFileSync } from 'fs';\n"
        "import { ClipTokenizer } from './tokenizer.mjs';\n"
        "const tok = new ClipTokenizer(JSON.parse(readFileSync(process.argv[2], 'utf8')));\n"
        "const prompts = JSON.parse(readFileSync(process.argv[3], 'utf8'));\n"
        "console.log(JSON.stringify(prompts.map((p) => tok.tokenize(p).ids)));\n"
    )
    out = subprocess.run([node, str(script), str(tmp_path / "spec.json"), str(tmp_path / "prompts.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def check_same_ids(encoder, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts warn that they are cut
        expected = encoder.tokenize(PROMPTS).tolist()
    got = node_ids(tokenizer_spec(encoder), PROMPTS, tmp_path)
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert g == e, f"prompt {prompt!r}"


def test_open_clip_ids(tmp_path):
    from ldm.testing import text_encoder

    check_same_ids(text_encoder(), tmp_path)


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_open_clip_other_cleanings(tmp_path, clean):
    from conditioning.open_clip_backend import OpenCLIPTextEncoder
    from ldm.testing import text_encoder

    enc = text_encoder()
    check_same_ids(OpenCLIPTextEncoder(enc.model, enc.model_cfg, clean=clean), tmp_path)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_transformers_clip_tokenizer_ids(tmp_path, pad_token):
    from conditioning import build_text_encoder
    from conditioning.bpe import write_clip_tokenizer_files

    folder = write_clip_tokenizer_files(tmp_path / "tokenizer", pad_token=pad_token)
    encoder = build_text_encoder({"backend": "transformers", "tokenizer": str(folder), "model_cfg": {
        "vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 77}})
    check_same_ids(encoder, tmp_path)
