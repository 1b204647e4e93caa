"""ops.haar_split (compiled and fallback) against PyWavelets, its gradient, and the model."""

import warnings

import numpy as np
import pytest
import torch

from msidtrans_fast import ops, reference
from tests.conftest import requires_cuda

pywt = pytest.importorskip("pywt")

SHAPES = [(1, 1, 2, 2), (2, 3, 8, 6), (1, 4, 7, 9), (2, 2, 1, 5), (1, 2, 6, 1), (1, 1, 1, 1),
          (3, 5, 13, 17), (1, 2, 31, 20)]
# Largest error of the fp32 split against PyWavelets on float32 input: same sums in the same
# order, so equal up to the rounding of the last operation.
FP32_ATOL = 1e-6


def needs_compiled_cpu():
    if not ops.compiled()["haar_split"]["cpu"]:
        pytest.skip("msidtrans_fast._C is not built")


def pywt_split(x: torch.Tensor):
    c_a, (c_h, c_v, c_d) = pywt.dwt2(x.detach().cpu().numpy(), "haar", mode="zero")
    return c_a, np.concatenate([c_h, c_v, c_d], axis=1)


def compiled_split(x):
    needs_compiled_cpu()
    return ops.haar_split(x)


IMPLS = {"compiled": compiled_split, "reference": reference.haar_split}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pywavelets(impl, shape, dtype):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(sum(shape)))
    low, high = IMPLS[impl](x)
    want_low, want_high = pywt_split(x)
    h2, w2 = (shape[2] + 1) // 2, (shape[3] + 1) // 2
    assert low.shape == (shape[0], shape[1], h2, w2) and low.dtype == dtype
    assert high.shape == (shape[0], 3 * shape[1], h2, w2) and high.dtype == dtype
    atol = FP32_ATOL if dtype == torch.float32 else 1e-14
    np.testing.assert_allclose(low.numpy(), want_low, rtol=0, atol=atol)
    np.testing.assert_allclose(high.numpy(), want_high, rtol=0, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_equals_reference_exactly(shape):
    needs_compiled_cpu()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for got, want in zip(ops.haar_split(x), reference.haar_split(x), strict=True):
        assert torch.equal(got, want)


def test_non_contiguous_input():
    needs_compiled_cpu()
    x = torch.randn(2, 9, 11, 3).permute(0, 3, 1, 2)[:, 1:]  # neither layout: copied
    for got, want in zip(ops.haar_split(x), reference.haar_split(x), strict=True):
        assert torch.equal(got, want) and got.is_contiguous()


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_in_channels_last_out(shape, dtype):
    """Read and written as channels_last (no layout copy), the same values as the NCHW path."""
    needs_compiled_cpu()
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    got = ops.haar_split(channels_last(x))
    for out, nchw, ref in zip(got, ops.haar_split(x), reference.haar_split(x), strict=True):
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, nchw) and torch.equal(out, ref)


def test_channels_last_backward_matches_reference():
    needs_compiled_cpu()
    x = channels_last(torch.randn(2, 5, 9, 12)).requires_grad_(True)
    g_low, g_high = torch.randn(2, 5, 5, 6), torch.randn(2, 15, 5, 6)
    (grad,) = torch.autograd.grad(ops.haar_split(x), x, (g_low, channels_last(g_high)))
    (want,) = torch.autograd.grad(reference.haar_split(x), x, (g_low, g_high))
    assert grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(1, 2, 5, 7), (2, 1, 6, 4), (1, 1, 1, 3), (1, 3, 3, 1)])
def test_gradcheck_float64(shape, layout):
    needs_compiled_cpu()
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.haar_split, (x,))
    if shape == (1, 2, 5, 7):
        assert torch.autograd.gradgradcheck(ops.haar_split, (x,))


def test_backward_matches_reference():
    needs_compiled_cpu()
    x = torch.randn(2, 3, 9, 12, requires_grad=True)
    g_low, g_high = torch.randn(2, 3, 5, 6), torch.randn(2, 9, 5, 6)
    (grad,) = torch.autograd.grad(ops.haar_split(x), x, (g_low, g_high))
    (want,) = torch.autograd.grad(reference.haar_split(x), x, (g_low, g_high))
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-6)
    # only one output used: the other's gradient is zero
    (grad_low_only,) = torch.autograd.grad(ops.haar_split(x)[0].sum(), x)
    (want_low_only,) = torch.autograd.grad(reference.haar_split(x)[0].sum(), x)
    torch.testing.assert_close(grad_low_only, want_low_only, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_opcheck(layout):
    needs_compiled_cpu()
    x = torch.randn(2, 3, 7, 6).contiguous(memory_format=layout).requires_grad_(True)
    torch.library.opcheck(torch.ops.msidtrans_fast.haar_split_forward, (x,))
    g_low = torch.randn(2, 3, 4, 3).contiguous(memory_format=layout)
    g_high = torch.randn(2, 9, 4, 3).contiguous(memory_format=layout)
    torch.library.opcheck(torch.ops.msidtrans_fast.haar_split_backward, (g_low, g_high, 7, 6))


def test_compiles_with_torch_compile():
    needs_compiled_cpu()
    x = torch.randn(1, 2, 9, 8)
    fn = torch.compile(ops.haar_split, backend="eager", fullgraph=True)
    for got, want in zip(fn(x), reference.haar_split(x), strict=True):
        assert torch.equal(got, want)


def test_other_dtypes_fall_back_to_reference():
    x = torch.randn(1, 2, 5, 6).to(torch.bfloat16)
    for got, want in zip(ops.haar_split(x), reference.haar_split(x), strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_input_validation():
    with pytest.raises(ValueError, match=r"\(b, C, H, W\)"):
        ops.haar_split(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        ops.haar_split(torch.zeros(1, 1, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.haar_split(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="empty"):
        ops.haar_split(torch.zeros(1, 1, 0, 4))


def test_model_calls_the_compiled_split_on_the_cpu_under_auto(monkeypatch):
    needs_compiled_cpu()
    from msidtrans_fast import MSIDTrans

    assert ops.compiled()["haar_split"]["cpu"]
    calls = []
    compiled = ops._C.haar_split_forward
    monkeypatch.setattr(ops._C, "haar_split_forward",
                        lambda x: calls.append(tuple(x.shape)) or compiled(x))
    model = MSIDTrans().eval()  # backend "auto": "reference" attention on the CPU
    assert model.backend == "reference"
    a = torch.rand(1, 3, 20, 24) * 2 - 1
    with torch.no_grad():
        model(a, a)
    assert len(calls) == 6  # Encoder1 on A and on B, and the four encoder trunks
    calls.clear()
    with ops.pytorch_fallback(), torch.no_grad():
        model(a, a)
    assert not calls


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_model_with_compiled_ops_matches_the_pytorch_fallback(layout):
    """The compiled Haar split and Mish against the fallbacks, through the whole model."""
    needs_compiled_cpu()
    from msidtrans_fast import MSIDTrans

    torch.manual_seed(0)
    model = MSIDTrans(backend="reference").eval().to(memory_format=layout)
    a = torch.rand(1, 3, 35, 42) * 2 - 1
    b = torch.rand(1, 3, 35, 42) * 2 - 1
    a.requires_grad_(True)
    with ops.pytorch_fallback():
        with torch.no_grad():
            want = model(a, b)
        (g_want,) = torch.autograd.grad(model(a, b).sum(), a)
    with torch.no_grad():
        got = model(a, b)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # gradients reach the input through the compiled split as through the fallback
    (g_got,) = torch.autograd.grad(model(a, b).sum(), a)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_IMPORT_ERROR", "simulated")
    monkeypatch.setattr(ops, "_warned", False)
    assert ops.compiled() == {"extension": {"built": False},
                              "haar_split": {"cpu": False, "cuda": False},
                              "mish_": {"cpu": False, "cuda": False},
                              "remove_small_regions": {"cpu": False, "cuda": False}}
    x = torch.randn(1, 1, 4, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            low, _ = ops.haar_split(x)
            ops.mish_(x.clone())
            ops.remove_small_regions(torch.zeros(1, 1, 3, 3, dtype=torch.bool), 2)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "msidtrans_fast._C" in messages[0]
    assert "pip install --no-build-isolation -e ." in messages[0]
    assert torch.equal(low, reference.haar_split(x)[0])


class _CpuOnlyExtension:
    """Stands in for an ``_C`` built without CUDA."""

    @staticmethod
    def has_cuda() -> bool:
        return False


def test_cuda_fallback_warns_once(monkeypatch):
    """An extension built without CUDA: the first CUDA tensor that takes a fallback warns, once;
    CPU tensors never do."""
    monkeypatch.setattr(ops, "_C", _CpuOnlyExtension())
    monkeypatch.setattr(ops, "_warned_cuda", False)
    assert ops.compiled()["haar_split"] == {"cpu": True, "cuda": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops._warn_no_cuda(torch.device("cpu"))
        for _ in range(3):
            ops._warn_no_cuda(torch.device("cuda", 0))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "built without its CUDA kernels" in messages[0] and "FORCE_CUDA=1" in messages[0]


@requires_cuda
def test_cuda_tensors_on_a_cpu_only_extension_warn(monkeypatch):
    """The same through the public ops, with real CUDA tensors."""
    monkeypatch.setattr(ops, "_C", _CpuOnlyExtension())
    monkeypatch.setattr(ops, "_warned_cuda", False)
    x = torch.randn(1, 2, 5, 4, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        low, _ = ops.haar_split(x)
        ops.remove_small_regions(torch.zeros(1, 1, 3, 3, dtype=torch.bool, device="cuda"), 2)
    assert len(caught) == 1 and "built without its CUDA kernels" in str(caught[0].message)
    assert torch.equal(low, reference.haar_split(x)[0])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 4, 7, 9), (1, 1, 1, 1), (2, 32, 65, 33)])
def test_cuda_matches_reference(dtype, shape):
    if not ops.compiled()["haar_split"]["cuda"]:
        pytest.skip("msidtrans_fast._C was built without CUDA")
    x64 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = x64.to(dtype).cuda().requires_grad_(True)
    low, high = ops.haar_split(x)
    want_low, want_high = reference.haar_split(x.detach().double().cpu())
    # fp32 accumulation: one rounding to the output dtype
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 2e-3,
           torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(low.double().cpu(), want_low, rtol=tol, atol=tol)
    torch.testing.assert_close(high.double().cpu(), want_high, rtol=tol, atol=tol)
    g_low, g_high = torch.randn_like(low), torch.randn_like(high)
    (grad,) = torch.autograd.grad((low, high), x, (g_low, g_high))
    xr = x.detach().double().cpu().requires_grad_(True)
    (want,) = torch.autograd.grad(reference.haar_split(xr), xr,
                                  (g_low.double().cpu(), g_high.double().cpu()))
    torch.testing.assert_close(grad.double().cpu(), want, rtol=tol, atol=tol)
    (again,) = torch.autograd.grad(ops.haar_split(x), x, (g_low, g_high))
    assert torch.equal(grad, again)
