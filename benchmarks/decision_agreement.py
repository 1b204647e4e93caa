"""bf16 against fp32: how often the whole model's binary decision changes.

    python benchmarks/decision_agreement.py --device cuda --out agreement.json

The bundled weights fuse the bundled sample pair at its own size and resized (bilinear) to a few
other sizes, once with the model and inputs in fp32 and once in bf16 (as ``--dtype bfloat16``
runs the fusing pipeline), for each backend. Per case: the share of pixels whose decision
``D > 0.5`` differs, before and after the consistency check (``pipeline.binarise`` with the
original's threshold 0.001), and the largest difference of D. One JSON file holds the rows and the
provenance; a short table is printed. On the CPU only the reference backend runs (slow but
possible); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from msidtrans_fast import io, pipeline, weights

DATA = Path(weights.__file__).resolve().parent / "data"
SAMPLE = (DATA / "sample_near.png", DATA / "sample_far.png")
#: (H, W) sizes besides the sample's own: odd, square, a landscape photo size.
SIZES = ((520, 520), (768, 1024), (1111, 777))
THRESHOLD = 0.001


def sample_pair(size: tuple[int, int] | None, device: torch.device) -> list[torch.Tensor]:
    """The sample pair as fp32 (1, 3, H, W) network inputs, resized to ``size`` if given."""
    pair = [pipeline.to_network_input(io.read_image(p), device, torch.float32) for p in SAMPLE]
    if size is not None:
        pair = [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in pair]
    return pair


def agreement(model32, model16, a, b) -> dict:
    with torch.inference_mode():
        d32 = model32(a, b)[0, 0].float()
        d16 = model16(a.to(torch.bfloat16), b.to(torch.bfloat16))[0, 0].float()
    raw = ((d32 > pipeline.BINARY_LEVEL) != (d16 > pipeline.BINARY_LEVEL)).double().mean()
    checked = (pipeline.binarise(d32, THRESHOLD, "original")
               != pipeline.binarise(d16, THRESHOLD, "original"))
    return {"height": a.shape[-2], "width": a.shape[-1],
            "differ_before_check": raw.item(), "differ_after_check": checked.double().mean().item(),
            "max_abs_diff_D": (d32 - d16).abs().max().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: triton and reference on CUDA, reference on the CPU")
    p.add_argument("--sizes", nargs="*", default=[f"{h}x{w}" for h, w in SIZES],
                   help="HxW sizes besides the sample's own (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes]
    device = torch.device(a.device)
    backends = a.backends or (["triton", "reference"] if device.type == "cuda" else ["reference"])
    model32 = weights.load_model(device=device, dtype=torch.float32)
    model16 = weights.load_model(device=device, dtype=torch.bfloat16)
    rows = []
    for size in (None, *sizes):
        pair = sample_pair(size, device)
        for backend in backends:
            model32.backend = model16.backend = backend
            start = time.perf_counter()
            row = {"backend": backend, **agreement(model32, model16, *pair)}
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(f"{backend:10s} {row['height']:5d}x{row['width']:<5d} differ before check "
                  f"{row['differ_before_check']:.2e}, after {row['differ_after_check']:.2e}, "
                  f"max|dD| {row['max_abs_diff_D']:.3f}", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__,
              "threshold": THRESHOLD, "rows": rows}
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
