"""Fused token embedding (``msidtrans_fast.embedding``) against the reference modules.

The tests take their device from the ``kernel_device`` fixture: compiled on CUDA tensors on a GPU
machine, Triton's interpreter on CPU tensors elsewhere (see conftest.py); shapes are small and odd.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from tolerances import FP32_FWD_REL, FP32_GRAD_REL, GRADCHECK, LOWP_FACTOR, LOWP_FLOOR, rel_err

from msidtrans_fast import reference
from msidtrans_fast.modules import ChannelLayerNorm, MultiScaleAttention

triton = pytest.importorskip("triton")
from msidtrans_fast.embedding import ln_dwconv, token_embedding  # noqa: E402


def _ln_dwconv_reference(x, g, b, weight, stride, upcast=True):
    """cLN + the three dilated depthwise convolutions, in float64 unless ``upcast`` is False."""
    if upcast:
        x, g, b, weight = (t.double() for t in (x, g, b, weight))
    xn = reference.channel_layer_norm(x, g.view(1, -1, 1, 1), b.view(1, -1, 1, 1))
    c = x.shape[1]
    ys = [F.conv2d(xn, weight[i].unsqueeze(1), None, stride, d, d, c).flatten(2)
          for i, d in enumerate(reference.SCALES)]
    return torch.stack(ys, 1)


def _params(c, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = 1 + 0.1 * torch.randn(c, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(c, generator=gen, dtype=torch.float64)
    w = torch.randn(3, c, 3, 3, generator=gen, dtype=torch.float64) / 3
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (g, b, w)]


# (batch, channels, H, W, stride): fewer pixels than a block; odd sizes; kv stride 2.
CASES = [(2, 48, 5, 7, 1), (1, 32, 13, 11, 2), (2, 64, 6, 9, 1), (2, 32, 3, 4, 2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-c{}-{}x{}-s{}".format(*c))
def test_ln_dwconv_matches_reference(case, kernel_device):
    n, c, h, w, s = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen).mul_(2).add_(0.5).to(kernel_device)
    x.requires_grad_()
    g, b, wt = _params(c, device=kernel_device)
    y = ln_dwconv(x, g, b, wt, s)
    ref = _ln_dwconv_reference(x, g, b, wt, s)
    assert y.shape == ref.shape and y.is_contiguous()
    assert rel_err(y, ref) <= FP32_FWD_REL
    grad = torch.randn(ref.shape, generator=gen).to(kernel_device)
    for name, a, r in zip(("x", "g", "b", "w"), torch.autograd.grad(y, (x, g, b, wt), grad),
                          torch.autograd.grad(ref, (x, g, b, wt), grad.double()), strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL, name


@pytest.mark.parametrize("c, h, w, s", [(48, 4, 5, 1), (32, 5, 3, 2)])
def test_ln_dwconv_gradcheck_float64(c, h, w, s, kernel_device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, c, h, w, generator=gen, dtype=torch.float64).to(kernel_device)
    x.requires_grad_()
    g, b, wt = _params(c, dtype=torch.float64, device=kernel_device)
    assert torch.autograd.gradcheck(lambda *a: ln_dwconv(*a, s), (x, g, b, wt),
                                    fast_mode=True, **GRADCHECK)


def test_ln_dwconv_non_contiguous_input(kernel_device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 5, 32, generator=gen).to(kernel_device).permute(0, 3, 2, 1)  # (2,32,5,7)
    x.requires_grad_()
    g, b, wt = _params(32, device=kernel_device)
    y = ln_dwconv(x, g, b, wt, 2)
    ref = _ln_dwconv_reference(x, g, b, wt, 2)
    assert rel_err(y, ref) <= FP32_FWD_REL
    grad = torch.randn(ref.shape, generator=gen).to(kernel_device)
    assert rel_err(torch.autograd.grad(y, x, grad)[0],
                   torch.autograd.grad(ref, x, grad.double())[0]) <= FP32_GRAD_REL


@pytest.mark.parametrize("bad, exc, match", [
    (lambda x, g, b, w: (x[0], g, b, w, 1), ValueError, "x must be"),
    (lambda x, g, b, w: (x.int(), g, b, w, 1), TypeError, "dtype"),
    (lambda x, g, b, w: (x, g[:-1], b, w, 1), ValueError, "elements"),
    (lambda x, g, b, w: (x, g, b, w[:2], 1), ValueError, "weight"),
    (lambda x, g, b, w: (x, g, b, w, 0), ValueError, "stride"),
    (lambda x, g, b, w: (x.double(), g, b, w, 1), TypeError, "share a dtype"),
])
def test_ln_dwconv_bad_inputs(bad, exc, match):
    x = torch.randn(1, 32, 3, 3)
    g, b, w = (t.detach() for t in _params(32))
    with pytest.raises(exc, match=match):
        ln_dwconv(*bad(x, g, b, w))


def _layer(dim, dim_head, kv_stride, seed=0):
    torch.manual_seed(seed)
    norm, attn = ChannelLayerNorm(dim), MultiScaleAttention(dim, dim_head, kv_stride)
    with torch.no_grad():
        norm.g.add_(0.1 * torch.randn_like(norm.g))
        norm.b.add_(0.1 * torch.randn_like(norm.b))
        for m in attn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return norm, attn


def _reference_embedding(x, norm, attn):
    qs, ks, vs = attn.embed(norm(x))
    return tuple(torch.stack(t, 1).transpose(2, 3) for t in (qs, ks, vs))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dim, dim_head, kv_stride, h, w", [(48, 48, 1, 5, 6), (32, 32, 2, 7, 5)])
def test_token_embedding_matches_modules(train, dim, dim_head, kv_stride, h, w, kernel_device):
    """q, k, v (token axis 16-aligned), all parameter gradients and the BatchNorm running
    statistics."""
    norm, attn = (m.to(kernel_device) for m in _layer(dim, dim_head, kv_stride))
    norm_ref, attn_ref = copy.deepcopy(norm), copy.deepcopy(attn)
    for m in (norm, attn, norm_ref, attn_ref):
        m.train(train)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, dim, h, w, generator=gen).to(kernel_device).requires_grad_()
    ours = token_embedding(x, norm, attn)
    theirs = _reference_embedding(x, norm_ref, attn_ref)
    for name, a, r in zip("qkv", ours, theirs, strict=True):
        assert a.shape == r.shape, name
        assert rel_err(a, r) <= FP32_FWD_REL, name
        assert a.stride(-1) == 1 and all(s % 16 == 0 for s in a.stride()[:3]), name
    grads = [torch.randn(r.shape, generator=gen).to(kernel_device) for r in theirs]
    torch.autograd.backward(ours, grads)
    torch.autograd.backward(theirs, grads)
    named = list(norm.named_parameters()) + list(attn.named_parameters())
    refs = list(norm_ref.parameters()) + list(attn_ref.parameters())
    for (name, p), p_ref in zip(named, refs, strict=True):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        assert rel_err(p.grad, p_ref.grad) <= FP32_GRAD_REL, name
    for (name, buf), buf_ref in zip(attn.named_buffers(), attn_ref.buffers(), strict=True):
        if buf.dtype == torch.long:
            assert torch.equal(buf, buf_ref), name
        else:
            assert rel_err(buf, buf_ref) <= FP32_FWD_REL, name
    if train:
        assert all(int(m.num_batches_tracked) == 1 for m in attn.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ln_dwconv_low_precision_gpu(dtype):
    gen = torch.Generator().manual_seed(5)
    x32 = torch.randn(2, 64, 33, 35, generator=gen).cuda()
    g, b, wt = (t.detach() for t in _params(64, device="cuda"))
    ref = _ln_dwconv_reference(x32, g, b, wt, 1)
    lowp = [t.to(dtype) for t in (x32, g, b, wt)]
    torch_lowp = _ln_dwconv_reference(*lowp, 1, upcast=False)
    ours = ln_dwconv(*lowp, 1)
    bound = LOWP_FACTOR * (torch_lowp.float() - ref).abs().max().item() + LOWP_FLOOR[dtype]
    assert (ours.float() - ref).abs().max().item() <= bound


def test_custom_ops_opcheck(kernel_device):
    """The launchers' torch.library ops: schema, fake kernels (shapes, strides), tracing."""
    x = torch.randn(2, 48, 5, 3, device=kernel_device)
    g, b, w = (t.detach() for t in _params(48, device=kernel_device))
    ops = torch.ops.msidtrans_fast
    torch.library.opcheck(ops.ln_dwconv_forward, (x, g, b, w, 2))
    y = ops.ln_dwconv_forward(x, g, b, w, 2)
    torch.library.opcheck(ops.ln_dwconv_backward, (torch.randn_like(y), x, g, b, w, 2))


def test_launchers_guard_the_tensors_device(kernel_device, monkeypatch):
    """Every launch runs inside ``device_guard`` of the input's device (Triton launches on the
    current CUDA device, not the tensors')."""
    from msidtrans_fast.kernels import token_embedding as kernels

    seen = []
    guard = kernels.device_guard
    monkeypatch.setattr(kernels, "device_guard", lambda d: seen.append(torch.device(d)) or guard(d))
    x = torch.randn(1, 32, 3, 4, device=kernel_device, requires_grad=True)
    g, b, w = _params(32, device=kernel_device)
    y = ln_dwconv(x, g, b, w, 1)
    torch.autograd.grad(y, (x, g, b, w), torch.ones_like(y))
    assert seen == [x.device, x.device]  # forward, backward


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_gpu_matches_first():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 48, 9, 10, generator=gen)
    params = [t.detach() for t in _params(48)]
    results = []
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        args = [t.to(device).requires_grad_() for t in (x, *params)]
        y = ln_dwconv(*args, 2)
        grads = torch.autograd.grad(y, args, torch.ones_like(y))
        torch.cuda.synchronize(device)
        assert y.device == torch.device(device)
        results.append([t.cpu() for t in (y, *grads)])
    for a, r in zip(*results, strict=True):
        assert rel_err(a, r) <= FP32_FWD_REL
