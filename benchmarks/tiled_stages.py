"""Per-stage CPU time of one tiled fusion of a pair of image files, measured in one process.

    python benchmarks/tiled_stages.py near.jpg far.jpg [--tile 256] [--overlap 32]
        [--threads N] [--crop WxH] [--out fused.jpg]

Runs the stages of ``msidtrans-fuse`` one after the other with the library's own functions:
decode (``io.load_sources``), the tiled decision map (``tiling.tiled_decision_map``), binarise,
consistency check (``ops.remove_small_regions`` on the whole map), compose, JPEG/PNG encode +
write (``io.write_image``). Inside the decision map, wrappers split the time into the tiles'
conversion to float, the network (hooks on the model's forward) and the rest (adding the tiles'
maps into D). Then, in the same process, the forward of a single tile and of a batch of tiles,
for the network's cost per tile outside the loop (skip with ``--no-single``). ``--stand-in``
replaces the network by a cheap function, to time everything else on a full frame in seconds.

Figures are CPU seconds (user + system): of the process (``resource.getrusage``) for stages on
the calling thread and for network calls that use all threads; of the calling thread
(``time.thread_time``) for calls on one thread each running side by side. The 1-minute load
average is printed beside them, since the machine may be shared. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from msidtrans_fast import io, pipeline, tiling


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    """Accumulates CPU and wall seconds per stage name."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, cpu: float, wall: float) -> None:
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.count[name] = self.count.get(name, 0) + 1

    def time(self, name: str, fn, *args, **kwargs):
        c, w = cpu_seconds(), time.perf_counter()
        out = fn(*args, **kwargs)
        self.add(name, cpu_seconds() - c, time.perf_counter() - w)
        return out

    def table(self) -> dict:
        return {k: {"cpu_s": round(self.cpu[k], 2), "wall_s": round(self.wall[k], 2),
                    "calls": self.count[k]} for k in self.cpu}


def timed_calls(clock: Clock, name: str):
    """Wraps a function so that each call adds to ``clock[name]`` its CPU time on the calling
    thread (``time.thread_time``: right for calls that run on one thread, and for calls that run
    side by side on several) and to ``clock[name + " (process)"]`` the process's CPU time (right
    for calls that use several threads one at a time)."""

    def wrap(fn):
        def timed(*args, **kwargs):
            c, t, w = cpu_seconds(), time.thread_time(), time.perf_counter()
            out = fn(*args, **kwargs)
            wall = time.perf_counter() - w
            clock.add(name, time.thread_time() - t, wall)
            clock.add(f"{name} (process)", cpu_seconds() - c, wall)
            return out
        return timed
    return wrap


def network_hooks(model: torch.nn.Module, clock: Clock):
    """Forward pre/post hooks timing each forward as :func:`timed_calls` does, as "network"."""
    local = threading.local()

    def pre(module, args):
        local.start = cpu_seconds(), time.thread_time(), time.perf_counter()

    def post(module, args, output):
        c, t, w = local.start
        wall = time.perf_counter() - w
        clock.add("network", time.thread_time() - t, wall)
        clock.add("network (process)", cpu_seconds() - c, wall)

    return model.register_forward_pre_hook(pre), model.register_forward_hook(post)


class StandIn(torch.nn.Module):
    """``sigmoid(A - B)`` of the first channel, (b, 1, H, W): the network's interface at no cost."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, A, B, **kwargs):
        return torch.sigmoid(A[:, :1] - B[:, :1])


def forward_cost(model, tile: int, batch: int, repeats: int = 2) -> dict:
    """CPU and wall seconds per tile of ``model`` on a batch of ``batch`` random tile pairs."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(batch, 3, tile, tile, generator=gen) * 2 - 1
    b = torch.rand(batch, 3, tile, tile, generator=gen) * 2 - 1
    with torch.inference_mode():
        model(a, b)  # warm-up
        c, w = cpu_seconds(), time.perf_counter()
        for _ in range(repeats):
            model(a, b)
        cpu, wall = cpu_seconds() - c, time.perf_counter() - w
    n = repeats * batch
    return {"batch": batch, "cpu_s_per_tile": round(cpu / n, 3),
            "wall_s_per_tile": round(wall / n, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs=2)
    p.add_argument("--tile", type=int, default=tiling.DEFAULT_TILE)
    p.add_argument("--overlap", type=int, default=tiling.DEFAULT_OVERLAP)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--crop", default=None, help="WxH: fuse the top-left corner only")
    p.add_argument("--out", default="/tmp/tiled-stages-fused.jpg")
    p.add_argument("--no-single", action="store_true", help="skip the single-forward timings")
    p.add_argument("--stand-in", action="store_true",
                   help="a cheap stand-in for the network (a sigmoid of the pixel difference), to "
                        "time everything else on large frames in seconds")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock()
    load_start = os.getloadavg()[0]

    sources = clock.time("decode", io.load_sources, args.sources)
    if args.crop:
        w, h = (int(v) for v in args.crop.split("x"))
        sources = [np.ascontiguousarray(s[:h, :w]) for s in sources]
    a, b = sources
    model = StandIn() if args.stand_in else pipeline.get_model(device="cpu", dtype="float32")
    hooks = network_hooks(model, clock)
    grid = tiling.plan_tiles(a.shape[0], a.shape[1], args.tile, args.overlap)
    batch = tiling.batch_size(grid.tile_h, grid.tile_w, torch.device("cpu"), torch.float32)
    batches = -(-len(grid) // batch)
    if hasattr(tiling, "cpu_workers"):
        workers, per_worker = tiling.cpu_workers(grid.tile_h, grid.tile_w, torch.float32, batch,
                                                 batches)
        tiling.tile_batch = timed_calls(clock, "tiles to float")(tiling.tile_batch)
    else:  # before the workers: one call at a time on all threads, tiles converted one by one
        workers, per_worker = 1, torch.get_num_threads()
        pipeline.to_network_input = timed_calls(clock, "tiles to float")(pipeline.to_network_input)
    main_thread = time.thread_time()
    soft = clock.time("decision map (all)", tiling.tiled_decision_map, model, a, b,
                      tile=args.tile, overlap=args.overlap)
    main_thread = time.thread_time() - main_thread
    for h in hooks:
        h.remove()
    soft = torch.from_numpy(soft)
    mask = clock.time("binarise", lambda: soft > pipeline.BINARY_LEVEL)
    area = pipeline.min_area(0.001, *mask.shape)
    from msidtrans_fast.ops import remove_small_regions

    mask = clock.time("consistency check", lambda: remove_small_regions(mask[None, None], area)
                      [0, 0].numpy())
    fused = clock.time("compose", np.where, mask[..., None], a, b)
    meta = clock.time("metadata", io.read_metadata, args.sources[0])
    clock.time("encode + write", io.write_image, args.out, fused, overwrite=True, metadata=meta)

    # Inside the decision map: calls on one torch thread are timed on their own thread; calls
    # on several threads one at a time by the process.
    exact = "" if per_worker == 1 else " (process)"
    network = clock.cpu.get("network" + exact, 0.0)
    to_float = clock.cpu.get("tiles to float" + exact, 0.0)
    if workers > 1:  # the calling thread only adds the maps up
        blend = main_thread
    else:
        blend = clock.cpu["decision map (all)"] - network - to_float
    breakdown = {"decode": clock.cpu["decode"], "tiles to float": to_float, "network": network,
                 "blend (and other work in the decision map)": blend}
    for name in ("binarise", "consistency check", "compose", "metadata", "encode + write"):
        breakdown[name] = clock.cpu[name]
    result = {"size": f"{a.shape[1]}x{a.shape[0]}", "tile": args.tile, "overlap": args.overlap,
              "tiles": len(grid), "batch": batch, "threads": torch.get_num_threads(),
              "workers": [workers, per_worker],
              "cpu_s": {k: round(v, 2) for k, v in breakdown.items()},
              "decision_map": {"cpu_s": round(clock.cpu["decision map (all)"], 1),
                               "wall_s": round(clock.wall["decision map (all)"], 1)},
              "raw": clock.table(),
              "network_cpu_s_per_tile": round(network / len(grid), 3),
              "network_cpu_s_per_output_mp": round(network / (a.shape[0] * a.shape[1] / 1e6),
                                                   2)}
    if not (args.no_single or args.stand_in):
        result["forward_alone"] = [forward_cost(model, args.tile, 1),
                                   forward_cost(model, args.tile, batch, repeats=1)]
    result["load_avg_1min"] = [round(load_start, 1), round(os.getloadavg()[0], 1)]
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
