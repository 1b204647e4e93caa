"""Measures source alignment on synthetic moved pairs (the figures in docs/fusing.md).

A moved pair is made from a triplet (ground truth, source A, source B; A and B are focused on
different depths): B is moved by a known random similarity (scale 0.97-1.03, rotation up to
1 degree, shift up to 2% of each side; Lanczos resampling), A stays. Then:

- ``accuracy``: the transform :func:`msidtrans_fast.align.estimate` recovers, as the RMS distance
  over the four image corners from the true one; with ``--gain`` B's exposure is changed too
  (gain and offset drawn within the given fraction); ``--no-match`` gives the plain ECC estimate
  (without the defocus-matched refinement) for comparison;
- ``resample``: PSNR of B moved and warped back with the true transform, against B, per
  interpolator (what resampling alone costs);
- ``fuse``: PSNR and SSIM against the ground truth of the pair fused with the bundled weights when
  B was never moved, warped back with the true transform (per interpolator), aligned by the
  pipeline (``FuseOptions(align=...)``), and not aligned. Where a warped source has no content
  the first source is taken, as in the pipeline. Scores cover the inner area: the largest
  rectangle where the truly warped-back B has content, less a margin of ``--margin`` px;
- ``timing``: estimation and warping time of pairs of 1, 12 and 24 megapixels (a photo of the
  data set scaled up, with noise; the second source moved, the first defocused).

Examples::

    python tools/measure_alignment.py --data ../shared/data/train_pairs/NYU-D --limit 20
    python tools/measure_alignment.py --data ../shared/data/dev_gt/NYU-D --limit 12 --fuse
    python tools/measure_alignment.py --data ../shared/data/dev_gt/NYU-D --timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from msidtrans_fast import align as al
from msidtrans_fast import io as mio
from msidtrans_fast import metrics

INTERPOLATIONS = ("linear", "cubic", "lanczos")


def random_similarity(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A similarity about the image centre: scale 0.97-1.03, rotation within +-1 degree, shift
    within +-2% of each side; as a reference-to-moved (3, 3) matrix."""
    scale = rng.uniform(0.97, 1.03)
    angle = math.radians(rng.uniform(-1.0, 1.0))
    shift = rng.uniform(-0.02, 0.02, 2) * (width, height)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    lin = scale * np.array([[math.cos(angle), -math.sin(angle)],
                            [math.sin(angle), math.cos(angle)]])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = centre + shift - lin @ centre
    return m


def moved(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` seen through ``matrix``: moved(matrix @ p) = image(p)."""
    return al.warp(image, np.linalg.inv(matrix), "lanczos")[0]


def triplets(root: Path, limit: int) -> list[tuple[str, Path, Path, Path]]:
    names = sorted(p.name for p in (root / "groundtruth").iterdir() if not p.name.startswith("."))
    step = max(1, len(names) // limit) if limit else 1
    picked = names[::step][:limit] if limit else names
    return [(n, root / "groundtruth" / n, root / "sourceA" / n, root / "sourceB" / n)
            for n in picked]


def inner(valid: np.ndarray, margin: int) -> tuple[slice, slice]:
    t, b, left, r = al.common_area([valid])
    return slice(t + margin, b - margin), slice(left + margin, r - margin)


def fuse_warped(decider, a, b_moved, matrix, interpolation):
    """The pair fused as the pipeline fuses aligned sources, with a given transform."""
    from msidtrans_fast import pipeline

    aligned = al.warp_sources([a, b_moved], [al.Alignment(np.eye(3), 1.0, "similarity"),
                                             al.Alignment(matrix, 1.0, "similarity")],
                              interpolation)
    return pipeline.compose(aligned.images, pipeline.content_aware(
        lambda x, y, valid: pipeline.pair_decision(decider, x, y, 0.001, valid=valid),
        aligned)).image


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    if not side:
        return image
    h, w = image.shape[:2]
    t, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[t:t + side, left:left + side]


def run_pairs(args) -> dict:
    rng = np.random.default_rng(args.seed)
    decider = options = None
    if args.fuse:
        from msidtrans_fast import pipeline

        options = pipeline.FuseOptions(device="cpu", align=args.model)
        decider = pipeline.make_decider(options)
    rows = []
    for name, gt_p, a_p, b_p in triplets(Path(args.data), args.limit):
        gt, a, b = (centre_crop(mio.read_image(p), args.size) for p in (gt_p, a_p, b_p))
        a, b = (x[..., None] if x.ndim == 2 else x for x in (a, b))
        h, w = a.shape[:2]
        truth = random_similarity(rng, h, w)
        b_moved = moved(b, truth)
        if args.gain:
            gain = 1 + rng.uniform(-args.gain, args.gain)
            offset = 255 * rng.uniform(-args.gain, args.gain) / 4
            b_moved = np.clip(np.rint(b_moved * gain + offset), 0, 255).astype(np.uint8)
        row = {"name": name}
        start = time.perf_counter()
        try:
            found = al.estimate(a, b_moved, args.model, name=name, match=not args.no_match)
        except al.AlignmentError as e:
            row.update(error=str(e))
            rows.append(row)
            print(f"{name}: {e}", flush=True)
            continue
        row["estimate_s"] = time.perf_counter() - start
        row["corner_rms_px"] = al.corner_error(found.matrix, truth, h, w)
        row["correlation"] = found.correlation
        valid_true = al.warp(b_moved, truth, "linear")[1]
        rows_, cols_ = inner(valid_true, args.margin)
        for interp in INTERPOLATIONS:
            back = al.warp(b_moved, truth, interp)[0]
            row[f"resample_psnr_{interp}"] = metrics.psnr(back[rows_, cols_].squeeze(-1) if
                                                          back.shape[-1] == 1 else
                                                          back[rows_, cols_], b[rows_, cols_]
                                                          .squeeze(-1) if b.shape[-1] == 1 else
                                                          b[rows_, cols_])
        if decider is not None:
            from msidtrans_fast.pipeline import FuseOptions, fuse_sources

            plain = FuseOptions(device="cpu")
            fused = {"never moved": fuse_sources([a, b], decider, plain).image,
                     "not aligned": fuse_sources([a, b_moved], decider, plain).image}
            for interp in args.interpolations:
                fused[f"true transform ({interp})"] = fuse_warped(decider, a, b_moved, truth,
                                                                  interp)
            fused["aligned"] = (fuse_warped(decider, a, b_moved, found.matrix, "lanczos")
                                if args.no_match else
                                fuse_sources([a, b_moved], decider, options,
                                             names=["A", name]).image)
            fused = {k: v[..., None] if v.ndim == 2 else v for k, v in fused.items()}
            ref = gt[rows_, cols_]
            for what, f in fused.items():
                f = f[rows_, cols_, 0] if f.shape[-1] == 1 else f[rows_, cols_]
                row[f"psnr {what}"] = metrics.psnr(f, ref)
                row[f"ssim {what}"] = metrics.ssim(f, ref)
        rows.append(row)
        print(f"{name}: corner RMS {row['corner_rms_px']:.3f} px, "
              f"{row['estimate_s']:.2f} s" + "".join(
                  f", {k[5:]} {v:.2f} dB" for k, v in row.items() if k.startswith("psnr")),
              flush=True)
    return summarise(rows)


def pooled_psnr(values: list[float]) -> float:
    """PSNR (peak 255) of the mean squared error behind per-pair PSNRs."""
    mse = float(np.mean([255.0 ** 2 / 10 ** (v / 10) for v in values]))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    keys = [k for k in ok[0] if k != "name"] if ok else []
    errors = np.array([r["corner_rms_px"] for r in ok])
    # PSNR is pooled (the PSNR of the mean squared error over the pairs): a pair fused exactly
    # (infinite PSNR) then counts as zero error instead of making the mean infinite.
    out = {"pairs": len(rows), "failures": [r for r in rows if "error" in r],
           "mean": {k: pooled_psnr([r[k] for r in ok]) if k.startswith("psnr") else
                    float(np.mean([r[k] for r in ok])) for k in keys},
           "corner_rms_px_over_pairs": float(np.sqrt((errors ** 2).mean())) if ok else None,
           "corner_rms_px_max": float(errors.max()) if ok else None,
           "rows": rows}
    return out


def run_timing(args) -> dict:
    rng = np.random.default_rng(args.seed)
    photo = mio.read_image(triplets(Path(args.data), 1)[0][1])
    out = {}
    for mp, (w, h) in (("1", (1152, 864)), ("12", (4000, 3000)), ("24", (6000, 4000))):
        big = cv2.resize(photo, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        big = np.clip(np.rint(big + rng.normal(0, 2, big.shape)), 0, 255).astype(np.uint8)
        a = cv2.GaussianBlur(big, (0, 0), 2.0)
        truth = random_similarity(rng, h, w)
        b = moved(big, truth)
        for model in args.models:
            wall, cpu = time.perf_counter(), time.process_time()
            found = al.estimate(a, b, model, match=not args.no_match)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            out[f"{mp} MP {model} estimate"] = {
                "wall_s": wall, "cpu_s": cpu,
                "corner_rms_px": al.corner_error(found.matrix, truth, h, w)}
            print(f"{mp} MP ({w}x{h}) {model}: estimate {wall:.2f} s wall, {cpu:.2f} s CPU, "
                  f"corner RMS {out[f'{mp} MP {model} estimate']['corner_rms_px']:.3f} px",
                  flush=True)
        for interp in args.interpolations:
            wall, cpu = time.perf_counter(), time.process_time()
            al.warp(b, found.matrix, interp)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            out[f"{mp} MP warp {interp}"] = {"wall_s": wall, "cpu_s": cpu}
            print(f"{mp} MP warp RGB ({interp}): {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder with groundtruth/, sourceA/, sourceB/")
    p.add_argument("--limit", type=int, default=0, help="use this many triplets, evenly spaced")
    p.add_argument("--model", default="similarity", choices=al.MODELS)
    p.add_argument("--models", nargs="+", default=["similarity"], choices=al.MODELS,
                   help="models timed with --timing")
    p.add_argument("--interpolations", nargs="+", default=list(INTERPOLATIONS),
                   choices=INTERPOLATIONS, help="interpolators of the true-transform fusion")
    p.add_argument("--fuse", action="store_true", help="also fuse with the bundled weights")
    p.add_argument("--timing", action="store_true", help="time 1, 12 and 24 MP pairs instead")
    p.add_argument("--gain", type=float, default=0.0,
                   help="change the moved source's exposure: gain within 1 +- GAIN and offset "
                        "within +- GAIN/4 of the range")
    p.add_argument("--no-match", action="store_true",
                   help="estimate without the defocus-matched refinement (the plain ECC estimate, "
                        "also with --timing, "
                        "for comparison); the aligned fusion then warps with that estimate as the "
                        "pipeline does")
    p.add_argument("--margin", type=int, default=8)
    p.add_argument("--size", type=int, default=0,
                   help="cut the triplets to their centre SIZE x SIZE first (network run time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    result = run_timing(args) if args.timing else run_pairs(args)
    if not args.timing:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
