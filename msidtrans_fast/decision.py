"""Decision rules of the binarise stage: which source each pixel takes, given the soft map D.

``"original"`` -- the original ``Eval.py``: ``D > 0.5``, then the consistency check.
``"flat"`` -- as ``"original"``, but before the consistency check every connected flat region
    takes one source as a whole, the one most of its pixels chose (``D > 0.5``; a tie goes to the
    second source, as D = 0.5 does). Flat regions (:func:`flat_regions`) are where neither source
    carries focus information (low gradient energy in both, :func:`msidtrans_fast.metrics.
    flat_mask`) and the sources differ visibly in brightness (:func:`msidtrans_fast.metrics.
    brightness_differs`; real cameras change exposure and vignetting as they refocus). There the
    network has nothing to decide on, and its decisions scatter into blotches that the brightness
    difference makes visible; one source per region leaves switches only on the region's border.
    Where the sources are equally bright a switch is invisible, and the network's choice stays.

:func:`msidtrans_fast.pipeline.binarise` applies the rules.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from . import metrics as _metrics

#: Names of the decision rules.
DECISION_RULES = ("original", "flat")

#: The rule :func:`msidtrans_fast.fuse` and ``msidtrans-fuse`` use unless told otherwise (chosen
#: on a held-out split of the dev sets: docs/evaluation.md, "The flat decision rule").
DEFAULT_RULE = "flat"

#: Flat level of the ``"flat"`` rule: the largest local RMS gradient, in grey levels per pixel,
#: of a flat pixel; the level of the ``Blotch`` measure (:func:`msidtrans_fast.metrics.flat_mask`).
FLAT_LEVEL = _metrics.BLOTCH_FLAT_LEVEL


def check_rule(rule: str) -> str:
    """``rule`` if it names a decision rule, else ValueError."""
    if rule not in DECISION_RULES:
        raise ValueError(f"unknown decision rule {rule!r}; use one of {', '.join(DECISION_RULES)}")
    return rule


def _luminance(x: np.ndarray) -> np.ndarray:
    """(H, W) float32 luminance on the 0..255 scale of an (H, W) or (H, W, C) source (uint8,
    uint16 / 257, floats in [0, 1] * 255); the weights of :func:`msidtrans_fast.metrics.
    to_luminance`, whose float64 definition this follows."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    scale = 1 / 257 if x.dtype == np.uint16 else 255.0 if np.issubdtype(x.dtype, np.floating) else 1
    if x.ndim == 3 and not ((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()):
        y = x.astype(np.float32) @ np.float32(_metrics.LUMA_WEIGHTS)
    else:
        y = (x[..., 0] if x.ndim == 3 else x).astype(np.float32)
    return y * np.float32(scale) if scale != 1 else y


def _gaussian(y: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian of radius ``ceil(3 sigma)``, reflected borders (as the metrics')."""
    size = 2 * math.ceil(3 * sigma) + 1
    return cv2.GaussianBlur(y, (size, size), sigma, borderType=cv2.BORDER_REFLECT_101)


def flat_regions(a: np.ndarray, b: np.ndarray, level: float = FLAT_LEVEL) -> np.ndarray:
    """Where neither source carries focus information and their brightness differs visibly:
    (H, W) bool.

    The definitions of :func:`msidtrans_fast.metrics.flat_mask` (local RMS Sobel gradient at
    most ``level`` in both sources) and :func:`msidtrans_fast.metrics.brightness_differs`,
    computed in float32 with OpenCV's filters (the metrics' float64 code is the reference; the
    two differ only for pixels within float32 rounding of a threshold).

    Args:
        a, b: the sources, (H, W) or (H, W, C) with C = 1 or 3, of one size: uint8, uint16, or
            floats in [0, 1] (as :func:`msidtrans_fast.io.load_sources` returns them).
        level: largest local RMS gradient of a flat pixel, in 8-bit grey levels per pixel.
    """
    ya, yb = _luminance(a), _luminance(b)
    energy = None
    for y in (ya, yb):
        sx = cv2.Sobel(y, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT_101)
        sy = cv2.Sobel(y, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT_101)
        e = _gaussian(cv2.multiply(sx, sx) + cv2.multiply(sy, sy), _metrics.BLOTCH_ENERGY_SIGMA)
        energy = e if energy is None else np.maximum(energy, e)
    # RMS gradient = sqrt(energy) / 8 (Sobel's gain), compared squared.
    flat = energy <= np.float32((8 * level) ** 2)
    sigma = _metrics.BLOTCH_MEAN_SIGMA
    step = np.abs(_gaussian(ya, sigma) - _gaussian(yb, sigma))
    return flat & (step >= _metrics.BLOTCH_MIN_STEP)


def fill_flat_regions(decision: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Each 4-connected component of ``flat`` takes the value held by more than half of its
    pixels in ``decision`` (else False); the other pixels keep theirs.

    Args:
        decision, flat: (H, W) bool tensors (any devices; the labelling runs on the host).

    Returns:
        A new (H, W) bool tensor on ``decision``'s device.
    """
    d = decision.cpu().numpy()
    count, labels = cv2.connectedComponents(flat.cpu().numpy().view(np.uint8), connectivity=4,
                                            ltype=cv2.CV_32S)
    labels = labels.reshape(-1)
    inside = labels > 0
    ids = labels[inside]
    votes = np.bincount(ids, weights=d.reshape(-1)[inside], minlength=count)
    sizes = np.bincount(ids, minlength=count)
    out = d.copy()
    out.reshape(-1)[inside] = (2 * votes > sizes)[ids]
    return torch.from_numpy(out).to(decision.device)
