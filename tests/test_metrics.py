"""Fusion metrics on known answers, against scikit-image where it has the metric, and against
direct transcriptions of the published formulas (scipy filtering) on small images."""

import math

import numpy as np
import pytest

from msidtrans_fast import metrics as m

skimage_metrics = pytest.importorskip("skimage.metrics")
ndimage = pytest.importorskip("scipy.ndimage")
signal = pytest.importorskip("scipy.signal")


def textured(h=41, w=53, seed=0, sigma=1.0):
    """Smooth random texture spanning exactly 0..255 (float64)."""
    rng = np.random.default_rng(seed)
    s = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma)
    return (s - s.min()) / (s.max() - s.min()) * 255


def to_uint8(x):
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def multifocus_pair(h=48, w=64, seed=1):
    """(sharp, A, B): A is sharp on the left half, B on the right half (Gaussian defocus)."""
    s = textured(h, w, seed)
    blurred = ndimage.gaussian_filter(s, 2.0)
    a, b = s.copy(), blurred.copy()
    a[:, w // 2:] = blurred[:, w // 2:]
    b[:, w // 2:] = s[:, w // 2:]
    return s, a, b


# ------------------------------------------------------------------------------- oracles
def qabf_oracle(a, b, f):
    """Xydeas-Petrovic, transcribed with true 2-D convolutions (scipy) and the paper's formulas."""
    h_y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)
    h_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)

    def grad(img):
        sx = signal.convolve2d(img, h_x, mode="same")
        sy = signal.convolve2d(img, h_y, mode="same")
        g = np.sqrt(sx ** 2 + sy ** 2)
        alpha = np.empty_like(g)
        for idx in np.ndindex(g.shape):
            alpha[idx] = math.pi / 2 if sx[idx] == 0 else math.atan(sy[idx] / sx[idx])
        return g, alpha

    def q(gs, als, gf, alf):
        out = np.empty_like(gs)
        for idx in np.ndindex(gs.shape):
            s_, f_ = gs[idx], gf[idx]
            rel = 1.0 if s_ == f_ else min(s_, f_) / max(s_, f_)
            ori = 1 - abs(als[idx] - alf[idx]) / (math.pi / 2)
            out[idx] = (0.9994 / (1 + math.exp(-15 * (rel - 0.5)))
                        * 0.9879 / (1 + math.exp(-22 * (ori - 0.8))))
        return out

    (ga, aa), (gb, ab), (gf, af) = grad(a), grad(b), grad(f)
    return float((q(ga, aa, gf, af) * ga + q(gb, ab, gf, af) * gb).sum() / (ga + gb).sum())


def qcb_oracle(a, b, f):
    """Chen-Blum as laid out in the MATLAB toolbox: centred frequency grid (freqspace), fftshift,
    31x31 unnormalised Gaussians applied with a zero-padded 'same' correlation."""
    def stretch(x):
        return np.round((x - x.min()) / (x.max() - x.min()) * 255)

    h, w = a.shape
    u = (np.arange(w) - w // 2) * (2.0 / w) if w % 2 == 0 else \
        (np.arange(w) - (w - 1) / 2) * (2.0 / w)
    v = (np.arange(h) - h // 2) * (2.0 / h) if h % 2 == 0 else \
        (np.arange(h) - (h - 1) / 2) * (2.0 / h)
    uu, vv = np.meshgrid(u * w / 30, v * h / 30)
    r = np.sqrt(uu ** 2 + vv ** 2)
    sd = np.exp(-(r / 15.3870) ** 2) - 0.7622 * np.exp(-(r / 1.3456) ** 2)
    x, y = np.meshgrid(np.arange(-15, 16), np.arange(-15, 16))

    def gauss(sig):
        return np.exp(-(x * x + y * y) / (2 * sig * sig)) / (2 * np.pi * sig * sig)

    def contrast_p(img):
        filt = np.real(np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(img)) * sd)))
        c = np.abs(signal.correlate2d(filt, gauss(2), mode="same")
                   / signal.correlate2d(filt, gauss(4), mode="same") - 1)
        return c ** 3 / (c ** 2 + 1e-4)

    ca, cb, cf = (contrast_p(stretch(t)) for t in (a, b, f))
    qa = np.where(ca < cf, ca / cf, cf / ca)
    qb = np.where(cb < cf, cb / cf, cf / cb)
    lam = ca ** 2 / (ca ** 2 + cb ** 2)
    return float((lam * qa + (1 - lam) * qb).mean())


def ssim_map_oracle(x, y, size):
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()

    def filt(t):
        return signal.correlate2d(t, win, mode="valid")

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s, vx, vy


def qy_oracle(a, b, f):
    s_ab, va, vb = ssim_map_oracle(a, b, 7)
    s_af, _, _ = ssim_map_oracle(a, f, 7)
    s_bf, _, _ = ssim_map_oracle(b, f, 7)
    out = np.empty_like(s_ab)
    for idx in np.ndindex(out.shape):
        if s_ab[idx] >= 0.75:
            lam = va[idx] / (va[idx] + vb[idx])
            out[idx] = lam * s_af[idx] + (1 - lam) * s_bf[idx]
        else:
            out[idx] = max(s_af[idx], s_bf[idx])
    return float(out.mean())


# --------------------------------------------------------------------------- vs. oracles
def test_qabf_matches_transcribed_formula():
    _, a, b = multifocus_pair(23, 31)
    f = 0.6 * a + 0.4 * b + textured(23, 31, seed=5) * 0.1
    assert m.qabf(a, b, f) == pytest.approx(qabf_oracle(a, b, f), rel=1e-12)


def test_qcb_matches_toolbox_layout_odd_and_even_sizes():
    for h, w in ((40, 52), (41, 53)):
        _, a, b = multifocus_pair(h, w, seed=2)
        f = np.where(np.arange(w) < w // 2, a, b)
        f = f + textured(h, w, seed=7) * 0.05
        assert m.qcb(a, b, f) == pytest.approx(qcb_oracle(a, b, f), rel=1e-9)


def test_qy_matches_transcribed_formula():
    _, a, b = multifocus_pair(30, 37)
    f = np.where(np.arange(37) < 20, a, b) + textured(30, 37, seed=3) * 0.05
    assert m.qy(a, b, f) == pytest.approx(qy_oracle(a, b, f), rel=1e-10)


@pytest.mark.parametrize("shape", [(37, 45), (40, 52, 3)])
def test_ssim_psnr_match_skimage(shape):
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, shape).astype(np.uint8)
    x = np.clip(gt + rng.normal(0, 15, shape), 0, 255).astype(np.uint8)
    channel_axis = -1 if len(shape) == 3 else None
    ref = skimage_metrics.structural_similarity(
        gt, x, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        channel_axis=channel_axis)
    assert m.ssim(x, gt) == pytest.approx(ref, abs=1e-10)
    ref_psnr = skimage_metrics.peak_signal_noise_ratio(gt, x, data_range=255)
    assert m.psnr(x, gt) == pytest.approx(ref_psnr, abs=1e-10)


def test_mutual_information_matches_skimage():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (50, 60)).astype(np.uint8)
    x[0, 0], x[0, 1] = 0, 255  # full range: skimage's 256 bins are then the integer levels
    y = to_uint8(0.7 * x + rng.normal(0, 30, x.shape))
    y[0, 0], y[0, 1] = 0, 255
    mi, hx, hy = m.mutual_information(x, y)
    # skimage's NMI is (H(x) + H(y)) / H(x, y), so MI / (H(x) + H(y)) = 1 - 1 / that.
    studholme = skimage_metrics.normalized_mutual_information(x, y, bins=256)
    assert mi / (hx + hy) == pytest.approx(1 - 1 / studholme, abs=1e-12)
    from skimage.measure import shannon_entropy
    assert hx == pytest.approx(shannon_entropy(x, base=2), abs=1e-12)
    assert m.nmi(x, x, y) == pytest.approx(4 * (1 - 1 / studholme), abs=1e-12)


# --------------------------------------------------------------------------- known answers
def test_identical_images():
    a = textured()
    assert m.QABF_PERFECT == pytest.approx(0.97479, abs=1e-5)
    assert m.qabf(a, a, a) == pytest.approx(m.QABF_PERFECT, abs=1e-12)
    assert m.qcb(a, a, a) == pytest.approx(1.0, abs=1e-12)
    assert m.qy(a, a, a) == pytest.approx(1.0, abs=1e-12)
    assert m.nmi(a, a, a) == pytest.approx(2.0, abs=1e-12)
    assert m.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert m.psnr(a, a) == math.inf


def test_constant_images():
    a, b = textured(seed=1), textured(seed=2)
    c = np.full_like(a, 117.0)
    assert m.spatial_frequency(c) == 0.0
    assert m.average_gradient(c) == 0.0
    # A black fused image keeps no edge (G = 0: Qg = 0.9994 / (1 + e^7.5)) and no contrast. (A
    # non-zero constant image has edges at its border: the Sobel filter pads with zeros, as the
    # reference MATLAB code does.)
    black = np.zeros_like(a)
    assert 0 < m.qabf(a, b, black) < 0.9994 / (1 + math.exp(7.5))
    assert m.qabf(a, b, c) > 0.05
    assert m.qcb(a, b, c) < 0.01
    assert m.nmi(a, b, c) == 0.0
    assert math.isnan(m.qabf(black, black, a))  # no source gradient at all: undefined
    assert m.nmi(c, c, c) == 0.0
    assert m.qy(c, c, c) == pytest.approx(1.0)
    assert m.ssim(c, c) == pytest.approx(1.0)


def test_fused_equal_to_one_source():
    a = textured(seed=4)
    flat = np.zeros_like(a)  # no edge anywhere, even at the zero-padded border
    # Only A has edges: copying A transfers all of them perfectly.
    assert m.qabf(a, flat, a) == pytest.approx(m.QABF_PERFECT, abs=1e-12)
    # NMI of F = A: the A term is 1, the B term 2 MI(B, A) / (H(B) + H(A)).
    b = to_uint8(0.5 * a + textured(seed=9) * 0.5)
    mi, hb, ha = m.mutual_information(b, a)
    assert m.nmi(a, b, a) == pytest.approx(1 + 2 * mi / (hb + ha), abs=1e-12)
    # Q_Y of F = A with an unrelated B: SSIM(A, B) < 0.75 everywhere, so Q = max(1, .) = 1.
    noise = np.random.default_rng(0).integers(0, 256, a.shape).astype(float)
    assert m.qy(a, noise, a) == pytest.approx(1.0, abs=1e-12)


def test_blind_spot_copying_a_source_beats_ideal_fusion_on_nmi_and_qy():
    sharp, a, b = multifocus_pair()
    copy_a = m.fusion_metrics(a, b, a)
    ideal = m.fusion_metrics(a, b, sharp)
    assert copy_a["NMI"] > ideal["NMI"]
    assert copy_a["Qy"] > ideal["Qy"]
    for k in ("Qabf", "Qcb", "SF", "AG"):
        assert ideal[k] > copy_a[k], k


def test_analytic_cases():
    h, w = 20, 30
    stripes = np.tile(np.array([0.0, 255.0]), (h, w // 2))
    assert m.spatial_frequency(stripes) == pytest.approx(255 * math.sqrt((w - 1) / w))
    i, j = np.mgrid[0:h, 0:w]
    ramp = 3.0 * i + 4.0 * j
    assert m.average_gradient(ramp) == pytest.approx(math.sqrt((9 + 16) / 2))
    assert m.spatial_frequency(ramp) == pytest.approx(
        math.sqrt(16 * h * (w - 1) / (h * w) + 9 * (h - 1) * w / (h * w)))
    a = textured(seed=6)
    flat = np.zeros_like(a)
    # Doubled edges: G = 1/2 everywhere -> Qg = 0.9994 / 2, orientation kept.
    half = 0.9994 / 2 * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert m.qabf(a, flat, 2 * a) == pytest.approx(half, abs=1e-12)
    # Contrast inversion is invisible to Qabf (blind spot), and an affine brightness change to Qcb.
    # (-a rather than 255 - a, so that the zero-padded border inverts as well.)
    assert m.qabf(a, flat, -a) == pytest.approx(m.QABF_PERFECT, abs=1e-12)
    assert m.qcb(a, a, 0.5 * a + 40) == pytest.approx(1.0, abs=1e-12)
    # A one-to-one relabelling of grey levels keeps all information.
    q = to_uint8(a)
    assert m.nmi(q, q, 255 - q) == pytest.approx(2.0, abs=1e-12)
    # PSNR of a uniform error of 5 grey levels.
    assert m.psnr(q.astype(float) + 5, q) == pytest.approx(10 * math.log10(255 ** 2 / 25))


def test_luminance_and_colour():
    g = to_uint8(textured())
    rgb = np.stack([g, g, g], -1)
    assert np.array_equal(m.to_luminance(rgb), g.astype(float))
    col = np.stack([g, 255 - g, g // 2], -1)
    y = m.to_luminance(col)
    v = float(g[3, 4])
    assert y[3, 4] == pytest.approx(0.299 * v + 0.587 * (255 - v) + 0.114 * (g[3, 4] // 2))
    # A grayscale pair scores the same against a fused gray image and its RGB copy.
    _, a, b = multifocus_pair()
    f = to_uint8(np.where(np.arange(64) < 32, a, b))
    assert m.fusion_metrics(a, b, f) == m.fusion_metrics(a, b, np.stack([f, f, f], -1))
    # Reference metrics: per channel for RGB pairs, luminance when one side is gray.
    assert m.ssim(rgb, rgb) == pytest.approx(1.0)
    assert m.psnr(rgb, g) == math.inf


def test_bad_inputs():
    a = textured()
    with pytest.raises(TypeError, match="numpy"):
        m.qabf(a.tolist(), a, a)
    with pytest.raises(TypeError, match="bool"):
        m.spatial_frequency(a > 100)
    with pytest.raises(ValueError, match="same height and width"):
        m.qcb(a, a, a[:-1])
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        m.nmi(a, a, np.zeros(a.shape + (4,)))
    with pytest.raises(ValueError, match="NaN"):
        m.qy(a, a, np.full_like(a, np.nan))
    with pytest.raises(ValueError, match="at least 7x7"):
        m.qy(a[:6], a[:6], a[:6])
    with pytest.raises(ValueError, match="11x11"):
        m.ssim(a[:10], a[:10])
    with pytest.raises(ValueError, match="empty"):
        m.psnr(a[:0], a[:0])


# ------------------------------------------------------------------------------- blotch measure
def exposure_pair(h=64, w=96, offset=4.0, seed=3):
    """(A, B): a flat grey backdrop (B brighter by ``offset``, as after an exposure change) with a
    textured block at the top left, sharp in A and defocused in B."""
    a = np.full((h, w), 100.0)
    a[4:28, 4:28] = 60 + textured(24, 24, seed) * 0.5
    b = a + offset
    b[4:28, 4:28] = ndimage.gaussian_filter(a, 2.0)[4:28, 4:28] + offset
    return a, b


def test_blotch_switch_inside_flat_region_scores_worse_than_none():
    a, b = exposure_pair()
    clean = a.copy()
    blotched = a.copy()
    blotched[40:52, 50:66] = b[40:52, 50:66]  # a patch of the brighter source on the backdrop
    assert m.blotch(a, b, clean) == 0.0
    assert m.blotch(a, b, b) == 0.0  # all from one source: no switch either
    score = m.blotch(a, b, blotched)
    assert score > 1.0
    switch, flat = m.switch_map(a, b, blotched)
    assert flat[40:52, 50:66].all() and not flat[10:20, 10:20].any()
    assert switch[38:54, 48:68].sum() == switch.sum() > 0  # only around the patch
    # two patches of the same area have more seam than one
    two = a.copy()
    two[40:52, 50:58] = b[40:52, 50:58]
    two[40:52, 80:88] = b[40:52, 80:88]
    assert m.blotch(a, b, two) > score


def test_blotch_switch_along_an_edge_does_not_count():
    h, w = 64, 128
    a = np.full((h, w), 60.0)
    a[:, w // 2:] = 190.0  # a strong vertical edge; flat on both sides
    b = a + 5.0
    f = np.where(np.arange(w) < w // 2, a, b)  # switches source exactly at the edge
    switch, flat = m.switch_map(a, b, f)
    assert flat[:, :w // 2 - 12].all() and not flat[:, w // 2 - 3:w // 2 + 3].any()
    assert m.blotch(a, b, f) == 0.0
    # the same switch moved 25 pixels into the flat left side counts
    g = np.where(np.arange(w) < w // 2 - 25, a, b)
    assert m.blotch(a, b, g) > 0.0


def test_blotch_ignores_switches_between_equal_sources_and_mixes():
    a, b = exposure_pair(offset=0.0)
    f = a.copy()
    f[40:52, 50:66] = b[40:52, 50:66]
    assert m.blotch(a, b, f) == 0.0  # equal brightness: the switch is invisible
    a, b = exposure_pair(offset=0.5)  # below the smallest step
    assert m.blotch(a, b, np.where(np.arange(96) < 70, a, b)) == 0.0
    a, b = exposure_pair()
    assert m.blotch(a, b, (a + b) / 2) == 0.0  # an even mix takes neither source


def test_blotch_colour_scale_and_shapes():
    a, b = exposure_pair()
    f = a.copy()
    f[40:52, 50:66] = b[40:52, 50:66]
    rgb = [np.repeat(x[..., None], 3, -1) for x in (a, b, f)]
    assert m.blotch(*rgb) == m.blotch(a, b, f)
    assert m.fusion_metrics(a, b, f)["Blotch"] == m.blotch(a, b, f)
    assert m.blotch(a[:1, :5], b[:1, :5], f[:1, :5]) == 0.0  # tiny images work
    with pytest.raises(ValueError):
        m.blotch(a, b, f[:10])
