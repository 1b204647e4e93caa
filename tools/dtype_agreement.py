"""How far a lower compute precision moves the fused results from float32, on the dev sets.

For every pair of each dataset folder (``ROOT/sourceA``, ``ROOT/sourceB``, optionally
``ROOT/groundtruth``) the network runs twice with the same weights, in float32 and in ``--dtype``
(default bfloat16), on the CPU with the layout ``msidtrans_fast.weights.load_model`` gives it. Per
pair it records the share of pixels whose binary decision (``D > 0.5``) differs from float32,
before and after the consistency check (threshold 0.001, as ``fuse``), and for both precisions
Q^AB/F and Q_CB of the fused image and, with a ground truth, PSNR and SSIM. The summary gives
per-dataset means and the largest per-pair difference share.

Usage::

    python tools/dtype_agreement.py ../shared/data/dev_eval/MFFW \\
        ../shared/data/dev_eval/Grayscale ../shared/data/dev_gt/NYU-D --jsonl agreement.jsonl

``--limit N`` takes the first N pairs (sorted by name) of each folder. Results are appended to
``--jsonl`` pair by pair (an interrupted run keeps what it measured; rerunning skips pairs
already there) and the summary table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from msidtrans_fast import io, metrics, weights
from msidtrans_fast.ops import remove_small_regions

THRESHOLD = 0.001


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _network_input(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    x = torch.from_numpy(array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 65535.0))
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, 3)
    return ((x - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0).to(dtype).contiguous()


def decisions(model, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw, checked): (H, W) bool maps, True where ``a`` is taken, before and after the check."""
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        raw = model(_network_input(a, dtype), _network_input(b, dtype)).float() > 0.5
    area = int(np.ceil(THRESHOLD * a.shape[0] * a.shape[1]))
    checked = remove_small_regions(raw, area)
    return raw[0, 0].numpy(), checked[0, 0].numpy()


def _scores(a, b, keep, gt) -> dict[str, float]:
    fused = np.where(keep[..., None], a, b)
    if fused.shape[-1] == 1:
        a, b, fused = a[..., 0], b[..., 0], fused[..., 0]
    out = {"Qabf": metrics.qabf(a, b, fused), "Qcb": metrics.qcb(a, b, fused)}
    if gt is not None:
        out.update(metrics.reference_metrics(fused, gt))
    return out


def measure_pair(models, a_path: Path, b_path: Path, gt_path: Path | None) -> dict:
    a, b = (x if x.ndim == 3 else x[..., None] for x in map(io.read_image, (a_path, b_path)))
    if a.shape[-1] != b.shape[-1]:
        a, b = (np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in (a, b))
    gt = io.read_image(gt_path) if gt_path is not None else None
    row = {"pair": a_path.name, "pixels": int(a.shape[0] * a.shape[1])}
    maps = {}
    for name, model in models.items():
        start = time.perf_counter()
        maps[name] = decisions(model, a, b)
        row[f"{name}_s"] = round(time.perf_counter() - start, 3)
        row[name] = _scores(a, b, maps[name][1], gt)
    ref, low = maps["float32"], maps[[n for n in models if n != "float32"][0]]
    row["differ_raw"] = float((ref[0] != low[0]).mean())
    row["differ_checked"] = float((ref[1] != low[1]).mean())
    return row


def summarise(rows: list[dict], low: str) -> str:
    lines = [f"| set | pairs | decision differs, before check (mean / max) "
             f"| after check (mean / max) | Q^AB/F fp32 / {low} | Q_CB fp32 / {low} "
             f"| PSNR fp32 / {low} | SSIM fp32 / {low} |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == dataset]

        def mean(key, name, rs=rs):
            values = [min(r[name][key], 100.0) for r in rs if key in r[name]]
            return f"{np.mean(values):.4f}" if values else "-"

        raw = [r["differ_raw"] for r in rs]
        checked = [r["differ_checked"] for r in rs]
        cells = [f"{mean(k, 'float32')} / {mean(k, low)}" for k in ("Qabf", "Qcb", "PSNR", "SSIM")]
        lines.append(f"| {dataset} | {len(rs)} | {100 * np.mean(raw):.3f}% / {100 * max(raw):.3f}% "
                     f"| {100 * np.mean(checked):.3f}% / {100 * max(checked):.3f}% | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="dataset folders (sourceA, sourceB)")
    parser.add_argument("--dtype", default="bfloat16", help="precision compared with float32")
    parser.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    parser.add_argument("--limit", type=int, default=None, help="first N pairs of each folder")
    parser.add_argument("--jsonl", type=Path, required=True, help="per-pair results (appended)")
    args = parser.parse_args()
    low = str(weights.resolve_dtype(args.dtype)).removeprefix("torch.")
    models = {"float32": weights.load_model(args.weights, "cpu", "float32"),
              low: weights.load_model(args.weights, "cpu", low)}
    done = []
    if args.jsonl.exists():
        done = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    seen = {(r["set"], r["pair"]) for r in done}
    for root in args.roots:
        list_a, list_b = _files(root / "sourceA"), _files(root / "sourceB")
        gts = _files(root / "groundtruth") if (root / "groundtruth").is_dir() else None
        for i, (a, b) in enumerate(zip(list_a, list_b, strict=True)):
            if args.limit is not None and i >= args.limit:
                break
            if (root.name, a.name) in seen:
                continue
            row = {"set": root.name, **measure_pair(models, a, b, gts[i] if gts else None)}
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
            print(f"{root.name} {a.name}: differ {100 * row['differ_raw']:.3f}% raw, "
                  f"{100 * row['differ_checked']:.3f}% checked", flush=True)
    print(summarise([r for r in done if r["set"] in {p.name for p in args.roots}], low))


if __name__ == "__main__":
    main()
