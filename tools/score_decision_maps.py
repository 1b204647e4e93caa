"""Decision-map accuracy on synthetic pairs with a true map: the network against the baseline.

    python tools/score_decision_maps.py --sharp ../shared/data/train_sharp --weights FILE \
        [--pairs 100] [--crop 256] [--json out.json]

The pairs come from the photos that ``msidtrans-train`` holds out for validation (the same seeded
split, ``--val-fraction`` and ``--seed`` as the training run), made by
:class:`msidtrans_fast.datasets.SyntheticPairs` at ``--crop`` size and quantised to 8-bit as real
files are. For the network (``msidtrans_fast.fuse`` with the default threshold 0.001) and for the
energy-of-Laplacian baseline (``msidtrans_fast.evaluate.laplacian_energy_fuse``), per pair:

- accuracy: share of pixels whose binary decision equals the true map;
- accuracy away from edges: the same, on pixels at least 4 px from a focus boundary (where soft
  edges blend both sources, either choice is right);
- PSNR of the fused image against the all-in-focus truth (8-bit, peak 255; identical images count
  as 100 dB).

Prints the means as a Markdown table; ``--json`` also writes the per-pair values.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from msidtrans_fast import datasets, evaluate, fuse, weights

EDGE_MARGIN = 4


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """(H, W) bool: pixels whose (2 margin + 1)^2 neighbourhood lies on one side of the map."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * margin + 1
    hi = F.max_pool2d(m, k, stride=1, padding=margin)
    lo = -F.max_pool2d(-m, k, stride=1, padding=margin)
    return (hi == lo)[0, 0].numpy()


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def score(decision: np.ndarray, fused: np.ndarray, truth: np.ndarray, gt: np.ndarray,
          inner: np.ndarray) -> dict[str, float]:
    right = decision == truth
    return {"accuracy": float(right.mean()),
            "accuracy_interior": float(right[inner].mean()) if inner.any() else float("nan"),
            "psnr": psnr(fused, gt)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sharp", required=True, help="folder of sharp photos (as for training)")
    p.add_argument("--weights", default=None, help="network weights (default: the bundled ones)")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    _, val_images = datasets.split_images(datasets.list_images(args.sharp), args.val_fraction,
                                          args.seed)
    pairs = datasets.SyntheticPairs(val_images, args.pairs, args.crop, args.seed + 1, fixed=True)
    model = weights.load_model(args.weights, "cpu")
    rows = []
    for i in range(len(pairs)):
        s = pairs[i]
        a, b, gt = to_uint8(s["A"]), to_uint8(s["B"]), to_uint8(s["GT"])
        truth = s["DM"][0].numpy() > 0.5
        inner = interior(truth, EDGE_MARGIN)
        fused_net, d_net = fuse([a, b], model=model, return_decision_map=True)
        fused_base, d_base = evaluate.laplacian_energy_fuse(a, b)
        rows.append({"pair": i,
                     "network": score(d_net > 0.5, fused_net, truth, gt, inner),
                     "baseline": score(d_base, fused_base, truth, gt, inner)})

    print(f"{len(rows)} held-out synthetic pairs, {args.crop}x{args.crop}\n")
    print("| method | accuracy | accuracy (>= 4 px from edges) | PSNR vs truth (dB) |")
    print("|---|---|---|---|")
    for method in ("network", "baseline"):
        means = {k: float(np.nanmean([r[method][k] for r in rows]))
                 for k in ("accuracy", "accuracy_interior", "psnr")}
        print(f"| {method} | {means['accuracy']:.4f} | {means['accuracy_interior']:.4f} | "
              f"{means['psnr']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
