"""The Triton kernels compile for a Hopper GPU (sm_90), checked without one.

The interpreter runs the kernels' arithmetic but never the GPU compiler, which rejects things the
interpreter accepts (layouts, dot operand types, unsupported ops). Triton can compile ahead of
time for a named target with its bundled ptxas, so this test compiles a representative set of
kernels (every kernel, the odd head size 48, fp32 and bf16) in a subprocess without
``TRITON_INTERPRET``. It does not run them: GPU numerics are tested by the GPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    from msidtrans_fast.kernels import msa_attention as A
    from msidtrans_fast.kernels import token_embedding as E

    assert not isinstance(A._msa_fwd_kernel, InterpretedFunction)
    TARGET = GPUTarget("cuda", 90, 32)
    FLOATS = ("qk_scale", "sm_scale", "eps")

    def build(fn, pointers, consts, options):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            else:
                sig[name] = pointers.get(name, "fp32" if name in FLOATS else "i32")
        triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=options)
        print("compiled", fn.__name__)

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        p = "*" + name
        cfg, opts = A._config(dtype, 48, forward=True)
        build(A._msa_fwd_kernel, dict(Q=p, K=p, V=p, OUT=p, LSE="*fp32"), cfg, opts)
        if dtype == torch.float32:
            continue
        cfg, opts = A._config(dtype, 48, forward=False)
        stats = dict(LSE="*fp32", DELTA="*fp32")
        build(A._msa_bwd_dkdv_kernel, dict(Q=p, K=p, V=p, DO=p, DK=p, DV=p, **stats), cfg, opts)
        build(A._msa_bwd_dq_kernel, dict(Q=p, K=p, V=p, DO=p, DQ=p, **stats), cfg, opts)
        pre = {k: cfg[k] for k in ("HEAD_DIM", "BLOCK_M", "BLOCK_D", "ACC_DTYPE")}
        build(A._msa_bwd_preprocess_kernel, dict(OUT=p, DO=p, DELTA="*fp32"), pre,
              {"num_warps": 4})
    cfg = E._config(torch.empty(1, 48, 1, 1))
    p = "*fp32"
    build(E._ln_dwconv_fwd_kernel, dict(X=p, G=p, B=p, W=p, Y=p), cfg, {"num_warps": E.NUM_WARPS})
    build(E._ln_dwconv_bwd_input_kernel,
          dict(X=p, G=p, B=p, W=p, DY=p, DX=p, DG_PART=p, DB_PART=p), cfg,
          {"num_warps": E.NUM_WARPS})
    build(E._ln_dwconv_bwd_weight_kernel, dict(X=p, G=p, B=p, DY=p, DW_PART=p), cfg,
          {"num_warps": E.NUM_WARPS})
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend (with ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 8
