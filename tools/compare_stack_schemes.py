"""Compares two ways of fusing a focus stack (n > 2 sources) from pairwise decision maps.

- fold: the running result is fused with the next source (n - 1 pairwise decisions);
  ``msidtrans_fast.pipeline.fold_stack``.
- vote: every pair (i, j) is decided (n(n-1)/2 decisions); each pixel takes the source that wins
  the most pairwise comparisons (ties: the lowest index); ``msidtrans_fast.pipeline.vote_stack``.
``msidtrans_fast.fuse`` votes up to ``VOTE_MAX_SOURCES`` sources and folds larger stacks.

Stacks are made from real all-in-focus photos (default: the ground truth of
``../shared/data/dev_gt/NYU-D``) with synthetic depth layers: a smooth random field split at its
terciles (quartiles for n = 4) gives n layers ordered like depth; source k is in focus on layer k
and the Gaussian blur of layer j grows with |j - k| (sigma = step * |j - k|), as a focus sweep.
Scored against the all-in-focus photo: PSNR, and the share of pixels taken from the source in
focus there (among pixels whose layer has detail).

The pairwise decider is the network (``--weights FILE``, default: the bundled weights) or, with
``--decider focus``, a classic focus measure (9x9 sum of the modified Laplacian, the larger wins),
followed by the same binarise + consistency check, which compares the two *combination schemes*
independently of the network's quality.

Usage: ``python tools/compare_stack_schemes.py [--decider focus] --n 4 [--limit 50]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from msidtrans_fast import io, pipeline

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev_gt" / "NYU-D"


def make_stack(sharp: np.ndarray, n: int, step: float, seed: int):
    """(sources, layer map) for an all-in-focus uint8 RGB image."""
    h, w = sharp.shape[:2]
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((h, w)), min(h, w) / 8)
    layers = np.digitize(field, np.quantile(field, np.linspace(0, 1, n + 1)[1:-1]))
    x = sharp.astype(np.float64)
    blurred = {0: x}
    for d in range(1, n):
        blurred[d] = ndimage.gaussian_filter(x, (step * d, step * d, 0))
    sources = []
    for k in range(n):
        out = np.empty_like(x)
        for j in range(n):
            sel = layers == j
            out[sel] = blurred[abs(j - k)][sel]
        sources.append(np.clip(np.round(out), 0, 255).astype(np.uint8))
    return sources, layers


class FocusDecider:
    """A decision stage without the network: 1 where ``a`` has the larger local modified
    Laplacian (9 x 9 mean), else 0 (see ``msidtrans_fast.pipeline.Decider``)."""

    device = torch.device("cpu")

    @staticmethod
    def _measure(x):
        g = x.astype(np.float64).mean(-1)
        ml = (np.abs(2 * g - np.roll(g, 1, 0) - np.roll(g, -1, 0))
              + np.abs(2 * g - np.roll(g, 1, 1) - np.roll(g, -1, 1)))
        return ndimage.uniform_filter(ml, 9)

    def __call__(self, a, b):
        return torch.from_numpy(self._measure(a) > self._measure(b)).float()

    def memory_needed(self, height, width):
        return 64 * height * width


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="folder with groundtruth/ (all-in-focus photos)")
    p.add_argument("--n", type=int, default=3, help="stack size")
    p.add_argument("--step", type=float, default=2.0, help="blur sigma per layer of distance")
    p.add_argument("--limit", type=int, default=50, help="number of photos")
    p.add_argument("--decider", choices=["focus", "network"], default="network")
    p.add_argument("--weights", help="weights for --decider network (default: the bundled weights)")
    p.add_argument("--device", default=None)
    p.add_argument("--threshold", type=float, default=0.001)
    args = p.parse_args()

    files = sorted((args.data / "groundtruth").iterdir())[:args.limit]
    if args.decider == "focus":
        decider = FocusDecider()
    else:
        decider = pipeline.WholeImageDecider(pipeline.get_model(args.weights, args.device))

    def decide(a, b):
        return pipeline.pair_decision(decider, a, b, args.threshold)

    scores = {"fold": [], "vote": []}
    times = {"fold": 0.0, "vote": 0.0}
    for idx, f in enumerate(files):
        sharp = io.read_image(f)
        sources, layers = make_stack(sharp, args.n, args.step, seed=idx)
        detail = ndimage.uniform_filter(np.abs(ndimage.laplace(sharp.mean(-1))), 9) > 2.0
        for name, scheme in (("fold", pipeline.fold_stack), ("vote", pipeline.vote_stack)):
            t = time.perf_counter()
            fused, labels = scheme(sources, decide)
            times[name] += time.perf_counter() - t
            correct = (labels == layers)[detail].mean() if detail.any() else np.nan
            scores[name].append((psnr(fused, sharp), correct))
    print(f"{len(files)} photos from {args.data}, stacks of {args.n}, blur step {args.step}, "
          f"decider {args.decider}, threshold {args.threshold}")
    print("scheme  decisions  mean PSNR dB  in-focus share  time s")
    for name in ("fold", "vote"):
        s = np.array(scores[name])
        decisions = args.n - 1 if name == "fold" else args.n * (args.n - 1) // 2
        print(f"{name:6}  {decisions:9d}  {s[:, 0].mean():12.2f}  {np.nanmean(s[:, 1]):14.4f}  "
              f"{times[name]:6.1f}")
    diff = np.array(scores["vote"])[:, 0] - np.array(scores["fold"])[:, 0]
    print(f"vote - fold PSNR: mean {diff.mean():+.2f} dB, vote better on {(diff > 0).sum()} of "
          f"{len(diff)}, worse on {(diff < 0).sum()}")


if __name__ == "__main__":
    main()
