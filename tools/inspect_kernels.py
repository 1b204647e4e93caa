"""What the Triton kernels compile to on an H100 (sm_90) or A100 (sm_80), without a GPU.

    python tools/inspect_kernels.py [--arch 90] [--sizes 520x520 1024x768] [--dtypes fp32 bf16]
                                    [--all-configs]

Compiles ahead of time exactly the specialisations that launch for the given input sizes
(``HxW``): the whole network runs on the meta device (no memory, no arithmetic) to find every
attention layer's input; the fused path's launchers then run on meta tensors of those shapes and
strides (the token embedding produces the real q/k/v layout), with every kernel launch recorded
instead of run. Each recorded launch is specialised as Triton's launcher would specialise it
(integer arguments equal to 1 become constants; arguments and pointers divisible by 16 are marked
so), once per autotuning configuration that the tuner tries on that GPU (the tuning spaces less
the configurations that spill there with the installed Triton, ``msa_attention.launch_configs``;
``--all-configs``: the whole spaces, to re-check that list on another Triton release), and
compiled for the target with Triton's bundled ptxas.

One Markdown row per compiled kernel: tile sizes, warps, pipeline stages, shared memory (bytes),
registers and stack frame per thread (``cuobjdump --dump-resource-usage``; a stack frame means
spills), and instruction counts in the PTX: global loads by width (``ld.global`` ``.v4``/``.v2``
vectors and scalars, of any element type), ``cp.async`` copies (global to shared, the software
pipeline's multi-buffering) of 16 bytes and of fewer, and matrix instructions
(``wgmma.mma_async``: Hopper's warpgroup MMA; ``mma.sync``: the warp-level MMA of sm_80). The
counts are static (instructions in the code, not executed ones). Needs triton with its NVIDIA
backend; runs without ``TRITON_INTERPRET``. The result depends on the Triton version: run it with
the GPU machine's.
"""

from __future__ import annotations

import argparse
import contextlib
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
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from msidtrans_fast import MSIDTrans  # noqa: E402
from msidtrans_fast.embedding import token_embedding  # noqa: E402
from msidtrans_fast.modules import AttentionPreNorm  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
KERNELS = {  # module attribute -> label
    (A, "_msa_fwd_kernel"): "attention fwd",
    (A, "_msa_bwd_preprocess_kernel"): "attention bwd delta",
    (A, "_msa_bwd_dkdv_kernel"): "attention bwd dK dV",
    (A, "_msa_bwd_dq_kernel"): "attention bwd dQ",
    (E, "_ln_dwconv_fwd_kernel"): "cLN + dwconv fwd",
    (E, "_ln_dwconv_bwd_input_kernel"): "cLN + dwconv bwd input",
    (E, "_ln_dwconv_bwd_weight_kernel"): "cLN + dwconv bwd weight",
}
COLUMNS = ("ld.v4", "ld.v2", "ld.scalar", "cp.async16", "cp.async<16", "st.v4", "st.scalar",
           "wgmma", "mma.sync")


class _Recorder:
    """Stands in for a kernel (plain or autotuned): ``kernel[grid](*args, **kw)`` only records."""

    def __init__(self, kernel, label: str, log: list):
        self.kernel, self.label, self.log = kernel, label, log
        self.configs = getattr(kernel, "configs", None)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self, args, kwargs))


@contextlib.contextmanager
def recording(log: list):
    saved = {key: getattr(*key) for key in KERNELS}
    try:
        for (module, name), label in KERNELS.items():
            setattr(module, name, _Recorder(saved[(module, name)], label, log))
        yield
    finally:
        for (module, name), kernel in saved.items():
            setattr(module, name, kernel)


def attention_inputs(height: int, width: int) -> list[tuple[str, torch.Tensor, AttentionPreNorm]]:
    """(layer name, input x on meta, block) of every attention call of one eval forward."""
    model = MSIDTrans().to("meta").eval()
    model.backend = "reference"
    seen = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((names[m], args[0], m)))
             for m in model.modules() if isinstance(m, AttentionPreNorm)]
    with torch.no_grad():
        model(*(torch.empty(1, 3, height, width, device="meta") for _ in range(2)))
    for h in hooks:
        h.remove()
    return seen


def launches(height: int, width: int, dtype: torch.dtype) -> list:
    """Every kernel launch of the fused path's forward and backward at this size, recorded."""
    log: list = []
    done = set()
    for name, x, block in attention_inputs(height, width):
        key = (tuple(x.shape), block.fn.dim_head, block.fn.kv_stride)
        if key in done:  # t0's two layers launch identical specialisations
            continue
        done.add(key)
        x = x.to(dtype)
        block = block.to(dtype)
        q, k, v = token_embedding(x, block.norm, block.fn)
        h, w = x.shape[-2:]
        start = len(log)
        with recording(log):
            for stride in (1, block.fn.kv_stride):
                c = x.shape[1]
                g, b, wt = (torch.empty(s, device="meta", dtype=dtype) for s in
                            (c, c, (3, c, 3, 3)))
                y = E.ln_dwconv_forward(x, g, b, wt, stride, block.norm.eps)
                E.ln_dwconv_backward(torch.empty_like(y), x, g, b, wt, stride, block.norm.eps)
            out, lse = A.msa_attention_forward(q, k, v, (1, 2, 0), (h, w))
            A.msa_attention_backward(torch.empty_like(out), q, k, v, out, lse, (1, 2, 0))
        for i in range(start, len(log)):
            log[i] = (name.split(".")[0], *log[i])
    return log


def _configs(recorder: _Recorder, kwargs: dict, args: tuple, arch: int,
             every: bool = False) -> list[tuple[dict, dict]]:
    """(constexpr kwargs, options) per configuration the launch may run on a GPU of compute
    capability ``arch`` (the tuner's pruning applied), or of its whole tuning space (``every``)."""
    if recorder.configs is None:
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        return [(kwargs, opts)]
    dtype = args[0].dtype
    space = (A.configs_for(recorder.configs, dtype) if every else
             A.launch_configs(recorder.configs, dtype, divmod(arch, 10)))
    out = []
    for cfg in space:
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        out.append(({**kwargs, **cfg.kwargs}, opts))
    return out


def compile_launch(recorder: _Recorder, args: tuple, kwargs: dict, arch: int,
                   first_only: bool = False, every: bool = False) -> list:
    """Compiles the recorded launch as the launcher would specialise it: one kernel per config
    the tuner tries on that GPU (of the launch's dtype; only the first with ``first_only``; the
    whole tuning space with ``every``)."""
    fn = recorder.kernel
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kernels = []
    configs = _configs(recorder, dict(kwargs), args, arch, every)
    for consts, opts in configs[:1] if first_only else configs:
        bound, specialization, options = binder(*args, **consts, **opts)
        options, signature, constexprs, attrs = fn._pack_args(backend, {**consts, **opts}, bound,
                                                              specialization, options)
        src = ASTSource(fn, signature, constexprs, attrs)
        kernels.append((consts, triton.compile(src, target=target, options=options.__dict__)))
    return kernels


def cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resources(kernel) -> tuple[int, int]:
    """(registers, stack-frame bytes) per thread, from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def ptx_counts(ptx: str) -> dict[str, int]:
    """Static instruction counts of the columns in COLUMNS."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    loads = [ln for ln in lines if re.match(r"(@%p\d+\s+)?ld\.global", ln)]
    stores = [ln for ln in lines if re.match(r"(@%p\d+\s+)?st\.global", ln)]
    copies = [int(m.group(1), 0) for ln in lines if (m := re.match(
        r"(?:@%p\d+\s+)?cp\.async\.c[ag]\.shared\.global[^,]*,[^,]*,\s*(0x[0-9a-f]+|\d+)", ln))]
    return {
        "ld.v4": sum(".v4." in ln for ln in loads),
        "ld.v2": sum(".v2." in ln for ln in loads),
        "ld.scalar": sum(".v2." not in ln and ".v4." not in ln for ln in loads),
        "cp.async16": sum(size == 16 for size in copies),
        "cp.async<16": sum(size < 16 for size in copies),
        "st.v4": sum(".v4." in ln for ln in stores),
        "st.scalar": sum(".v2." not in ln and ".v4." not in ln for ln in stores),
        "wgmma": sum("wgmma.mma_async" in ln for ln in lines),
        "mma.sync": sum(ln.startswith("mma.sync") for ln in lines),
    }


def rows(sizes, dtypes, arch, every: bool = False) -> list[dict]:
    out, cache, seen = [], {}, set()
    for height, width in sizes:
        for dname in dtypes:
            for layer, recorder, args, kwargs in launches(height, width, DTYPES[dname]):
                for consts, kernel in compile_launch(recorder, args, kwargs, arch, every=every):
                    key = kernel.hash
                    if (height, width, layer, dname, key) in seen:  # e.g. q and kv at stride 1
                        continue
                    seen.add((height, width, layer, dname, key))
                    if key not in cache:
                        regs, stack = resources(kernel)
                        cache[key] = {"regs": regs, "stack": stack,
                                      "shared": kernel.metadata.shared,
                                      **ptx_counts(kernel.asm["ptx"])}
                    tiles = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_P")
                                     if k in consts)
                    out.append({"size": f"{height}x{width}", "layer": layer,
                                "kernel": recorder.label, "dtype": dname, "tiles": tiles,
                                "warps": kernel.metadata.num_warps,
                                "stages": kernel.metadata.num_stages, **cache[key]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    p.add_argument("--sizes", nargs="+", default=["520x520", "1024x768"],
                   help="input sizes HxW (default: 520x520 1024x768)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--all-configs", action="store_true",
                   help="every configuration of the tuning spaces, also those the tuner leaves "
                        "out on this GPU because they spill")
    a = p.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes]
    scope = "every configuration" if a.all_configs else "the configurations the tuner tries"
    print(f"Triton {triton.__version__}, target sm_{a.arch}, {scope}\n")
    head = ("size", "layer", "kernel", "dtype", "tiles", "warps", "stages", "shared", "regs",
            "stack", *COLUMNS)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows(sizes, a.dtypes, a.arch, a.all_configs):
        print("| " + " | ".join(str(r[h]) for h in head) + " |")


if __name__ == "__main__":
    main()
