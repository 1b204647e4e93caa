"""Time and peak memory of one eval forward of the reference path on the CPU.

Run as a script, one measurement per process so that the peak resident memory is this forward's:

    python benchmarks/cpu_forward.py --size 520 [--materialize] [--repeats 3]

``--materialize`` computes attention with the full N x N matrix, as the original code does, for
comparison. Prints one JSON line: size, mode, median and all times (s), peak RSS (MiB), threads.
"""

import argparse
import functools
import json
import resource
import statistics
import time

import torch

from msidtrans_fast import MSIDTrans, reference
from msidtrans_fast import modules as msid_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=520, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--materialize", action="store_true",
                        help="materialise the attention matrix, as the original does")
    args = parser.parse_args()
    if args.materialize:
        msid_modules.reference = _MaterializedReference()
    torch.manual_seed(0)
    model = MSIDTrans().eval()
    A, B = (torch.rand(1, 3, args.size, args.size) * 2 - 1 for _ in range(2))
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            model(A, B)
            times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"size": args.size, "mode": "materialized" if args.materialize else "sdpa",
                      "median_s": round(statistics.median(times), 3),
                      "times_s": [round(t, 3) for t in times], "peak_rss_mib": round(peak_mib),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


class _MaterializedReference:
    """The reference module with attention forced to materialise its matrix."""

    def __getattr__(self, name):
        if name == "multi_scale_attention":
            return functools.partial(reference.multi_scale_attention, materialize=True)
        return getattr(reference, name)


if __name__ == "__main__":
    main()
