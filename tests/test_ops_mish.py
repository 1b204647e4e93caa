"""ops.mish_ (compiled and fallback) against torch.nn.functional.mish, and its use in the model."""

import pytest
import torch
import torch.nn.functional as F

from msidtrans_fast import MSIDTrans, ops

#: Largest relative error of the compiled float32 Mish against F.mish (both a few ulp off the
#: exact value; measured at most 5 ulp apart, about 3e-7).
REL = 1e-6
#: Below this magnitude both results are subnormal and hold only a few significant bits.
ATOL = 1e-37


def needs_compiled_cpu():
    if not ops.compiled()["mish_"]["cpu"]:
        pytest.skip("msidtrans_fast._C is not built")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Shapes of the tensors the compiled kernel received (it still runs)."""
    needs_compiled_cpu()
    calls = []
    compiled = ops._C.mish_
    monkeypatch.setattr(ops._C, "mish_", lambda x: calls.append(tuple(x.shape)) or compiled(x))
    return calls


def special_values() -> torch.Tensor:
    big = torch.finfo(torch.float32).max
    tiny = torch.finfo(torch.float32).tiny
    return torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), big, -big,
                         tiny, -tiny, tiny / 8, -tiny / 8, 1e-45, -1e-45, 20.0, 20.5, -20.0,
                         88.7, 89.0, -87.3, -103.5, -104.0, -104.5, 1e-3, -1e-3])


def check(got: torch.Tensor, x: torch.Tensor) -> None:
    want = F.mish(x)
    torch.testing.assert_close(got, want, rtol=REL, atol=ATOL, equal_nan=True)
    finite = torch.isfinite(want)
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))  # signed zeros


@pytest.mark.parametrize("n", [0, 1, 7, 16, 17, 33, 100_003])
def test_matches_torch_on_a_wide_range(kernel_calls, n):
    x = torch.cat([torch.linspace(-100, 100, n), special_values()])
    got = x.clone()
    assert ops.mish_(got) is got
    check(got, x)
    assert kernel_calls == [tuple(x.shape)]


def test_channels_last_and_empty(kernel_calls):
    x = torch.randn(2, 5, 7, 3, generator=torch.Generator().manual_seed(0)) * 8
    x = x.contiguous(memory_format=torch.channels_last)
    got = x.clone(memory_format=torch.preserve_format)
    ops.mish_(got)
    assert got.is_contiguous(memory_format=torch.channels_last)
    check(got, x)
    empty = torch.empty(0, 3)
    assert ops.mish_(empty).numel() == 0
    assert kernel_calls == [(2, 5, 7, 3), (0, 3)]


def test_bfloat16_equals_torch_on_every_value(kernel_calls):
    """Computed in float32 and rounded once to nearest even, as F.mish does: the same bits."""
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    got = x.clone()
    ops.mish_(got)
    want = F.mish(x)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan])
    assert kernel_calls == [(2**16,)]


@pytest.mark.parametrize("case", ["float64", "float16", "strided", "grad", "forced"])
def test_fallbacks_give_torch_results(kernel_calls, case):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 5
    if case in ("float64", "float16"):
        x = x.to(getattr(torch, case))
    elif case == "strided":
        x = x[:, ::2]
    want = F.mish(x)
    if case == "grad":
        leaf = x.clone().requires_grad_(True)
        y = leaf * 1.0
        out = ops.mish_(y)
        out.sum().backward()
        torch.testing.assert_close(leaf.grad, torch.func.grad(lambda t: F.mish(t).sum())(x))
    elif case == "forced":
        with ops.pytorch_fallback():
            out = ops.mish_(x)
    else:
        out = ops.mish_(x)
    assert torch.equal(out.detach(), want)
    assert kernel_calls == []


def test_opcheck_and_fullgraph_compile():
    needs_compiled_cpu()
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.msidtrans_fast.mish_, (x,))
    fn = torch.compile(lambda t: ops.mish_(t * 2), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), F.mish(x * 2), rtol=REL, atol=ATOL)


def test_model_uses_the_kernel_only_without_autograd(kernel_calls):
    model = MSIDTrans().eval()
    a = torch.rand(1, 3, 12, 10) * 2 - 1
    with torch.no_grad():
        model(a, a)
    assert len(kernel_calls) == 41  # every Mish of an eval forward (Encoder1 runs twice)
    kernel_calls.clear()
    model(a, a)
    assert kernel_calls == []
