"""Attention and token-embedding benchmarks on the real layer shapes (CUDA only).

    python -m pytest benchmarks/bench_attention.py --benchmark-json=attention.json

Shapes: the three Transformer stages of a 520x520, 1024x1024 and 2048x2048 input, batch 1:
t0 at H4 x W4 (dim 64, dim_head 64), tu1 at H3 x W3 (48, 48), tu2 at H2 x W2 (32, 32, kv stride 2).

Attention compares, from the layout the embedding produces (q (b, 3, d, N), k/v halves of one
(b, 3, 2d, Nk) tensor):
- ``ours``: :func:`msidtrans_fast.attention.msa_attention`, output straight in (b, 3d, H, W);
- ``sdpa_flash`` / ``sdpa_efficient``: ``scaled_dot_product_attention`` restricted to one backend,
  *including* the copies it needs (gather the permuted q, transpose to token-major contiguous, and
  transpose the output back to (b, 3d, H, W));
- ``materialized``: the original's full softmax(QK^T)V (``reference.multi_scale_attention(...,
  materialize=True)``), skipped where its N x Nk matrices would not fit in free memory.
Forward and forward+backward, bf16 and fp32 (flash has no fp32 kernel). ``extra_info`` holds the
analytic FLOP count (flash-attention's convention: forward 4 N Nk d per group, backward 2.5 times
that), the achieved TFLOP/s from the median, peak memory above the inputs, device and versions.
The embedding compares :func:`msidtrans_fast.embedding.token_embedding` with the unfused PyTorch
modules (cLN, ``MultiScaleAttention.embed``, then the stack/transpose into the same layout).

Timing: every call ends with ``torch.cuda.synchronize()`` so pytest-benchmark's wall clock covers
the GPU work. Nothing here asserts speed. Without CUDA every benchmark skips (with the reason).
"""

from __future__ import annotations

import math
import platform

import pytest
import torch
import torch.nn.functional as F

from msidtrans_fast import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="attention benchmarks need a CUDA GPU (none here)")

SIZES = (520, 1024, 2048)
#: name -> (downsampling steps from the input, dim, dim_head, kv_stride)
LAYERS = {"t0": (4, 64, 64, 1), "tu1": (3, 48, 48, 1), "tu2": (2, 32, 32, 2)}
PERM = (2, 0, 1)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("ours", "sdpa_flash", "sdpa_efficient", "materialized")


def layer_shape(size: int, layer: str) -> tuple[int, int, int, int, int]:
    """(H, W, d, Hk, Wk) of a layer for a size x size input."""
    steps, _, d, stride = LAYERS[layer]
    side = size
    for _ in range(steps):
        side = math.ceil(side / 2)
    kv_side = (side - 1) // stride + 1
    return side, side, d, kv_side, kv_side


def attention_flops(n: int, n_k: int, d: int, batch: int = 1, backward: bool = False) -> float:
    forward = 4.0 * batch * 3 * n * n_k * d
    return forward * (3.5 if backward else 1.0)


def _provenance(dtype_name: str) -> dict:
    import triton
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "dtype": dtype_name}


def _run(benchmark, fn, flops: float | None, info: dict, rounds: int = 10) -> None:
    """Benchmarks ``fn`` (synchronised) and records FLOP/s and peak memory in extra_info."""
    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    timed()  # compile / warm up outside the measurement
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    timed()
    info["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if flops is not None:
        info["gflop"] = flops / 1e9
        info["tflops"] = flops / median / 1e12
    benchmark.extra_info.update(info)


def _make_inputs(size, layer, dtype, requires_grad):
    h, w, d, hk, wk = layer_shape(size, layer)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 3, d, h * w, device="cuda", dtype=dtype, generator=gen)
    kv = torch.randn(1, 3, 2 * d, hk * wk, device="cuda", dtype=dtype, generator=gen)
    q.requires_grad_(requires_grad)
    kv.requires_grad_(requires_grad)
    return q, kv[:, :, :d], kv[:, :, d:], (h, w)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v, hw):
        qs = q[:, list(PERM)].transpose(2, 3).contiguous()
        ks, vs = k.transpose(2, 3).contiguous(), v.transpose(2, 3).contiguous()
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qs, ks, vs)
        b, g, n, d = out.shape
        return out.transpose(2, 3).reshape(b, g * d, *hw)
    return attend


def _impl(name):
    if name == "ours":
        from msidtrans_fast.attention import msa_attention
        return lambda q, k, v, hw: msa_attention(q, k, v, PERM, hw)
    if name == "materialized":
        def attend(q, k, v, hw):
            split = [lambda t, i=i: t[:, i].transpose(1, 2) for i in range(3)]
            return reference.multi_scale_attention([f(q) for f in split], [f(k) for f in split],
                                                   [f(v) for f in split], PERM, hw,
                                                   materialize=True)
        return attend
    from torch.nn.attention import SDPBackend
    return _sdpa(SDPBackend.FLASH_ATTENTION if name == "sdpa_flash"
                 else SDPBackend.EFFICIENT_ATTENTION)


def _skip_reason(impl, size, layer, dtype, backward):
    h, w, d, hk, wk = layer_shape(size, layer)
    if impl == "sdpa_flash" and dtype == torch.float32:
        return "SDPA's flash backend has no fp32 kernel"
    if impl == "materialized":
        # scores + probabilities (+ their gradients in backward), 3 groups
        matrices = 4 if backward else 2
        need = matrices * 3 * h * w * hk * wk * torch.finfo(dtype).bits // 8
        free = torch.cuda.mem_get_info()[0]
        if need > 0.8 * free:
            return f"the materialised attention needs {need / 2**30:.1f} GiB"
    return None


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_attention(benchmark, direction, size, layer, impl, dtype_name):
    dtype = DTYPES[dtype_name]
    backward = direction == "fwd_bwd"
    reason = _skip_reason(impl, size, layer, dtype, backward)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"attention-{direction}-{layer}-{size}-{dtype_name}"
    q, k, v, hw = _make_inputs(size, layer, dtype, backward)
    attend = _impl(impl)
    h, w, d, hk, wk = layer_shape(size, layer)
    if backward:
        grad = torch.randn(1, 3 * d, h, w, device="cuda", dtype=dtype)

        def fn():
            out = attend(q, k, v, hw)
            return torch.autograd.grad(out, (q, k, v), grad)
    else:
        def fn():
            with torch.no_grad():
                return attend(q, k, v, hw)
    info = {"impl": impl, "layer": layer, "size": size, "n_q": h * w, "n_k": hk * wk,
            "dim_head": d, **_provenance(dtype_name)}
    _run(benchmark, fn, attention_flops(h * w, hk * wk, d, backward=backward), info)


def _embedding_layer(layer, dtype):
    from msidtrans_fast.modules import ChannelLayerNorm, MultiScaleAttention
    _, dim, d, stride = LAYERS[layer]
    torch.manual_seed(0)
    norm = ChannelLayerNorm(dim).cuda().to(dtype)
    attn = MultiScaleAttention(dim, d, stride).cuda().to(dtype)
    return norm, attn


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("impl", ["ours", "pytorch"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["eval_fwd", "train_fwd_bwd"])
def test_embedding(benchmark, mode, size, layer, impl, dtype_name):
    from msidtrans_fast.embedding import token_embedding
    dtype = DTYPES[dtype_name]
    train = mode == "train_fwd_bwd"
    benchmark.group = f"embedding-{mode}-{layer}-{size}-{dtype_name}"
    norm, attn = _embedding_layer(layer, dtype)
    norm.train(train)
    attn.train(train)
    h, w, d, hk, wk = layer_shape(size, layer)
    dim = LAYERS[layer][1]
    x = torch.randn(1, dim, h, w, device="cuda", dtype=dtype, requires_grad=train)

    def embed():
        if impl == "ours":
            return token_embedding(x, norm, attn)
        qs, ks, vs = attn.embed(norm(x))
        return tuple(torch.stack(t, 1).transpose(2, 3).contiguous() for t in (qs, ks, vs))

    if train:
        def fn():
            loss = sum(o.float().sum() for o in embed())
            return torch.autograd.grad(loss, [x, *attn.parameters()], allow_unused=True)
    else:
        def fn():
            with torch.no_grad():
                return embed()
    info = {"impl": impl, "layer": layer, "size": size, "pixels": h * w, "dim": dim,
            **_provenance(dtype_name)}
    _run(benchmark, fn, None, info)
