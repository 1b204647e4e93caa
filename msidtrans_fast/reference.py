"""Plain-PyTorch reference implementations of MSI-DTrans's special operations.

These functions are the oracle that every fused kernel is checked against, and they are what the
"reference" backend runs. All tensors are NCHW unless stated otherwise. Everything here is
differentiable through ordinary autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Epsilon of the channel LayerNorm (`cLN`) and of every BatchNorm in the network.
NORM_EPS = 1e-5

#: The dilations of the three token-embedding scales ("dynamic sense field").
SCALES = (1, 2, 4)


def haar_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-level 2-D Haar transform, identical to ``pywt.dwt2(x, 'haar', mode='zero')``.

    Args:
        x: (b, C, H, W) floating tensor.

    Returns:
        ``(low, high)``: low is cA, (b, C, ceil(H/2), ceil(W/2)); high is
        ``cat([cH, cV, cD], dim=1)``, (b, 3C, ceil(H/2), ceil(W/2)) (all cH channels first).

    An odd H or W is padded with one zero row/column at the bottom/right. For each 2x2 block
    ``[[a, b], [c, d]]``: cA = (a+b+c+d)/2, cH = (a+b-c-d)/2, cV = (a-b+c-d)/2, cD = (a-b-c+d)/2.
    """
    if x.dim() != 4:
        raise ValueError(f"haar_split expects a (b, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
    a = x[..., 0::2, 0::2]
    b = x[..., 0::2, 1::2]
    c = x[..., 1::2, 0::2]
    d = x[..., 1::2, 1::2]
    top, bottom = a + b, c + d
    left_minus_right_top, left_minus_right_bottom = a - b, c - d
    low = (top + bottom) * 0.5
    c_h = (top - bottom) * 0.5
    c_v = (left_minus_right_top + left_minus_right_bottom) * 0.5
    c_d = (left_minus_right_top - left_minus_right_bottom) * 0.5
    return low, torch.cat([c_h, c_v, c_d], dim=1)


def channel_layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                       eps: float = NORM_EPS) -> torch.Tensor:
    """LayerNorm over the channel axis only (per pixel), the original's ``LayerNorm`` module.

    Args:
        x: (b, C, H, W). g, b: (1, C, 1, 1) scale and shift.

    Returns ``(x - mean_C) / sqrt(var_C + eps) * g + b`` with the biased variance.
    """
    mean = x.mean(dim=1, keepdim=True)
    var = (x - mean).square().mean(dim=1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * g + b


def multi_scale_attention(q: Sequence[torch.Tensor], k: Sequence[torch.Tensor],
                          v: Sequence[torch.Tensor], perm: Sequence[int],
                          out_hw: tuple[int, int], materialize: bool = False,
                          channels_last: bool = False) -> torch.Tensor:
    """The dynamic multi-scale attention of MSI-DTrans, without any N x N buffer.

    Args:
        q: three (b, N, d) query tensors, one per scale (N = H * W, row-major pixels).
        k, v: three (b, Nk, d) key/value tensors, one per scale.
        perm: permutation of (0, 1, 2); group g pairs ``q[perm[g]]`` with ``k[g]``, ``v[g]``.
        out_hw: (H, W) with H * W == N.
        materialize: compute ``softmax(q k^T / sqrt(d)) v`` with the full matrix, as the original
            does (for baselines and tests only: memory grows as N * Nk).
        channels_last: return the result in channels_last memory. The stacked q, k and v are
            then stored as (b, N, 3, d), so that an attention kernel that keeps the query's
            layout (PyTorch's CPU kernels do) writes its output in the result's order: no copy.

    Returns:
        (b, 3 * d, H, W), channel ``g * d + c`` holding group g's channel c; contiguous, or
        channels_last when asked.
    """
    dim = 2 if channels_last else 1  # the axis of the three groups in memory
    q_all = torch.stack([q[p] for p in perm], dim=dim)
    k_all = torch.stack(list(k), dim=dim)
    v_all = torch.stack(list(v), dim=dim)
    if channels_last:
        q_all, k_all, v_all = (t.transpose(1, 2) for t in (q_all, k_all, v_all))
    b, groups, n, d = q_all.shape  # (b, 3, N, d)
    if materialize:
        scores = torch.matmul(q_all, k_all.transpose(-1, -2)) * d ** -0.5
        out = torch.matmul(scores.softmax(dim=-1), v_all)
    else:
        out = F.scaled_dot_product_attention(q_all, k_all, v_all)
    if channels_last:
        return out.transpose(1, 2).reshape(b, *out_hw, groups * d).permute(0, 3, 1, 2)
    return out.transpose(-1, -2).reshape(b, groups * d, *out_hw)
