"""Multi-scale flash attention as an autograd Function (kernels in ``kernels/msa_attention.py``).

``msa_attention(q, k, v, perm, out_hw)`` computes, for every image and group g = 0, 1, 2,
``softmax(q[perm[g]] k[g]^T / sqrt(d)) v[g]`` and writes it to channels ``g*d .. g*d+d-1`` of a
(b, 3d, H, W) tensor, the layout ``to_out`` consumes: the same numbers as
:func:`msidtrans_fast.reference.multi_scale_attention`, with memory linear in the token count.

Layout (channel-major, what a 1x1 projection produces flattened over its pixels):
    q: (b, 3, d, Nq), Nq = H * W in row-major pixel order; scale index on axis 1.
    k, v: (b, 3, d, Nk). Any strides are accepted (views into one (b, 3, 2d, Nk) key/value
    tensor, for example); nothing is copied. The fast case on a GPU: token stride 1 and every
    other stride a multiple of 16 elements (the token-padded layout that
    :func:`msidtrans_fast.embedding.token_embedding` produces), whatever Nq and Nk are.
CUDA tensors run compiled Triton; CPU tensors run the same kernels in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), for tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kernels import msa_attention as _kernels

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_perm(perm: Sequence[int]) -> tuple[int, int, int]:
    try:
        values = tuple(int(p) for p in perm)
    except (TypeError, ValueError):
        raise TypeError(f"perm must be a sequence of three ints, got {perm!r}") from None
    if sorted(values) != [0, 1, 2]:
        raise ValueError(f"perm must be a permutation of (0, 1, 2), got {perm!r}")
    return values


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: Sequence[int],
              out_hw: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int]]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[1] != _kernels.GROUPS:
            raise ValueError(f"{name} must have shape (b, 3, d, N), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of {_DTYPES}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[:3] != k.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and "
                         "head size")
    d = q.shape[2]
    if d > _kernels.MAX_HEAD_DIM:
        raise ValueError(f"head size {d} exceeds the supported maximum {_kernels.MAX_HEAD_DIM}")
    if len(out_hw) != 2:
        raise ValueError(f"out_hw must be (H, W), got {out_hw!r}")
    h, w = int(out_hw[0]), int(out_hw[1])
    if h * w != q.shape[3]:
        raise ValueError(f"out_hw {(h, w)} does not match the {q.shape[3]} query tokens")
    return _check_perm(perm), (h, w)


# The launchers as torch.library custom ops (with fake kernels), so that torch.compile and
# torch.library.opcheck can trace them; the autograd Function below calls them.
@torch.library.custom_op("msidtrans_fast::msa_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: list[int], height: int,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels.msa_attention_forward(q, k, v, perm, (height, width))


@_forward_op.register_fake
def _(q, k, v, perm, height, width):
    b, groups, d, n_q = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((b, groups * d, height, width)), q.new_empty((b, groups, n_q),
                                                                    dtype=lse_dtype)


@torch.library.custom_op("msidtrans_fast::msa_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, perm: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.msa_attention_backward(grad_out, q, k, v, out, lse, perm)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, perm):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class MultiScaleAttentionFunction(torch.autograd.Function):
    """Autograd Function of :func:`msa_attention`; saves q, k, v, the output and the fp32
    log-sum-exp only when an input needs a gradient (backward recomputes the probabilities)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, perm, out_hw):
        out, lse = _forward_op(q, k, v, list(perm), *out_hw)
        ctx.perm = perm
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        w = grad_out.shape[-1]
        if grad_out.stride(-1) != 1 or grad_out.stride(-2) != w:
            grad_out = grad_out.contiguous()  # the kernels need pixels contiguous per channel
        dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, list(ctx.perm))
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                None, None)


def msa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: Sequence[int],
                  out_hw: Sequence[int]) -> torch.Tensor:
    """Multi-scale attention, fused (Triton).

    Args:
        q: (b, 3, d, Nq) queries of the three scales, Nq = H * W (row-major pixels).
        k, v: (b, 3, d, Nk) keys and values of the three scales. q, k, v share dtype (fp16, bf16,
            fp32 or fp64) and device; any strides.
        perm: permutation of (0, 1, 2); group g pairs ``q[:, perm[g]]`` with ``k[:, g]`` and
            ``v[:, g]``.
        out_hw: (H, W).

    Returns:
        (b, 3 * d, H, W) in q's dtype, contiguous; channel ``g * d + c`` is group g's channel c.

    Raises:
        TypeError: a non-tensor, an unsupported or mixed dtype, a perm that is not integers.
        ValueError: wrong shapes, mismatched devices, head size > 128, a bad perm or out_hw.
    """
    perm, out_hw = _validate(q, k, v, perm, out_hw)
    return MultiScaleAttentionFunction.apply(q, k, v, perm, out_hw)
