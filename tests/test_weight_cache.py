"""Parameter-derived weights computed once per weights version; a capturable, lean eval forward."""

import collections
import copy

import pytest
import torch
from tolerances import FP32_FWD_REL, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from msidtrans_fast import MSIDTrans, weights

SIDE = 24
#: Operators one eval forward of the reference backend dispatches at SIDE x SIDE, batch 1 (563
#: when this was written, NaN/Inf check included): BatchNorm folding and weight stacking used to
#: add about 415 more at every call.
OP_BUDGET = 580


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _model(seed=0):
    torch.manual_seed(seed)
    model = MSIDTrans().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _pair(side=SIDE, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(1, 3, side, side, generator=g) * 2 - 1 for _ in range(2))


def _fresh_output(model, A, B):
    """The decision map of a new model holding ``model``'s weights (no cache carried over)."""
    fresh = MSIDTrans().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        return fresh(A, B)


def _run(model, A, B):
    with torch.inference_mode():
        return model(A, B)


def test_eval_forward_dispatches_within_the_op_budget_and_reuses_folded_weights():
    model, (A, B) = _model(), _pair()
    _run(model, A, B)
    bn = model.Encoder1.conv[1]
    folded = bn._derived_cache["folded"][1][0]
    with torch.inference_mode(), OpCounter() as counter:
        model(A, B)
    total = sum(counter.counts.values())
    assert total <= OP_BUDGET, (total, counter.counts.most_common(10))
    assert counter.counts["rsqrt"] <= 14  # the channel LayerNorms only: no BatchNorm folding
    assert bn._derived_cache["folded"][1][0] is folded


def test_in_place_update_and_load_state_dict_invalidate_the_cache():
    model, (A, B) = _model(), _pair()
    before = _run(model, A, B)
    with torch.no_grad():
        model.Mixer[1].running_var.mul_(3.0)
        model.t0.layers[0][0].fn.Multi_scale_Token_Embeding[1][0].net[1].weight.add_(0.5)
    after = _run(model, A, B)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, _fresh_output(model, A, B), rtol=0, atol=0)

    other = _model(seed=5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_run(model, A, B), _run(other, A, B), rtol=0, atol=0)


def test_training_steps_never_see_stale_weights():
    model, (A, B) = _model(), _pair()
    _run(model, A, B)  # fills the cache
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(A, B).mean().backward()
        optimizer.step()
    model.eval()
    torch.testing.assert_close(_run(model, A, B), _fresh_output(model, A, B), rtol=0, atol=0)


def test_eval_forward_with_autograd_differentiates_through_the_folding():
    model, (A, B) = _model(), _pair()
    _run(model, A, B)  # a cached value must not cut the graph afterwards
    model(A, B).sum().backward()
    for module in (model.Mixer[1], model.Encoder1.conv[1],
                   model.tu2.layers[0][0].fn.Multi_scale_Token_Embeding[2][1].net[1]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_dtype_and_layout_changes_recompute():
    model, (A, B) = _model(), _pair()
    _run(model, A, B)
    model.to(torch.bfloat16)
    low = _run(model, A.bfloat16(), B.bfloat16())
    assert low.dtype == torch.bfloat16
    fresh = MSIDTrans().eval()
    fresh.load_state_dict(model.state_dict())
    fresh.to(torch.bfloat16)
    torch.testing.assert_close(low, _run(fresh, A.bfloat16(), B.bfloat16()), rtol=0, atol=0)


def test_channels_last_matches_the_contiguous_layout_in_fp32():
    model, (A, B) = _model(), _pair(side=40)
    ref = _run(model, A, B)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert rel_err(_run(model_cl, A, B), ref) <= FP32_FWD_REL


def test_finite_check_is_eager_only_and_can_be_skipped():
    model, (A, B) = _model(), _pair()
    A = A.clone()
    A[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        _run(model, A, B)
    with torch.inference_mode():
        assert model(A, B, check_finite=False).shape == (1, 1, SIDE, SIDE)


def test_eval_forward_compiles_as_one_graph():
    model, (A, B) = _model(), _pair(side=16)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(A, B), model(A, B), rtol=0, atol=0)


def test_cached_values_are_not_inference_tensors():
    # A cache filled under inference_mode must serve a later no-grad or frozen-weights call.
    model, (A, B) = _model(), _pair()
    _run(model, A, B)
    model.requires_grad_(False)
    A.requires_grad_(True)
    model(A, B).sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("agrees", [True, False])
def test_auto_dtype_on_the_cpu_follows_native_bf16_and_agreement(monkeypatch, native, agrees):
    monkeypatch.setattr(weights, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(weights, "BF16_AGREES", agrees)
    expected = torch.bfloat16 if native and agrees else torch.float32
    assert weights.auto_dtype("cpu") == expected
    assert weights.resolve_dtype("auto", "cpu") == expected
    assert weights.resolve_dtype("float32", "cpu") == torch.float32
    assert weights.resolve_dtype(None, "cpu") == torch.float32


def test_native_bf16_detection_agrees_with_the_cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert weights.cpu_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inference_shortcuts_match_the_autograd_path(layout):
    # In-place activations, the split 1x1 projection of the first encoder and the fused
    # channels-last LayerNorm run only without autograd; with it, the plain formulas run.
    model, (A, B) = _model(), _pair(side=40)
    model.to(memory_format=layout)
    with torch.enable_grad():
        plain = model(A, B)
    assert plain.requires_grad
    assert rel_err(_run(model, A, B), plain) <= FP32_FWD_REL


def test_channels_last_inference_under_bf16_autocast():
    model, (A, B) = _model(), _pair(side=40)
    model.to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(A, B)
    assert low.dtype == torch.bfloat16
    assert (low.float() - _run(model, A, B)).abs().max() < 0.1
