"""Fidelity metrics (ldm.fidelity): closed forms, agreement with torchmetrics' FID and KID, the bootstrap's
behaviour, reference sets and the embedding cache.

Tolerances: the metrics are computed in float64 (eps 2.2e-16). A value that is a sum of O(E n) products of
O(1) numbers, or an SVD of such a matrix, carries a relative round-off of about 1e-13 at these sizes; 1e-9
(relative to the terms' scale) leaves four orders of margin and still catches any mistake in a formula.
Where float32 embeddings enter (the CLIP), comparisons are against the same float32 inputs.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import fidelity
from ldm.fidelity import (CMMD_SCALE, CMMD_SIGMA, cmmd, embed_images, fidelity_metrics, flat_metrics, frechet_distance,
                          kid, load_reference, reference_embeddings)


def exact_moments(n, mean, cov, seed):
    """n points whose sample mean is ``mean`` and sample covariance (ddof = 1) is ``cov``, exactly (float64)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    white = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
    return torch.from_numpy(white @ np.linalg.cholesky(cov).T + mean)


def gaussians(n, e, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, e, generator=g, dtype=torch.float64) + shift


# -- Frechet distance ---------------------------------------------------------------------------------------------


def test_fd_equals_the_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 1.0, 0.0])
    x, y = exact_moments(50, mu1, np.diag(a), 0), exact_moments(70, mu2, np.diag(b), 1)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # commuting covariances
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_fd_equals_the_closed_form_for_non_commuting_covariances():
    # 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for PSD M, and M = S1^1/2 S2 S1^1/2 has
    # tr M = tr(S1 S2), det M = det S1 det S2.
    s1, s2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.0, 0.5])
    x, y = exact_moments(40, mu1, s1, 2), exact_moments(25, mu2, s2, 3)
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [300, 40])  # more images than dimensions, and fewer (rank-deficient covariance)
def test_fd_of_a_set_with_itself_is_zero(n):
    x = gaussians(n, 64)
    scale = float(torch.cov(x.T).trace())  # tr S: the size of the terms that cancel
    assert abs(frechet_distance(x, x)) <= 1e-9 * scale


def test_fd_agrees_with_torchmetrics_fid_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(torch.nn.Module):  # the "images" are already the embeddings
        num_features = 32

        def forward(self, x):
            return x

    for n_gen, n_ref in [(200, 150), (20, 30)]:  # full rank, and rank-deficient (fewer images than dimensions)
        x, y = gaussians(n_gen, 32, 0.2, seed=1), gaussians(n_ref, 32, seed=2) * 1.5
        fid = FrechetInceptionDistance(feature=Features())
        fid.update(y, real=True)
        fid.update(x, real=False)
        # torchmetrics' sqrt of the eigenvalues of the non-symmetric S1 S2 loses ~1e-7 relative on tiny ones
        assert frechet_distance(x, y) == pytest.approx(float(fid.compute()), rel=1e-6)


# -- KID and CMMD ---------------------------------------------------------------------------------------------------


def test_kid_agrees_with_torchmetrics_when_the_subset_is_the_whole_set():
    from torchmetrics.image.kid import KernelInceptionDistance

    class Features(torch.nn.Module):
        def forward(self, x):
            return x

    x, y = gaussians(120, 16, 0.3, seed=3), gaussians(120, 16, seed=4)
    metric = KernelInceptionDistance(feature=Features(), subsets=3, subset_size=120)  # each subset: a permutation
    metric.update(y, real=True)
    metric.update(x, real=False)
    mean, _ = metric.compute()
    assert kid(x, y, subsets=3, subset_size=120) == pytest.approx(float(mean), rel=1e-9)


def test_kid_and_cmmd_of_two_point_masses_equal_their_kernels():
    e = 8
    a, b = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
    a[0], b[0], b[1] = 1.0, 0.6, 0.8  # unit vectors, a.b = 0.6, |a - b|^2 = 0.8
    x, y = a.repeat(5, 1), b.repeat(7, 1)
    poly = lambda u, v: (float(u @ v) / e + 1) ** 3  # noqa: E731
    assert kid(x, y, subsets=4, subset_size=5) == pytest.approx(poly(a, a) + poly(b, b) - 2 * poly(a, b), rel=1e-12)
    assert cmmd(x, y) == pytest.approx(CMMD_SCALE * 2 * (1 - math.exp(-0.8 / (2 * CMMD_SIGMA**2))), rel=1e-9)


def test_cmmd_normalises_its_inputs_and_is_zero_for_identical_sets():
    x = gaussians(50, 16)
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)  # the minimum-variance estimator: exactly 0 up to round-off
    assert cmmd(3 * x, gaussians(60, 16, seed=1)) == pytest.approx(cmmd(x, gaussians(60, 16, seed=1)), rel=1e-9)


def test_kid_is_unbiased_around_zero_for_one_distribution():
    values = np.array([kid(gaussians(30, 8, seed=2 * r), gaussians(30, 8, seed=2 * r + 1), subsets=1, subset_size=30)
                       for r in range(200)])
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean()) < 4 * se  # mean 0 (a biased estimator here sits near +1e-2, ~20 se away)
    assert (values < 0).sum() > 40 and (values > 0).sum() > 40
    assert np.mean(values) < 0.25 * kid(gaussians(30, 8, 0.5, seed=7), gaussians(30, 8, seed=8), subsets=1, subset_size=30)


@pytest.mark.parametrize("metric", [lambda x, y: kid(x, y, subsets=10), frechet_distance, cmmd])
def test_metrics_rank_shifted_sets_above_unshifted(metric):
    y = gaussians(200, 16, seed=10)
    values = [metric(gaussians(200, 16, shift, seed=11), y) for shift in (0.0, 0.3, 1.0)]
    assert values[0] < values[1] < values[2]


# -- bootstrap ------------------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_images():
    widths = {}
    for n in (60, 480):
        est = fidelity_metrics(gaussians(n, 16, 0.15, seed=20), gaussians(n, 16, seed=21), bootstrap=100, seed=0)
        assert set(est) == {"kid", "fd", "cmmd"}
        for name, e in est.items():
            assert e.low <= e.value <= e.high, (name, e)
            assert (e.n_generated, e.n_reference, e.bootstrap) == (n, n, 100)
            widths[name, n] = e.high - e.low
    for name in ("kid", "fd", "cmmd"):
        assert widths[name, 480] < 0.6 * widths[name, 60]  # ~ 1/sqrt(8) = 0.35 expected


def test_kernel_replicates_are_centred_on_the_estimate():
    # copies of one image in a resample count as i = j, so KID's and CMMD's bootstrap has (almost) no bias
    est = fidelity_metrics(gaussians(80, 16, 0.1, seed=30), gaussians(80, 16, seed=31), bootstrap=200, seed=1,
                           kid_subset_size=80)
    for name in ("kid", "cmmd"):
        assert abs(est[name].bias) < 0.1 * (est[name].high - est[name].low), est[name]
    assert est["fd"].bias > 0  # FD's small-sample bias grows with fewer distinct images: the reason for re-centring


def test_bootstrap_is_seeded():
    x, y = gaussians(50, 8, 0.2, seed=40), gaussians(60, 8, seed=41)
    a, b = fidelity_metrics(x, y, bootstrap=50, seed=3), fidelity_metrics(x, y, bootstrap=50, seed=3)
    c = fidelity_metrics(x, y, bootstrap=50, seed=4)
    assert a == b
    assert all(a[m].low != c[m].low for m in a)
    none = fidelity_metrics(x, y, bootstrap=0)
    assert all(math.isnan(e.low) and math.isnan(e.high) for e in none.values())
    row = flat_metrics(a)
    assert row["fd"] == a["fd"].value and row["cmmd_high"] == a["cmmd"].high and row["kid_n_reference"] == 60


@pytest.mark.parametrize("call, message", [
    (lambda: kid(torch.zeros(1, 4), torch.zeros(5, 4)), "at least 2"),
    (lambda: frechet_distance(torch.zeros(5, 4), torch.zeros(5, 3)), "same CLIP"),
    (lambda: cmmd(torch.zeros(5), torch.zeros(5, 4)), "(N, E)"),
    (lambda: fidelity_metrics(torch.randn(5, 4), torch.randn(5, 4), metrics=["fid"]), "allowed: kid, fd, cmmd"),
    (lambda: fidelity_metrics(torch.randn(5, 4), torch.randn(5, 4), bootstrap=1), ">= 2 replicates"),
    (lambda: fidelity_metrics(torch.full((5, 4), float("nan")), torch.randn(5, 4)), "non-finite"),
])
def test_bad_arguments_are_one_line_errors(call, message):
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


# -- reference sets -------------------------------------------------------------------------------------------------


def png(path, colour, size=(16, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def captioned_set(root):
    rows = []
    for k in range(6):
        name = f"img/{k}.png"
        png(root / name, (40 * k, 0, 0))
        rows.append({"file_name": name, "text": f"caption {k}", "split": "test" if k % 2 else "train"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_load_reference_reads_a_captioned_set_and_its_heldout_split(tmp_path):
    root = captioned_set(tmp_path / "data")
    ref = load_reference(root, split="heldout")
    assert ref.files == ["img/1.png", "img/3.png", "img/5.png"]
    assert ref.captions == ["caption 1", "caption 3", "caption 5"]
    assert [im.getpixel((0, 0)) for im in ref.images] == [(40, 0, 0), (120, 0, 0), (200, 0, 0)]
    assert len(load_reference(root)) == 6 and load_reference(root, split="train").captions[0] == "caption 0"
    assert load_reference(root, limit=3).files == ["img/0.png", "img/2.png", "img/5.png"]  # evenly spaced, ends kept


def test_load_reference_reads_a_plain_folder_as_training_does(tmp_path):
    png(tmp_path / "b" / "x.png", (0, 0, 0, 0), mode="RGBA")  # transparent: on white, as training reads it
    png(tmp_path / "a.jpg", (10, 20, 30))
    png(tmp_path / ".hidden.png", (1, 2, 3))
    (tmp_path / "notes.txt").write_text("not an image")
    ref = load_reference(tmp_path)
    assert ref.files == ["a.jpg", "b/x.png"] and ref.captions is None
    assert ref.images[1].mode == "RGB" and ref.images[1].getpixel((3, 3)) == (255, 255, 255)
    assert load_reference(tmp_path, split="b").files == ["b/x.png"]


def test_reference_manifest_follows_the_file_contents(tmp_path):
    root = captioned_set(tmp_path / "data")
    first = load_reference(root).manifest
    assert load_reference(root).manifest == first
    png(root / "img/2.png", (0, 1, 0))
    assert load_reference(root).manifest != first


def write(root, name, data):
    (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("damage, message", [
    (lambda r: r / "nowhere", "does not exist"),
    (lambda r: r / "metadata.jsonl", "is a file"),
    (lambda r: (r / "img/3.png").unlink() or r, "img/3.png is missing"),
    (lambda r: write(r, "img/3.png", b""), "img/3.png is empty"),
    (lambda r: write(r, "img/3.png", b"\x89PNG\r\n\x1a\n broken"), "img/3.png cannot be used"),
    (lambda r: write(r, "metadata.jsonl", b'{"file_name": "../x.png", "split": "test"}\n'), "outside the data set folder"),
    (lambda r: write(r, "metadata.jsonl", b""), "has no rows"),
    (lambda r: write(r, "metadata.jsonl", b"{oops\n"), "line 1: not JSON"),
])
def test_reference_errors_are_one_line(tmp_path, damage, message):
    path = damage(captioned_set(tmp_path / "data"))
    with pytest.raises(ValueError) as info:
        load_reference(path, split="heldout")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_reference_split_and_limit_errors_name_what_is_allowed(tmp_path):
    root = captioned_set(tmp_path / "data")
    with pytest.raises(ValueError, match="its splits: test, train"):
        load_reference(root, split="validation")
    with pytest.raises(ValueError, match="positive integer"):
        load_reference(root, limit=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_reference(tmp_path / "empty")
    with pytest.raises(ValueError, match="without a 'heldout' subfolder"):
        load_reference(root / "img", split="heldout")


# -- embeddings and their cache ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from conditioning import load_clip_scorer
    from ldm.testing import text_encoder

    out = []
    for seed in (0, 1):
        root = tmp_path_factory.mktemp(f"clip{seed}")
        text_encoder(seed=seed).save_pretrained(root)
        out.append(load_clip_scorer(root))
    return out


def test_embed_images_handles_mixed_sizes_like_one_at_a_time(scorers):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for s in (32, 40, 32, 48, 40)]
    batched = embed_images(scorers[0], images, batch_size=4)
    single = torch.cat([scorers[0].encode_image([im]) for im in images])
    # same float32 inputs, different batch shapes: float32 matmul round-off only (~1e-7 relative)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(5))


def test_reference_embeddings_are_cached_per_set_and_clip(tmp_path, scorers, monkeypatch):
    root = captioned_set(tmp_path / "data")
    cache = tmp_path / "cache"
    ref = load_reference(root)
    first = reference_embeddings(ref, scorers[0], cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1
    calls = []
    original = fidelity.embed_images
    monkeypatch.setattr(fidelity, "embed_images", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = reference_embeddings(load_reference(root), scorers[0], cache_dir=cache)
    assert torch.equal(first, again) and calls == []  # read from the file, not embedded again
    reference_embeddings(ref, scorers[1], cache_dir=cache)  # another CLIP: another file
    png(root / "img/4.png", (0, 0, 255))  # a changed image: another manifest, another file
    changed = reference_embeddings(load_reference(root), scorers[0], cache_dir=cache)
    assert len(calls) == 2 and len(list(cache.glob("*.safetensors"))) == 3
    assert not torch.equal(changed[4], first[4]) and torch.equal(changed[0], first[0])
