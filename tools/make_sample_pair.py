"""Regenerates the bundled sample multi-focus pair ``msidtrans_fast/data/sample_{near,far}.png``.

Source: scikit-image's ``data.stereo_motorcycle()`` (the left view of the Middlebury 2014
"Motorcycle" scene and its ground-truth disparity; see ``msidtrans_fast/data/README.md`` for the
licence). Disparity is inversely proportional to depth, so it orders the scene from near to far.

Method: fill the pixels without ground truth (NaN/inf) from their nearest valid neighbour, smooth
the disparity a little, downscale image and disparity to ``--width``; then build two synthetic
focal planes by depth-dependent Gaussian blur: the blur radius grows linearly with the disparity
distance from the plane in focus (thin-lens defocus is proportional to |1/z - 1/z_focus|, which is
linear in disparity). Each pixel takes its value from a stack of progressively blurred copies,
interpolating between the two nearest blur levels. "near" is focused on the motorcycle (high
disparity), "far" on the back wall (low disparity).

Usage: ``python tools/make_sample_pair.py [--width 480] [--max-sigma 3.0]`` (needs scikit-image
and SciPy; they are development tools, not runtime dependencies).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import data, transform

OUT_DIR = Path(__file__).resolve().parent.parent / "msidtrans_fast" / "data"
BLUR_LEVELS = 13  # blur stack size; sigma steps of max_sigma / 12


def load_scene(width: int) -> tuple[np.ndarray, np.ndarray]:
    """The left view (H, W, 3) float in [0, 1] and a filled, smoothed disparity (H, W)."""
    left, _, disparity = data.stereo_motorcycle()
    invalid = ~np.isfinite(disparity)
    _, (iy, ix) = ndimage.distance_transform_edt(invalid, return_indices=True)
    disparity = disparity[iy, ix]
    disparity = ndimage.gaussian_filter(disparity, 2.0)
    height = round(left.shape[0] * width / left.shape[1])
    image = transform.resize(left / 255.0, (height, width), anti_aliasing=True)
    disparity = transform.resize(disparity, (height, width), anti_aliasing=True)
    return image, disparity


def defocus(image: np.ndarray, disparity: np.ndarray, focus: float, max_sigma: float,
            spread: float) -> np.ndarray:
    """Blur ``image`` per pixel with sigma = max_sigma * |disparity - focus| / spread."""
    sigma = np.clip(max_sigma * np.abs(disparity - focus) / spread, 0, max_sigma)
    levels = np.linspace(0, max_sigma, BLUR_LEVELS)
    stack = np.stack([image if s == 0 else ndimage.gaussian_filter(image, (s, s, 0))
                      for s in levels])
    pos = sigma / levels[1]
    lo = np.minimum(np.floor(pos).astype(int), BLUR_LEVELS - 2)
    frac = (pos - lo)[..., None]
    rows, cols = np.indices(sigma.shape)
    return stack[lo, rows, cols] * (1 - frac) + stack[lo + 1, rows, cols] * frac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=480, help="output width in pixels")
    parser.add_argument("--max-sigma", type=float, default=3.0,
                        help="largest blur (Gaussian sigma, output pixels)")
    args = parser.parse_args()
    image, disparity = load_scene(args.width)
    near_plane, far_plane = np.percentile(disparity, [90, 10])
    spread = near_plane - far_plane
    from PIL import Image

    for name, focus in (("sample_near.png", near_plane), ("sample_far.png", far_plane)):
        out = defocus(image, disparity, focus, args.max_sigma, spread)
        array = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
        path = OUT_DIR / name
        Image.fromarray(array).save(path, optimize=True)
        print(f"wrote {path} ({array.shape[1]}x{array.shape[0]}, {path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
