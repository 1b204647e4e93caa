"""Channel LayerNorm fused with MSI-DTrans's three depthwise 3x3 convolutions: Triton kernels.

Forward (``_ln_dwconv_fwd_kernel``): one program per (block of output pixels, image * 3 + scale).
The program holds all C channels of a pixel block (C <= 128, padded to a power of two and masked),
so for every one of the 9 taps it loads the shifted input tile, computes the per-pixel cLN mean and
biased variance from that very tile (no statistics buffer, no normalised copy of x in memory),
normalises, applies the zero padding to the *normalised* input (as the original's convolution
does), and accumulates ``w[scale, c, tap] * xn``. Dilation of scale s is 2**s (1, 2, 4), padding
equals the dilation, the stride is a launch argument (1 for queries, ``kv_stride`` for keys/values).

Backward, with ``dy`` (b, 3, C, No):
- ``_ln_dwconv_bwd_input_kernel``: one program per (block of input pixels, image). It gathers
  ``dxn[c, p] = sum_{scale, tap} w[scale, c, tap] * dy[scale, c, p_out]`` over the output pixels
  whose tap lands on p (the transposed convolution, no atomics), then applies the cLN backward
  ``dx = rstd * (dxh - mean_c(dxh) - xh * mean_c(dxh * xh))`` with ``dxh = dxn * g``, and writes
  per-program partial sums of ``dg = sum dxn * xh`` and ``db = sum dxn``.
- ``_ln_dwconv_bwd_weight_kernel``: one program per (block of output pixels, image * 3 + scale);
  recomputes the 9 normalised taps as in the forward and writes per-program partial sums of
  ``dw[scale, c, tap] = sum_p dy[scale, c, p] * xn_tap[c, p]``.
Partial sums are reduced by the launcher with ``torch.sum`` (deterministic, no atomics).

All accumulation in fp32 (fp64 for fp64 inputs, for gradcheck). Layouts: x (b, C, H, W)
contiguous; y (b, 3, C, Ho*Wo) contiguous (the layout the 1x1 projection consumes as a batched
matmul); g, b (C,); weight (3, C, 3, 3) contiguous. Channel offsets are 64-bit (a channel times
the pixel count passes 2**31 elements from about 16.7 million pixels at 128 channels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import device_guard

#: Largest supported channel count (one program holds all channels of its pixel block).
MAX_CHANNELS = 128
#: Number of scales (dilations 1, 2, 4) the kernels compute in one launch.
NUM_SCALES = 3


@triton.jit
def _normalised_tap(x_base, g, bb, chan_off, mask_c, ih, iw, valid_p, height, width,
                    channels, eps, ACC_DTYPE: tl.constexpr):
    """cLN(x) at input pixels (ih, iw) for all channels: (BLOCK_C, BLOCK_P); 0 outside the image.

    ``chan_off`` (BLOCK_C,) int64: each channel's offset in the image. Also returns the pixel's
    ``xh = (x - mean) * rstd`` tile and ``rstd`` (for the backward).
    """
    inside = valid_p & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
    pix = tl.where(inside, ih * width + iw, 0)
    mask = mask_c[:, None] & inside[None, :]
    x = tl.load(x_base + chan_off[:, None] + pix[None, :], mask=mask, other=0.0)
    x = x.to(ACC_DTYPE)
    mean = tl.sum(x, 0) / channels
    centred = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(centred * centred, 0) / channels
    rstd = 1.0 / tl.sqrt(var + eps)
    xh = centred * rstd[None, :]
    xn = tl.where(mask, xh * g[:, None] + bb[:, None], 0.0)
    return xn, xh, rstd


@triton.jit
def _ln_dwconv_fwd_kernel(
    X, G, B, W, Y,
    channels, height, width, out_width, n_out, stride, eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bs = tl.program_id(1)
    image = (pid_bs // 3).to(tl.int64)
    scale = pid_bs % 3
    dilation = tl.where(scale == 0, 1, tl.where(scale == 1, 2, 4))
    n_in = height * width

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = offs_p < n_out
    oh = offs_p // out_width
    ow = offs_p % out_width
    g = tl.load(G + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    bb = tl.load(B + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    x_base = X + image * channels * n_in
    w_base = W + (scale * channels + offs_c) * 9
    offs_c64 = offs_c.to(tl.int64)

    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC_DTYPE)
    for tap in tl.static_range(9):
        ih = oh * stride + (tap // 3 - 1) * dilation
        iw = ow * stride + (tap % 3 - 1) * dilation
        xn, _, _ = _normalised_tap(x_base, g, bb, offs_c64 * n_in, mask_c, ih, iw, valid_p,
                                   height, width, channels, eps, ACC_DTYPE)
        w = tl.load(w_base + tap, mask=mask_c, other=0.0).to(ACC_DTYPE)
        acc += w[:, None] * xn

    y_offs = (image * 3 + scale) * channels * n_out + offs_c64[:, None] * n_out + offs_p[None, :]
    tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=mask_c[:, None] & valid_p[None, :])


@triton.jit
def _ln_dwconv_bwd_input_kernel(
    X, G, B, W, DY, DX, DG_PART, DB_PART,
    channels, height, width, out_height, out_width, stride, eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    n_in = height * width
    n_out = out_height * out_width

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = offs_p < n_in
    ih = offs_p // width
    iw = offs_p % width
    dy_image = DY + image * 3 * channels * n_out
    offs_c64 = offs_c.to(tl.int64)

    dxn = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC_DTYPE)
    for scale in tl.static_range(3):
        dilation = 1 << scale
        for tap in tl.static_range(9):
            # Output pixel (oh, ow) reads input (oh*stride + dh, ow*stride + dw) at this tap.
            th = ih - (tap // 3 - 1) * dilation
            tw = iw - (tap % 3 - 1) * dilation
            th_safe = tl.where(th >= 0, th, 0)
            tw_safe = tl.where(tw >= 0, tw, 0)
            oh = th_safe // stride
            ow = tw_safe // stride
            hit = (valid_p & (th >= 0) & (tw >= 0) & (th_safe % stride == 0)
                   & (tw_safe % stride == 0) & (oh < out_height) & (ow < out_width))
            pix = tl.where(hit, oh * out_width + ow, 0)
            dy = tl.load(dy_image + (scale * channels + offs_c64[:, None]) * n_out + pix[None, :],
                         mask=mask_c[:, None] & hit[None, :], other=0.0).to(ACC_DTYPE)
            w = tl.load(W + (scale * channels + offs_c) * 9 + tap, mask=mask_c,
                        other=0.0).to(ACC_DTYPE)
            dxn += w[:, None] * dy

    g = tl.load(G + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    bb = tl.load(B + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    _, xh, rstd = _normalised_tap(X + image * channels * n_in, g, bb, offs_c64 * n_in, mask_c,
                                  ih, iw, valid_p, height, width, channels, eps, ACC_DTYPE)
    dxh = dxn * g[:, None]
    mean_dxh = tl.sum(dxh, 0) / channels
    mean_dxh_xh = tl.sum(dxh * xh, 0) / channels
    dx = (dxh - mean_dxh[None, :] - xh * mean_dxh_xh[None, :]) * rstd[None, :]
    mask = mask_c[:, None] & valid_p[None, :]
    tl.store(DX + image * channels * n_in + offs_c64[:, None] * n_in + offs_p[None, :],
             dx.to(DX.dtype.element_ty), mask=mask)
    part = (image * tl.num_programs(0) + pid_p) * channels + offs_c
    tl.store(DG_PART + part, tl.sum(tl.where(mask, dxn * xh, 0.0), 1), mask=mask_c)
    tl.store(DB_PART + part, tl.sum(tl.where(mask, dxn, 0.0), 1), mask=mask_c)


@triton.jit
def _ln_dwconv_bwd_weight_kernel(
    X, G, B, DY, DW_PART,
    channels, height, width, out_width, n_out, stride, eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bs = tl.program_id(1)
    image = (pid_bs // 3).to(tl.int64)
    scale = pid_bs % 3
    dilation = tl.where(scale == 0, 1, tl.where(scale == 1, 2, 4))
    n_in = height * width

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = offs_p < n_out
    oh = offs_p // out_width
    ow = offs_p % out_width
    g = tl.load(G + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    bb = tl.load(B + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    x_base = X + image * channels * n_in
    offs_c64 = offs_c.to(tl.int64)
    dy = tl.load(DY + (image * 3 + scale) * channels * n_out + offs_c64[:, None] * n_out
                 + offs_p[None, :], mask=mask_c[:, None] & valid_p[None, :],
                 other=0.0).to(ACC_DTYPE)
    # Partial sums laid out (image, scale, pixel block, C, 9).
    part = ((image * 3 + scale) * tl.num_programs(0) + pid_p) * channels * 9 + offs_c * 9
    for tap in tl.static_range(9):
        ih = oh * stride + (tap // 3 - 1) * dilation
        iw = ow * stride + (tap % 3 - 1) * dilation
        xn, _, _ = _normalised_tap(x_base, g, bb, offs_c64 * n_in, mask_c, ih, iw, valid_p,
                                   height, width, channels, eps, ACC_DTYPE)
        tl.store(DW_PART + part + tap, tl.sum(dy * xn, 1), mask=mask_c)


# ------------------------------------------------------------------------------------ launchers

#: Warps per program of every embedding kernel.
NUM_WARPS = 8


def _config(x: torch.Tensor) -> dict:
    block_c = max(16, triton.next_power_of_2(x.shape[1]))
    # A program's tile holds about 1024 elements (16 pixels at 64 channels), 4 per thread with
    # NUM_WARPS = 8: compiled for sm_90, the nine unrolled taps then fit in registers, while
    # 4096-element tiles on 4 warps spilled 7-14 KB per thread (tools/inspect_kernels.py).
    return {"BLOCK_C": block_c, "BLOCK_P": max(16, 1024 // block_c),
            "ACC_DTYPE": tl.float64 if x.dtype == torch.float64 else tl.float32}


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def out_size(size: int, stride: int) -> int:
    """Output length of a 3x3 convolution with padding = dilation: ``(size - 1) // stride + 1``."""
    return (size - 1) // stride + 1


def ln_dwconv_forward(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                      stride: int, eps: float) -> torch.Tensor:
    """cLN (epsilon ``eps``) + three depthwise convolutions; returns y (no statistics are stored).

    x (b, C, H, W) contiguous; g, b (C,); weight (3, C, 3, 3) contiguous; y (b, 3, C, Ho*Wo).
    """
    n, c, h, w = x.shape
    ho, wo = out_size(h, stride), out_size(w, stride)
    y = torch.empty((n, NUM_SCALES, c, ho * wo), device=x.device, dtype=x.dtype)
    cfg = _config(x)
    grid = (triton.cdiv(ho * wo, cfg["BLOCK_P"]), n * NUM_SCALES)
    with device_guard(x.device):
        _ln_dwconv_fwd_kernel[grid](x, g, b, weight, y, c, h, w, wo, ho * wo, stride, eps,
                                    **cfg, num_warps=NUM_WARPS)
    return y


def ln_dwconv_backward(grad_y: torch.Tensor, x: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                       weight: torch.Tensor, stride: int, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dg, db, dweight)`` shaped like x, g, b, weight; grad_y contiguous."""
    n, c, h, w = x.shape
    ho, wo = out_size(h, stride), out_size(w, stride)
    cfg = _config(x)
    acc = _acc_dtype(x)
    blocks_in = triton.cdiv(h * w, cfg["BLOCK_P"])
    dx = torch.empty_like(x)
    dg_part = torch.empty((n * blocks_in, c), device=x.device, dtype=acc)
    db_part = torch.empty_like(dg_part)
    blocks_out = triton.cdiv(ho * wo, cfg["BLOCK_P"])
    dw_part = torch.empty((n, NUM_SCALES, blocks_out, c, 9), device=x.device, dtype=acc)
    with device_guard(x.device):
        _ln_dwconv_bwd_input_kernel[(blocks_in, n)](
            x, g, b, weight, grad_y, dx, dg_part, db_part, c, h, w, ho, wo, stride, eps,
            **cfg, num_warps=NUM_WARPS)
        _ln_dwconv_bwd_weight_kernel[(blocks_out, n * NUM_SCALES)](
            x, g, b, grad_y, dw_part, c, h, w, wo, ho * wo, stride, eps,
            **cfg, num_warps=NUM_WARPS)
    dg = dg_part.sum(0).to(g.dtype)
    db = db_part.sum(0).to(b.dtype)
    dw = dw_part.sum((0, 2)).view(NUM_SCALES, c, 3, 3).to(weight.dtype)
    return dx, dg, db, dw
