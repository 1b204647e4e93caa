"""The Triton kernels compile for a Hopper GPU (sm_90), checked without one.

The interpreter runs the kernels' arithmetic but never the GPU compiler, which rejects things the
interpreter accepts (layouts, dot operand types, unsupported ops). Triton can compile ahead of
time for a named target with its bundled ptxas, so this test compiles, in a subprocess without
``TRITON_INTERPRET``, the specialisations that launch for the tu1 layer (head size 48, token
count 4225: an odd size on the token-padded layout) of a 520x520 input, found by
``tools/inspect_kernels.py``: every kernel in bf16 (the first configuration its tuner tries), the
attention kernels in fp32 and fp64 (the gradcheck dtype on a GPU). It does not run them: GPU
numerics are tested by the GPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import inspect_kernels as ik

    ATTENTION = ("attention fwd", "attention bwd delta", "attention bwd dK dV", "attention bwd dQ")
    compiled = set()
    for dtype in ("bf16", "fp32", "fp64"):
        for layer, rec, args, kwargs in ik.launches(520, 520, ik.DTYPES[dtype]):
            if layer != "tu1" or (dtype != "bf16" and rec.label not in ATTENTION):
                continue
            for _, kernel in ik.compile_launch(rec, args, kwargs, 90, first_only=True):
                assert kernel.asm["cubin"]
                compiled.add((rec.label, dtype))
    for label, dtype in sorted(compiled):
        print("compiled", label, dtype)
""")


@pytest.mark.slow
def test_launched_kernels_compile_for_sm90():
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend (with ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO_ROOT / "tools")],
                            capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 7 + 4 + 4, result.stdout
