"""Multi-scale token embedding of MSI-DTrans, producing q, k, v in the attention kernel's layout.

For the three dilations s in (1, 2, 4) the original computes, on ``xn = cLN(x)``,
``q_s = conv1x1(BN(dwconv3x3_s(xn)))`` at stride 1 and ``kv_s`` likewise at stride ``kv_stride``,
then flattens and transposes every one of them. Here:

1. cLN + depthwise 3x3 convolutions: :func:`ln_dwconv` (fused Triton kernel,
   ``kernels/token_embedding.py``). For each tap the kernel computes the per-pixel cLN mean and
   variance from the input tile it has loaded anyway, so neither statistics nor the normalised
   input are ever stored; the epsilon is the ``ChannelLayerNorm`` module's ``eps``. Output ``y``
   (b, 3, C, N): all three scales in one tensor, channel-major.
2. BatchNorm over the stacked (b, 3C, N) view, one call for the three scales. Train mode: batch
   statistics, running statistics updated exactly as ``nn.BatchNorm2d`` (momentum, unbiased
   running variance, ``num_batches_tracked``), through ``F.batch_norm`` on concatenated buffers
   that are copied back into each module. Eval mode: BatchNorm is folded into the projection.
   A reduction over the whole batch does not fuse into a tiled convolution without a second pass,
   so it stays a separate step.
3. The 1x1 projections of the three scales as one batched matmul (3, out, C) @ (b, 3, C, N) ->
   (b, 3, out, N): already the attention layout; k and v are the two halves of the key/value
   projection (views, not copies). A matmul is what cuBLAS does best; fusing it into the
   convolution would need the full channel axis per tile and gains one memory pass at most.

Everything is differentiable (autograd through steps 2-3, a hand-written backward for step 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .kernels import msa_attention as _attention_kernels
from .kernels import token_embedding as _kernels
from .modules import cached


# The launchers as torch.library custom ops (with fake kernels), so that torch.compile and
# torch.library.opcheck can trace them; the autograd Function below calls them.
@torch.library.custom_op("msidtrans_fast::ln_dwconv_forward", mutates_args=())
def _forward_op(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
                stride: int, eps: float = reference.NORM_EPS) -> torch.Tensor:
    return _kernels.ln_dwconv_forward(x, g, b, weight, stride, eps)


@_forward_op.register_fake
def _(x, g, b, weight, stride, eps=reference.NORM_EPS):
    n, c, h, w = x.shape
    n_out = _kernels.out_size(h, stride) * _kernels.out_size(w, stride)
    return x.new_empty((n, _kernels.NUM_SCALES, c, n_out))


@torch.library.custom_op("msidtrans_fast::ln_dwconv_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                 weight: torch.Tensor, stride: int, eps: float = reference.NORM_EPS
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.ln_dwconv_backward(grad_y, x, g, b, weight, stride, eps)


@_backward_op.register_fake
def _(grad_y, x, g, b, weight, stride, eps=reference.NORM_EPS):
    return (x.new_empty(x.shape), g.new_empty(g.shape), b.new_empty(b.shape),
            weight.new_empty(weight.shape))


class LnDwConvFunction(torch.autograd.Function):
    """Autograd Function of :func:`ln_dwconv`; saves only its inputs (the backward recomputes the
    normalised input and its statistics)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, g, b, weight, stride, eps):
        y = _forward_op(x, g, b, weight, stride, eps)
        ctx.stride, ctx.eps = stride, eps
        if any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(x, g, b, weight)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        x, g, b, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()  # the kernels read (b, 3, C, N) contiguous
        dx, dg, db, dw = _backward_op(grad_y, x, g, b, weight, ctx.stride, ctx.eps)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, dg if needs[1] else None, db if needs[2] else None,
                dw if needs[3] else None, None, None)


def ln_dwconv(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
              stride: int, eps: float = reference.NORM_EPS) -> torch.Tensor:
    """Channel LayerNorm followed by three depthwise 3x3 convolutions (dilations 1, 2, 4).

    Args:
        x: (b, C, H, W) floating (fp16, bf16, fp32, fp64), any strides (made contiguous).
        g, b: cLN scale and shift, C elements each (e.g. shaped (1, C, 1, 1)).
        weight: (3, C, 3, 3) depthwise kernels of the three dilations (no bias); padding equals
            the dilation, as in the original.
        stride: 1 or more.
        eps: the cLN epsilon (a layer passes its ``ChannelLayerNorm.eps``).

    Returns:
        (b, 3, C, Ho * Wo), contiguous, x's dtype, Ho = (H - 1) // stride + 1 (Wo likewise).

    Raises:
        TypeError / ValueError on bad dtypes, shapes, devices or stride.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (b, C, H, W) tensor, got {getattr(x, 'shape', x)!r}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x has unsupported dtype {x.dtype}")
    c = x.shape[1]
    if c > _kernels.MAX_CHANNELS:
        raise ValueError(f"{c} channels exceed the supported maximum {_kernels.MAX_CHANNELS}")
    if g.numel() != c or b.numel() != c:
        raise ValueError(f"g and b must have {c} elements, got {g.numel()} and {b.numel()}")
    if tuple(weight.shape) != (len(reference.SCALES), c, 3, 3):
        raise ValueError(f"weight must be (3, {c}, 3, 3), got {tuple(weight.shape)}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if len({t.device for t in (x, g, b, weight)}) != 1:
        raise ValueError("x, g, b and weight must be on one device")
    if len({t.dtype for t in (x, g, b, weight)}) != 1:
        raise TypeError("x, g, b and weight must share a dtype")
    return LnDwConvFunction.apply(x.contiguous(), g.reshape(c).contiguous(),
                                  b.reshape(c).contiguous(), weight.contiguous(), stride,
                                  float(eps))


def _batch_norm_stacked(y: torch.Tensor, bns) -> torch.Tensor:
    """Train-mode BatchNorm of (b, 3, C, N) with one BN module per scale; updates their buffers.

    Returns the normalised (b, 3, C, N) tensor.
    """
    b, groups, c, n = y.shape
    flat = y.view(b, groups * c, n)
    weight = torch.cat([bn.weight for bn in bns])
    bias = torch.cat([bn.bias for bn in bns])
    bn0 = bns[0]
    if bn0.track_running_stats and bn0.running_mean is not None:
        with torch.no_grad():
            for bn in bns:
                bn.num_batches_tracked.add_(1)
        momentum = (1.0 / float(bn0.num_batches_tracked) if bn0.momentum is None
                    else bn0.momentum)
        running_mean = torch.cat([bn.running_mean for bn in bns])
        running_var = torch.cat([bn.running_var for bn in bns])
        out = F.batch_norm(flat, running_mean, running_var, weight, bias, True, momentum, bn0.eps)
        with torch.no_grad():
            for i, bn in enumerate(bns):
                bn.running_mean.copy_(running_mean[i * c:(i + 1) * c])
                bn.running_var.copy_(running_var[i * c:(i + 1) * c])
    else:
        out = F.batch_norm(flat, None, None, weight, bias, True, 0.0, bn0.eps)
    return out.view(b, groups, c, n)


def _bn_project(y: torch.Tensor, bns, proj: torch.Tensor, projections, owner,
                which: int) -> torch.Tensor:
    """BN (train: batch stats; eval: folded) then the three 1x1 projections: (b, 3, out, N).

    ``proj`` is the (3, out, C) stack of the projection weights; in eval mode the folded weights
    are computed once per weights version (:func:`modules.cached` on ``owner``).
    """
    if any(bn.training for bn in bns):
        return torch.matmul(proj, _batch_norm_stacked(y, bns))

    def fold():
        scale = torch.stack([bn.weight * torch.rsqrt(bn.running_var + bn.eps) for bn in bns])
        shift = torch.stack([bn.bias for bn in bns]) - torch.stack(
            [bn.running_mean for bn in bns]) * scale                    # (3, C)
        return proj * scale.unsqueeze(1), torch.matmul(proj, shift.unsqueeze(-1))  # (3, out, 1)

    sources = [t for bn in bns for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    weight, bias = cached(owner, f"folded{which}", sources + [p.weight for p in projections],
                          fold)
    out = torch.matmul(weight, y)  # under autocast: the autocast dtype
    return out + bias.to(out.dtype)


def token_embedding(x: torch.Tensor, norm, attention) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """cLN + the three-scale token embedding of one ``MultiScaleAttention``, fused.

    Args:
        x: (b, dim, H, W), the un-normalised input of the attention layer.
        norm: the layer's ``ChannelLayerNorm`` (``g``, ``b`` of shape (1, dim, 1, 1)).
        attention: the ``MultiScaleAttention`` (its ``Multi_scale_Token_Embeding[i][0|1].net``
            hold dwconv, BN and the 1x1 projection for queries (0) and keys/values (1)).

    Returns:
        ``(q, k, v)``: q (b, 3, d, H*W); k, v (b, 3, d, Hk*Wk), the two halves of one
        (b, 3, 2d, Hk*Wk) tensor. Scale index on axis 1, row-major pixels, token stride 1. The
        token axis is padded to a multiple of 16 elements (q and the key/value tensor are views
        of zero-padded buffers) so that the attention kernels load aligned 16-byte vectors.
    """
    embeds = attention.Multi_scale_Token_Embeding
    d = attention.dim_head
    outs = []
    for which, stride in ((0, 1), (1, attention.kv_stride)):
        nets = [embeds[i][which].net for i in range(len(reference.SCALES))]

        def stack(nets=nets):
            weight = torch.cat([net[0].weight for net in nets])            # (3C, 1, 3, 3)
            return (norm.g.to(x.dtype), norm.b.to(x.dtype),
                    weight.view(len(nets), -1, 3, 3).to(x.dtype),
                    torch.stack([net[2].weight.flatten(1) for net in nets]))  # (3, out, C)

        sources = [norm.g, norm.b] + [net[i].weight for net in nets for i in (0, 2)]
        g, b, weight, proj = cached(attention, f"stacked{which}", sources, stack, x.dtype)
        y = ln_dwconv(x, g, b, weight, stride, norm.eps)
        outs.append(_bn_project(y, [net[1] for net in nets], proj, [net[2] for net in nets],
                                attention, which))
    q, kv = (_pad_tokens(t) for t in outs)
    return q, kv[:, :, :d], kv[:, :, d:]


def _pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """(..., N) as a view of a zero-padded (..., N') tensor, N' the next multiple of
    ``TOKEN_ALIGN``: every stride but the token one becomes a multiple of it."""
    n = t.shape[-1]
    pad = -n % _attention_kernels.TOKEN_ALIGN
    return F.pad(t, (0, pad))[..., :n] if pad else t
