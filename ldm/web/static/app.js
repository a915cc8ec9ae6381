// The page's sampler: tokenizer -> text encoder -> guided U-Net steps -> decoder, all in the browser.
// Schedule maths is not done here: each step applies the coefficients of schedule.json, computed by
// ldm/schedule.py and ldm/samplers.py (see ldm/web/coefficients.py for the formulas):
//   x0 = px*x + po*out (clamped when clip_x0 is set); eps = ex*x + eo*out, or qx*x + q0*x0 when clipped;
//   x = ax*x + a0*x0 + ae*eps + az*z + ap*x0_prev (x0_prev: the previous step's x0, DPM++ 2M).
// window.ldm exposes the state, the last image and the timings (the browser test and the bench read it).
import { ClipTokenizer } from "./tokenizer.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { status: "loading", provider: null, threads: null, proxy: null, error: null, image: null, timings: null, noise: null };
window.ldm = state;

let model, schedule, tokenizer, sessions, noiseData;

function showMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function fail(text) {
  state.status = "error";
  state.error = text;
  showMessage(text, true);
}

function log(line) {
  $("log").textContent += line + "\n";
  $("log").scrollTop = $("log").scrollHeight;
}

async function fetchChecked(name, kind) {
  let res;
  try {
    res = await fetch(name);
  } catch (e) {
    throw new Error(`Could not load the model file ${name}: ${e.message}`);
  }
  if (!res.ok) throw new Error(`Could not load the model file ${name} (HTTP ${res.status}); re-run 'ldm export-web' to write the site again.`);
  return kind === "json" ? res.json() : res.arrayBuffer();
}

async function createSession(bytes, providers) {
  return ort.InferenceSession.create(new Uint8Array(bytes), { executionProviders: providers, graphOptimizationLevel: "all" });
}

async function pickProvider() {
  const wanted = params.get("ep");
  if (wanted !== "wasm" && navigator.gpu) {
    try {
      if (await navigator.gpu.requestAdapter()) return "webgpu";
    } catch (e) {
      /* no adapter: wasm */
    }
  }
  return "wasm";
}

async function load() {
  if (typeof ort === "undefined") throw new Error("onnxruntime-web (ort/ort.min.js) did not load; re-run 'ldm export-web'.");
  model = await fetchChecked("model.json", "json");
  const files = model.files;
  const [tokSpec, sched, te, unet, dec, noise] = await Promise.all([
    fetchChecked(files.tokenizer, "json"), fetchChecked(files.schedule, "json"),
    fetchChecked(files.text_encoder), fetchChecked(files.unet), fetchChecked(files.decoder),
    model.noise.seeds > 0 ? fetchChecked(files.noise) : Promise.resolve(new ArrayBuffer(0)),
  ]);
  tokenizer = new ClipTokenizer(tokSpec);
  schedule = sched;
  noiseData = new Float32Array(noise);
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  const threads = params.has("threads") ? Number(params.get("threads"))
    : (self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
  ort.env.wasm.numThreads = threads;
  let provider = await pickProvider();
  // wasm: onnxruntime-web runs the graphs in its own worker, so the page stays responsive during a
  // U-Net call (params ?proxy=0 turns it off); WebGPU runs on the main thread's device queue
  const proxy = provider === "wasm" && params.get("proxy") !== "0";
  ort.env.wasm.proxy = proxy;
  try {
    sessions = await Promise.all([te, unet, dec].map((b) => createSession(b, [provider])));
  } catch (e) {
    if (provider === "wasm") throw new Error(`onnxruntime-web could not open the model: ${e.message}`);
    log(`webgpu failed (${e.message}); using wasm`);
    provider = "wasm";
    sessions = await Promise.all([te, unet, dec].map((b) => createSession(b, ["wasm"])));
  }
  state.provider = provider;
  state.threads = provider === "wasm" ? threads : null;
  state.proxy = proxy;  // false after a webgpu -> wasm fallback (set before the first session)
  $("provider").textContent = provider === "webgpu" ? "execution provider: webgpu"
    : `execution provider: wasm, ${threads} thread${threads === 1 ? "" : "s"}` + (self.crossOriginIsolated ? "" : " (page not cross-origin isolated: serve it with 'ldm serve-web' for threads)");
  for (const [i, s] of schedule.samplers.entries()) $("sampler").add(new Option(s.label, String(i)));
  $("steps").max = String(schedule.max_steps);
  $("prompt").value = model.default_prompt || "";
  const n = model.noise;
  $("noise-note").textContent = n.seeds > 0
    ? `Seeds ${n.first_seed}..${n.first_seed + n.seeds - 1} use Python's noise (torch generator, written by the exporter): their images match Python's. Other seeds use this page's own noise (mulberry32 + Box-Muller): valid samples, but not Python's images.`
    : "No Python noise was exported (--seeds 0): every seed uses this page's own noise (mulberry32 + Box-Muller), not Python's.";
  $("canvas").width = model.image_size[1];
  $("canvas").height = model.image_size[0];
  $("generate").disabled = false;
  state.status = "ready";
  showMessage(`Ready: ${model.image_size[0]}x${model.image_size[1]} images, steps 1..${schedule.max_steps}.`);
}

function readInputs() {
  const prompt = $("prompt").value;
  if (!prompt.trim()) throw new Error("Enter a prompt: it is empty.");
  const steps = Number($("steps").value);
  if ($("steps").value.trim() === "" || !Number.isInteger(steps) || steps < 1 || steps > schedule.max_steps)
    throw new Error(`Steps must be a whole number from 1 to ${schedule.max_steps} (the exported schedule); got '${$("steps").value}'.`);
  const guidance = Number($("guidance").value);
  if ($("guidance").value.trim() === "" || !Number.isFinite(guidance) || guidance < 0)
    throw new Error(`Guidance must be a number >= 0 (1 = no guidance); got '${$("guidance").value}'.`);
  const seed = Number($("seed").value);
  if ($("seed").value.trim() === "" || !Number.isInteger(seed) || seed < 0 || seed > 4294967295)
    throw new Error(`Seed must be a whole number from 0 to 4294967295; got '${$("seed").value}'.`);
  const sampler = schedule.samplers[Number($("sampler").value)];
  if (!sampler) throw new Error("Choose a sampler.");
  return { prompt, negative: $("negative").value, steps, guidance, seed, sampler };
}

// Standard normal noise of this page (seeds without Python's noise): mulberry32 + Box-Muller.
function pageNoise(seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return (n) => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i += 2) {
      const u1 = 1 - uniform(), u2 = uniform();
      const r = Math.sqrt(-2 * Math.log(u1));
      out[i] = r * Math.cos(2 * Math.PI * u2);
      if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
    }
    return out;
  };
}

// Noise source for a seed: draw(k) gives draw k (0 = x_T, then one per noisy step), as Python draws them.
function noiseFor(seed, n) {
  const nz = model.noise;
  if (seed >= nz.first_seed && seed < nz.first_seed + nz.seeds) {
    const base = (seed - nz.first_seed) * nz.draws_per_seed * n;
    state.noise = "python";
    return (k) => noiseData.subarray(base + k * n, base + (k + 1) * n);
  }
  state.noise = "page";
  const next = pageNoise(seed);
  return () => next(n);
}

async function encodeText(prompts) {
  const L = model.token_length;
  const ids = new BigInt64Array(prompts.length * L);
  let truncated = false;
  prompts.forEach((p, i) => {
    const t = tokenizer.tokenize(p);
    truncated = truncated || t.truncated;
    t.ids.forEach((id, j) => (ids[i * L + j] = BigInt(id)));
  });
  const out = await sessions[0].run({ tokens: new ort.Tensor("int64", ids, [prompts.length, L]) });
  return { context: out.out, truncated };
}

async function decode(latent) {
  const [c, h, w] = model.latent_shape;
  const out = await sessions[2].run({ z: new ort.Tensor("float32", latent, [1, c, h, w]) });
  return out.out.data;
}

// (1, 3, H, W) in about [-1, 1] -> RGB bytes, rounded as ldm.pipeline.to_pil does; drawn on the canvas.
function draw(pixels) {
  const [H, W] = model.image_size;
  const rgb = new Uint8Array(3 * H * W);
  const img = new ImageData(W, H);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    for (let ch = 0; ch < 3; ch++) {
      const v = Math.min(1, Math.max(-1, pixels[(ch * H + y) * W + x]));
      const b = Math.round((v / 2 + 0.5) * 255);
      rgb[(y * W + x) * 3 + ch] = b;
      img.data[(y * W + x) * 4 + ch] = b;
    }
    img.data[(y * W + x) * 4 + 3] = 255;
  }
  $("canvas").getContext("2d").putImageData(img, 0, 0);
  return rgb;
}

const nextFrame = () => new Promise((r) => setTimeout(r, 0));

async function generate() {
  let inputs;
  try {
    inputs = readInputs();
  } catch (e) {
    fail(e.message);
    return;
  }
  $("generate").disabled = true;
  state.status = "running";
  state.error = null;
  $("log").textContent = "";
  // the longest the main thread went without running a 4 ms timer: what a user feels as a freeze
  let lastTick = performance.now(), longestBlock = 0;
  const ticker = setInterval(() => {
    const now = performance.now();
    longestBlock = Math.max(longestBlock, now - lastTick);
    lastTick = now;
  }, 4);
  try {
    const { prompt, negative, steps, guidance, seed, sampler } = inputs;
    const fields = schedule.fields;
    const [c, h, w] = model.latent_shape;
    const n = c * h * w;
    const t0 = performance.now();
    const { context, truncated } = await encodeText([negative, prompt]);  // batch [uncond, cond]
    const textMs = performance.now() - t0;
    if (truncated) log(`the prompt is longer than ${model.token_length} tokens: the end was cut`);
    const draw_ = noiseFor(seed, n);
    let x = Float64Array.from(draw_(0));
    let k = 1;
    const rows = sampler.by_steps[String(steps)];
    let x0Prev = null;
    const clip = schedule.clip_x0;
    const timings = { text_ms: textMs, step_ms: [], unet_ms: [], preview_ms: [] };
    const contextData = context.data;
    for (let i = 0; i < rows.length; i++) {
      const r = Object.fromEntries(fields.map((f, j) => [f, rows[i][j]]));
      const ts = performance.now();
      const xIn = new Float32Array(2 * n);  // fresh buffers each call: the proxy worker takes them over
      for (let j = 0; j < n; j++) xIn[j] = xIn[n + j] = x[j];
      const res = await sessions[1].run({
        x: new ort.Tensor("float32", xIn, [2, c, h, w]),
        t: new ort.Tensor("float32", new Float32Array([r.t, r.t]), [2]),
        context: new ort.Tensor("float32", contextData.slice(), context.dims),
      });
      const unetMs = performance.now() - ts;
      const out = res.out.data;
      const z = r.noise ? draw_(k++) : null;
      const x0 = new Float32Array(n);
      const next = new Float64Array(n);
      const prev = x0Prev || x0;  // DPM++ 2M's previous x0 (ap = 0 on its first step and for other samplers)
      for (let j = 0; j < n; j++) {
        const o = out[j] + guidance * (out[n + j] - out[j]);  // classifier-free guidance
        let x0j = r.px * x[j] + r.po * o;
        let eps;
        if (clip !== null) {
          x0j = Math.min(clip, Math.max(-clip, x0j));
          eps = r.qx * x[j] + r.q0 * x0j;
        } else eps = r.ex * x[j] + r.eo * o;
        x0[j] = x0j;
        next[j] = r.ax * x[j] + r.a0 * x0j + r.ae * eps + (z ? r.az * z[j] : 0) + (r.ap ? r.ap * prev[j] : 0);
      }
      x0Prev = x0.slice();  // a copy: decode(x0) below hands x0's buffer to the worker
      x = Float64Array.from(Float32Array.from(next));  // the sample is float32, as in Python
      const stepMs = performance.now() - ts;
      let previewMs = 0;
      if (i < rows.length - 1 && params.get("preview") !== "0") {  // ?preview=0: no per-step preview (bench)
        const tp = performance.now();
        draw(await decode(x0));
        previewMs = performance.now() - tp;
      }
      timings.step_ms.push(stepMs);
      timings.unet_ms.push(unetMs);
      timings.preview_ms.push(previewMs);
      log(`step ${String(i + 1).padStart(3)}/${rows.length}  t=${String(r.t).padStart(4)}  ${stepMs.toFixed(1)} ms` +
          (previewMs ? `  (+ preview decode ${previewMs.toFixed(1)} ms)` : ""));
      await nextFrame();
    }
    const td = performance.now();
    const rgb = draw(await decode(Float32Array.from(x)));
    timings.decode_ms = performance.now() - td;
    timings.total_ms = performance.now() - t0;
    timings.longest_block_ms = Math.max(longestBlock, performance.now() - lastTick);
    const mean = timings.step_ms.reduce((a, b) => a + b, 0) / timings.step_ms.length;
    log(`text encoder ${textMs.toFixed(1)} ms, ${mean.toFixed(1)} ms per step, decode ${timings.decode_ms.toFixed(1)} ms, ` +
        `image ${(timings.total_ms / 1000).toFixed(2)} s (${state.provider})`);
    state.timings = timings;
    state.image = { height: model.image_size[0], width: model.image_size[1], rgb: Array.from(rgb) };
    state.status = "done";
    showMessage(`Done: ${steps} steps, ${mean.toFixed(1)} ms per step on ${state.provider}` +
                (state.noise === "python" ? ", Python's noise for this seed." : ", this page's noise (not Python's) for this seed."));
  } catch (e) {
    fail(`Generation failed: ${e.message}`);
  } finally {
    clearInterval(ticker);
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  generate();
});

load().catch((e) => fail(e.message));
