"""Fidelity against real images: how far the generated images' distribution lies from a reference set's,
measured on CLIP image embeddings (the bundle's own small CLIP, or another given by ``--clip``).

    ref = load_reference("data/emoji", split="heldout")          # the 392 held-out images and their captions
    scorer = conditioning.load_clip_scorer(bundle)
    emb_ref = reference_embeddings(ref, scorer)                  # (N, E); embedded once, then read from disk
    emb_gen = embed_images(scorer, images)                       # (M, E)
    est = fidelity_metrics(emb_gen, emb_ref, bootstrap=200, seed=0)
    est["kid"].value, est["kid"].low, est["kid"].high, est["kid"].n_generated   # also "fd", "cmmd"

All three use the scorer's L2-normalised image embeddings (those CLIP score and diversity use). With x the
M generated and y the N reference embeddings, E dimensions:

* ``kid``, the kernel inception distance of Binkowski et al. 2018 on these embeddings: the unbiased MMD^2
  with the cubic polynomial kernel k(a, b) = (a.b / E + 1)^3,
      MMD^2_u = mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j),
  averaged over ``subsets`` pairs of random subsets of min(M, N, ``subset_size``) images, drawn without
  replacement from each set, as clean-fid's ``kernel_distance`` and torchmetrics' ``KernelInceptionDistance``
  do. Unbiased: for two samples of one distribution it scatters around 0, negative about half the time.
* ``fd``, FID's formula on these embeddings: the 2-Wasserstein distance between the Gaussians fitted to each set,
      FD = |mu_x - mu_y|^2 + tr S_x + tr S_y - 2 tr (S_x^1/2 S_y S_x^1/2)^1/2,
  covariances with ddof = 1 (``np.cov``, as FID). The last trace is the nuclear norm of A_x A_y^T, where
  A = (rows - mu) / sqrt(n - 1), so S = A^T A (each A first reduced to E rows by a QR when it has more):
  an SVD in float64, no matrix square root, no complex round-off to discard. With M or N <= E a covariance is
  rank-deficient (rank <= n - 1); the formula still holds (Gaussians on a subspace) but FD's small-sample bias,
  about tr S / n per set, is then large: compare FDs only between cells with equal numbers of images.
* ``cmmd`` (Jayasumana et al. 2024, "Rethinking FID"): MMD^2 with the Gaussian kernel
  exp(-|a - b|^2 / (2 sigma^2)), sigma = 10, on L2-normalised embeddings, times 1000, exactly as
  google-research/cmmd's ``distance.mmd`` computes it: the minimum-variance estimator, i = j terms included
  (Gretton et al. 2012, eq. 5; that code's docstring notes it is almost identical to the unbiased one), so
  identical sets give exactly 0. ``cmmd(x, y, unbiased=True)`` gives the U-statistic instead.

Intervals: a bootstrap, ``bootstrap`` replicates drawn from ``seed``. Each replicate resamples the generated
and the reference embeddings with replacement (one draw shared by the three metrics) and computes the metric
again. A resample holds copies of one image, and a kernel between an image and its copy is not a pair of
independent draws, so in KID and CMMD pairs of copies count as the i = j terms (left out of the unbiased
within-set means); this keeps their replicates centred on the estimate. KID's replicates use all pairs of the
resample (what the subset average estimates) rather than subsets. FD cannot be mended so: a resample has
about 63% distinct images, and FD's small-sample bias grows as they fall, so FD's replicates sit above the
estimate, often by more than their own spread (by 15% to 150% of the estimate on the emoji held-out set with
our CLIP, E = 256, n = 98 to 196). The interval is therefore the percentile interval (2.5th to 97.5th for
``level`` = 0.95) of the replicates minus the bootstrap's estimate of bias (the replicates' mean minus the
estimate; Efron and Tibshirani 1993, ch. 10): for KID and CMMD nearly the plain percentile interval, for FD a
re-centred one; ``Estimate.bias`` keeps the shift. It says how much a metric moves with other images of the
same number; it does not remove FD's bias itself, and it can reach below 0 when the estimate is near 0.
Every ``Estimate`` carries the numbers of images behind it.

Reference sets (``load_reference``): a captioned data set, a folder with ``metadata.jsonl`` (rows with
``file_name``, the caption under ``text``, and optionally ``split``; what ``ldm data emoji`` writes), or a
plain folder of images (searched recursively, hidden names skipped, no captions). Images are read as training
reads them (``ldm.images.decode_image``: RGB, transparency on white). A missing, empty or unreadable reference
is a one-line error.

Embeddings of a reference set are cached in ``<toolkit cache>/fidelity/`` (``$LDM_CACHE``, else
``~/.cache/ldm-toolkit``), keyed by the set's file manifest (each file's path and sha256) and the CLIP's
identity (its weights hash and preprocessing), so a sweep embeds its reference once, and a changed image
or another CLIP gives a fresh file.

These are computed with our small CLIP: they compare the cells of one sweep (or runs scored by the same
CLIP on the same reference), never numbers in papers, which use Inception-v3 or CLIP ViT-L/14.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.images import ImageError, decode_image
from ldm_io import IMAGE_FORMATS, atomic_path

__all__ = ["CMMD_SCALE", "CMMD_SIGMA", "METRICS", "Estimate", "Reference", "cmmd", "embed_images", "fidelity_metrics",
           "flat_metrics", "frechet_distance", "kid", "load_reference", "reference_embeddings"]

METRICS = ("kid", "fd", "cmmd")
CMMD_SIGMA = 10.0  # google-research/cmmd's _SIGMA
CMMD_SCALE = 1000.0  # google-research/cmmd's _SCALE
HELDOUT = "heldout"  # split name for a data set's held-out rows: its "test" split (the project's held-out rule)
METADATA = "metadata.jsonl"
EMBED_VERSION = 1  # bump when what an embedding is changes (preprocessing, normalisation); old cache files then miss
PathLike = Union[str, os.PathLike]


# -- reference sets ---------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """Real images to compare with: ``images[i]`` (RGB) read from ``files[i]`` (relative to ``path``), with
    ``captions[i]`` when the set is captioned (None for a plain folder)."""

    path: Path
    files: list[str]
    images: list[Image.Image]
    captions: Optional[list[str]]
    split: Optional[str]
    manifest: str  # sha256 over every (file, sha256 of its bytes): what the embedding cache is keyed by

    def __len__(self) -> int:
        return len(self.files)


def load_reference(path: PathLike, split: Optional[str] = None, limit: Optional[int] = None) -> Reference:
    """A reference set from ``path``: a captioned data set (``metadata.jsonl``) or a plain folder of images.

    ``split`` keeps the rows whose ``split`` is that name (a plain folder: the images under its subfolder of that
    name); ``"heldout"`` is the data set's ``test`` split, the rows no trainer of ours trained on. ``limit`` keeps
    that many rows evenly spaced over the set (first and last included), so a limited set still spans it.
    Raises ``ValueError`` (one line) for a missing, empty or unreadable set, an unknown split or a bad limit.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"reference {root} does not exist; give a captioned data set (a folder with {METADATA}) "
                         f"or a folder of images")
    if not root.is_dir():
        raise ValueError(f"reference {root} is a file; give a folder: a captioned data set (with {METADATA}) "
                         f"or a folder of images")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"reference limit={limit!r} must be a positive integer (or None for every image)")
    if (root / METADATA).is_file():
        files, captions = _captioned_rows(root, split)
    else:
        files, captions = _folder_images(root, split), None
    if limit is not None and limit < len(files):
        keep = np.unique(np.round(np.linspace(0, len(files) - 1, limit)).astype(int))
        files = [files[i] for i in keep]
        captions = None if captions is None else [captions[i] for i in keep]
    images, digest = [], hashlib.sha256()
    for name in files:
        data = _read_bytes(root, name)
        try:
            images.append(decode_image(data))
        except ImageError as exc:
            raise ValueError(f"reference {root}: {name} cannot be used ({exc}); remove it or fix it") from None
        digest.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\0".encode())
    return Reference(root, files, images, captions, split, digest.hexdigest())


def _read_bytes(root: Path, name: str) -> bytes:
    file = root / name
    if not file.is_file():
        raise ValueError(f"reference {root}: {name} is missing; rebuild the data set or remove its row")
    data = file.read_bytes()
    if not data:
        raise ValueError(f"reference {root}: {name} is empty (0 bytes); remove it or replace it")
    return data


def _captioned_rows(root: Path, split: Optional[str]) -> tuple[list[str], list[str]]:
    """(file_name, caption) of the rows of ``root/metadata.jsonl`` in ``split`` (HELDOUT = "test")."""
    rows = []
    try:
        text = (root / METADATA).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"reference {root / METADATA} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    for k, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"reference {root / METADATA}, line {k}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f"reference {root / METADATA}, line {k}: a row needs a \"file_name\" string")
        rows.append(row)
    if not rows:
        raise ValueError(f"reference {root}: {METADATA} has no rows; build the data set first")
    if split is not None:
        wanted = "test" if split == HELDOUT else split
        splits = sorted({str(r["split"]) for r in rows if "split" in r})
        if not splits:
            raise ValueError(f"reference {root}: its rows have no \"split\"; leave split out to use all of them")
        rows = [r for r in rows if r.get("split") == wanted]
        if not rows:
            raise ValueError(f"reference {root}: no rows in split {split!r}; its splits: {', '.join(splits)} "
                             f"(or {HELDOUT!r} for \"test\")")
    for r in rows:
        inside = os.path.realpath(root / r["file_name"]).startswith(os.path.realpath(root) + os.sep)
        if not inside:
            raise ValueError(f"reference {root}: {r['file_name']} lies outside the data set folder; "
                             f"a reference row must name a file inside it")
    return [r["file_name"] for r in rows], [_caption(r.get("text")) for r in rows]


def _caption(text) -> str:
    if isinstance(text, list):  # several captions: the first
        text = text[0] if text else ""
    return "" if text is None else str(text)


def _folder_images(root: Path, split: Optional[str]) -> list[str]:
    """Image files under ``root`` (or ``root/split``), sorted, hidden names skipped, as paths relative to root."""
    base = root
    if split is not None:
        base = root / split
        if not base.is_dir():
            raise ValueError(f"reference {root} is a plain image folder without a {split!r} subfolder (and no "
                             f"{METADATA} with splits); leave split out, or give that subfolder")
    found = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder, n).relative_to(root).as_posix() for n in names
                  if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_FORMATS]
    if not found:
        raise ValueError(f"reference {base} holds no images ({', '.join(IMAGE_FORMATS)}); give a folder of images "
                         f"or a captioned data set")
    return sorted(found)


# -- embeddings -------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_images(scorer, images: Sequence[Image.Image], *, batch_size: int = 64,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """The scorer's L2-normalised image embeddings (N, E) float32 on the CPU, in batches of ``batch_size``
    (images of different sizes are embedded in groups of one size, each preprocessed as the scorer does)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if len(images) == 0:
        raise ValueError("no images to embed")
    out: list[Optional[torch.Tensor]] = [None] * len(images)
    for start in range(0, len(images), batch_size):
        chunk = list(range(start, min(start + batch_size, len(images))))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in chunk:
            by_size.setdefault(images[i].size, []).append(i)
        for idx in by_size.values():
            emb = scorer.encode_image([images[i] for i in idx]).float().cpu()  # (b, E)
            for i, e in zip(idx, emb):
                out[i] = e
        if progress is not None:
            progress(chunk[-1] + 1, len(images))
    return F.normalize(torch.stack(out), dim=-1)  # (N, E); a no-op for ClipScorer, kept for any scorer


def clip_identity(scorer) -> Optional[str]:
    """A hash of everything that decides a ClipScorer's image embedding (weights, input size, mean, std), or
    None for a scorer that cannot say (then nothing is cached on disk)."""
    encoder = getattr(scorer, "encoder", None)
    if encoder is None or not hasattr(encoder, "weights_hash"):
        return None
    pre = [getattr(scorer, "size", None), *(getattr(scorer, k).flatten().tolist() for k in ("mean", "std"))]
    return hashlib.sha256(f"{encoder.weights_hash()}|{pre}|{EMBED_VERSION}".encode()).hexdigest()[:16]


def cache_file(ref: Reference, scorer, cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Where ``ref``'s embeddings by ``scorer`` are cached (None when the scorer has no identity)."""
    ident = clip_identity(scorer)
    if ident is None:
        return None
    if cache_dir is None:
        from ldm.single_file import cache_root

        cache_dir = cache_root() / "fidelity"
    return Path(cache_dir) / f"reference-{ref.manifest[:16]}-{ident}.safetensors"


def reference_embeddings(ref: Reference, scorer, *, batch_size: int = 64, cache_dir: Optional[PathLike] = None,
                         progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """``embed_images`` of ``ref.images``, read from the cache when this set was embedded by this CLIP before
    (written atomically otherwise; an unreadable or mismatched cache file is recomputed)."""
    from safetensors.torch import load_file, save_file

    path = cache_file(ref, scorer, cache_dir)
    if path is not None and path.is_file():
        try:
            emb = load_file(str(path))["embeddings"]
            if emb.shape[0] == len(ref):
                return emb
        except Exception:  # a damaged file: compute again and replace it
            pass
    emb = embed_images(scorer, ref.images, batch_size=batch_size, progress=progress)
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp),
                      metadata={"reference": str(ref.path), "split": str(ref.split), "images": str(len(ref))})
    return emb


# -- metrics ----------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """A metric's value on the full sets, its bootstrap percentile interval, and what stands behind it."""

    value: float
    low: float
    high: float
    n_generated: int
    n_reference: int
    bootstrap: int  # replicates behind [low, high] (0: no interval; low = high = nan)
    level: float = 0.95  # the interval's coverage
    bias: float = float("nan")  # the bootstrap's estimate of bias (replicates' mean - value); [low, high] is shifted by it

    def as_dict(self) -> dict:
        return asdict(self)


def _as_float64(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise ValueError(f"{name} must be embeddings (N, E); got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} has {x.shape[0]} embedding(s); these metrics need at least 2 images per set")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_float64(x, "generated"), _as_float64(y, "reference")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"generated embeddings have {x.shape[1]} dimensions, reference {y.shape[1]}; embed both "
                         f"with the same CLIP")
    return x, y


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3  # (n, m), KID's kernel


def _rbf_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T  # (n, m) |a_i - b_j|^2
    return torch.exp(-sq / (2 * CMMD_SIGMA**2))


def _within(K: torch.Tensor, c: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Mean kernel within one set whose image i appears ``c[..., i]`` times (c: (..., n); ones = the set).

    Unbiased: the mean over pairs of different images (i = j and copies of one image left out);
    otherwise the mean over all (i, j) positions, a copy's pair with itself counted as k(x_i, x_i)."""
    diag = torch.diagonal(K)  # (n,)
    total = c.sum(-1)
    all_pairs = ((c @ K) * c).sum(-1)  # sum_ij c_i c_j K_ij
    same = (c * c * diag).sum(-1)  # the pairs of one image with itself or its copies
    off = (all_pairs - same) / (total**2 - (c * c).sum(-1))
    if unbiased:
        return off
    return ((c * diag).sum(-1) + (total**2 - total) * off) / total**2


def _mmd2(Kxx, Kyy, Kxy, cx, cy, unbiased: bool) -> torch.Tensor:
    cross = ((cx @ Kxy) * cy).sum(-1) / (cx.sum(-1) * cy.sum(-1))
    return _within(Kxx, cx, unbiased) + _within(Kyy, cy, unbiased) - 2 * cross


def _subset_counts(rng: np.random.Generator, subsets: int, n: int, m: int) -> torch.Tensor:
    """(subsets, n) indicators of ``m`` of ``n`` images drawn without replacement, one draw per row."""
    c = np.zeros((subsets, n))
    for s in range(subsets):
        c[s, rng.permutation(n)[:m]] = 1
    return torch.from_numpy(c)


def kid(x, y, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """KID (unbiased MMD^2, cubic polynomial kernel) of generated ``x`` (M, E) against reference ``y`` (N, E),
    averaged over ``subsets`` subsets of min(M, N, ``subset_size``) from each (seeded by ``seed``)."""
    x, y = _pair(x, y)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid needs subsets >= 1 and subset_size >= 2; got {subsets}, {subset_size}")
    m = min(x.shape[0], y.shape[0], subset_size)
    rng = np.random.default_rng(seed)
    cx, cy = _subset_counts(rng, subsets, x.shape[0], m), _subset_counts(rng, subsets, y.shape[0], m)
    vals = _mmd2(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y), cx, cy, unbiased=True)  # (subsets,)
    return float(vals.mean())


def cmmd(x, y, *, unbiased: bool = False) -> float:
    """CMMD of ``x`` (M, E) against ``y`` (N, E): 1000 x MMD^2, Gaussian kernel sigma = 10 on L2-normalised rows
    (google-research/cmmd's minimum-variance estimator; ``unbiased`` for the U-statistic)."""
    x, y = _pair(x, y)
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    ones_x, ones_y = torch.ones(x.shape[0], dtype=x.dtype), torch.ones(y.shape[0], dtype=y.dtype)
    return float(CMMD_SCALE * _mmd2(_rbf_kernel(x, x), _rbf_kernel(y, y), _rbf_kernel(x, y), ones_x, ones_y, unbiased))


def _centred_factor(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted mean (..., E) and a factor A (..., r, E), r <= E, with A^T A the weighted covariance
    (ddof = 1) of rows ``x`` (n, E) repeated ``c`` (..., n) times."""
    total = c.sum(-1, keepdim=True)  # (..., 1)
    mu = (c @ x) / total  # (..., E)
    a = (x - mu.unsqueeze(-2)) * (c / (total - 1)).sqrt().unsqueeze(-1)  # (..., n, E)
    if a.shape[-2] > a.shape[-1]:
        a = torch.linalg.qr(a, mode="r").R  # (..., E, E), R^T R = a^T a
    return mu, a


def _fd(x, y, cx, cy) -> torch.Tensor:
    mu_x, a_x = _centred_factor(x, cx)
    mu_y, a_y = _centred_factor(y, cy)
    nuclear = torch.linalg.svdvals(a_x @ a_y.transpose(-1, -2)).sum(-1)  # tr (S_x^1/2 S_y S_x^1/2)^1/2
    trace = (a_x * a_x).sum((-1, -2)) + (a_y * a_y).sum((-1, -2))  # tr S_x + tr S_y
    return ((mu_x - mu_y) ** 2).sum(-1) + trace - 2 * nuclear


def frechet_distance(x, y) -> float:
    """FD of ``x`` (M, E) against ``y`` (N, E): FID's formula on the Gaussians fitted to each set (float64)."""
    x, y = _pair(x, y)
    return float(_fd(x, y, torch.ones(x.shape[0], dtype=x.dtype), torch.ones(y.shape[0], dtype=y.dtype)))


def fidelity_metrics(generated, reference, *, bootstrap: int = 200, seed: int = 0, level: float = 0.95,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, metrics: Sequence[str] = METRICS,
                     chunk: int = 50) -> dict[str, Estimate]:
    """KID, FD and CMMD of ``generated`` (M, E) against ``reference`` (N, E) embeddings, each an ``Estimate``
    with a ``level`` bootstrap interval (percentiles of ``bootstrap`` resamples drawn from ``seed``, less the
    bootstrap's bias estimate; see the module's docstring). ``chunk`` replicates are computed at once."""
    x, y = _pair(generated, reference)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics={list(metrics)!r}; allowed: {', '.join(METRICS)}")
    if bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"bootstrap={bootstrap} must be 0 (no interval) or >= 2 replicates")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1), e.g. 0.95")
    n, m = x.shape[0], y.shape[0]
    rng = np.random.default_rng(seed)
    cx = torch.from_numpy(rng.multinomial(n, np.full(n, 1 / n), size=bootstrap)).to(x.dtype)  # (B, n) copies
    cy = torch.from_numpy(rng.multinomial(m, np.full(m, 1 / m), size=bootstrap)).to(y.dtype)  # (B, m)
    point = {"kid": lambda: kid(x, y, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed),
             "fd": lambda: frechet_distance(x, y), "cmmd": lambda: cmmd(x, y)}
    xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    replicate = {
        "kid": lambda a, b, K=(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)): _mmd2(*K, a, b, True),
        "fd": lambda a, b: _fd(x, y, a, b),
        "cmmd": lambda a, b, K=(_rbf_kernel(xn, xn), _rbf_kernel(yn, yn), _rbf_kernel(xn, yn)):
            CMMD_SCALE * _mmd2(*K, a, b, False),
    }
    out = {}
    for name in metrics:
        value = point[name]()
        low = high = bias = float("nan")
        if bootstrap:
            reps = torch.cat([replicate[name](cx[i : i + chunk], cy[i : i + chunk]) for i in range(0, bootstrap, chunk)])
            reps = reps.numpy()  # (B,); nan for a resample of one image repeated (no pair of distinct images)
            bias = float(np.nanmean(reps)) - value
            low, high = (float(q) - bias for q in np.nanquantile(reps, [(1 - level) / 2, (1 + level) / 2]))
        out[name] = Estimate(value, low, high, n, m, bootstrap, level, bias)
    return out


def flat_metrics(estimates: dict[str, Estimate]) -> dict[str, float]:
    """``{"kid": v, "kid_low": .., "kid_high": .., "kid_n_generated": .., "kid_n_reference": .., ...}``: one row
    of a metrics table."""
    row: dict[str, float] = {}
    for name, e in estimates.items():
        row.update({name: e.value, f"{name}_low": e.low, f"{name}_high": e.high,
                    f"{name}_n_generated": e.n_generated, f"{name}_n_reference": e.n_reference})
    return row
