// CLIP's byte-level BPE tokenizer, giving the ids the Python text encoder gives (ldm/web/tokenizer_spec.py).
// The spec (tokenizer.json, written by `ldm export-web`) holds the vocabulary, the merges, the special
// ids and every table the cleaning steps use; this file holds only the algorithms:
//   open_clip SimpleTokenizer: ftfy.fix_text (without mojibake repair), html.unescape twice, strip,
//     whitespace collapse, lower case; the pre-split regex; BPE with </w>; [bos] ids [eos], zero padding.
//   transformers CLIPTokenizer ("hf"): special tokens from the raw text; NFC, \s+ -> " ", lower case;
//     the same pre-split and BPE; padding with the pad token.
// Prompts longer than max_length keep the first max_length - 1 ids and the end token (TextEncoder.tokenize).

function escapeRegExp(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

function charClass(chars) {
  return Array.from(chars, (c) => "\\u" + c.codePointAt(0).toString(16).padStart(4, "0")).join("");
}

// GPT-2's table: each byte -> a printable unicode character (open_clip's bytes_to_unicode).
function bytesToUnicode() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n);
      n++;
    }
  }
  const table = new Array(256);
  bs.forEach((b, i) => (table[b] = String.fromCodePoint(cs[i])));
  return table;
}

export class ClipTokenizer {
  constructor(spec) {
    this.spec = spec;
    this.kind = spec.kind;
    this.clean = spec.clean;
    this.encoder = new Map(spec.vocab.map((t, i) => [t, i]));
    this.ranks = new Map(spec.merges.map((m, i) => [m, i]));
    this.byteEncoder = bytesToUnicode();
    this.specials = spec.special_tokens;
    this.cache = new Map(this.specials.map((t) => [t, [t]]));
    this.utf8 = new TextEncoder();
    const ws = charClass(spec.regex_whitespace);
    const special = this.specials.map(escapeRegExp).join("|");
    const body = `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^${ws}\\p{L}\\p{N}]+`;
    // open_clip: specials are alternatives of the pre-split (matched after cleaning), IGNORECASE;
    // hf: specials are cut out of the raw text first, and the split is case-sensitive.
    const splitSpecial = (spec.split_specials || []).map(escapeRegExp).join("|");
    this.pat = this.kind === "open_clip"
      ? new RegExp((special ? special + "|" : "") + body, "giu")
      : new RegExp((splitSpecial ? splitSpecial + "|" : "") + body, "gu");
    this.specialSplit = special ? new RegExp(`(${special})`, "u") : null;
    // hf: the ByteLevel pre-tokenizer splits each piece again with GPT-2's regex (use_regex=True)
    this.gpt2 = new RegExp(`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${ws}\\p{L}\\p{N}]+|[${ws}]+(?![^${ws}])|[${ws}]+`, "gu");
    if (this.kind === "open_clip") {
      const pyws = charClass(spec.py_whitespace);
      this.pyWsRun = new RegExp(`[${pyws}]+`, "gu");
      this.pyWsEnds = new RegExp(`^[${pyws}]+|[${pyws}]+$`, "gu");
      const f = spec.ftfy;
      this.singleQuotes = new RegExp(f.single_quotes, "gu");
      this.doubleQuotes = new RegExp(f.double_quotes, "gu");
      this.translate = f.translate.map((t) => new Map(Object.entries(t)));
      this.invalidCodepoints = new Set(spec.html.invalid_codepoints);
    } else {
      this.reWsRun = new RegExp(`[${ws}]+`, "gu");
    }
  }

  static async load(url) {
    const res = await fetch(url);
    if (!res.ok) throw new Error(`cannot load the tokenizer ${url}: HTTP ${res.status}`);
    return new ClipTokenizer(await res.json());
  }

  // Python's html.unescape.
  htmlUnescape(s) {
    if (!s.includes("&")) return s;
    const html5 = this.spec.html.html5;
    const invalid = this.spec.html.invalid_charrefs;
    return s.replace(/&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)/g, (m, g) => {
      if (g[0] === "#") {
        const num = g[1] === "x" || g[1] === "X" ? parseInt(g.slice(2).replace(/;$/, ""), 16) : parseInt(g.slice(1).replace(/;$/, ""), 10);
        if (Object.prototype.hasOwnProperty.call(invalid, String(num))) return invalid[String(num)];
        if ((num >= 0xd800 && num <= 0xdfff) || num > 0x10ffff) return "\ufffd";
        if (this.invalidCodepoints.has(num)) return "";
        return String.fromCodePoint(num);
      }
      if (Object.prototype.hasOwnProperty.call(html5, g)) return html5[g];
      for (let x = g.length - 1; x > 1; x--) {
        if (Object.prototype.hasOwnProperty.call(html5, g.slice(0, x))) return html5[g.slice(0, x)] + g.slice(x);
      }
      return "&" + g;
    });
  }

  // ftfy's fix_and_explain on one segment, minus fix_encoding (mojibake repair).
  ftfySegment(text, unescape) {
    const f = this.spec.ftfy;
    for (;;) {
      const orig = text;
      if (unescape) {
        text = text.replace(/&#?[0-9A-Za-z]{1,24};/g, (m) => {
          if (Object.prototype.hasOwnProperty.call(f.html_entities, m)) return f.html_entities[m];
          if (m.startsWith("&#")) {
            const u = this.htmlUnescape(m);
            return u.includes(";") ? m : u;
          }
          return m;
        });
      }
      text = text.replace(/[\x80-\x9f]/g, (c) => f.c1[c]);
      text = this.translateChars(text, this.translate[0]);
      text = text.replace(this.doubleQuotes, '"').replace(this.singleQuotes, "'");
      text = text.replace(/\r\n/g, "\n").replace(/\r/g, "\n").replace(/\u2028/g, "\n").replace(/\u2029/g, "\n").replace(/\u0085/g, "\n");
      text = text.replace(/\x1b\[((?:\d|;)*)([a-zA-Z])/g, "");
      text = this.translateChars(text, this.translate[1]);
      text = text.normalize("NFC");
      if (text === orig) return text;
    }
  }

  translateChars(text, table) {
    let out = "";
    for (const c of text) out += table.has(c) ? table.get(c) : c;
    return out;
  }

  // ftfy.fix_text: line by line; HTML unescaping stops at the first line holding "<".
  ftfy(text) {
    let out = "";
    let unescape = true;
    let pos = 0;
    while (pos < text.length) {
      let end = text.indexOf("\n", pos) + 1;
      if (end === 0) end = text.length;
      const segment = text.slice(pos, end);
      if (segment.includes("<")) unescape = false;
      out += this.ftfySegment(segment, unescape);
      pos = end;
    }
    return out;
  }

  pyStrip(text) {
    return text.replace(this.pyWsEnds, "");
  }

  pyCollapse(text) {
    return this.pyStrip(text).split(this.pyWsRun).filter((w) => w.length).join(" ");
  }

  cleanText(text) {
    // tokenizers' Lowercase maps each character alone (no final-sigma rule, unlike Python's str.lower)
    if (this.kind === "hf") return Array.from(text.normalize("NFC").replace(this.reWsRun, " "), (c) => c.toLowerCase()).join("");
    text = this.pyStrip(this.htmlUnescape(this.htmlUnescape(this.ftfy(text))));
    if (this.clean === "whitespace") return this.pyCollapse(text);
    if (this.clean === "lower") return this.pyCollapse(text).toLowerCase();
    if (this.clean === "canonicalize") {
      text = text.replace(/_/g, " ").replace(/[!"#$%&'()*+,\-./:;<=>?@[\\\]^_`{|}~]/g, "").toLowerCase();
      return this.pyCollapse(text);
    }
    throw new Error(`tokenizer clean=${this.clean} is not supported`);
  }

  bpe(token) {
    if (this.cache.has(token)) return this.cache.get(token);
    const chars = Array.from(token);
    let word = chars.slice(0, -1).concat([chars[chars.length - 1] + "</w>"]);
    while (word.length > 1) {
      let best = null;
      let bestRank = Infinity;
      for (let i = 0; i < word.length - 1; i++) {
        const r = this.ranks.get(word[i] + " " + word[i + 1]);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = [word[i], word[i + 1]];
        }
      }
      if (best === null) break;
      const [first, second] = best;
      const merged = [];
      for (let i = 0; i < word.length; ) {
        if (i < word.length - 1 && word[i] === first && word[i + 1] === second) {
          merged.push(first + second);
          i += 2;
        } else {
          merged.push(word[i]);
          i += 1;
        }
      }
      word = merged;
    }
    this.cache.set(token, word);
    return word;
  }

  encodePiece(text, ids) {
    let pieces = Array.from(text.matchAll(this.pat), (m) => m[0]);
    if (this.kind === "hf") pieces = pieces.flatMap((p) => Array.from(p.matchAll(this.gpt2), (m) => m[0]));
    for (const piece of pieces) {
      const mapped = this.specials.includes(piece) && this.kind === "open_clip"
        ? piece
        : Array.from(this.utf8.encode(piece), (b) => this.byteEncoder[b]).join("");
      for (const t of this.bpe(mapped)) {
        const id = this.encoder.get(t);
        if (id === undefined) {
          if (this.spec.unk_id === null || this.spec.unk_id === undefined) throw new Error(`token ${t} is not in the vocabulary`);
          ids.push(this.spec.unk_id);
        } else ids.push(id);
      }
    }
  }

  // Token ids of a prompt without start and end tokens.
  encode(text) {
    const ids = [];
    if (this.kind === "hf" && this.specialSplit) {
      text.split(this.specialSplit).forEach((part, i) => {
        if (i % 2 === 1) ids.push(this.encoder.get(part));
        else if (part) this.encodePiece(this.cleanText(part), ids);
      });
      return ids;
    }
    this.encodePiece(this.cleanText(text), ids);
    return ids;
  }

  // The (max_length,) ids the text encoder reads: [bos] ids [eos], cut to max_length keeping eos, padded.
  tokenize(text) {
    const s = this.spec;
    let ids = [s.bos_id, ...this.encode(text), s.eos_id];
    const truncated = ids.length > s.max_length;
    if (truncated) ids = ids.slice(0, s.max_length - 1).concat([s.eos_id]);
    while (ids.length < s.max_length) ids.push(s.pad_id);
    return { ids, truncated };
  }
}
