"""The benchmark baselines (``benchmarks/baselines.py``) compute what the reference model computes.

Eager paths only: compiling the model with inductor takes over a minute of CPU here, so
``pytorch_best`` is tested with ``compile=False`` plus a Dynamo trace (seconds) that checks the
compiled runner would see the whole network as one graph apart from the input checks.
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from conftest import REPO_ROOT, TESTS_DIR
from tolerances import LOWP_FACTOR, LOWP_FLOOR
from torch.utils._python_dispatch import TorchDispatchMode

from msidtrans_fast import MSIDTrans, available_backends, modules, reference

_spec = importlib.util.spec_from_file_location("baselines",
                                               REPO_ROOT / "benchmarks" / "baselines.py")
baselines = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("baselines", baselines)  # torch.compile looks modules up by name
_spec.loader.exec_module(baselines)

pywt = pytest.importorskip("pywt")

Q_PERMS = [(1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2)]
ATOL = 1e-5
SHAPES = [(1, 37, 29), (2, 29, 37)]


@pytest.fixture(scope="module")
def model():
    """The golden fixture's weights (BatchNorm statistics included), eval mode."""
    golden = torch.load(TESTS_DIR / "fixtures" / "golden_forward.pt", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in golden["state_dict_fp16"].items()}
    net = MSIDTrans(backend="reference").eval()
    net.load_state_dict(state, strict=True)
    return net


def _inputs(batch, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, h, w, generator=gen) * 2 - 1,
            torch.rand(batch, 3, h, w, generator=gen) * 2 - 1)


def _tu2_matrix_shape(batch, h, w):
    """(b, 3, N, Nk) of tu2's attention matrix: H2 x W2 queries, stride-2 keys."""
    h2, w2 = -(-h // 4), -(-w // 4)
    return (batch, 3, h2 * w2, ((h2 - 1) // 2 + 1) * ((w2 - 1) // 2 + 1))


class _RecordOps(TorchDispatchMode):
    """Records every aten op called and the shapes of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.shapes = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.name())
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.fixture
def dwt2_calls(monkeypatch):
    """Counts calls of ``pywt.dwt2`` (still computing them)."""
    calls = []
    real = pywt.dwt2

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(pywt, "dwt2", counting)
    return calls


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-{}x{}".format(*s))
@pytest.mark.parametrize("name,options", [
    ("original", {}),
    ("pytorch_best", {"compile": False}),
    ("pytorch_best", {"compile": False, "channels_last": False}),
    ("reference", {}),
], ids=["original", "pytorch_best-channels_last", "pytorch_best-contiguous", "reference"])
def test_runner_matches_reference_model(model, name, options, shape):
    A, B = _inputs(*shape)
    with torch.no_grad():
        expected = model(A, B, q_perms=Q_PERMS)
        runner = baselines.build_runner(name, model, q_perms=Q_PERMS, **options)
        got = runner(A, B)
    assert not runner.compiled
    assert runner.module is not model
    assert got.shape == expected.shape == (shape[0], 1, shape[1], shape[2])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    channels_last = name == "pytorch_best" and options.get("channels_last", True)
    weight = runner.module.Encoder1.conv[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert model.Encoder1.conv[0].weight.is_contiguous()


def test_pytorch_best_matches_reference_in_train_mode(model):
    """BatchNorm on batch statistics (train mode) through channels_last gives the same map."""
    A, B = _inputs(2, 29, 37, seed=1)
    net = MSIDTrans(backend="reference")
    net.load_state_dict(model.state_dict())
    runner = baselines.build_runner("pytorch_best", net, q_perms=Q_PERMS, compile=False)
    assert runner.module.training
    got = runner(A, B)
    expected = net(A, B, q_perms=Q_PERMS)
    # Train-mode BatchNorm divides by small batch deviations, so fp32 rounding of the reference
    # itself is ~4e-5 here: both are compared with the float64 model.
    with torch.no_grad():
        exact = copy.deepcopy(net).double()(A.double(), B.double(), q_perms=Q_PERMS)
    ours, theirs = (float((t.detach().double() - exact).abs().max()) for t in (got, expected))
    assert ours <= 2 * theirs + ATOL, (ours, theirs)
    got.sum().backward()
    assert runner.module.Encoder1.conv[0].weight.grad is not None


def test_original_materialises_attention_and_splits_through_pywt(model, dwt2_calls):
    batch, h, w = 2, 37, 29
    A, B = _inputs(batch, h, w)
    matrix = _tu2_matrix_shape(batch, h, w)
    runner = baselines.build_runner("original", model, q_perms=Q_PERMS)
    with torch.no_grad(), _RecordOps() as rec:
        runner(A, B)
    assert matrix in rec.shapes, sorted(rec.shapes)
    assert "aten::_softmax" in rec.ops
    assert not any("scaled_dot_product" in op for op in rec.ops)
    # Encoder1 on A and on B (as the original calls it), Encoder2_high/low, Encoder3_high/low.
    assert len(dwt2_calls) == 6
    assert dwt2_calls[0] == dwt2_calls[1] == (batch, 32, h, w)  # numpy arrays: on the host
    assert baselines.materialized_attention_bytes(h, w, batch) == 8 * torch.Size(matrix).numel()

    # The reference model on the same input: SDPA, no matrix, no PyWavelets.
    dwt2_calls.clear()
    with torch.no_grad(), _RecordOps() as rec:
        model(A, B, q_perms=Q_PERMS)
    assert matrix not in rec.shapes
    assert any("scaled_dot_product" in op for op in rec.ops)
    assert dwt2_calls == []


def test_original_wavelet_split_cuts_the_graph(model):
    """As in the original, no gradient reaches what lies upstream of a wavelet split."""
    A, B = _inputs(1, 37, 29)
    runner = baselines.build_runner("original", model, q_perms=Q_PERMS)
    runner(A, B).sum().backward()
    emulation = runner.module
    assert emulation.Encoder1.conv[0].weight.grad is None
    assert emulation.Encoder1.high_layer[0].weight.grad is not None
    assert emulation.ReconstructD[0].weight.grad is not None

    net = MSIDTrans(backend="reference").eval()
    net.load_state_dict(model.state_dict())
    net(A, B, q_perms=Q_PERMS).sum().backward()
    assert net.Encoder1.conv[0].weight.grad is not None


def test_building_the_original_changes_nothing_else(model, dwt2_calls):
    A, B = _inputs(1, 37, 29, seed=2)
    with torch.no_grad():
        before = model(A, B, q_perms=Q_PERMS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    module_types = [type(m) for m in model.modules()]
    attention_fn = reference.multi_scale_attention
    impls = dict(modules.ATTENTION_IMPLS)
    names = available_backends()

    runner = baselines.build_runner("original", model, q_perms=Q_PERMS)
    with torch.no_grad():
        runner(A, B)
    assert len(dwt2_calls) == 6
    assert {type(m) for m in runner.module.modules()} >= {
        baselines.MaterializedMultiScaleAttention, baselines.NumpyHaarSplit}

    assert [type(m) for m in model.modules()] == module_types
    assert modules.reference is reference
    assert reference.multi_scale_attention is attention_fn
    assert modules.ATTENTION_IMPLS == impls
    assert available_backends() == names
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    dwt2_calls.clear()
    fresh = MSIDTrans(backend="reference").eval()
    fresh.load_state_dict(state)
    with torch.no_grad(), _RecordOps() as rec:
        after = model(A, B, q_perms=Q_PERMS)
        fresh_out = fresh(A, B, q_perms=Q_PERMS)
    assert dwt2_calls == []
    assert _tu2_matrix_shape(1, 37, 29) not in rec.shapes
    assert torch.equal(after, before)
    assert torch.equal(fresh_out, before)


def test_original_under_bf16_autocast(model):
    """numpy has no bf16: the split runs in float32 on the host and returns bf16."""
    A, B = _inputs(1, 37, 29)
    with torch.no_grad():
        got = baselines.build_runner("original", model, q_perms=Q_PERMS,
                                     autocast_dtype=torch.bfloat16)(A, B)
        expected = baselines.build_runner("reference", model, q_perms=Q_PERMS,
                                          autocast_dtype=torch.bfloat16)(A, B)
        fp32 = model(A, B, q_perms=Q_PERMS)
    assert got.dtype == expected.dtype == torch.bfloat16
    # The project's low-precision rule, with the reference path under bf16 as the yardstick.
    ours, theirs = (float((t.float() - fp32).abs().max()) for t in (got, expected))
    assert ours <= LOWP_FACTOR * theirs + LOWP_FLOOR[torch.bfloat16], (ours, theirs)


def test_numpy_haar_split_matches_reference_split():
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    low, high = baselines.NumpyHaarSplit()(x)
    want_low, want_high = reference.haar_split(x)
    assert low.dtype == high.dtype == torch.float64
    torch.testing.assert_close(low, want_low, atol=1e-12, rtol=0)
    torch.testing.assert_close(high, want_high, atol=1e-12, rtol=0)


def test_pytorch_best_traces_as_one_graph_besides_input_checks(model):
    """What torch.compile sees: at most the model's two finiteness checks break the graph."""
    A, B = _inputs(1, 37, 29)
    runner = baselines.build_runner("pytorch_best", model, q_perms=Q_PERMS, compile=False,
                                    autocast_dtype=torch.bfloat16)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(runner)(A, B)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count <= 2, [r.reason for r in explanation.break_reasons]
    for reason in explanation.break_reasons:
        assert "data-dependent" in reason.reason.lower(), reason.reason
    biggest = max(explanation.graphs, key=lambda g: len(g.graph.nodes))
    convolutions = sum("conv2d" in str(n.target) for n in biggest.graph.nodes)
    assert convolutions >= 60, convolutions


def test_materialized_attention_bytes():
    # tu2 of a square side s: (s/4)^2 queries x (s/8)^2 keys x 3 groups x (4 + 4) bytes.
    assert baselines.materialized_attention_bytes(520, 520) == 3 * 130 ** 2 * 65 ** 2 * 8
    side = 1024
    assert baselines.materialized_attention_bytes(side, side) == pytest.approx(
        0.0234 * side ** 4, rel=0.01)
    assert baselines.materialized_attention_bytes(520, 520, 2, torch.bfloat16) == \
        2 * 3 * 130 ** 2 * 65 ** 2 * 6
    # Tiny inputs: t0 or tu1 (kv stride 1) can hold the largest matrix.
    assert baselines.materialized_attention_bytes(1, 1) == 3 * 8
    with pytest.raises(ValueError, match="height"):
        baselines.materialized_attention_bytes(0, 5)
    with pytest.raises(ValueError, match="autocast_dtype"):
        baselines.materialized_attention_bytes(5, 5, autocast_dtype=torch.float64)


def test_bad_arguments(model, monkeypatch):
    with pytest.raises(ValueError, match="unknown runner"):
        baselines.build_runner("eager", model)
    with pytest.raises(TypeError, match="MSIDTrans"):
        baselines.build_runner("original", torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="MSIDTrans"):
        baselines.original_emulation("model")
    with pytest.raises(ValueError, match="q_perms"):
        baselines.build_runner("reference", model, q_perms=[(0, 1, 2)] * 3)
    with pytest.raises(ValueError, match="q_perms"):
        baselines.build_runner("reference", model, q_perms=[(0, 1, 1)] * 4)
    with pytest.raises(ValueError, match="autocast_dtype"):
        baselines.build_runner("reference", model, autocast_dtype=torch.float64)
    monkeypatch.setitem(sys.modules, "pywt", None)
    with pytest.raises(ImportError, match="PyWavelets"):
        baselines.build_runner("original", model)
