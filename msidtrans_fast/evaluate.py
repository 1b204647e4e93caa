"""Scoring fused images: ``msidtrans-eval`` and the classical energy-of-Laplacian baseline.

``msidtrans-eval --sources ROOT --fused DIR [--groundtruth DIR] [--baseline] [--json OUT]``

``ROOT`` holds ``sourceA/`` and ``sourceB/`` (and optionally ``groundtruth/``, used when
``--groundtruth`` is not given). Every metric of :mod:`msidtrans_fast.metrics` is computed per image
and averaged; SSIM and PSNR are added when a ground truth is present. ``--baseline`` also fuses
every pair with :func:`laplacian_energy_fuse` and scores it the same way.

File matching: in each folder the image files are listed by the rule every tool uses
(:func:`msidtrans_fast.io.list_images`: ``.png .jpg .jpeg .bmp .tif .tiff .webp``, any case;
hidden files ignored, other files left out with one warning), leaving out ``*-dm.*`` decision maps
in the fused folder. ``sourceA`` and ``sourceB`` pair by sorted name
(:func:`msidtrans_fast.io.pair_images`), as in the original ``Eval.py``, the fusing CLI and
training. A fused (or ground-truth) file belongs to a pair when its stem is the pair's name
(``mffw_01`` for ``mffw_01_A.jpg``/``mffw_01_B.jpg``) or the sourceA stem; when that does not
cover every pair, the files are taken in natural order (``x-9`` before ``x-10``) and paired with
the sources in sorted order: this is the fusing CLI's ``msidtrans-fuse --dataset ROOT -o DIR``
output ``{ROOT name}-{i:02d}.png``, i = 1, 2, ... over the sorted sources, and the naming of the
authors' published ``MFFW-01.png``... (numbered names must then run without gaps). Counts must
be equal.

Means are plain averages over the images, except that an infinite PSNR (a fused image identical
to its ground truth, which happens on synthetic sets such as NYU-D) counts as :data:`PSNR_CAP`
(100 dB) in the mean; per image it is reported as ``inf`` (``null`` in JSON).

Images may be 8- or 16-bit, grayscale or RGB; 16-bit values are divided by 257 to the 8-bit scale
the metrics use. A grayscale pair can be scored against an RGB fused file (fusion metrics use
luminance). Bad input (a missing folder, an empty one, different counts, an unreadable file,
images of different sizes) prints one line ``msidtrans-eval: error: ...`` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from . import io as _io
from . import metrics as _metrics

#: Defaults of the classical baseline.
BASELINE_WINDOW = 15
BASELINE_THRESHOLD = 0.001

#: An image identical to its ground truth has an infinite PSNR (reported per image as ``inf``, or
#: null in JSON); means count it as this many dB, so one perfect image does not make a mean
#: infinite.
PSNR_CAP = 100.0

PROG = "msidtrans-eval"


class EvaluationError(ValueError):
    """Bad evaluation input (missing folder, count or size mismatch); the message says which."""


# ------------------------------------------------------------------------------------ baseline
def _box_sum(x: np.ndarray, window: int) -> np.ndarray:
    """Sum over a window x window square around every pixel of an (H, W) map, edge-replicated."""
    r = window // 2
    p = np.pad(x, r, mode="edge")
    c = np.zeros((p.shape[0] + 1, p.shape[1] + 1))
    c[1:, 1:] = p.cumsum(0).cumsum(1)
    h, w = x.shape
    return (c[window:window + h, window:window + w] - c[:h, window:window + w]
            - c[window:window + h, :w] + c[:h, :w])


def laplacian_energy(img: np.ndarray, window: int = BASELINE_WINDOW) -> np.ndarray:
    """Local focus measure: windowed energy of the Laplacian.

    ``E = sum over a window x window square of (4-neighbour Laplacian of the luminance)^2``, with
    edge-replicated borders.

    Args:
        img: (H, W) or (H, W, 3) array on the 8-bit scale (see :mod:`msidtrans_fast.metrics`).
        window: odd window side >= 1.

    Returns:
        (H, W) float64, >= 0.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise TypeError(f"window must be an integer, got {type(window).__name__}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1, got {window}")
    y = np.pad(_metrics.to_luminance(img, "img"), 1, mode="edge")
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    return _box_sum(lap * lap, int(window))


def laplacian_energy_fuse(a: np.ndarray, b: np.ndarray, window: int = BASELINE_WINDOW,
                          threshold: float = BASELINE_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Classical baseline: energy-of-Laplacian decision map, then the network pipeline's clean-up
    and blend (docs/design.md, "Fusing", steps 4-5).

    ``D = 1`` where ``laplacian_energy(a) >= laplacian_energy(b)`` (ties go to ``a``); then, with
    ``threshold > 0``, 4-connected foreground and then background components of fewer than
    ``threshold * H * W`` pixels are flipped (:func:`msidtrans_fast.ops.remove_small_regions`);
    finally ``F = a * D + b * (1 - D)``, so every fused pixel is a copy of a source pixel.

    Args:
        a, b: the sources, numpy arrays of one shape, (H, W) or (H, W, 3), and one dtype
            (uint8, uint16, or floats); the focus measure needs values on a common scale.
        window: odd side of the square focus-measure window (default :data:`BASELINE_WINDOW`).
        threshold: clean-up area as a fraction of H * W, in [0, 1); 0 disables the clean-up.

    Returns:
        ``(fused, decision)``: fused has a's shape and dtype; decision is an (H, W) bool map,
        True where the pixel comes from ``a``.
    """
    for x, n in ((a, "a"), (b, "b")):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{n} must be a numpy.ndarray, got {type(x).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    decision = laplacian_energy(a, window) >= laplacian_energy(b, window)
    h, w = decision.shape
    if threshold > 0:
        from .ops import remove_small_regions

        mask = torch.from_numpy(decision)[None, None]
        decision = remove_small_regions(mask, math.ceil(threshold * h * w))[0, 0].numpy()
    keep = decision if a.ndim == 2 else decision[..., None]
    return np.where(keep, a, b), decision


# ------------------------------------------------------------------------------------- folders
def _natural_key(name: str):
    parts = re.split(r"(\d+)", name.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def list_images(folder: str | Path, what: str, skip_decision_maps: bool = False) -> list[Path]:
    """Image files of a folder sorted by name (:func:`msidtrans_fast.io.list_images`);
    EvaluationError naming the ``what`` folder when it is missing or has none.

    ``skip_decision_maps`` leaves out ``*-dm.*`` files (the fusing CLI's ``--save-decision-map``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{what} folder not found: {folder}")
    try:
        files = _io.list_images(folder)
    except ValueError:
        raise EvaluationError(f"no images ({', '.join(_io.IMAGE_SUFFIXES)}) in the {what} "
                              f"folder: {folder}") from None
    files = [p for p in files if not (skip_decision_maps and p.stem.lower().endswith("-dm"))]
    if not files:
        raise EvaluationError(f"no images but decision maps in the {what} folder: {folder}")
    return files


def _pair_name(a: Path, b: Path) -> str:
    """Row label: the sourceA stem, without a trailing ``_A``/``-A`` when B's stem has ``_B``."""
    sa = re.sub(r"[-_ ][Aa]$", "", a.stem)
    sb = re.sub(r"[-_ ][Bb]$", "", b.stem)
    return sa if sa == sb else a.stem


def check_source_pairs(files_a: list[Path], files_b: list[Path]) -> None:
    """sourceA and sourceB pair by the rule of every tool (:func:`msidtrans_fast.io.pair_images`);
    EvaluationError when they do not."""
    try:
        _io.pair_images(files_a, files_b)
    except ValueError as e:
        raise EvaluationError(str(e)) from None


def match_files(names: list[str], files_a: list[Path], files: list[Path], what: str) -> list[Path]:
    """The file of ``files`` that belongs to each source pair.

    1. By name: when every pair has a file whose stem equals its row name (``mffw_01``) or its
       sourceA stem (case-insensitive), those are used.
    2. Otherwise by position: ``files`` in natural order (``NAME-9`` before ``NAME-10``, as the
       fusing CLI's ``{NAME}-{i:02d}.png`` numbering) pair with the sources in sorted-name order.
       When every name ends in a distinct number, the numbers must run consecutively (a gap means
       a missing or extra file).

    Raises:
        EvaluationError: different counts, or a gap in the numbering.
    """
    if len(files) != len(files_a):
        raise EvaluationError(f"{len(files)} {what} images in {files[0].parent}, but "
                              f"{len(files_a)} source pairs")
    by_stem: dict[str, Path] = {}
    for p in files:
        by_stem.setdefault(p.stem.lower(), p)
    named = [by_stem.get(n.lower()) or by_stem.get(a.stem.lower())
             for n, a in zip(names, files_a, strict=True)]
    if all(named) and len(set(named)) == len(named):
        return named
    ordered = sorted(files, key=lambda p: _natural_key(p.name))
    nums = [_io._last_number(p.stem) for p in ordered]
    if None not in nums and len(set(nums)) == len(nums):
        for k, (p, v) in enumerate(zip(ordered, nums, strict=True)):
            if v != nums[0] + k:
                raise EvaluationError(f"{what} files do not line up with the sources: {p.name} "
                                      f"is number {v}, expected {nums[0] + k} (a file is missing "
                                      f"or extra)")
    return ordered


def _read(path: Path) -> np.ndarray:
    """An image via :func:`msidtrans_fast.io.read_image`; 16-bit -> float64 on the 8-bit scale."""
    img = _io.read_image(path)
    if img.dtype == np.uint16:
        return img.astype(np.float64) / 257.0
    return img


def _check_size(images: dict[str, np.ndarray], paths: dict[str, Path]) -> None:
    sizes = {k: v.shape[:2] for k, v in images.items()}
    first = next(iter(sizes))
    for k, s in sizes.items():
        if s != sizes[first]:
            raise EvaluationError(f"image sizes differ: {paths[first]} is {sizes[first][1]}x"
                                  f"{sizes[first][0]}, {paths[k]} is {s[1]}x{s[0]} (WxH)")


# ------------------------------------------------------------------------------------- scoring
def evaluate(sources: str | Path, fused: str | Path | None = None,
             groundtruth: str | Path | None = None, baseline: bool = False,
             window: int = BASELINE_WINDOW, threshold: float = BASELINE_THRESHOLD,
             save_baseline: str | Path | None = None) -> dict:
    """Scores a folder of fused images (and/or the baseline) against their sources.

    Args:
        sources: folder with ``sourceA/`` and ``sourceB/`` (and optionally ``groundtruth/``).
        fused: folder of fused images, one per pair, or None to score the baseline only.
        groundtruth: folder of all-in-focus images; default ``sources/groundtruth`` if present.
        baseline: also fuse and score :func:`laplacian_energy_fuse` with window and threshold.
        save_baseline: folder to write the baseline's fused images to (``{name}.png``).

    Returns:
        ``{"sources", "groundtruth", "metrics", "methods": {"fused"|"baseline": {..., "images":
        [{"name", "source_a", "source_b", ["fused"], ["groundtruth"], metric: value, ...}],
        "mean": {metric: value}}}}``.

    Raises:
        EvaluationError / io.ImageFormatError / FileNotFoundError: bad input.
    """
    if fused is None and not baseline:
        raise EvaluationError("nothing to score: give --fused DIR and/or --baseline")
    root = Path(sources)
    if not root.is_dir():
        raise EvaluationError(f"sources folder not found: {root}")
    files_a = list_images(root / "sourceA", "sourceA")
    files_b = list_images(root / "sourceB", "sourceB")
    check_source_pairs(files_a, files_b)
    pair_names = [_pair_name(pa, pb) for pa, pb in zip(files_a, files_b, strict=True)]
    gt_dir = Path(groundtruth) if groundtruth is not None else root / "groundtruth"
    files_gt = None
    if groundtruth is not None or gt_dir.is_dir():
        files_gt = match_files(pair_names, files_a, list_images(gt_dir, "groundtruth"),
                               "groundtruth")
    files_f = None
    if fused is not None:
        files_f = match_files(pair_names, files_a,
                              list_images(fused, "fused", skip_decision_maps=True), "fused")
    if save_baseline is not None:
        Path(save_baseline).mkdir(parents=True, exist_ok=True)

    names = _metrics.FUSION_METRICS + (_metrics.REFERENCE_METRICS if files_gt else ())
    methods: dict[str, dict] = {}
    if files_f is not None:
        methods["fused"] = {"path": str(Path(fused)), "images": []}
    if baseline:
        methods["baseline"] = {"method": "energy of Laplacian", "window": window,
                               "threshold": threshold, "images": []}
    for i, (pa, pb) in enumerate(zip(files_a, files_b, strict=True)):
        paths = {"source_a": pa, "source_b": pb}
        if files_f is not None:
            paths["fused"] = files_f[i]
        if files_gt is not None:
            paths["groundtruth"] = files_gt[i]
        images = {k: _read(p) for k, p in paths.items()}
        _check_size(images, paths)
        a, b, gt = images["source_a"], images["source_b"], images.get("groundtruth")
        name = pair_names[i]
        candidates = []
        if files_f is not None:
            candidates.append(("fused", images["fused"]))
        if baseline:
            if a.ndim != b.ndim:
                raise EvaluationError(f"the baseline needs two gray or two RGB sources: {pa} and "
                                      f"{pb} differ")
            fused_img, _ = laplacian_energy_fuse(a, b, window=window, threshold=threshold)
            if save_baseline is not None:
                from .io import write_image

                out = fused_img if fused_img.dtype == np.uint8 else \
                    np.clip(np.floor(fused_img * 257 + 0.5), 0, 65535).astype(np.uint16)
                write_image(Path(save_baseline) / f"{name}.png", out, overwrite=True)
            candidates.append(("baseline", fused_img))
        for method, img in candidates:
            row = {"name": name, **{k: str(p) for k, p in paths.items()
                                    if k != "fused" or method == "fused"}}
            row.update(_metrics.fusion_metrics(a, b, img))
            if gt is not None:
                row.update(_metrics.reference_metrics(img, gt))
            methods[method]["images"].append(row)
    for entry in methods.values():
        entry["mean"] = {k: float(np.mean([min(r[k], PSNR_CAP) if k == "PSNR" else r[k]
                                           for r in entry["images"]])) for k in names}
    return {"sources": str(root), "groundtruth": str(gt_dir) if files_gt else None,
            "metrics": list(names), "methods": methods}


# ----------------------------------------------------------------------------------- reporting
_DIGITS = {"Qabf": 4, "Qcb": 4, "NMI": 4, "Qy": 4, "SF": 3, "AG": 3, "SSIM": 4, "PSNR": 2,
           "Blotch": 3}


def _fmt(value: float, metric: str) -> str:
    return f"{value:.{_DIGITS.get(metric, 4)}f}" if math.isfinite(value) else str(value)


def format_table(result: dict) -> str:
    """Per-image tables and a summary of means, as plain text."""
    names = result["metrics"]
    lines = []
    summary = []
    for method, entry in result["methods"].items():
        title = (f"fused images: {entry['path']}" if method == "fused" else
                 f"baseline: energy of Laplacian, window {entry['window']}, "
                 f"threshold {entry['threshold']}")
        width = max([len("image")] + [len(r["name"]) for r in entry["images"]]) + 2
        lines.append(f"== {title} ({len(entry['images'])} images)")
        lines.append("image".ljust(width) + "".join(f"{n:>10}" for n in names))
        for r in entry["images"]:
            lines.append(r["name"].ljust(width) + "".join(f"{_fmt(r[n], n):>10}" for n in names))
        mean_row = "".join(f"{_fmt(entry['mean'][n], n):>10}" for n in names)
        lines.append("mean".ljust(width) + mean_row)
        lines.append("")
        summary.append((method, mean_row))
    lines.append("== mean over " + str(len(next(iter(result["methods"].values()))["images"]))
                 + " images")
    lines.append("method".ljust(10) + "".join(f"{n:>10}" for n in names))
    lines.extend(m.ljust(10) + row for m, row in summary)
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ CLI
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Score multi-focus fused images with the standard "
                "objective metrics (Qabf, Qcb, NMI, Qy, SF, AG; SSIM/PSNR with a ground truth) "
                "and Blotch, the share of flat pixels on a switch of source.")
    p.add_argument("--sources", required=True, metavar="ROOT",
                   help="folder holding sourceA/ and sourceB/ (and optionally groundtruth/)")
    p.add_argument("--fused", metavar="DIR", help="folder of fused images, one per source pair "
                   "(matched by name, else in natural sorted order)")
    p.add_argument("--groundtruth", metavar="DIR",
                   help="all-in-focus images for SSIM/PSNR (default: ROOT/groundtruth if present)")
    p.add_argument("--baseline", action="store_true",
                   help="also fuse with the energy-of-Laplacian baseline and score it")
    p.add_argument("--window", type=int, default=BASELINE_WINDOW,
                   help="baseline focus window, odd (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=BASELINE_THRESHOLD,
                   help="baseline clean-up area fraction (0: off; default: %(default)s)")
    p.add_argument("--save-baseline", metavar="DIR",
                   help="write the baseline's fused images to DIR as NAME.png (overwrites)")
    p.add_argument("--json", metavar="OUT", help="also write all numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``msidtrans-eval``; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.json is not None and not Path(args.json).resolve().parent.is_dir():
            raise EvaluationError(f"folder for --json does not exist: {Path(args.json).parent}")
        if args.window < 1 or args.window % 2 == 0:
            raise EvaluationError(f"--window must be an odd integer >= 1, got {args.window}")
        if not 0 <= args.threshold < 1:
            raise EvaluationError(f"--threshold must be in [0, 1), got {args.threshold}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = evaluate(args.sources, args.fused, args.groundtruth, baseline=args.baseline,
                              window=args.window, threshold=args.threshold,
                              save_baseline=args.save_baseline)
        for message in dict.fromkeys(str(w.message) for w in caught):
            print(f"{PROG}: warning: {message}", file=sys.stderr)
        if args.json is not None:
            Path(args.json).write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    except _UsageError as e:
        print(f"{PROG}: error: {e} (see {PROG} --help)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # EvaluationError, io.ImageFormatError, missing files
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
