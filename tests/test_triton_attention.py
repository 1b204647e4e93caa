"""Fused multi-scale attention (``msidtrans_fast.attention``) against the reference ops.

On a machine without CUDA the kernels run in Triton's interpreter (see conftest.py); shapes are
small and odd: head sizes 32, 48, 64; N below one 64-token block and not a multiple of it;
Nq != Nk (kv stride 2); batch 2; all six permutations; non-contiguous inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import requires_cuda
from tolerances import FP32_FWD_REL, FP32_GRAD_REL, GRADCHECK, LOWP_FACTOR, LOWP_FLOOR, rel_err

from msidtrans_fast import reference

triton = pytest.importorskip("triton")
from msidtrans_fast.attention import msa_attention  # noqa: E402

PERMS = list(itertools.permutations(range(3)))


def _inputs(b, d, h, w, kv_stride, dtype=torch.float32, device="cpu", seed=0):
    """q (b, 3, d, H*W); k, v (b, 3, d, Hk*Wk) as views into one key/value tensor."""
    gen = torch.Generator().manual_seed(seed)
    hk, wk = (h - 1) // kv_stride + 1, (w - 1) // kv_stride + 1
    q = torch.randn(b, 3, d, h * w, generator=gen, dtype=torch.float64)
    kv = torch.randn(b, 3, 2 * d, hk * wk, generator=gen, dtype=torch.float64)
    q, kv = q.to(device=device, dtype=dtype), kv.to(device=device, dtype=dtype)
    return q, kv[:, :, :d], kv[:, :, d:]


def _reference(q, k, v, perm, hw):
    split = [lambda t, i=i: t[:, i].transpose(1, 2) for i in range(3)]
    return reference.multi_scale_attention([f(q) for f in split], [f(k) for f in split],
                                           [f(v) for f in split], perm, hw)


# (batch, head size, H, W, kv stride): N = 35 < one block; N = 143, Nk = 42; N = 90.
CASES = [(2, 48, 5, 7, 1), (1, 32, 13, 11, 2), (2, 64, 9, 10, 1), (1, 48, 3, 3, 2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-{}x{}-s{}".format(*c))
def test_forward_and_gradients_fp32(case):
    b, d, h, w, s = case
    q, k, v = (t.requires_grad_() for t in (t.clone() for t in _inputs(b, d, h, w, s)))
    perm = (2, 0, 1)
    out = msa_attention(q, k, v, perm, (h, w))
    ref = _reference(q, k, v, perm, (h, w))
    assert out.shape == (b, 3 * d, h, w) and out.is_contiguous()
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, r in zip("qkv", ours, theirs, strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL, name


@pytest.mark.parametrize("perm", PERMS, ids=str)
def test_every_permutation(perm):
    b, d, h, w, s = 2, 32, 7, 5, 2
    q, k, v = (t.requires_grad_() for t in (t.clone() for t in _inputs(b, d, h, w, s, seed=1)))
    out = msa_attention(q, k, v, perm, (h, w))
    ref = _reference(q, k, v, perm, (h, w))
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL


def test_groups_are_independent_and_images_too():
    """Changing image 1 or key scale 0 leaves image 0 / groups 1 and 2 untouched."""
    b, d, h, w, perm = 2, 32, 4, 5, (1, 2, 0)
    q, k, v = _inputs(b, d, h, w, 1, seed=2)
    out = msa_attention(q, k, v, perm, (h, w))
    k2 = k.clone()
    k2[1] += 1.0
    k2[0, 0] += 1.0
    out2 = msa_attention(q, k2, v, perm, (h, w))
    assert torch.equal(out[0, d:], out2[0, d:])
    assert not torch.equal(out[0, :d], out2[0, :d])
    assert not torch.equal(out[1], out2[1])


@pytest.mark.parametrize("d, h, w, s, b", [(48, 4, 5, 1, 2), (32, 5, 3, 2, 1), (64, 3, 4, 1, 1)])
def test_gradcheck_float64(d, h, w, s, b):
    q, k, v = (t.requires_grad_() for t in (t.clone() for t in
                                             _inputs(b, d, h, w, s, dtype=torch.float64)))
    assert torch.autograd.gradcheck(lambda q_, k_, v_: msa_attention(q_, k_, v_, (1, 2, 0), (h, w)),
                                    (q, k, v), fast_mode=True, **GRADCHECK)


def test_non_contiguous_inputs_and_grad_output():
    """Token-major q (a transposed view), k/v slices of one tensor, a strided grad_output."""
    b, d, h, w, perm = 2, 48, 6, 5, (0, 2, 1)
    gen = torch.Generator().manual_seed(3)
    q_tok = torch.randn(b, 3, h * w, d, generator=gen, requires_grad=True)
    kv = torch.randn(b, 3, 2 * d, 7, 9, generator=gen)[..., ::2, ::2].flatten(-2)  # (.., 16)
    kv.requires_grad_()
    q, k, v = q_tok.transpose(2, 3), kv[:, :, :d], kv[:, :, d:]
    assert not (q.is_contiguous() or k.is_contiguous())
    out = msa_attention(q, k, v, perm, (h, w))
    ref = _reference(q, k, v, perm, (h, w))
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn(b, 3 * d, w, h, generator=gen).transpose(2, 3)
    ours = torch.autograd.grad(out, (q_tok, kv), grad)
    theirs = torch.autograd.grad(ref, (q_tok, kv), grad)
    for a, r in zip(ours, theirs, strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL


def test_no_grad_inputs_save_nothing():
    q, k, v = _inputs(1, 32, 3, 3, 1)
    out = msa_attention(q, k, v, (0, 1, 2), (3, 3))
    assert out.grad_fn is None


@pytest.mark.parametrize("bad, exc, match", [
    (lambda q, k, v: (q[:, :2], k, v, (0, 1, 2), (5, 7)), ValueError, "shape"),
    (lambda q, k, v: (q, k.double(), v, (0, 1, 2), (5, 7)), TypeError, "dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int(), (0, 1, 2), (5, 7)), TypeError, "dtype"),
    (lambda q, k, v: (q, k, v[..., :-1], (0, 1, 2), (5, 7)), ValueError, "same shape"),
    (lambda q, k, v: (q, k, v, (0, 1, 1), (5, 7)), ValueError, "permutation"),
    (lambda q, k, v: (q, k, v, ("a", 1, 2), (5, 7)), TypeError, "perm"),
    (lambda q, k, v: (q, k, v, (0, 1, 2), (7, 6)), ValueError, "out_hw"),
    (lambda q, k, v: (q, k[:, :, :16], v[:, :, :16], (0, 1, 2), (5, 7)), ValueError, "head size"),
    (lambda q, k, v: (q.numpy(), k, v, (0, 1, 2), (5, 7)), TypeError, "q must be"),
])
def test_bad_inputs_raise(bad, exc, match):
    q, k, v = _inputs(1, 32, 5, 7, 1)
    with pytest.raises(exc, match=match):
        msa_attention(*bad(q, k, v))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(2, 64, 33, 33, 1), (1, 48, 65, 65, 1), (2, 32, 130, 129, 2)])
def test_low_precision_gpu(dtype, case):
    """fp16/bf16 against the fp32 reference, within twice PyTorch's own error in that dtype."""
    b, d, h, w, s = case
    q32, k32, v32 = (t.requires_grad_() for t in
                     (t.clone() for t in _inputs(b, d, h, w, s, device="cuda")))
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q32, k32, v32))
    perm = (1, 2, 0)
    ref = _reference(q32, k32, v32, perm, (h, w))
    torch_lowp = _reference(q, k, v, perm, (h, w))
    out = msa_attention(q, k, v, perm, (h, w))
    floor = LOWP_FLOOR[dtype]
    bound = LOWP_FACTOR * (torch_lowp.float() - ref).abs().max().item() + floor
    assert (out.float() - ref).abs().max().item() <= bound
    grad = torch.randn_like(ref)
    for a, p, r in zip(torch.autograd.grad(out, (q, k, v), grad.to(dtype)),
                       torch.autograd.grad(torch_lowp, (q, k, v), grad.to(dtype)),
                       torch.autograd.grad(ref, (q32, k32, v32), grad), strict=True):
        bound = LOWP_FACTOR * (p.float() - r).abs().max().item() + floor
        assert (a.float() - r).abs().max().item() <= bound


@requires_cuda
@pytest.mark.gpu
def test_deterministic_gpu():
    """Repeated forward and backward give bit-identical results (no atomics, no races)."""
    q, k, v = (t.requires_grad_() for t in
               (t.clone() for t in _inputs(2, 64, 65, 65, 1, dtype=torch.float16, device="cuda")))
    grad = torch.randn(2, 192, 65, 65, device="cuda", dtype=torch.float16)
    first = None
    for _ in range(3):
        out = msa_attention(q, k, v, (2, 1, 0), (65, 65))
        result = (out, *torch.autograd.grad(out, (q, k, v), grad))
        if first is None:
            first = result
        assert all(torch.equal(a, r) for a, r in zip(result, first, strict=True))


def test_custom_ops_opcheck():
    """The launchers' torch.library ops: schema, fake kernels (shapes, strides), tracing."""
    q, k, v = _inputs(2, 48, 5, 7, 2)
    perm = [2, 0, 1]
    ops = torch.ops.msidtrans_fast
    torch.library.opcheck(ops.msa_attention_forward, (q, k, v, perm, 5, 7))
    out, lse = ops.msa_attention_forward(q, k, v, perm, 5, 7)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.msa_attention_backward, (grad, q, k, v, out, lse, perm))


def test_torch_compile_fullgraph():
    """torch.compile traces the Function and its custom ops without graph breaks."""
    q, k, v = (t.requires_grad_() for t in (t.clone() for t in _inputs(1, 32, 5, 7, 2)))

    def attend(q_, k_, v_):
        return msa_attention(q_, k_, v_, (2, 0, 1), (5, 7))

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out, ref = compiled(q, k, v), attend(q, k, v)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        assert torch.equal(a, r)
