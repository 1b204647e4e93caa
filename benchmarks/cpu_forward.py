"""CPU time and peak memory: our forward and ``fuse`` against the original's cost model.

One mode per process gives that mode's peak resident memory (of the whole process)::

    python benchmarks/cpu_forward.py --size 520 --modes fuse-auto --repeats 3

Several modes in one process run interleaved, round by round (``original, fp32, bf16, ...,
original, fp32, ...``), so that a busy machine slows them alike; the medians and the speed-up
over ``original`` are printed (peak memory is then the largest mode's)::

    python benchmarks/cpu_forward.py --size 520 --modes original fp32 bf16 fuse-fp32 fuse-auto

Modes:

* ``original``: the original network's costs (``baselines.original_emulation``: every attention
  matrix materialised, every Haar split through numpy and PyWavelets), fp32, contiguous layout.
* ``fp32``, ``mixed``, ``bf16``: our eval forward (reference backend), weights in
  ``channels_last`` as ``weights.load_model`` puts them on the CPU; ``mixed`` is the float32
  model under ``precision.bf16_products``.
* ``fuse-fp32``, ``fuse-auto``: ``msidtrans_fast.fuse`` of one pair of uint8 RGB arrays
  end to end (model cached, its CPU forwards in reused blocks), with ``dtype="float32"`` and the
  default ``"auto"`` (``mixed`` on a CPU with native bf16).

The network runs on a seeded untrained model (the time does not depend on the weights), ``fuse``
on the bundled weights. Prints one JSON line: size, threads, CPU and flags, and per mode the
median and all times (s); for ``fuse-*`` also the median time spent outside the network
(the call's time minus its forward, timed by hooks on the model); plus the peak RSS (MiB).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msidtrans_fast import MSIDTrans, pipeline, precision, weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import original_emulation  # noqa: E402

MODES = ("original", "fp32", "mixed", "bf16", "fuse-fp32", "fuse-auto")


def cpu_description() -> dict:
    """CPU model name, the flags that matter here and torch's kernel capability."""
    name, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not flags:
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return {"cpu": name, "flags": [f for f in wanted if f in flags],
            "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": weights.cpu_native_bf16()}


#: Seconds each network forward inside the ``fuse-*`` modes took, in call order.
NETWORK_TIMES: list[float] = []


def _time_network(model) -> None:
    """Records the time of every forward of ``model`` in :data:`NETWORK_TIMES` (hooks)."""
    if getattr(model, "_timed", False):
        return
    starts = []
    model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    model.register_forward_hook(
        lambda *_: NETWORK_TIMES.append(time.perf_counter() - starts.pop()))
    model._timed = True


def make_runner(mode: str, size: int):
    """A no-argument callable running ``mode`` once on a fixed random pair of side ``size``."""
    g = torch.Generator().manual_seed(0)
    if mode.startswith("fuse-"):
        rng = np.random.default_rng(0)
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        b = np.ascontiguousarray(a[:, ::-1])
        dtype = mode.removeprefix("fuse-")
        dtype = "float32" if dtype == "fp32" else dtype
        model = pipeline.get_model(None, "cpu", dtype)  # load once, as repeated calls do
        _time_network(model)
        return lambda: pipeline.fuse([a, b], device="cpu", dtype=dtype)
    torch.manual_seed(0)
    model = MSIDTrans().eval()
    A, B = (torch.rand(1, 3, size, size, generator=g) * 2 - 1 for _ in range(2))
    if mode == "original":
        model = original_emulation(model)
    else:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        model = model.to(dtype=dtype, memory_format=weights.preferred_memory_format("cpu"))
        A, B = A.to(dtype), B.to(dtype)
    products = torch.bfloat16 if mode == "mixed" else None

    def forward():
        with torch.inference_mode(), precision.products_context(products):
            return model(A, B)
    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=520, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--modes", nargs="+", default=["fp32"], choices=MODES,
                        help="what to run (default: fp32)")
    args = parser.parse_args()
    runners = {mode: make_runner(mode, args.size) for mode in args.modes}
    for run in runners.values():  # warm-up: first-call allocations and caches
        run()
    times = {mode: [] for mode in runners}
    outside = {mode: [] for mode in runners if mode.startswith("fuse-")}
    for _ in range(args.repeats):
        for mode, run in runners.items():
            NETWORK_TIMES.clear()
            start = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - start)
            if mode in outside:
                outside[mode].append(times[mode][-1] - sum(NETWORK_TIMES))
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    result = {"size": args.size, "threads": torch.get_num_threads(), "torch": torch.__version__,
              **cpu_description(),
              "median_s": {m: round(t, 3) for m, t in medians.items()},
              "times_s": {m: [round(x, 3) for x in t] for m, t in times.items()},
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if outside:  # fuse's work outside the network: reading the arrays, binarising, composing
        result["outside_network_s"] = {m: round(statistics.median(t), 3)
                                       for m, t in outside.items()}
    if "original" in medians:
        result["speedup_vs_original"] = {m: round(medians["original"] / t, 2)
                                         for m, t in medians.items() if m != "original"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
