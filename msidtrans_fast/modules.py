"""The building blocks of MSI-DTrans (docs/design.md, "Building blocks").

Attribute names and registration order reproduce the original's ``state_dict`` exactly (including
its spellings, e.g. ``Multi_scale_Token_Embeding``), so that its checkpoints load with
``strict=True``. Forward passes do not call the ``nn.Sequential`` containers directly: they go
through :func:`conv_bn`, which folds BatchNorm into the preceding convolution in eval mode.

Every module takes and returns NCHW tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, ops, reference
from .backends import ATTENTION_IMPLS

Permutation = Sequence[int]


def _source_key(t: torch.Tensor) -> tuple:
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device)


def cached(owner: nn.Module, name: str, sources: Sequence[torch.Tensor],
           compute: Callable[[], object], *extra) -> object:
    """``compute()``: a value derived from parameters and buffers, once per weights version.

    The value is kept on ``owner`` under ``name`` and keyed on the identity, storage, version
    counter, dtype and device of every tensor in ``sources`` (plus ``extra``), so an in-place
    update (an optimizer step, ``load_state_dict``, ``copy_``) or a move with ``.to()`` recomputes
    it. It is computed afresh, inside the autograd graph, whenever a gradient could flow to a
    source, and while ``torch.compile`` traces (the compiler sees the plain computation).
    Cached values are ordinary tensors made outside ``inference_mode`` without a graph, so they
    serve ``no_grad`` and ``inference_mode`` calls alike.
    """
    if torch.compiler.is_compiling() or any(t.is_inference() for t in sources) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
        return compute()
    key = (*(_source_key(t) for t in sources), *extra)
    store = owner.__dict__.setdefault("_derived_cache", {})
    entry = store.get(name)
    if entry is None or entry[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            entry = store[name] = (key, compute())
    return entry[1]


def _up(t: torch.Tensor) -> torch.Tensor:
    """16-bit weights to float32 for folding (rounded once, at the end); others unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv`` with eval-mode ``bn`` folded in, in ``conv.weight``'s dtype.

    Low-precision weights are folded in float32 and rounded once at the end.
    """
    dtype = conv.weight.dtype
    scale = _up(bn.weight) * torch.rsqrt(_up(bn.running_var) + bn.eps)
    weight = _up(conv.weight) * scale.view(-1, 1, 1, 1)
    shift = _up(bn.bias) - _up(bn.running_mean) * scale
    bias = shift if conv.bias is None else _up(conv.bias) * scale + shift
    return weight.to(dtype), bias.to(dtype)


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``; in eval mode one convolution with BatchNorm folded into its weights
    (folded once per weights version, see :func:`cached`)."""
    if bn.training:
        return bn(conv(x))
    sources = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        sources.append(conv.bias)
    weight, bias = cached(bn, "folded", sources, lambda: fold_bn(conv, bn))
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _in_place() -> bool:
    """Whether activations may be overwritten: only where autograd records nothing (less memory,
    no fresh allocation)."""
    return not torch.is_grad_enabled()


def mish(x: torch.Tensor) -> torch.Tensor:
    """``F.mish(x)``; where autograd records nothing, in place through :func:`ops.mish_` (the
    compiled kernel on CPU float32 and bfloat16)."""
    return ops.mish_(x) if _in_place() else F.mish(x)


def add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``; where autograd records nothing and the sum has ``fresh``'s shape and
    dtype, written into ``fresh``, which must be an intermediate nothing else holds (not a
    module's output: forward hooks would see the sum): no new allocation."""
    if _in_place() and fresh.shape == other.shape and fresh.dtype == other.dtype:
        return fresh.add_(other)
    return fresh + other


def conv_bn_mish(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    return mish(conv_bn(x, conv, bn))


def conv_bn_mish_block(cin: int, cout: int, kernel: int = 3, bias: bool = True) -> nn.Sequential:
    """``Sequential(conv, BN, Mish)`` with "same" padding: indices 0 and 1 hold the weights."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias),
                         nn.BatchNorm2d(cout), nn.Mish())


class HaarSplit(nn.Module):
    """Haar wavelet split, ``(b, C, H, W) -> (low (b, C, H', W'), high (b, 3C, H', W'))``.

    ``H' = ceil(H/2)``. Differentiable; with ``detach=True`` it cuts the graph as the original's
    numpy round trip did (nothing upstream of it then learns). Runs :func:`ops.haar_split`: the
    compiled extension wherever it is built, whatever the attention backend, else the plain
    PyTorch code (:func:`ops.pytorch_fallback` forces that, for parity tests).
    """

    def __init__(self, detach: bool = False):
        super().__init__()
        self.detach = detach

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.detach:
            x = x.detach()
        return ops.haar_split(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels per pixel; parameters ``g``, ``b`` of shape (1, C, 1, 1)."""

    def __init__(self, dim: int, eps: float = reference.NORM_EPS):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and \
                x.is_contiguous(memory_format=torch.channels_last):
            # Channels innermost: a LayerNorm over the last axis of the (b, H, W, C) view, one
            # fused kernel instead of the reference's nine element-wise passes.
            c = x.shape[1]
            y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), self.g.reshape(c), self.b.reshape(c),
                             self.eps)
            return y.permute(0, 3, 1, 2)
        return reference.channel_layer_norm(x, self.g, self.b, self.eps)


class _WaveletHighLayer(nn.Module):
    """Shared tail of the three encoders: Haar split, then ``Mish(BN(conv1x1(3C->C)))`` on high."""

    def _init_high_layer(self, dim: int, detach_wavelet: bool) -> None:
        self.high_layer = conv_bn_mish_block(3 * dim, dim, kernel=1)
        self.wavelet = HaarSplit(detach_wavelet)

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.wavelet(t)
        return low, conv_bn_mish(high, self.high_layer[0], self.high_layer[1])


class MSSEAttention(nn.Module):
    """Channel attention: ``x * sigmoid(fc(mean_hw(Mish(BN(conv1x1(x))))))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The (b, C, 1, 1) factor of ``x``."""
        y = conv_bn_mish(x, self.conv, self.bn)
        return torch.sigmoid(self.fc(y.mean(dim=(2, 3))))[:, :, None, None]


class ParallelBlock(nn.Module):
    """``cat([Mish(conv3x3(x)), Mish(conv5x5(x)), Mish(conv7x7(x))])``: C -> 3C channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.branch1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.branch2 = nn.Conv2d(dim, dim, 5, padding=2)
        self.branch3 = nn.Conv2d(dim, dim, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([mish(self.branch1(x)), mish(self.branch2(x)), mish(self.branch3(x))],
                         dim=1)


class MSSEModule(_WaveletHighLayer):
    """The first encoder (the original's ``MSSE_Module``), shared by both sources.

    (b, cin, H, W) -> ``(low, high, pre_attention)``: low and high are (b, dim, H1, W1);
    ``pre_attention`` (b, dim, H, W) is the original's unused third output, None when called
    with ``pre_attention=False`` (then it is freed before the parallel block, the forward's
    peak of memory).
    """

    def __init__(self, cin: int, dim: int, detach_wavelet: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Mish(),
            nn.Conv2d(16, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.Mish())
        self.attention = MSSEAttention(dim)
        self.residual = nn.Conv2d(cin, dim, 1)
        self.parallel = ParallelBlock(dim)
        self.skip_connection = nn.Conv2d(cin, 3 * dim, 1)
        self.channel_splitter = nn.Conv2d(3 * dim, dim, 1)
        self._init_high_layer(dim, detach_wavelet)

    def forward(self, x: torch.Tensor, pre_attention: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        t = conv_bn_mish(x, self.conv[0], self.conv[1])
        pre = conv_bn_mish(t, self.conv[3], self.conv[4])
        if _in_place():
            # residual + pre * gate in one pass, into the residual's fresh output
            gate = self.attention.gate(pre)
            t = self.residual(x).addcmul_(pre, gate)
        else:
            t = self.attention(pre) + self.residual(x)
        if not pre_attention:
            pre = None
        low, high = self._split(self._split_parallel(t, x))
        return low, high, pre

    def _split_parallel(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``channel_splitter(parallel(t) + skip_connection(x))`` without its two 3C-channel
        tensors at full resolution (the largest activations of the network): the 1x1
        ``channel_splitter`` is linear, so it is applied to each branch's C channels, and
        ``skip_connection`` is folded into it. The same arithmetic with and without autograd
        (only the in-place updates differ), so both give the same numbers."""
        split, skip, parallel = self.channel_splitter, self.skip_connection, self.parallel

        def fold():
            dtype = split.weight.dtype
            ws = [part.contiguous()[..., None, None]                      # 3 x (C, C, 1, 1)
                  for part in split.weight.flatten(1).chunk(3, dim=1)]
            w = _up(split.weight.flatten(1))                              # (C, 3C)
            wx = (w @ _up(skip.weight.flatten(1)))[..., None, None]       # (C, cin, 1, 1)
            bx = w @ _up(skip.bias) + _up(split.bias)
            return (*ws, wx.to(dtype), bx.to(dtype))

        sources = [split.weight, split.bias, skip.weight, skip.bias]
        w1, w2, w3, wx, bx = cached(self, "split_parallel", sources, fold)
        inplace = _in_place()
        out = F.conv2d(x, wx, bx)
        for branch, w in zip((parallel.branch1, parallel.branch2, parallel.branch3),
                             (w1, w2, w3), strict=True):
            y = mish(branch(t))
            if _channels_last(out) and _channels_last(y) and out.dtype == y.dtype:
                # (b, H, W, C) rows: the 1x1 convolution accumulates into ``out`` as one GEMM,
                # in place without autograd (no temporary of out's size); under autocast the
                # weight is cast here, as the convolution would.
                b, c, h, wd = out.shape
                rows = out.permute(0, 2, 3, 1).reshape(-1, c)
                args = (y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]),
                        w.flatten(1).t().to(y.dtype))
                if inplace:
                    rows.addmm_(*args)
                else:
                    out = torch.addmm(rows, *args).view(b, h, wd, c).permute(0, 3, 1, 2)
            else:
                term = F.conv2d(y, w)
                out = out.add_(term) if inplace else out + term
        return out


class FSEModule(_WaveletHighLayer):
    """Low-frequency encoder (``FSE_Module``): (b, C, H, W) -> low, high (b, C, H/2, W/2)."""

    def __init__(self, dim: int, detach_wavelet: bool = False):
        super().__init__()
        self.bottleneck = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 3, padding=1), nn.BatchNorm2d(2 * dim), nn.Mish(),
            nn.Conv2d(2 * dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.Mish())
        self._init_high_layer(dim, detach_wavelet)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = conv_bn_mish(x, self.bottleneck[0], self.bottleneck[1])
        t = add(conv_bn_mish(t, self.bottleneck[3], self.bottleneck[4]), x)
        return self._split(t)


class RSEModule(_WaveletHighLayer):
    """High-frequency encoder (``RSE_Module``): (b, C, H, W) -> low, high (b, C, H/2, W/2).

    ``sub2`` exists only so the original's checkpoints load: the original never calls it.
    """

    def __init__(self, dim: int, detach_wavelet: bool = False):
        super().__init__()
        self.path1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.path2 = nn.Conv2d(dim, dim, 1)
        self.path3 = nn.Conv2d(dim, dim, 1, dilation=2)
        self.sub1 = conv_bn_mish_block(dim, dim)
        self.sub2 = conv_bn_mish_block(dim, dim)
        self.layer = nn.Sequential(
            nn.Conv2d(4 * dim, 2 * dim, 3, padding=1), nn.BatchNorm2d(2 * dim), nn.Mish(),
            nn.Conv2d(2 * dim, dim, 1), nn.BatchNorm2d(dim), nn.Mish())
        self._init_high_layer(dim, detach_wavelet)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p1, p2, p3 = self.path1(x), self.path2(x), self.path3(x)
        # sub1 is applied to both differences, as in the original.
        s1 = conv_bn_mish(p1 - p2, self.sub1[0], self.sub1[1])
        s2 = conv_bn_mish(p3 - p2, self.sub1[0], self.sub1[1])
        t = conv_bn_mish(torch.cat([p1, s1, p3, s2], dim=1), self.layer[0], self.layer[1])
        t = add(conv_bn_mish(t, self.layer[3], self.layer[4]), x)
        return self._split(t)


class Downsample(nn.Module):
    """``cLN(conv(k, cin->cout, stride, padding, no bias)(x))``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.down_conv = nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
            ChannelLayerNorm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_conv(x)


class Conv3x3Block(nn.Module):
    """``Mish(BN(conv3x3(cin->cout, no bias)))``, the skip connections' block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv3x3 = conv_bn_mish_block(cin, cout, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_mish(x, self.conv3x3[0], self.conv3x3[1])


class Upsample(nn.Module):
    """Bilinear resize to (h, w) (``align_corners=False``), then a :class:`Conv3x3Block`."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv3x3 = Conv3x3Block(cin, cout)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return self.conv3x3(x)


class TokenEmbedding(nn.Module):
    """One scale's embedding: ``conv1x1(dim->out, nb)(BN(dwconv3x3(dilation, stride, nb)(x)))``."""

    def __init__(self, dim: int, out_dim: int, dilation: int, stride: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, stride=stride, padding=dilation, dilation=dilation,
                      groups=dim, bias=False),
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, out_dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](conv_bn(x, self.net[0], self.net[1]))


class MultiScaleAttention(nn.Module):
    """The dynamic multi-scale self-attention (the original's ``Attention``).

    Input (b, dim, H, W), already channel-normalised; output (b, dim, H, W). Scale i embeds
    queries with dilation ``SCALES[i]`` at stride 1 and keys/values at stride ``kv_stride``
    (``Hk = (H - 1) // kv_stride + 1``).
    """

    def __init__(self, dim: int, dim_head: int, kv_stride: int, dropout: float = 0.0):
        super().__init__()
        self.dim_head = dim_head
        self.kv_stride = kv_stride
        self.Multi_scale_Token_Embeding = nn.ModuleList([
            nn.ModuleList([TokenEmbedding(dim, dim_head, s, 1),
                           TokenEmbedding(dim, 2 * dim_head, s, kv_stride)])
            for s in reference.SCALES])
        self.to_out = nn.Sequential(nn.Conv2d(len(reference.SCALES) * dim_head, dim, 1),
                                    nn.Dropout(dropout))

    def embed(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                               list[torch.Tensor]]:
        """Returns q (three (b, H*W, d)), k and v (three (b, Hk*Wk, d) each), token-major."""
        qs, ks, vs = [], [], []
        for q_embed, kv_embed in self.Multi_scale_Token_Embeding:
            qs.append(q_embed(x).flatten(2).transpose(1, 2))
            kv = kv_embed(x).flatten(2).transpose(1, 2)
            ks.append(kv[..., :self.dim_head])
            vs.append(kv[..., self.dim_head:])
        return qs, ks, vs

    def forward(self, x: torch.Tensor, perm: Permutation) -> torch.Tensor:
        qs, ks, vs = self.embed(x)
        out = reference.multi_scale_attention(qs, ks, vs, perm, x.shape[-2:],
                                              channels_last=_channels_last(x))
        return self.to_out(out)


class PreNorm(nn.Module):
    """``fn(cLN(x))``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = ChannelLayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class AttentionPreNorm(PreNorm):
    """``attention(cLN(x), perm)``, the unit a fused backend replaces as a whole.

    ``forward(x, perm, backend)``: a backend with an entry in :data:`ATTENTION_IMPLS` receives
    this block (for its weights) and the un-normalised input; any other name ("reference") runs
    the modules' own PyTorch code. The model passes the backend it resolved for the call.
    """

    def forward(self, x: torch.Tensor, perm: Permutation,
                backend: str = backends.REFERENCE) -> torch.Tensor:
        impl = ATTENTION_IMPLS.get(backend)
        if impl is None:
            return self.fn(self.norm(x), perm)
        return impl(self, x, perm)


class FeedForward(nn.Module):
    """conv1x1(dim->dim*mult), GELU (erf), dropout, conv1x1(dim*mult->dim), dropout."""

    def __init__(self, dim: int, mult: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim * mult, 1), nn.GELU(), nn.Dropout(dropout),
            nn.Conv2d(dim * mult, dim, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """``depth`` times: ``x = Attention(cLN(x), perm) + x; x = FF(cLN(x)) + x``.

    ``forward(x, perms, backend)`` takes one permutation per layer and the attention backend
    (see :class:`AttentionPreNorm`).
    """

    def __init__(self, dim: int, dim_head: int, depth: int, mlp_mult: int, kv_stride: int,
                 dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([
                AttentionPreNorm(dim, MultiScaleAttention(dim, dim_head, kv_stride, dropout)),
                PreNorm(dim, FeedForward(dim, mlp_mult, dropout))])
            for _ in range(depth)])

    def forward(self, x: torch.Tensor, perms: Sequence[Permutation],
                backend: str = backends.REFERENCE) -> torch.Tensor:
        if len(perms) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} permutations, got {len(perms)}")
        for (attention, feed_forward), perm in zip(self.layers, perms, strict=True):
            x = attention(x, perm, backend) + x
            x = feed_forward(x) + x
        return x
