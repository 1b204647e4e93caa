"""Whole-model benchmarks: our backends against the two baselines, in one run (CUDA only).

    python -m pytest benchmarks/bench_model.py --benchmark-json=model.json
    python -m pytest benchmarks/bench_model.py -k "train_step or 520"     # a subset

Runners (built by ``baselines.build_runner``, each on its own copy of one seeded model):
``triton`` and ``reference`` (our backends, eager), ``original`` (baseline 1: the reference path
with the original code's two costs, materialised N x N attention and a numpy/PyWavelets round trip
through the CPU for every Haar split) and ``pytorch_best`` (baseline 2: the reference path with
SDPA, device Haar split, folded BatchNorm, channels_last and ``torch.compile(mode="max-autotune")``,
which adds CUDA graphs).

Cases (fixed attention permutations ``Q_PERMS`` everywhere, so compiled code is reused):

* ``eval_fwd``: batch 1, square 520, 1024, 2048 in fp32 and in bf16 autocast, and 4096 in bf16 (the
  "one pass within 80 GB" target), under ``torch.no_grad()``: all four runners. ``original`` is
  skipped, with the figures, where its attention matrices
  (``baselines.materialized_attention_bytes``, about 0.023 x side^4 bytes in fp32) exceed 90% of
  the free GPU memory.
* ``train_fwd_bwd``: batch 1, 520 to 2048, fp32 and bf16: forward and backward of ``D.mean()``
  (train mode, BatchNorm on batch statistics): ``triton`` and ``reference``.
* ``train_step``: the original recipe's step, batch 8 at 224x224 with bf16 autocast: forward, the
  training loss (``msidtrans_loss`` against a fixed random binary map), backward and a fused AdamW
  step (lr 2e-4): ``triton``, ``reference`` and ``pytorch_best`` (compiled forward and backward;
  the loss and the optimizer run eager, the same for all three).

Each case runs three warm-up calls (compilation, autotuning and CUDA graph recording happen there;
``compile_s`` is the first call's time), one call for the peak memory, then five timed rounds.
``extra_info``: runner, size, batch, mode, dtype, megapixels/s and pairs/s of the median, peak
memory, compile time and, for compiled runners, the mode, graph breaks and CUDA graph skips, with
device and versions. Every call ends with ``torch.cuda.synchronize()``; nothing asserts speed. A
size that runs out of memory is skipped with the message. Without CUDA everything skips.

``MSID_BENCH_COMPILE_MODE`` overrides the compile mode of ``pytorch_best`` (default
"max-autotune"; "max-autotune-no-cudagraphs" or "default" compile faster).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import pytest
import torch

from msidtrans_fast import MSIDTrans
from msidtrans_fast.losses import msidtrans_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import COMPILE_MODE, build_runner, materialized_attention_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="model benchmarks need a CUDA GPU (none here)")

Q_PERMS = [(1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2)]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
WARMUP_CALLS = 3
ROUNDS = 5
#: Share of the free GPU memory the original's attention matrices may take before it is skipped.
ORIGINAL_MEMORY_SHARE = 0.9
TRAIN_BATCH, TRAIN_SIZE, TRAIN_LR = 8, 224, 2e-4


def _cases() -> list:
    """(runner, mode, size, batch, dtype name) for every measurement."""
    cases = []
    for size, dtype in [(s, d) for s in (520, 1024, 2048) for d in DTYPES] + [(4096, "bf16")]:
        for runner in ("triton", "reference", "original", "pytorch_best"):
            cases.append((runner, "eval_fwd", size, 1, dtype))
    for size in (520, 1024, 2048):
        for dtype in DTYPES:
            for runner in ("triton", "reference"):
                cases.append((runner, "train_fwd_bwd", size, 1, dtype))
    for runner in ("triton", "reference", "pytorch_best"):
        cases.append((runner, "train_step", TRAIN_SIZE, TRAIN_BATCH, "bf16"))
    return cases


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    """Each case compiles from scratch and leaves no compiled code or CUDA graph pool behind."""
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    reset_cudagraph_trees()
    torch.cuda.empty_cache()


def _case_id(case) -> str:
    runner, mode, size, batch, dtype = case
    return f"{mode}-{size}x{batch}-{dtype}-{runner}"


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_model(benchmark, case):
    import triton
    from torch._dynamo.utils import counters

    runner_name, mode, size, batch, dtype_name = case
    autocast_dtype = DTYPES[dtype_name]
    benchmark.group = f"model-{mode}-{size}x{batch}-{dtype_name}"
    if runner_name == "original":
        need = materialized_attention_bytes(size, size, batch, autocast_dtype)
        free = torch.cuda.mem_get_info()[0]
        if need > ORIGINAL_MEMORY_SHARE * free:
            pytest.skip(f"original: its attention matrices need {need / 2 ** 30:.1f} GiB, "
                        f"{free / 2 ** 30:.1f} GiB free")

    torch.manual_seed(0)
    model = MSIDTrans().cuda().train(mode != "eval_fwd")
    compile_mode = os.environ.get("MSID_BENCH_COMPILE_MODE", COMPILE_MODE)
    runner = build_runner(runner_name, model, q_perms=Q_PERMS, autocast_dtype=autocast_dtype,
                          compile_mode=compile_mode)
    del model
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.rand(batch, 3, size, size, device="cuda", generator=gen) * 2 - 1
    b = torch.rand(batch, 3, size, size, device="cuda", generator=gen) * 2 - 1
    dm = (torch.rand(batch, 1, size, size, device="cuda", generator=gen) > 0.5).float()
    optimizer = None
    if mode == "train_step":
        optimizer = torch.optim.AdamW(runner.module.parameters(), lr=TRAIN_LR, weight_decay=0.0,
                                      fused=True)

    def fn():
        if mode == "eval_fwd":
            with torch.no_grad():
                out = runner(a, b)
        elif mode == "train_fwd_bwd":
            out = runner(a, b)
            out.float().mean().backward()
        else:
            optimizer.zero_grad(set_to_none=True)
            out, _ = msidtrans_loss(runner(a, b), dm)
            out.backward()
            optimizer.step()
        torch.cuda.synchronize()
        return out

    counters.clear()
    try:
        start = time.perf_counter()
        fn()
        compile_s = time.perf_counter() - start
        for _ in range(WARMUP_CALLS - 1):
            fn()
        torch.cuda.reset_peak_memory_stats()
        fn()
    except torch.OutOfMemoryError as error:
        pytest.skip(f"out of memory: {str(error).splitlines()[0]}")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    info = {
        "runner": runner_name, "backend": runner_name, "size": size, "batch": batch,
        "mode": mode, "dtype": dtype_name,
        "megapixels_per_s": batch * size * size / median / 1e6, "pairs_per_s": batch / median,
        "peak_mem_gib": peak, "compile_s": compile_s, "compiled": runner.compiled,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version()}
    if runner.compiled:
        info.update({"compile_mode": compile_mode,
                     "graph_breaks": sum(counters["graph_break"].values()),
                     "cudagraph_skips": counters["inductor"]["cudagraph_skips"]})
    benchmark.extra_info.update(info)
