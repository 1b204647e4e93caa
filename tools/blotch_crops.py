"""Before/after pictures of the worst blotch crop of every pair of a data set.

    python tools/blotch_crops.py --sources ROOT --before DIR --after DIR [--also DIR] \
        --out DIR [--size 160]

For each source pair of ROOT (``sourceA/``, ``sourceB/``; fused files matched as
``msidtrans-eval`` matches them) the worst crop is the ``size`` x ``size`` window holding the most
switch pixels of the ``--before`` fused image (:func:`msidtrans_fast.metrics.switch_map`: switches
of source inside flat regions). The picture ``OUT/NAME.png`` shows that window of ``--before``,
``--after`` (and ``--also``) side by side; the second row shows the same crops with their contrast
stretched alike (the 1st and 99th percentiles of the crops to 0 and 255), so that brightness steps
of a few grey levels become visible. A pair without flat switches in ``--before`` gets the window
with the most flat pixels. Prints one line per pair: name, window, Blotch of each image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from msidtrans_fast import metrics
from msidtrans_fast.evaluate import _pair_name, _read, list_images, match_files
from msidtrans_fast.io import write_image

GAP = 4


def window_sums(mask: np.ndarray, size: int) -> np.ndarray:
    """Number of set pixels in every size x size window (top-left corners), (H-s+1, W-s+1)."""
    c = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    c[1:, 1:] = mask.cumsum(0).cumsum(1)
    return c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]


def worst_window(switch: np.ndarray, flat: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the window with the most switch pixels (ties and no switches: the
    most flat pixels)."""
    score = window_sums(switch, size) * (flat.size + 1) + window_sums(flat, size)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(y), int(x)


def as_rgb8(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) on the 8-bit scale -> (H, W, 3) uint8."""
    img = np.clip(np.floor(np.asarray(img, dtype=np.float64) + 0.5), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img


def side_by_side(images: list[np.ndarray], axis: int) -> np.ndarray:
    """(h, w, 3) uint8 images joined along ``axis`` (1: left to right, 0: top to bottom) with
    white gaps of :data:`GAP` pixels."""
    out = [images[0]]
    for im in images[1:]:
        gap_shape = list(im.shape)
        gap_shape[axis] = GAP
        out += [np.full(gap_shape, 255, np.uint8), im]
    return np.concatenate(out, axis)


def panel(crops: list[np.ndarray]) -> np.ndarray:
    """Crops side by side (top row) and contrast-stretched alike (bottom row)."""
    stack = np.stack([as_rgb8(c) for c in crops]).astype(np.float64)
    lo, hi = np.percentile(stack, [1, 99])
    stretched = (stack - lo) / max(hi - lo, 1.0) * 255
    rows = [side_by_side([as_rgb8(im) for im in imgs], 1) for imgs in (stack, stretched)]
    return side_by_side(rows, 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", required=True, type=Path)
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", required=True, type=Path)
    p.add_argument("--also", type=Path, help="a third fused folder shown on the right")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=int, default=160)
    args = p.parse_args(argv)
    files_a = list_images(args.sources / "sourceA", "sourceA")
    files_b = list_images(args.sources / "sourceB", "sourceB")
    names = [_pair_name(a, b) for a, b in zip(files_a, files_b, strict=True)]
    folders = [args.before, args.after] + ([args.also] if args.also else [])
    fused = [match_files(names, files_a, list_images(d, "fused", skip_decision_maps=True),
                         "fused") for d in folders]
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        a, b = _read(files_a[i]), _read(files_b[i])
        images = [_read(f[i]) for f in fused]
        switch, flat = metrics.switch_map(a, b, images[0])
        s = min(args.size, *a.shape[:2])
        y, x = worst_window(switch, flat, s)
        write_image(args.out / f"{name}.png", panel([im[y:y + s, x:x + s] for im in images]),
                    overwrite=True)
        scores = " ".join(f"{metrics.blotch(a, b, im):.3f}" for im in images)
        print(f"{name} y={y} x={x} size={s} Blotch {scores}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
