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

import numpy as np
import torch

from . import metrics as _metrics

#: Names of the decision rules.
DECISION_RULES = ("original", "flat")

#: The rule :func:`msidtrans_fast.fuse` and ``msidtrans-fuse`` use unless told otherwise.
DEFAULT_RULE = "original"

#: Flat level of the ``"flat"`` rule: the largest local RMS gradient, in grey levels per pixel,
#: of a flat pixel (see :func:`msidtrans_fast.metrics.flat_mask`).
FLAT_LEVEL = 2.0


def check_rule(rule: str) -> str:
    """``rule`` if it names a decision rule, else ValueError."""
    if rule not in DECISION_RULES:
        raise ValueError(f"unknown decision rule {rule!r}; use one of {', '.join(DECISION_RULES)}")
    return rule


def _on_8bit_scale(x: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) float64 on the 0..255 scale: uint16 / 257, floats in [0, 1] * 255."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.dtype == np.uint16:
        return x / 257.0
    if np.issubdtype(x.dtype, np.floating):
        return x * 255.0
    return x.astype(np.float64)


def flat_regions(a: np.ndarray, b: np.ndarray, level: float = FLAT_LEVEL) -> np.ndarray:
    """Where neither source carries focus information and their brightness differs visibly:
    (H, W) bool.

    Args:
        a, b: the sources, (H, W) or (H, W, C) with C = 1 or 3, of one size: uint8, uint16, or
            floats in [0, 1] (as :func:`msidtrans_fast.io.load_sources` returns them).
        level: largest local RMS gradient of a flat pixel, in 8-bit grey levels per pixel.
    """
    a, b = _on_8bit_scale(a), _on_8bit_scale(b)
    return _metrics.flat_mask(a, b, level=level) & _metrics.brightness_differs(a, b)


def fill_flat_regions(decision: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Each 4-connected component of ``flat`` takes the value held by more than half of its
    pixels in ``decision`` (else False); the other pixels keep theirs.

    Args:
        decision, flat: (H, W) bool tensors on one device.

    Returns:
        A new (H, W) bool tensor.
    """
    from .ops import _label_4

    labels = _label_4(flat[None])[0].reshape(-1)
    inside = flat.reshape(-1)
    ids = labels[inside]
    n = labels.numel()
    votes = torch.bincount(ids, weights=decision.reshape(-1)[inside].double(), minlength=n)
    sizes = torch.bincount(ids, minlength=n)
    out = decision.reshape(-1).clone()
    out[inside] = (2 * votes > sizes)[ids]
    return out.view(decision.shape)
