"""A1111's ``parameters`` PNG text ("infotext"), which A1111's PNG Info, ComfyUI and model sites read.

Beside our own JSON record (``ldm.generate_cli.PNG_KEY``) every PNG that ``ldm generate`` writes carries
the same request in the layout stable-diffusion-webui writes (modules/processing.py ``create_infotext``)::

    koala, twemoji style
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 64x64, Model hash: 3f2a9c41d0, Model: default, Version: ldm-toolkit 0.4.0

The prompt comes first (it may hold line breaks), then ``Negative prompt:`` when there is one, then one line
of ``key: value`` pairs joined by ", "; a value holding a comma, colon or line break is written as a JSON
string, as A1111's ``quote`` does. ``Model hash`` is the first 10 hex digits of the model's sha256
(``ldm.bundle.bundle_hash``), the length A1111 shows. LoRAs go where A1111 puts them: ``<lora:NAME:SCALE>``
after the prompt and a ``Lora hashes`` entry. ``parse_parameters`` reads the text back as A1111's
``parse_generation_parameters`` does.

A guidance method other than plain CFG (``ldm.guidance``) is written as A1111 extensions write theirs:
rescale as ``CFG Rescale phi: 0.7`` (the CFG-rescale extension's key), interval and APG as ``Guidance method``
with our spec (``"apg:eta=0,r=15,beta=-0.5"``); ``guidance_method_from_parameters`` reads either back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Our sampler names -> A1111's (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py).
SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp-2m": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a"}
MODEL_HASH_LENGTH = 10  # A1111's short hash

# A1111's pattern for one "key: value" pair of the last line (modules/infotext_utils.py).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value) -> str:
    """``value`` as text, a JSON string when it holds a comma, a colon or a line break (A1111's ``quote``)."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(x) -> str:
    """7.5 -> "7.5", 4.0 -> "4": numbers as A1111 writes them."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def a1111_parameters(record: dict) -> str:
    """The ``parameters`` text for one image's JSON record (the dict ``ldm generate`` writes)."""
    loras = record.get("loras") or []
    prompt = record["prompt"] + "".join(f" <lora:{_lora_name(x)}:{_number(x.get('scale', 1.0))}>" for x in loras)
    params = {
        "Steps": record["steps"],
        "Sampler": SAMPLER_NAMES.get(record["method"], record["method"]),
        "Schedule type": "Karras" if record.get("sigmas") == "karras" else None,
        "Eta DDIM": _number(record["eta"]) if record["method"] == "ddim" and record.get("eta") else None,
        "CFG scale": _number(record["guidance"]),
        **_guidance_method_entries(record.get("guidance_method") or "cfg"),
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model hash": record["model_hash"][:MODEL_HASH_LENGTH],
        "Model": Path(record["model"]).name,
        "Lora hashes": ", ".join(f"{_lora_name(x)}: {x['hash'][:MODEL_HASH_LENGTH]}" for x in loras if x.get("hash")) or None,
        "Version": f"ldm-toolkit {record['versions']['ldm-toolkit']}" if "versions" in record else None,
    }
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {record['negative_prompt']}" if record.get("negative_prompt") else ""
    return f"{prompt}{negative}\n{line}".strip()


def _guidance_method_entries(spec: str) -> dict:
    if spec == "cfg":  # plain CFG adds nothing (and ldm.guidance imports torch, which the torch-free runner avoids)
        return {}
    from ldm.guidance import parse_guidance_method

    method = parse_guidance_method(spec)
    if method.name == "cfg":
        return {}
    if method.name == "rescale":
        return {"CFG Rescale phi": _number(method.kwargs["phi"])}
    return {"Guidance method": str(method)}


def guidance_method_from_parameters(params: dict) -> str:
    """The canonical guidance method spec that a ``parse_parameters`` dict records (cfg when it names none)."""
    from ldm.guidance import format_guidance_method, parse_guidance_method

    if "Guidance method" in params:
        return format_guidance_method(parse_guidance_method(params["Guidance method"]))
    phi = float(params.get("CFG Rescale phi", 0))
    return format_guidance_method(parse_guidance_method(f"rescale:{params['CFG Rescale phi']}" if phi else "cfg"))


def _lora_name(lora: dict) -> str:
    return Path(lora.get("name") or lora.get("file") or lora.get("path") or "lora").stem


def parse_parameters(text: str) -> dict:
    """A1111's reading of a ``parameters`` text: {"Prompt", "Negative prompt", key: value, ...} (values as text)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's rule: a last line of fewer than 3 pairs is prompt text
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # A1111 keeps such a value as written
        out[key] = value
    return out
