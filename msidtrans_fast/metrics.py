"""Objective quality metrics for multi-focus image fusion (MFIF).

Every function takes ``numpy`` arrays of shape (H, W) (grayscale) or (H, W, 3) (RGB), any real
dtype, with values on the **8-bit scale [0, 255]** (``uint8`` images as read, or floats on that
scale; 16-bit images must be divided by 257 first, as :mod:`msidtrans_fast.evaluate` does).
Internally everything is computed in float64. All return a Python ``float``.

The fusion metrics (:func:`qabf`, :func:`qcb`, :func:`nmi`, :func:`qy`, :func:`spatial_frequency`,
:func:`average_gradient`) are computed on the luminance ``Y = 0.299 R + 0.587 G + 0.114 B``
(:func:`to_luminance`; an image whose three channels are equal is taken as is), so a grayscale
source pair can be scored against an RGB fused file. Some published tables instead score each RGB
channel and average; numbers from the two conventions are close but not identical.
The ground-truth metrics (:func:`ssim`, :func:`psnr`) use the channels as they are when both images
are RGB, and luminance otherwise.

Metrics, formulas and blind spots (A, B: sources; F: fused image):

``Qabf`` -- Xydeas & Petrovic (2000), edge-information preservation. Sobel responses ``sx, sy``
    (3x3, zero padding, same size); strength ``g = sqrt(sx^2 + sy^2)``, orientation
    ``alpha = arctan(sy / sx)`` (pi/2 where sx = 0). Relative strength ``G_AF = min(gA, gF) /
    max(gA, gF)`` (1 where both are 0), relative orientation ``A_AF = 1 - |alpha_A - alpha_F| /
    (pi/2)``; ``Q_AF = Gg / (1 + exp(kg (G_AF - sg))) * Ga / (1 + exp(ka (A_AF - sa)))`` with the
    usual constants Gg = 0.9994, kg = -15, sg = 0.5, Ga = 0.9879, ka = -22, sa = 0.8; likewise Q_BF.
    ``Qabf = sum(Q_AF gA + Q_BF gB) / sum(gA + gB)`` (weights g^L with L = 1). Range [0, ~0.975]:
    with these constants perfect transfer (F = A = B) scores :data:`QABF_PERFECT` = 0.9748, not 1.
    Blind spots: contrast inversion (F = 255 - A) is not penalised (orientation uses sy/sx only);
    near-vertical gradients whose sx changes sign flip alpha from +pi/2 to -pi/2 and are scored as
    opposite; noise and ringing that add gradient are penalised only through G; the zero padding
    (kept from the reference MATLAB code, for comparable numbers) makes the image border an edge
    that any fused image of similar brightness "preserves"; NaN when neither source has any
    gradient.
``Qcb`` -- Chen & Blum (2009), contrast preservation weighted by a human contrast sensitivity
    function (CSF), as in the widely used MATLAB implementation by Z. Liu: each image is stretched
    to [0, 255] and rounded (a constant image becomes 0), filtered in the frequency domain with the
    DoG CSF ``S(r) = exp(-(r/f0)^2) - a exp(-(r/f1)^2)``, f0 = 15.3870, f1 = 1.3456, a = 0.7622,
    with ``r = |k| / 15`` for the integer frequency index k (cycles per image); local contrast
    ``C = |G2 * I / G4 * I - 1|`` with sampled, unnormalised 31x31 Gaussians of sigma 2 and 4
    (zero padding; C = 0 where the denominator is 0); masked contrast ``C' = C^3 / (C^2 + 1e-4)``;
    ``Q_AF = min(C'_A, C'_F) / max(C'_A, C'_F)`` (1 where both are 0); saliency
    ``lambda_A = C'_A^2 / (C'_A^2 + C'_B^2)`` (1/2 where both are 0);
    ``Qcb = mean(lambda_A Q_AF + lambda_B Q_BF)``. Range [0, 1]; 1 for F = A = B.
    Blind spots: the contrast ratio is unstable where the band-passed image crosses zero (large,
    noisy C there), and it ignores whether preserved contrast is correctly placed structure.
``NMI`` -- Hossny et al. (2008), normalised mutual information:
    ``NMI = 2 [MI(A,F) / (H(A) + H(F)) + MI(B,F) / (H(B) + H(F))]`` with entropies in bits from
    256-bin (joint) histograms of the luminance rounded to integers 0..255. Range [0, 2]
    (a term whose two images are both constant counts as 0). Blind spot: copying one source
    unchanged gives that term its maximum (1), so ``F = A`` usually scores **above** any real
    fusion; it rewards similarity to the sources, not all-in-focus quality. Report it, never
    optimise for it.
``Qy`` -- Yang et al. (2008), SSIM-based: SSIM maps with a 7x7 Gaussian window (sigma 1.5,
    normalised, 'valid' positions only) and the standard constants C1 = (0.01*255)^2,
    C2 = (0.03*255)^2 (Liu's MATLAB code uses C1 = C2 = 2e-16, which leaves flat windows
    numerically undefined). Per window w: if ``SSIM(A,B|w) >= 0.75``,
    ``Q = l SSIM(A,F|w) + (1-l) SSIM(B,F|w)`` with ``l = var_A / (var_A + var_B)`` (1/2 if both
    are 0), else ``Q = max(SSIM(A,F|w), SSIM(B,F|w))``; ``Qy = mean Q``. Range [-1, 1]; 1 for
    F = A = B. Blind spot: where the sources differ (the defocused regions) it takes the max, so
    ``F = A`` scores 1 wherever A and B disagree and near 1 elsewhere: copying a source scores
    above real fusion. Report it, never optimise for it.
``SF`` -- spatial frequency (Eskicioglu & Fisher 1995): ``RF^2 = sum_{i,j>=2} (F[i,j] -
    F[i,j-1])^2 / (M N)``, ``CF^2`` likewise along columns, ``SF = sqrt(RF^2 + CF^2)``.
``AG`` -- average gradient: forward differences on the (M-1) x (N-1) grid,
    ``AG = mean(sqrt((dx^2 + dy^2) / 2))``.
    SF and AG look at F alone: noise, ringing and over-sharpening raise them. Higher is not
    always better; compare only fusions of the same sources.
``SSIM`` -- Wang et al. (2004) against a ground truth: 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, mean over 'valid' positions and over
    channels; equal to ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=255)``.
``PSNR`` -- ``10 log10(255^2 / MSE)`` over all pixels and channels; ``inf`` for identical images.
``Blotch`` -- switches of source inside flat regions (seams a photographer sees as blotches where
    the sources differ in brightness), in percent of the flat pixels; lower is better, 0 ideal.
    Local means ``mX = G_2 * X`` (normalised Gaussian, sigma 2, reflected borders). Where the
    sources' brightness differs, ``|mA - mB| >= 1`` grey level, the fused image's position between
    them, ``t = (mF - mB) / (mA - mB)``, says which source it took: A where ``t > 0.75``, B where
    ``t < 0.25`` (between: a mix, neither). Flat: the local RMS gradient
    ``sqrt(G_3 * (sx^2 + sy^2)) / 8`` (Sobel, reflected borders; a ramp of s levels per pixel gives
    s) is at most 1 grey level per pixel in **both** sources, so neither carries focus information
    there. A switch pixel is a flat pixel whose 5x5 neighbourhood holds both A-taken and B-taken
    pixels. ``Blotch = 100 * #switch / #flat`` (0 without flat pixels). A switch along an edge does
    not count (the edge is not flat), nor does one where the sources are equal (it is invisible).
    Blind spots: switches inside textured regions are not seen (Q^AB/F and Q_CB see those);
    a brightness step under 1 level counts as no difference, and every counted seam weighs the
    same whatever its step; it counts seam length, not blotch area, so one large patch weighs less
    than many small ones of the same area; a gently shaded region (sky with a gradient under 1
    level per pixel) counts as flat.
"""

from __future__ import annotations

import math

import numpy as np

#: Luminance weights (ITU-R BT.601) used to turn RGB into one channel.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

#: Xydeas-Petrovic constants: (Gamma, kappa, sigma) for strength and for orientation.
QABF_STRENGTH = (0.9994, -15.0, 0.5)
QABF_ORIENTATION = (0.9879, -22.0, 0.8)
#: Qabf of perfect edge transfer (F = A = B) with the constants above.
QABF_PERFECT = (QABF_STRENGTH[0] / (1 + math.exp(QABF_STRENGTH[1] * (1 - QABF_STRENGTH[2])))
                * QABF_ORIENTATION[0]
                / (1 + math.exp(QABF_ORIENTATION[1] * (1 - QABF_ORIENTATION[2]))))

#: Chen-Blum CSF and contrast constants.
QCB_CSF = (15.3870, 1.3456, 0.7622)  # f0, f1, a
QCB_SIGMAS = (2.0, 4.0)
QCB_RADIUS = 15  # 31x31 Gaussian kernels
QCB_MASKING = (1.0, 1.0, 3.0, 2.0, 1e-4)  # k, h, p, q, Z

#: Blotch constants: local-mean sigma, gradient-energy sigma, flat level (grey levels per pixel),
#: smallest brightness step between the sources (grey levels), neighbourhood radius of a switch.
BLOTCH_MEAN_SIGMA = 2.0
BLOTCH_ENERGY_SIGMA = 3.0
BLOTCH_FLAT_LEVEL = 1.0
BLOTCH_MIN_STEP = 1.0
BLOTCH_RADIUS = 2

#: SSIM constants on the 8-bit scale.
DATA_RANGE = 255.0
SSIM_C1 = (0.01 * DATA_RANGE) ** 2
SSIM_C2 = (0.03 * DATA_RANGE) ** 2

#: Names of the metrics returned by :func:`fusion_metrics` and :func:`reference_metrics`.
FUSION_METRICS = ("Qabf", "Qcb", "NMI", "Qy", "SF", "AG", "Blotch")
REFERENCE_METRICS = ("SSIM", "PSNR")


# ------------------------------------------------------------------------------------- inputs
def _as_image(img, name: str) -> np.ndarray:
    """(H, W) or (H, W, 3) float64 copy of a real array; raises TypeError/ValueError."""
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(img).__name__}")
    if img.dtype == bool or not (np.issubdtype(img.dtype, np.integer)
                                 or np.issubdtype(img.dtype, np.floating)):
        raise TypeError(f"{name} must hold integers or floats on the 0..255 scale, got {img.dtype}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"{name} must be (H, W) or (H, W, 3), got shape {img.shape}")
    if 0 in img.shape:
        raise ValueError(f"{name} is empty, shape {img.shape}")
    out = img.astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def to_luminance(img, name: str = "image") -> np.ndarray:
    """Luminance of an image on the 0..255 scale.

    Args:
        img: (H, W) or (H, W, 3) array (uint8, or any real dtype on the 8-bit scale).

    Returns:
        (H, W) float64: the image itself when it is grayscale or its three channels are equal,
        else ``0.299 R + 0.587 G + 0.114 B``.
    """
    x = _as_image(img, name)
    if x.ndim == 2:
        return x
    if (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all():
        return np.ascontiguousarray(x[..., 0])
    return x @ np.asarray(LUMA_WEIGHTS)


def _sources_and_fused(a, b, f, min_size: int = 2):
    ya, yb, yf = (to_luminance(x, n) for x, n in ((a, "a"), (b, "b"), (f, "fused")))
    if not ya.shape == yb.shape == yf.shape:
        raise ValueError(f"a, b and fused must have the same height and width, got {ya.shape}, "
                         f"{yb.shape} and {yf.shape}")
    if min(ya.shape) < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size}, got {ya.shape}")
    return ya, yb, yf


# ---------------------------------------------------------------------------------- filtering
def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of ``size`` taps (sum 1); its outer product is the 2-D window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(stack: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Correlates each (H, W) map of an (n, H, W) stack with the separable window
    ``outer(taps, taps)``, 'valid' positions only: (n, H - k + 1, W - k + 1)."""
    k = len(taps)
    h, w = stack.shape[1] - k + 1, stack.shape[2] - k + 1
    rows = sum(t * stack[:, i:i + h, :] for i, t in enumerate(taps))
    return sum(t * rows[:, :, i:i + w] for i, t in enumerate(taps))


def _ssim_maps(x: np.ndarray, y: np.ndarray, taps: np.ndarray):
    """SSIM map of two (H, W) float64 maps plus the local variances of x and y ('valid'), with
    the separable window ``outer(taps, taps)``."""
    m = _filter_valid(np.stack([x, y, x * x, y * y, x * y]), taps)
    mx, my = m[0], m[1]
    vx = np.maximum(m[2] - mx * mx, 0.0)
    vy = np.maximum(m[3] - my * my, 0.0)
    cxy = m[4] - mx * my
    s = ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)
         / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2)))
    return s, vx, vy


# ------------------------------------------------------------------------------------ metrics
def _sobel(y: np.ndarray, mode: str = "constant"):
    """Sobel responses (sx, sy) of an (H, W) map, same size; ``mode``: np.pad's border mode
    (zero padding by default)."""
    p = np.pad(y, 1, mode=mode)
    sx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    sy = (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:]) - (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:])
    return sx, sy


def _edge_strength_orientation(y: np.ndarray):
    sx, sy = _sobel(y)
    g = np.hypot(sx, sy)
    zero = sx == 0
    alpha = np.where(zero, np.pi / 2, np.arctan(sy / np.where(zero, 1.0, sx)))
    return g, alpha


def _edge_preservation(g_src, a_src, g_f, a_f) -> np.ndarray:
    """Per-pixel Q_SF of Xydeas-Petrovic."""
    hi = np.maximum(g_src, g_f)
    rel_g = np.where(hi > 0, np.minimum(g_src, g_f) / np.where(hi > 0, hi, 1.0), 1.0)
    rel_a = 1 - np.abs(a_src - a_f) / (np.pi / 2)
    (tg, kg, dg), (ta, ka, da) = QABF_STRENGTH, QABF_ORIENTATION
    return tg / (1 + np.exp(kg * (rel_g - dg))) * ta / (1 + np.exp(ka * (rel_a - da)))


def qabf(a, b, f) -> float:
    """Xydeas-Petrovic Q^AB/F (edge preservation); see the module docstring.

    Args:
        a, b: the sources; f: the fused image. (H, W) or (H, W, 3), 0..255 scale, same H and W.

    Returns:
        Q^AB/F in [0, QABF_PERFECT]; NaN when neither source has any gradient.
    """
    ya, yb, yf = _sources_and_fused(a, b, f)
    ga, aa = _edge_strength_orientation(ya)
    gb, ab = _edge_strength_orientation(yb)
    gf, af = _edge_strength_orientation(yf)
    den = float((ga + gb).sum())
    if den == 0:
        return float("nan")
    num = (_edge_preservation(ga, aa, gf, af) * ga + _edge_preservation(gb, ab, gf, af) * gb).sum()
    return float(num / den)


def _stretch_round(y: np.ndarray) -> np.ndarray:
    """Min-max stretch to [0, 255] and round half up; a constant map becomes zeros."""
    lo, hi = y.min(), y.max()
    if hi == lo:
        return np.zeros_like(y)
    return np.floor((y - lo) / (hi - lo) * 255 + 0.5)


def _csf_filter(stack: np.ndarray) -> np.ndarray:
    """Chen-Blum DoG contrast sensitivity filter of an (n, H, W) stack, in the frequency domain."""
    h, w = stack.shape[-2:]
    ky = np.fft.fftfreq(h) * h
    kx = np.fft.fftfreq(w) * w
    r = np.hypot(ky[:, None], kx[None, :]) / 15.0
    f0, f1, a = QCB_CSF
    s = np.exp(-((r / f0) ** 2)) - a * np.exp(-((r / f1) ** 2))
    return np.fft.ifft2(np.fft.fft2(stack) * s).real


def _gaussian_same_zero(stack: np.ndarray, sigma: float) -> np.ndarray:
    """(n, H, W) stack filtered with the sampled, unnormalised 31x31 Gaussian
    exp(-(x^2+y^2) / (2 sigma^2)) / (2 pi sigma^2), zero padding, same size (separable)."""
    x = np.arange(-QCB_RADIUS, QCB_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-(x * x) / (2 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    r = QCB_RADIUS
    return _filter_valid(np.pad(stack, ((0, 0), (r, r), (r, r))), taps)


def _ratio_min_max(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    hi = np.maximum(p, q)
    return np.where(hi > 0, np.minimum(p, q) / np.where(hi > 0, hi, 1.0), 1.0)


def qcb(a, b, f) -> float:
    """Chen-Blum Q_CB (CSF-weighted contrast preservation); see the module docstring.

    Args:
        a, b: the sources; f: the fused image. (H, W) or (H, W, 3), 0..255 scale, same H and W.

    Returns:
        Q_CB in [0, 1].
    """
    ya, yb, yf = _sources_and_fused(a, b, f)
    filtered = _csf_filter(np.stack([_stretch_round(y) for y in (ya, yb, yf)]))
    num = _gaussian_same_zero(filtered, QCB_SIGMAS[0])
    den = _gaussian_same_zero(filtered, QCB_SIGMAS[1])
    nz = den != 0
    contrast = np.abs(np.where(nz, num / np.where(nz, den, 1.0) - 1, 0.0))
    k, h, p, q, z = QCB_MASKING
    masked = k * contrast ** p / (h * contrast ** q + z)
    ca, cb, cf = masked
    qa, qb = _ratio_min_max(ca, cf), _ratio_min_max(cb, cf)
    sa, sb = ca * ca, cb * cb
    tot = sa + sb
    lam_a = np.where(tot > 0, sa / np.where(tot > 0, tot, 1.0), 0.5)
    return float((lam_a * qa + (1 - lam_a) * qb).mean())


def _quantise(y: np.ndarray) -> np.ndarray:
    """Integers 0..255 (round half up, clipped) of a map on the 8-bit scale."""
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mutual_information(x, y) -> tuple[float, float, float]:
    """Mutual information of two images from their 256-bin joint histogram, in bits.

    Args:
        x, y: (H, W) or (H, W, 3) arrays on the 0..255 scale, same H and W (luminance, rounded).

    Returns:
        ``(MI, H(x), H(y))`` with ``MI = H(x) + H(y) - H(x, y)``.
    """
    qx = _quantise(to_luminance(x, "x"))
    qy = _quantise(to_luminance(y, "y"))
    if qx.shape != qy.shape:
        raise ValueError(f"x and y must have the same height and width, got {qx.shape} and "
                         f"{qy.shape}")
    joint = np.bincount((qx * 256 + qy).ravel(), minlength=256 * 256).reshape(256, 256)
    hx, hy, hxy = _entropy(joint.sum(1)), _entropy(joint.sum(0)), _entropy(joint.ravel())
    return max(hx + hy - hxy, 0.0), hx, hy


def nmi(a, b, f) -> float:
    """Hossny's normalised mutual information; see the module docstring.

    Args:
        a, b: the sources; f: the fused image. (H, W) or (H, W, 3), 0..255 scale, same H and W.

    Returns:
        NMI in [0, 2].
    """
    ya, yb, yf = _sources_and_fused(a, b, f, min_size=1)
    total = 0.0
    for src in (ya, yb):
        mi, hs, hf = mutual_information(src, yf)
        if hs + hf > 0:
            total += mi / (hs + hf)
    return 2.0 * total


def qy(a, b, f) -> float:
    """Yang's SSIM-based Q_Y; see the module docstring.

    Args:
        a, b: the sources; f: the fused image. (H, W) or (H, W, 3), 0..255 scale, same H and W,
            at least 7x7.

    Returns:
        Q_Y in [-1, 1].
    """
    ya, yb, yf = _sources_and_fused(a, b, f, min_size=7)
    window = _gaussian_1d(7, 1.5)
    s_ab, va, vb = _ssim_maps(ya, yb, window)
    s_af, _, _ = _ssim_maps(ya, yf, window)
    s_bf, _, _ = _ssim_maps(yb, yf, window)
    tot = va + vb
    lam = np.where(tot > 0, va / np.where(tot > 0, tot, 1.0), 0.5)
    q = np.where(s_ab >= 0.75, lam * s_af + (1 - lam) * s_bf, np.maximum(s_af, s_bf))
    return float(q.mean())


def spatial_frequency(f) -> float:
    """Spatial frequency ``sqrt(RF^2 + CF^2)`` of an image's luminance (both sums over M N).

    Args:
        f: (H, W) or (H, W, 3) array on the 0..255 scale.
    """
    y = to_luminance(f, "fused")
    n = y.size
    rf2 = float((np.diff(y, axis=1) ** 2).sum()) / n
    cf2 = float((np.diff(y, axis=0) ** 2).sum()) / n
    return math.sqrt(rf2 + cf2)


def average_gradient(f) -> float:
    """Average gradient ``mean(sqrt((dx^2 + dy^2) / 2))`` over the (H-1) x (W-1) forward-difference
    grid of an image's luminance.

    Args:
        f: (H, W) or (H, W, 3) array on the 0..255 scale, at least 2x2.
    """
    y = to_luminance(f, "fused")
    if min(y.shape) < 2:
        raise ValueError(f"average_gradient needs at least 2x2 pixels, got {y.shape}")
    dx = y[:-1, 1:] - y[:-1, :-1]
    dy = y[1:, :-1] - y[:-1, :-1]
    return float(np.sqrt((dx * dx + dy * dy) / 2).mean())


def _pair_for_reference(x, ref):
    """Both as (C, H, W) float64: RGB channels when both are RGB, else luminance."""
    xi, ri = _as_image(x, "image"), _as_image(ref, "reference")
    if xi.ndim == 3 and ri.ndim == 3:
        xs, rs = np.moveaxis(xi, -1, 0), np.moveaxis(ri, -1, 0)
    else:
        xs, rs = to_luminance(xi)[None], to_luminance(ri)[None]
    if xs.shape != rs.shape:
        raise ValueError(f"image and reference must have the same height and width, got "
                         f"{xi.shape[:2]} and {ri.shape[:2]}")
    return np.ascontiguousarray(xs), np.ascontiguousarray(rs)


def ssim(x, ref) -> float:
    """SSIM of an image against a reference (ground truth); see the module docstring.

    Args:
        x, ref: (H, W) or (H, W, 3) arrays on the 0..255 scale, same H and W, at least 11x11.

    Returns:
        Mean SSIM in [-1, 1] (mean over channels when both are RGB).
    """
    xs, rs = _pair_for_reference(x, ref)
    if min(xs.shape[1:]) < 11:
        raise ValueError(f"ssim needs at least 11x11 pixels, got {xs.shape[1:]}")
    window = _gaussian_1d(11, 1.5)
    return float(np.mean([_ssim_maps(c, r, window)[0].mean() for c, r in zip(xs, rs, strict=True)]))


def psnr(x, ref) -> float:
    """Peak signal-to-noise ratio in dB against a reference, peak 255, over all pixels and
    channels (channels as in :func:`ssim`); ``inf`` for identical images.

    Args:
        x, ref: (H, W) or (H, W, 3) arrays on the 0..255 scale, same H and W.
    """
    xs, rs = _pair_for_reference(x, ref)
    mse = float(((xs - rs) ** 2).mean())
    if mse == 0:
        return float("inf")
    return 10.0 * math.log10(DATA_RANGE ** 2 / mse)


def _gaussian_same(stack: np.ndarray, sigma: float) -> np.ndarray:
    """(n, H, W) stack filtered with a normalised Gaussian (radius 3 sigma), reflected borders."""
    r = math.ceil(3 * sigma)
    return _filter_valid(np.pad(stack, ((0, 0), (r, r), (r, r)), mode="reflect"),
                         _gaussian_1d(2 * r + 1, sigma))


def _max_filter(mask: np.ndarray, radius: int) -> np.ndarray:
    """Whether any pixel of the (2 radius + 1)^2 square around each pixel of a bool map is set."""
    h, w = mask.shape
    p = np.pad(mask, radius)
    rows = np.zeros((h, p.shape[1]), dtype=bool)
    for i in range(2 * radius + 1):
        rows |= p[i:i + h]
    out = np.zeros((h, w), dtype=bool)
    for j in range(2 * radius + 1):
        out |= rows[:, j:j + w]
    return out


def flat_mask(a, b, level: float = BLOTCH_FLAT_LEVEL) -> np.ndarray:
    """Where neither source carries focus information: (H, W) bool, True where the local RMS
    gradient (see ``Blotch`` in the module docstring) is at most ``level`` grey levels per pixel
    in both sources. a, b: (H, W) or (H, W, 3), 0..255 scale, same H and W."""
    ya, yb = to_luminance(a, "a"), to_luminance(b, "b")
    if ya.shape != yb.shape:
        raise ValueError(f"a and b must have the same height and width, got {ya.shape} and "
                         f"{yb.shape}")
    energy = []
    for y in (ya, yb):
        sx, sy = _sobel(y, mode="reflect")
        energy.append(sx * sx + sy * sy)
    rms = np.sqrt(_gaussian_same(np.stack(energy), BLOTCH_ENERGY_SIGMA)) / 8
    return rms.max(0) <= level


def brightness_differs(a, b) -> np.ndarray:
    """Where the sources' local brightness differs visibly: (H, W) bool, ``|mA - mB| >=``
    :data:`BLOTCH_MIN_STEP` grey levels with the local means of ``Blotch`` (module docstring).
    a, b: (H, W) or (H, W, 3), 0..255 scale, same H and W."""
    ya, yb = to_luminance(a, "a"), to_luminance(b, "b")
    if ya.shape != yb.shape:
        raise ValueError(f"a and b must have the same height and width, got {ya.shape} and "
                         f"{yb.shape}")
    ma, mb = _gaussian_same(np.stack([ya, yb]), BLOTCH_MEAN_SIGMA)
    return np.abs(ma - mb) >= BLOTCH_MIN_STEP


def switch_map(a, b, f) -> tuple[np.ndarray, np.ndarray]:
    """Where the fused image switches source inside flat regions (see ``Blotch`` in the module
    docstring).

    Args:
        a, b: the sources; f: the fused image. (H, W) or (H, W, 3), 0..255 scale, same H and W.

    Returns:
        ``(switch, flat)``: (H, W) bool maps; ``switch`` is a subset of ``flat``.
    """
    ya, yb, yf = _sources_and_fused(a, b, f, min_size=1)
    ma, mb, mf = _gaussian_same(np.stack([ya, yb, yf]), BLOTCH_MEAN_SIGMA)
    step = ma - mb
    known = np.abs(step) >= BLOTCH_MIN_STEP
    t = np.where(known, (mf - mb) / np.where(known, step, 1.0), 0.5)
    took_a, took_b = known & (t > 0.75), known & (t < 0.25)
    flat = flat_mask(ya, yb)
    switch = flat & _max_filter(took_a, BLOTCH_RADIUS) & _max_filter(took_b, BLOTCH_RADIUS)
    return switch, flat


def blotch(a, b, f) -> float:
    """Switches of source inside flat regions, in percent of the flat pixels (0 when there are
    none); see ``Blotch`` in the module docstring. Lower is better.

    Args:
        a, b: the sources; f: the fused image. (H, W) or (H, W, 3), 0..255 scale, same H and W.
    """
    switch, flat = switch_map(a, b, f)
    n = int(flat.sum())
    return 100.0 * float(switch.sum()) / n if n else 0.0


def fusion_metrics(a, b, f) -> dict[str, float]:
    """All no-reference fusion metrics of one fused image.

    Args:
        a, b: the sources; f: the fused image. (H, W) or (H, W, 3), 0..255 scale, same H and W,
            at least 7x7.

    Returns:
        ``{"Qabf", "Qcb", "NMI", "Qy", "SF", "AG", "Blotch"}`` -> float (see
        :data:`FUSION_METRICS`).
    """
    ya, yb, yf = _sources_and_fused(a, b, f, min_size=7)
    return {
        "Qabf": qabf(ya, yb, yf),
        "Qcb": qcb(ya, yb, yf),
        "NMI": nmi(ya, yb, yf),
        "Qy": qy(ya, yb, yf),
        "SF": spatial_frequency(yf),
        "AG": average_gradient(yf),
        "Blotch": blotch(ya, yb, yf),
    }


def reference_metrics(f, gt) -> dict[str, float]:
    """SSIM and PSNR of a fused image against the all-in-focus ground truth.

    Returns:
        ``{"SSIM", "PSNR"}`` -> float (PSNR may be ``inf``).
    """
    return {"SSIM": ssim(f, gt), "PSNR": psnr(f, gt)}
