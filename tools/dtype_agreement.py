"""How far a lower compute precision moves the fused results from float32, on the dev sets.

For every pair of each dataset folder (``ROOT/sourceA``, ``ROOT/sourceB``, optionally
``ROOT/groundtruth``) the network runs twice with the same weights, in float32 and in ``--dtype``
(default bfloat16; or ``mixed``), on the CPU as ``fuse`` runs it (whole image, the layout
``msidtrans_fast.weights.load_model`` gives). Per pair it records, for every decision rule, the
share of pixels whose final decision (the binarise stage: threshold 0.001, the rule, the
consistency check) differs from float32, and for both precisions, with the default rule, Q^AB/F
and Q_CB of the fused image and, with a ground truth, PSNR and SSIM. The summary gives
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

from msidtrans_fast import decision, io, metrics, pipeline, weights

THRESHOLD = 0.001


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _scores(a, b, keep, gt) -> dict[str, float]:
    fused = np.where(keep[..., None], a, b)
    if fused.shape[-1] == 1:
        a, b, fused = a[..., 0], b[..., 0], fused[..., 0]
    out = {"Qabf": metrics.qabf(a, b, fused), "Qcb": metrics.qcb(a, b, fused)}
    if gt is not None:
        out.update(metrics.reference_metrics(fused, gt))
    return out


def measure_pair(deciders, a_path: Path, b_path: Path, gt_path: Path | None) -> dict:
    a, b = io.load_sources([a_path, b_path])
    gt = io.read_image(gt_path) if gt_path is not None else None
    row = {"pair": a_path.name, "pixels": int(a.shape[0] * a.shape[1]), "differ": {}}
    keep = {}
    for name, decider in deciders.items():
        start = time.perf_counter()
        soft = decider(a, b)
        row[f"{name}_s"] = round(time.perf_counter() - start, 3)
        keep[name] = {rule: pipeline.binarise(soft, THRESHOLD, rule, a, b).numpy()
                      for rule in decision.DECISION_RULES}
        row[name] = _scores(a, b, keep[name][decision.DEFAULT_RULE], gt)
    ref, low = (keep[name] for name in deciders)
    for rule in decision.DECISION_RULES:
        row["differ"][rule] = float((ref[rule] != low[rule]).mean())
    return row


def summarise(rows: list[dict], low: str) -> str:
    rules = decision.DECISION_RULES
    lines = ["| set | pairs | " + " | ".join(f"decision differs, `{r}` rule (mean / worst)"
                                             for r in rules)
             + f" | Q^AB/F fp32 / {low} | Q_CB fp32 / {low} | PSNR fp32 / {low} "
             f"| SSIM fp32 / {low} |",
             "|---|---|" + "---|" * (len(rules) + 4)]
    for dataset in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == dataset]

        def mean(key, name, rs=rs):
            values = [min(r[name][key], 100.0) for r in rs if key in r[name]]
            return f"{np.mean(values):.4f}" if values else "-"

        differ = [[r["differ"][rule] for r in rs] for rule in rules]
        cells = [f"{100 * np.mean(d):.3f}% / {100 * max(d):.3f}%" for d in differ]
        cells += [f"{mean(k, 'float32')} / {mean(k, low)}" for k in ("Qabf", "Qcb", "PSNR", "SSIM")]
        lines.append(f"| {dataset} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="dataset folders (sourceA, sourceB)")
    parser.add_argument("--dtype", default="bfloat16",
                        help="precision compared with float32 (bfloat16, mixed)")
    parser.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    parser.add_argument("--limit", type=int, default=None, help="first N pairs of each folder")
    parser.add_argument("--jsonl", type=Path, required=True, help="per-pair results (appended)")
    args = parser.parse_args()
    low = weights.resolve_precision(args.dtype)
    deciders = {name: pipeline.make_decider(pipeline.FuseOptions(device="cpu", dtype=name,
                                                                 tile="off"),
                                            weights=args.weights)
                for name in ("float32", low)}
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
            row = {"set": root.name, **measure_pair(deciders, a, b, gts[i] if gts else None)}
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
            print(f"{root.name} {a.name}: differ " + ", ".join(
                f"{100 * v:.3f}% ({rule})" for rule, v in row["differ"].items()), flush=True)
    print(summarise([r for r in done if r["set"] in {p.name for p in args.roots}], low))


if __name__ == "__main__":
    main()
