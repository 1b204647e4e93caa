"""Measures tiled against whole-image fusion (the tables of docs/fusing.md, "Large images").

Both paths run the same network and the same binarisation + consistency check on the whole soft
map; only the soft map differs (one forward over the whole image, or tiles blended by
``msidtrans_fast.tiling``).

- ``devsets``: the real pairs of ``dev_eval`` (MFFW, Grayscale), tiles forced smaller than the
  images: mean Q^AB/F and Q_CB of both paths and the share of pixels whose final decision differs.
- ``truth``: the ``dev_gt/NYU-D`` triplets, PSNR and SSIM of both paths against the all-in-focus
  truth.
- ``mosaic``: several NYU-D triplets placed side by side as one large picture (sources and truth
  alike), fused whole and with each tile configuration: PSNR, SSIM, differing decisions, CPU time.

NYU-D is split in two: the odd-numbered triplets (``--split select``) were used to choose the
defaults of ``msidtrans_fast.tiling``, the even-numbered ones (``--split report``) are the ones
reported. Usage::

    python tools/measure_tiling.py devsets --tile 256 --overlap 64 [--limit N]
    python tools/measure_tiling.py truth --split report --tile 256 --overlap 64 [--limit N]
    python tools/measure_tiling.py mosaic --split select --grid 2x2 --configs 256:32 512:64
    python tools/measure_tiling.py seam --tile 256 --overlap 32   # docs/images/tile_seam.png
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from msidtrans_fast import io, metrics, pipeline, tiling
from msidtrans_fast.ops import remove_small_regions

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def soft_whole(model, a, b) -> np.ndarray:
    param = next(model.parameters())
    with torch.inference_mode():
        d = model(pipeline.to_network_input(a, param.device, param.dtype),
                  pipeline.to_network_input(b, param.device, param.dtype))
    return d[0, 0].float().cpu().numpy()


def finish(d: np.ndarray, a, b, threshold: float = 0.001):
    """Binarise + consistency check on the whole soft map, then compose: (fused, mask)."""
    mask = torch.from_numpy(d > pipeline.BINARY_LEVEL)[None, None]
    if threshold > 0:
        mask = remove_small_regions(mask, pipeline.min_area(threshold, *d.shape))
    mask = mask[0, 0].numpy()
    return np.where(mask[..., None], a, b), mask


def timed(fn, *args, **kwargs):
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - start


def squeeze(x):
    return x[..., 0] if x.shape[-1] == 1 else x


def nyu_triplets(split: str, limit: int | None):
    root = DATA / "dev_gt" / "NYU-D"
    files = sorted((root / "groundtruth").iterdir(),
                   key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    keep = 1 if split == "select" else 0
    out = []
    for gt in files:
        k = int(re.findall(r"\d+", gt.name)[-1])
        if k % 2 == keep:
            out.append(tuple(io.as_source_array(root / d / gt.name) for d in
                             ("sourceA", "sourceB", "groundtruth")))
    return out[:limit]


def devsets(model, args):
    for name in args.sets:
        root = DATA / "dev_eval" / name
        pairs = list(zip(sorted((root / "sourceA").iterdir()),
                         sorted((root / "sourceB").iterdir()), strict=True))
        pairs = pairs[::args.every][:args.limit]
        rows = []
        for pa, pb in pairs:
            a, b = io.as_source_array(pa), io.as_source_array(pb)
            if a.shape[-1] != b.shape[-1]:
                a, b = (np.repeat(x, 3, -1) if x.shape[-1] == 1 else x for x in (a, b))
            fw, mw = finish(soft_whole(model, a, b), a, b)
            ft, mt = finish(tiling.tiled_decision_map(model, a, b, tile=args.tile,
                                                      overlap=args.overlap), a, b)
            sa, sb = squeeze(a), squeeze(b)
            rows.append((metrics.qabf(sa, sb, squeeze(fw)), metrics.qabf(sa, sb, squeeze(ft)),
                         metrics.qcb(sa, sb, squeeze(fw)), metrics.qcb(sa, sb, squeeze(ft)),
                         float((mw != mt).mean())))
            print(f"  {name} {pa.name} {a.shape[1]}x{a.shape[0]} tiles "
                  f"{len(tiling.plan_tiles(*a.shape[:2], args.tile, args.overlap))} "
                  + " ".join(f"{v:.4f}" for v in rows[-1]), flush=True)
        m = np.mean(rows, axis=0)
        print(f"| {name} | {len(rows)} | {m[0]:.4f} | {m[1]:.4f} | {m[2]:.4f} | {m[3]:.4f} | "
              f"{100 * m[4]:.2f}% | {100 * np.max([r[4] for r in rows]):.2f}% |", flush=True)


def truth(model, args):
    rows = []
    for a, b, gt in nyu_triplets(args.split, args.limit):
        fw, mw = finish(soft_whole(model, a, b), a, b)
        ft, mt = finish(tiling.tiled_decision_map(model, a, b, tile=args.tile,
                                                  overlap=args.overlap), a, b)
        rows.append((metrics.psnr(fw, gt), metrics.psnr(ft, gt), metrics.ssim(fw, gt),
                     metrics.ssim(ft, gt), float((mw != mt).mean())))
        print("  " + " ".join(f"{v:.4f}" for v in rows[-1]), flush=True)
    m = np.mean(rows, axis=0)
    print(f"| NYU-D {args.split} | {len(rows)} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.4f} | "
          f"{m[3]:.4f} | {100 * m[4]:.2f}% |", flush=True)


def mosaic(model, args):
    rows_n, cols_n = (int(v) for v in args.grid.split("x"))
    trip = nyu_triplets(args.split, rows_n * cols_n)
    if len(trip) < rows_n * cols_n:
        raise SystemExit(f"only {len(trip)} triplets in split {args.split}")
    a, b, gt = (np.concatenate([np.concatenate([t[k] for t in trip[r * cols_n:(r + 1) * cols_n]],
                                               axis=1) for r in range(rows_n)], axis=0)
                for k in range(3))
    h, w = a.shape[:2]
    print(f"mosaic {args.grid} of split {args.split}: {w}x{h} ({h * w / 1e6:.2f} MP)", flush=True)
    ref = None
    if not args.no_whole:
        d, cpu = timed(soft_whole, model, a, b)
        ref = _mosaic_row("whole", finish(d, a, b), gt, cpu, 1, None)
    for config in args.configs:
        t, o = (int(v) for v in config.split(":"))
        d, cpu = timed(tiling.tiled_decision_map, model, a, b, tile=t, overlap=o)
        _mosaic_row(config, finish(d, a, b), gt, cpu, len(tiling.plan_tiles(h, w, t, o)), ref)


def _mosaic_row(name, fused_mask, gt, cpu, tiles, ref_mask):
    fused, mask = fused_mask
    differ = "" if ref_mask is None else f"{100 * float((mask != ref_mask).mean()):.2f}%"
    print(f"| {name} | {tiles} | {metrics.psnr(fused, gt):.2f} | {metrics.ssim(fused, gt):.4f} | "
          f"{differ} | {cpu:.0f} |", flush=True)
    return mask


def seam(model, args):
    """A picture of a tile corner: the soft-map difference to the whole-image map, blended (the
    default window) and with hard cuts (overlap 0), amplified ``--gain`` times."""
    from PIL import Image

    a, b, _ = nyu_triplets(args.split, args.limit or 1)[-1]
    h, w = a.shape[:2]
    whole = soft_whole(model, a, b)
    blended = tiling.tiled_decision_map(model, a, b, tile=args.tile, overlap=args.overlap)
    cut = tiling.tiled_decision_map(model, a, b, tile=args.tile, overlap=0)
    grid = tiling.plan_tiles(h, w, args.tile, args.overlap)
    # the corner shared by the first tiles: middle of the strip tiles (0, 0) and (1, 1) share
    cy = (grid.ys[1] + grid.tile_h) // 2 if len(grid.ys) > 1 else h // 2
    cx = (grid.xs[1] + grid.tile_w) // 2 if len(grid.xs) > 1 else w // 2
    r = args.crop // 2
    y0, x0 = max(0, min(h - args.crop, cy - r)), max(0, min(w - args.crop, cx - r))
    box = np.s_[y0:y0 + args.crop, x0:x0 + args.crop]
    panels = [np.repeat(np.abs(d - whole)[box][..., None] * args.gain * 255, 3, -1)
              for d in (blended, cut)]
    source = np.asarray(a[box][..., :3], dtype=np.float64)
    gap = np.full((args.crop, 4, 3), 255.0)
    picture = np.concatenate([source, gap, panels[0], gap, panels[1]], 1)
    Image.fromarray(np.clip(picture, 0, 255).round().astype(np.uint8)).save(args.out)
    for name, d in (("blended", blended), ("hard cuts", cut)):
        diff = np.abs(d - whole)
        print(f"{name}: max |D - D_whole| {diff.max():.4f}, mean {diff.mean():.5f}, in the crop "
              f"max {diff[box].max():.4f}", flush=True)
    print(f"wrote {args.out}: crop {args.crop} px at ({x0}, {y0}) of {w}x{h}, gain {args.gain}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("devsets", "truth", "mosaic", "seam"))
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=tiling.DEFAULT_OVERLAP)
    p.add_argument("--split", choices=("select", "report"), default="report")
    p.add_argument("--grid", default="3x3", help="mosaic rows x columns of triplets")
    p.add_argument("--configs", nargs="*", default=[f"{tiling.DEFAULT_TILE}:"
                                                    f"{tiling.DEFAULT_OVERLAP}"],
                   help="tile:overlap pairs for the mosaic")
    p.add_argument("--no-whole", action="store_true", help="mosaic: skip the whole-image run")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--every", type=int, default=1, help="devsets: every k-th pair")
    p.add_argument("--sets", nargs="*", default=["MFFW", "Grayscale"], help="devsets: which sets")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--crop", type=int, default=160, help="seam: crop side in pixels")
    p.add_argument("--gain", type=float, default=10.0, help="seam: difference amplification")
    p.add_argument("--out", default="docs/images/tile_seam.png", help="seam: picture to write")
    args = p.parse_args()
    model = pipeline.get_model(None, "cpu", args.dtype)
    {"devsets": devsets, "truth": truth, "mosaic": mosaic, "seam": seam}[args.mode](model, args)


if __name__ == "__main__":
    main()
