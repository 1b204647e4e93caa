"""What the Triton kernels compile to on a Hopper GPU (sm_90), without a GPU.

    python tools/inspect_kernels.py [--arch 90]

Compiles every attention and embedding kernel ahead of time with the launch configurations the
wrappers use (``kernels.msa_attention._config``, ``kernels.token_embedding._config``), for each
head size (32, 48, 64) and dtype, and prints one Markdown row per kernel: warps, pipeline stages,
shared memory (Triton's allocation, bytes), registers and stack-frame bytes per thread from
``cuobjdump --dump-resource-usage`` on the cubin (a stack frame here means register spills), and
the matrix instructions in the PTX (``wgmma.mma_async``: Hopper's asynchronous warpgroup MMA;
``mma.sync``: the older warp-level MMA).

Needs triton with its NVIDIA backend (bundled ptxas and cuobjdump); must run without
``TRITON_INTERPRET``. The result depends on the Triton version and its ptxas: run it with the
Triton the GPU machine uses.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from msidtrans_fast.kernels import msa_attention as A  # noqa: E402
from msidtrans_fast.kernels import token_embedding as E  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FLOAT_ARGS = ("qk_scale", "sm_scale", "eps")
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def compile_kernel(fn, pointers: dict, consts: dict, options: dict, arch: int):
    sig = {name: "constexpr" if name in consts else
           pointers.get(name, "fp32" if name in FLOAT_ARGS else "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                          options=options)


def resources(kernel) -> tuple[int, int]:
    """(registers, stack-frame bytes) per thread, from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(regs.group(1)), int(stack.group(1))


def row(label: str, dtype: str, head_dim: int | str, kernel) -> str:
    regs, stack = resources(kernel)
    ptx = kernel.asm["ptx"]
    md = kernel.metadata
    return (f"| {label} | {dtype} | {head_dim} | {md.num_warps} | {md.num_stages} | {md.shared} | "
            f"{regs} | {stack} | {ptx.count('wgmma.mma_async')} | {ptx.count('mma.sync')} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    arch = p.parse_args().arch
    print(f"Triton {triton.__version__}, target sm_{arch}\n")
    print("| kernel | dtype | head/channels | warps | stages | shared B | regs | stack B | "
          "wgmma | mma.sync |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype, name in DTYPES.items():
        ptr = "*" + name
        stats = dict(LSE="*fp32", DELTA="*fp32")
        for d in (32, 48, 64):
            for wide in ((True, False) if dtype != torch.float32 else (False,)):
                cfg, opts = A._config(dtype, d, forward=True, programs_if_wide=int(wide), num_sms=1)
                k = compile_kernel(A._msa_fwd_kernel, dict(Q=ptr, K=ptr, V=ptr, OUT=ptr,
                                                           LSE="*fp32"), cfg, opts, arch)
                print(row(f"attention fwd ({cfg['BLOCK_M']}x{cfg['BLOCK_N']})", name, d, k))
            cfg, opts = A._config(dtype, d, forward=False)
            k = compile_kernel(A._msa_bwd_dkdv_kernel, dict(Q=ptr, K=ptr, V=ptr, DO=ptr, DK=ptr,
                                                            DV=ptr, **stats), cfg, opts, arch)
            print(row("attention bwd dK dV", name, d, k))
            k = compile_kernel(A._msa_bwd_dq_kernel, dict(Q=ptr, K=ptr, V=ptr, DO=ptr, DQ=ptr,
                                                          **stats), cfg, opts, arch)
            print(row("attention bwd dQ", name, d, k))
        for c in (32, 48, 64):
            cfg = E._config(torch.empty(1, c, 1, 1, dtype=dtype))
            ptrs = dict(X=ptr, G=ptr, B=ptr, W=ptr, Y=ptr, DY=ptr, DX=ptr, DG_PART=ptr,
                        DB_PART=ptr, DW_PART=ptr)
            for label, fn in (("cLN + dwconv fwd", E._ln_dwconv_fwd_kernel),
                              ("cLN + dwconv bwd input", E._ln_dwconv_bwd_input_kernel),
                              ("cLN + dwconv bwd weight", E._ln_dwconv_bwd_weight_kernel)):
                k = compile_kernel(fn, ptrs, cfg, {"num_warps": E.NUM_WARPS}, arch)
                print(row(label, name, c, k))


if __name__ == "__main__":
    main()
