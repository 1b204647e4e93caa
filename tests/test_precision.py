"""The ``mixed`` precision: float32 activations, bfloat16 products of the heavy convolutions."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fuse_api import smooth_image

from msidtrans_fast import MSIDTrans, fuse, pipeline, precision, tiling, weights


def low(t):
    return t.to(torch.bfloat16)


def test_heavy_convolutions_compute_on_bf16_operands_and_return_float32():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 32, 12, 10), torch.randn(32, 32, 3, 3), torch.randn(32)
    assert precision.worth_bf16(w)
    with precision.bf16_products():
        got = F.conv2d(x, w, b, padding=1)
        got_keyword = torch.nn.functional.conv2d(x, w, bias=b, stride=2)
    assert got.dtype == torch.float32 and got_keyword.dtype == torch.float32
    torch.testing.assert_close(got, F.conv2d(low(x), low(w), low(b), padding=1).float(),
                               rtol=0, atol=0)
    torch.testing.assert_close(got_keyword, F.conv2d(low(x), low(w), low(b), stride=2).float(),
                               rtol=0, atol=0)
    assert (got - F.conv2d(x, w, b, padding=1)).abs().max() > 0  # bf16 really was used


@pytest.mark.parametrize("shape", [(32, 32, 1, 1), (32, 16, 3, 3), (16, 3, 3, 3), (64, 1, 3, 3)])
def test_light_convolutions_and_attention_stay_float32(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    groups = 64 if shape[1] == 1 else 1
    x = torch.randn(1, shape[1] * groups, 9, 11)
    assert not precision.worth_bf16(w)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    with precision.bf16_products():
        got = F.conv2d(x, w, padding=shape[-1] // 2, groups=groups)
        attention = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, F.conv2d(x, w, padding=shape[-1] // 2, groups=groups),
                               rtol=0, atol=0)
    torch.testing.assert_close(attention, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


def test_products_context_names():
    assert isinstance(precision.products_context(None), type(precision.products_context(None)))
    with pytest.raises(ValueError, match="bfloat16"):
        precision.products_context(torch.float16)


def test_model_forward_stays_close_to_float32():
    torch.manual_seed(0)
    model = MSIDTrans().eval()
    a, b = (torch.rand(1, 3, 40, 48) * 2 - 1 for _ in range(2))
    with torch.inference_mode():
        exact = model(a, b)
        with precision.bf16_products():
            mixed = model(a, b)
    assert mixed.dtype == torch.float32
    assert 0 < (mixed - exact).abs().max() < 0.05


@pytest.mark.parametrize("native, agrees, expected", [
    (True, True, "mixed"), (True, False, "float32"), (False, True, "float32")])
def test_auto_picks_mixed_only_with_native_bf16_and_agreement(monkeypatch, native, agrees,
                                                               expected):
    monkeypatch.setattr(weights, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(weights, "MIXED_AGREES", agrees)
    monkeypatch.setattr(weights, "BF16_AGREES", False)
    assert weights.auto_precision("cpu") == expected
    assert weights.resolve_precision("auto", "cpu") == expected
    assert weights.resolve_dtype("auto", "cpu") == torch.float32
    assert weights.products_dtype("auto", "cpu") == (torch.bfloat16 if expected == "mixed"
                                                      else None)


def test_precision_names():
    assert weights.resolve_precision("mixed") == "mixed"
    assert weights.resolve_dtype("mixed") == torch.float32
    assert weights.products_dtype("mixed") == torch.bfloat16
    assert weights.products_dtype("bf16") is None and weights.products_dtype(None) is None
    assert weights.resolve_precision(torch.bfloat16) == "bfloat16"
    assert weights.describe_precision("mixed") == "float32 with bfloat16 products"
    with pytest.raises(ValueError, match="mixed"):
        weights.resolve_precision("int8")


def test_fuse_applies_products_whole_and_tiled(monkeypatch):
    """dtype="mixed" runs the network under bf16_products on both decision paths; "auto" on a
    float32 model follows auto_precision."""
    torch.manual_seed(0)
    model = MSIDTrans().eval()
    a, b = smooth_image(1, shape=(48, 56, 3)), smooth_image(2, shape=(48, 56, 3))
    A, B = (pipeline.to_network_input(x, torch.device("cpu"), torch.float32) for x in (a, b))
    with torch.inference_mode():
        exact = model(A, B)[0, 0]
        with precision.bf16_products():
            mixed = model(A, B)[0, 0]
    for tile in ("off", 64):
        options = pipeline.FuseOptions(device="cpu", dtype="mixed", tile=tile)
        decider = pipeline.make_decider(options, model=model)
        torch.testing.assert_close(decider(a, b), mixed, rtol=0, atol=0)
        decider = pipeline.make_decider(pipeline.FuseOptions(device="cpu", dtype="float32",
                                                             tile=tile), model=model)
        torch.testing.assert_close(decider(a, b), exact, rtol=0, atol=0)
    for native, expected in ((True, mixed), (False, exact)):
        monkeypatch.setattr(weights, "cpu_native_bf16", lambda native=native: native)
        decider = pipeline.make_decider(pipeline.FuseOptions(device="cpu"), model=model)
        torch.testing.assert_close(decider(a, b), expected, rtol=0, atol=0)
    # tiles on worker threads: each worker enters the context itself. Two workers of one torch
    # thread each: compare with one thread (the sums' order depends on the thread count).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode(), precision.bf16_products():
            mixed_one_thread = model(A, B)[0, 0].numpy()
        torch.set_num_threads(2)
        d = tiling.tiled_decision_map(model, a, b, tile=64, overlap=16, workers=2,
                                      products=torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(d, mixed_one_thread)
    fused = fuse([a, b], model=model, dtype="mixed")
    assert fused.shape == a.shape and fused.dtype == a.dtype
