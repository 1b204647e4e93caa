"""FLOP and minimum-byte counts of one MSI-DTrans eval forward (the floor of issue "whole-model
GPU performance").

Runs on the meta device, so it needs no GPU and no memory:

    python benchmarks/flop_count.py --sizes 520 1024 2048 [--dtype-bytes 2]

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2), split into
convolutions and attention (the batched matmuls of the SDPA math path). Two byte counts:

* ``io_bytes``: the inputs, the decision map and the weights, each moved once: the absolute floor.
* ``boundary_bytes``: every top-level module's output written once and read once, plus io_bytes:
  the floor for an implementation that fuses within modules but not across them.

Prints a Markdown table.
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from msidtrans_fast import MSIDTrans


def count(size: int, dtype_bytes: int) -> dict:
    model = MSIDTrans().eval().to("meta")
    A = torch.empty(1, 3, size, size, device="meta")
    boundary_elems = 0

    def hook(_module, _inputs, output):
        nonlocal boundary_elems
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        boundary_elems += sum(t.numel() for t in outputs)

    handles = [m.register_forward_hook(hook) for m in model.children()]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(A, A)
    for h in handles:
        h.remove()
    flops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    conv = flops.get("aten.convolution", 0)
    total = counter.get_total_flops()
    weights = sum(p.numel() for p in model.parameters())
    io_bytes = (2 * 3 * size * size + size * size + weights) * dtype_bytes
    return {"size": size, "gflop": total / 1e9, "conv_gflop": conv / 1e9,
            "attention_gflop": (total - conv) / 1e9, "io_mb": io_bytes / 1e6,
            "boundary_mb": (2 * boundary_elems * dtype_bytes + io_bytes) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[520, 1024, 2048])
    parser.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16/fp16, 4 for fp32")
    args = parser.parse_args()
    print("| size | GFLOP | conv GFLOP | attention GFLOP | io MB | module-boundary MB |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        r = count(size, args.dtype_bytes)
        print(f"| {size}x{size} | {r['gflop']:.1f} | {r['conv_gflop']:.1f} | "
              f"{r['attention_gflop']:.1f} | {r['io_mb']:.1f} | {r['boundary_mb']:.1f} |")


if __name__ == "__main__":
    main()
