"""Whole-model benchmarks: backend "triton" against "reference" (CUDA only).

    python -m pytest benchmarks/bench_model.py --benchmark-json=model.json

Batch 1, square inputs of 520, 1024 and 2048 pixels (and 4096 for bf16 inference, the issue's
"one pass within 80 GB" target): eval forward (fp32, and bf16 under ``torch.autocast``) and train
forward+backward (fp32, and bf16 autocast). ``extra_info`` holds megapixels/s (input pixels per
second of the median), peak memory, device and versions. A size that runs out of memory is skipped
with the amount it asked for. Every call ends with ``torch.cuda.synchronize()``; nothing asserts
speed. Without CUDA every benchmark skips (with the reason).
"""

from __future__ import annotations

import platform

import pytest
import torch

from msidtrans_fast import MSIDTrans

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="model benchmarks need a CUDA GPU (none here)")

CASES = [(s, m, d) for s in (520, 1024, 2048) for m in ("eval_fwd", "train_fwd_bwd")
         for d in ("fp32", "bf16")] + [(4096, "eval_fwd", "bf16")]
Q_PERMS = [(1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2)]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-{}-{}".format(*c))
def test_model(benchmark, case, backend):
    import triton

    size, mode, dtype_name = case
    train = mode == "train_fwd_bwd"
    benchmark.group = f"model-{mode}-{size}-{dtype_name}"
    torch.manual_seed(0)
    model = MSIDTrans(backend=backend).cuda().train(train)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.rand(1, 3, size, size, device="cuda", generator=gen) * 2 - 1
    b = torch.rand(1, 3, size, size, device="cuda", generator=gen) * 2 - 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype_name == "bf16")

    def fn():
        with autocast:
            if train:
                out = model(a, b, q_perms=Q_PERMS)
                out.float().mean().backward()
            else:
                with torch.no_grad():
                    out = model(a, b, q_perms=Q_PERMS)
        torch.cuda.synchronize()
        return out

    try:
        fn()  # compile / warm up
        torch.cuda.reset_peak_memory_stats()
        fn()
    except torch.OutOfMemoryError as error:
        pytest.skip(f"out of memory: {str(error).splitlines()[0]}")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "backend": backend, "size": size, "mode": mode, "dtype": dtype_name,
        "megapixels_per_s": size * size / median / 1e6, "peak_mem_gib": peak,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version()})
