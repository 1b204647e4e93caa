"""Time and peak memory of ``msidtrans-fuse`` on a 24-megapixel (6000x4000) pair on the CPU.

    python benchmarks/cpu_fuse_24mp.py [--workdir DIR] [-- extra msidtrans-fuse options]

Makes the pair once in ``--workdir`` (JPEG, quality 95): the bundled sample photo mirrored into a
6000x4000 frame, each source blurred (Gaussian, radius 4) on one side of a wavy vertical line.
Then runs the command in a child process with the default options (``--tile auto``) and prints
one JSON line: the wall time, the child's CPU time (user + system, less sensitive to other load
on the machine than the wall time), its peak resident memory, and the command's closing line.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

WIDTH, HEIGHT = 6000, 4000
SAMPLE = Path(__file__).resolve().parents[1] / "msidtrans_fast" / "data" / "sample_near.png"


def make_pair(workdir: Path) -> tuple[Path, Path]:
    near, far = workdir / "near.jpg", workdir / "far.jpg"
    if near.is_file() and far.is_file():
        return near, far
    src = np.asarray(Image.open(SAMPLE).convert("RGB"))
    row = np.concatenate([src, src[:, ::-1]], 1)
    block = np.concatenate([row, row[::-1]], 0)
    reps = (-(-HEIGHT // block.shape[0]), -(-WIDTH // block.shape[1]), 1)
    sharp = np.tile(block, reps)[:HEIGHT, :WIDTH].copy()
    blur = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(4)))
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    left = (x < WIDTH / 2 + 300 * np.sin(y / 500.0))[..., None]
    Image.fromarray(np.where(left, sharp, blur)).save(near, quality=95)
    Image.fromarray(np.where(left, blur, sharp)).save(far, quality=95)
    return near, far


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/msidtrans-bench-24mp")
    p.add_argument("extra", nargs="*", help="more msidtrans-fuse options (after --)")
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    near, far = make_pair(workdir)
    command = [sys.executable, "-m", "msidtrans_fast.cli", str(near), str(far), "-o",
               str(workdir / "fused.jpg"), "--overwrite", "--device", "cpu", *args.extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "size": f"{WIDTH}x{HEIGHT}", "options": args.extra, "exit": done.returncode,
        "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024), "cpus": os.cpu_count(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 1),
        "closing_line": done.stdout.strip().splitlines()[-1:] or done.stderr.strip()[-300:],
    }))


if __name__ == "__main__":
    main()
