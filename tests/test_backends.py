"""The backend registry: resolution per call, and backends that cannot load listed with why."""

import sys

import pytest
import torch

import msidtrans_fast
from msidtrans_fast import MSIDTrans, backends, embedding, modules


@pytest.fixture()
def registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    monkeypatch.setattr(backends, "_FAILED", dict(backends._FAILED))
    monkeypatch.setattr(backends, "ATTENTION_IMPLS", backends.ATTENTION_IMPLS)


def test_backend_that_fails_to_import_is_listed_with_its_reason(registry, monkeypatch):
    # the kernels package cannot be imported (as with the source tree on the path, uninstalled)
    monkeypatch.delitem(sys.modules, "msidtrans_fast.triton_backend", raising=False)
    monkeypatch.setitem(sys.modules, "msidtrans_fast.kernels", None)
    backends._BACKENDS.pop("triton", None)
    with pytest.warns(RuntimeWarning, match="backend 'triton' failed to load"):
        reason = backends.load_backend("triton", "msidtrans_fast.triton_backend")
    assert "ModuleNotFoundError" in reason and "msidtrans_fast.kernels" in reason
    assert msidtrans_fast.unavailable_backends() == {"triton": reason}
    assert "triton" not in msidtrans_fast.available_backends()
    with pytest.raises(ValueError, match="backend 'triton' is unavailable: ModuleNotFoundError"):
        MSIDTrans(backend="triton")
    with pytest.raises(ValueError, match="unavailable"):
        backends.resolve_backend("triton", "cpu")
    assert backends.resolve_backend("auto", "cpu") == "reference"


def test_missing_optional_package_is_recorded_without_a_warning(registry, monkeypatch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = backends.load_backend("other", "nonexistent_package_for_a_backend")
    assert reason == "the package 'nonexistent_package_for_a_backend' is not installed"
    assert backends.unavailable_backends()["other"] == reason


def test_backend_is_resolved_per_call_without_module_state(registry):
    calls = []

    def counted(block, x, perm):
        calls.append(tuple(perm))
        return block.fn(block.norm(x), perm)

    backends.register_backend("counted", lambda device: None, {}, attention=counted)
    model = MSIDTrans(backend="counted").eval()
    a = torch.rand(1, 3, 12, 12) * 2 - 1
    with torch.no_grad():
        out = model(a, a)
        model.backend = "reference"
        ref = model(a, a)
    assert len(calls) == 4  # every attention layer of the counted call, none of the other
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not any(hasattr(m, "backend") for m in model.modules() if m is not model)


def test_fused_embedding_uses_the_modules_epsilon(monkeypatch):
    seen = []
    monkeypatch.setattr(embedding, "ln_dwconv",
                        lambda x, g, b, w, stride, eps: seen.append(eps) or
                        torch.zeros(x.shape[0], 3, x.shape[1], x[0, 0].numel() // stride ** 2))
    attention = modules.MultiScaleAttention(8, 8, kv_stride=1)
    norm = modules.ChannelLayerNorm(8, eps=1e-3)
    embedding.token_embedding(torch.randn(1, 8, 4, 4), norm, attention.eval())
    assert seen == [1e-3, 1e-3]
