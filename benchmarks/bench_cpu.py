"""CPU benchmarks: the eval forward and ``fuse()`` against the original's cost model, one run.

    python -m pytest benchmarks/bench_cpu.py --benchmark-json=cpu.json
    python -m pytest benchmarks/bench_cpu.py -k 520          # a subset

Cases (batch 1, square sides 520 and 1024, the machine's default intra-op threads):

* ``forward``: ``original`` (the original network's costs, ``baselines.original_emulation``:
  materialised attention, PyWavelets round trip per Haar split; fp32, contiguous), and ours in
  ``fp32``, ``mixed``, ``bf16`` and the ``auto`` precision (``weights.auto_precision("cpu")``;
  skipped as the case it equals), weights in the CPU layout of ``weights.load_model``.
  ``original`` is skipped at 1024x1024, where its attention matrices alone need 25.8 GB.
* ``fuse``: ``msidtrans_fast.fuse`` of one pair of uint8 RGB arrays end to end, model cached,
  ``dtype="float32"`` and ``"auto"`` (skipped where auto is float32).

``extra_info``: CPU model, its bf16/AVX flags, threads, the dtype used, torch. Nothing asserts
speed; the speed-ups are the ratios of the medians (benchmarks/RESULTS.md), and
``benchmarks/cpu_forward.py`` measures the same modes interleaved and the peak memory per process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from msidtrans_fast import weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import materialized_attention_bytes  # noqa: E402
from cpu_forward import cpu_description, make_runner  # noqa: E402

SIZES = (520, 1024)
ROUNDS = {520: 3, 1024: 1}


def _info(benchmark, size, mode):
    benchmark.extra_info.update({"size": size, "mode": mode, "threads": torch.get_num_threads(),
                                 "auto_precision": weights.auto_precision("cpu"),
                                 "torch": torch.__version__, **cpu_description()})


def _auto_mode() -> str:
    return {"bfloat16": "bf16", "mixed": "mixed"}.get(weights.auto_precision("cpu"), "fp32")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["original", "fp32", "mixed", "bf16", "auto"])
def test_cpu_forward(benchmark, size, mode):
    if mode == "original":
        need = materialized_attention_bytes(size, size)
        if need > 0.5 * 24 * 2**30:
            pytest.skip(f"the original's attention matrices need {need / 2**30:.1f} GiB")
    if mode == "auto":
        pytest.skip(f"auto is {_auto_mode()} on this machine: measured by that case")
    benchmark.group = f"cpu-forward-{size}"
    run = make_runner(mode, size)
    benchmark.pedantic(run, rounds=ROUNDS[size], iterations=1, warmup_rounds=1)
    _info(benchmark, size, mode)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_cpu_fuse(benchmark, size, dtype):
    if dtype == "auto" and _auto_mode() == "fp32":
        pytest.skip("auto is float32 on this machine: measured by the fp32 case")
    benchmark.group = f"cpu-fuse-{size}"
    run = make_runner(f"fuse-{dtype}", size)
    benchmark.pedantic(run, rounds=ROUNDS[size], iterations=1, warmup_rounds=1)
    _info(benchmark, size, f"fuse-{dtype}")
