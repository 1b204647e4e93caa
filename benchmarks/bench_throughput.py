"""End-to-end throughput of ``msidtrans-fuse --dataset`` on a folder of 520x520 pairs.

    python -m pytest benchmarks/bench_throughput.py --benchmark-json=throughput.json

A folder of synthetic 520x520 RGB PNG pairs (``sourceA/``, ``sourceB/``) is fused by the command's
entry point in-process, decoding, network, consistency check, blending and PNG encoding included,
with the background decode/encode threads (``cli.IO_THREADS = 2``, the default) and without them
(``0``).
The device is the command's default (a CUDA GPU when present, else the CPU) in float32 and, on
CUDA, bfloat16. ``extra_info`` holds pairs per second from the median, device and versions.
The bundled weights are used when present, otherwise the seeded untrained network (the time does
not depend on the weights). Nothing asserts speed.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from msidtrans_fast import cli, io, pipeline

SIDE = 520
PAIRS = 32 if torch.cuda.is_available() else 3
DTYPES = ["float32", "bfloat16"] if torch.cuda.is_available() else ["float32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("throughput") / "Pairs"
    rng = np.random.default_rng(0)
    for sub in ("sourceA", "sourceB"):
        (root / sub).mkdir(parents=True)
    for i in range(PAIRS):
        sharp = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        blurred = ((sharp.astype(np.uint16) + np.roll(sharp, 1, axis=0)) // 2).astype(np.uint8)
        io.write_image(root / "sourceA" / f"{i:03d}.png", sharp)
        io.write_image(root / "sourceB" / f"{i:03d}.png", blurred)
    return root


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("io_threads", [2, 0])
def test_dataset_throughput(benchmark, dataset, tmp_path, monkeypatch, io_threads, dtype):
    monkeypatch.setattr(cli, "IO_THREADS", io_threads)
    benchmark.group = f"fuse-dataset-{SIDE}-{dtype}"
    pipeline.clear_model_cache()
    runs = iter(range(1000))

    def fuse_folder():
        code = cli.main(["--dataset", str(dataset), "-o", str(tmp_path / f"run{next(runs)}"),
                         "--dtype", dtype, "--quiet"])
        assert code == 0

    fuse_folder()  # loads the model, compiles kernels
    benchmark.pedantic(fuse_folder, rounds=3, iterations=1, warmup_rounds=0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    benchmark.extra_info.update({
        "pairs": PAIRS, "side": SIDE, "io_threads": io_threads, "dtype": dtype,
        "pairs_per_s": PAIRS / benchmark.stats.stats.median, "device": device or "cpu",
        "torch": torch.__version__, "python": platform.python_version()})
