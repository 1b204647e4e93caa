"""Network CPU time per megapixel of output for several tile sizes and overlaps, on the CPU.

    python benchmarks/tile_sizes.py near.jpg far.jpg --crop 3000x2000 \\
        --configs 256:32 384:32 512:32 512:64 [--frame 6000x4000]

Each configuration runs in its own child process (``--child``), so that each gets its own peak
resident memory: the tiled decision map of the (cropped) pair with the defaults of
``msidtrans_fast.tiling`` for batches and workers, float32. The child reports the network's CPU
time (user + system of the whole process while forward calls run, from hooks on the model), the
decision map's CPU and wall time, the tile count and the peak RSS. The parent adds, for
``--frame``, the tile count of that frame and the network CPU time it implies at the measured
cost per tile. Prints one JSON line per configuration, with the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def child(args) -> None:
    import torch

    from msidtrans_fast import io, pipeline, tiling

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiled_stages import Clock, cpu_seconds, network_hooks

    tile, overlap = (int(v) for v in args.child.split(":"))
    a, b = io.load_sources(args.sources)
    if args.crop:
        w, h = (int(v) for v in args.crop.split("x"))
        a, b = (np.ascontiguousarray(s[:h, :w]) for s in (a, b))
    model = pipeline.get_model(device="cpu", dtype="float32")
    clock = Clock()
    network_hooks(model, clock)
    load = os.getloadavg()[0]
    c, w = cpu_seconds(), time.perf_counter()
    tiling.tiled_decision_map(model, a, b, tile=tile, overlap=overlap)
    cpu, wall = cpu_seconds() - c, time.perf_counter() - w
    grid = tiling.plan_tiles(a.shape[0], a.shape[1], tile, overlap)
    mp = a.shape[0] * a.shape[1] / 1e6
    print(json.dumps({
        "tile": tile, "overlap": overlap, "size": f"{a.shape[1]}x{a.shape[0]}",
        "tiles": len(grid), "threads": torch.get_num_threads(),
        "network_cpu_s": round(clock.cpu["network"], 1),
        "network_cpu_s_per_tile": round(clock.cpu["network"] / len(grid), 3),
        "network_cpu_s_per_mp": round(clock.cpu["network"] / mp, 2),
        "decision_cpu_s": round(cpu, 1), "decision_wall_s": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_avg_1min": [round(load, 1), round(os.getloadavg()[0], 1)]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs=2)
    p.add_argument("--crop", default=None, help="WxH: the top-left corner only")
    p.add_argument("--configs", nargs="+", default=["256:32", "384:32", "512:32", "512:64"],
                   help="TILE:OVERLAP")
    p.add_argument("--frame", default="6000x4000", help="WxH to count tiles for")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from msidtrans_fast import tiling

    fw, fh = (int(v) for v in args.frame.split("x"))
    for config in args.configs:
        command = [sys.executable, __file__, *args.sources, "--child", config]
        if args.crop:
            command += ["--crop", args.crop]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        tiles = len(tiling.plan_tiles(fh, fw, result["tile"], result["overlap"]))
        result["frame"] = {"size": args.frame, "tiles": tiles,
                           "network_cpu_s": round(tiles * result["network_cpu_s_per_tile"]),
                           "network_cpu_s_per_mp": round(tiles * result["network_cpu_s_per_tile"]
                                                         / (fw * fh / 1e6), 2)}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
