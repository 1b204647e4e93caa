"""Tests of the fusing API (msidtrans_fast.fuse), image IO and weights loading.

The untrained network gives an almost constant decision map, which would let a swapped or
ignored source go unnoticed. The tests therefore use "contrast" weights: the seeded untrained
network with its last convolution scaled and re-centred on a calibration pair, so D spreads over
(0, 1) and the binary map mixes both sources.
"""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from msidtrans_fast import fuse, io, pipeline, tiling, weights
from msidtrans_fast.ops import remove_small_regions

H, W = 24, 32


def smooth_image(seed, shape=(H, W, 3), dtype=np.uint8):
    """A smooth random image (blurred noise stretched to the full range)."""
    x = np.random.default_rng(seed).random(shape)
    x = ndimage.gaussian_filter(x, (1.5, 1.5, 0)[:len(shape)])
    x = (x - x.min()) / (x.max() - x.min())
    return np.round(x * np.iinfo(dtype).max).astype(dtype)


def make_contrast_state_dict(gain=200.0):
    """State dict of the seeded untrained model whose decision map varies across the image."""
    model = weights._untrained_model().eval()
    conv = model.ReconstructD[0]
    features = {}
    hook = conv.register_forward_hook(lambda m, i, o: features.__setitem__("y", o))
    a, b = smooth_image(1), smooth_image(2)
    dev = torch.device("cpu")
    with torch.inference_mode():
        model(pipeline.to_network_input(a, dev, torch.float32),
              pipeline.to_network_input(b, dev, torch.float32))
    hook.remove()
    centre = features["y"].median()
    with torch.no_grad():
        conv.weight.mul_(gain)
        conv.bias.sub_(centre).mul_(gain)
    return model.state_dict()


@pytest.fixture(scope="module")
def contrast_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "contrast.pt"
    torch.save(make_contrast_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def contrast_model(contrast_weights):
    return weights.load_model(contrast_weights, "cpu")


def by_hand(model, a, b, threshold):
    """docs/design.md "Fusing" steps written out: returns (fused float64 array, binary D)."""
    def net_input(x):
        x = x.astype(np.float64) / np.iinfo(x.dtype).max
        if x.ndim == 2:
            x = np.repeat(x[..., None], 3, axis=-1)
        x = (x - 0.5) / 0.5
        return torch.from_numpy(x).permute(2, 0, 1)[None].float()

    model.eval()
    with torch.inference_mode():
        D = model(net_input(a), net_input(b))
    mask = D > 0.5
    if threshold:
        mask = remove_small_regions(mask, math.ceil(threshold * a.shape[0] * a.shape[1]))
    d = mask[0, 0].numpy().astype(np.float64)
    if a.ndim == 3:
        d = d[..., None]
    return a * d + b * (1 - d), mask[0, 0].numpy()


# ----------------------------------------------------------------------------------- API parity
@pytest.mark.parametrize("threshold", [0.0, 0.001, 0.05])
def test_pair_equals_spec_steps_by_hand(contrast_model, threshold):
    a, b = smooth_image(1), smooth_image(2)
    fused, dm = fuse([a, b], model=contrast_model, dtype="float32", threshold=threshold,
                     return_decision_map=True)
    expected, mask = by_hand(contrast_model, a, b, threshold)
    assert fused.dtype == np.uint8 and fused.shape == (H, W, 3)
    np.testing.assert_array_equal(fused, expected.astype(np.uint8))
    np.testing.assert_array_equal(dm, mask.astype(np.float32))
    assert dm.dtype == np.float32
    assert 0.05 < dm.mean() < 0.95, "the contrast weights must mix both sources"


def test_consistency_check_changes_the_map(contrast_model):
    a, b = smooth_image(1), smooth_image(2)
    _, raw = fuse([a, b], model=contrast_model, threshold=0, return_decision_map=True)
    _, checked = fuse([a, b], model=contrast_model, threshold=0.05, return_decision_map=True)
    assert not np.array_equal(raw, checked)


def test_min_area_is_ceil_of_real_area():
    assert pipeline.min_area(0.001, 520, 520) == 271  # area 270.4: sizes <= 270 go
    assert pipeline.min_area(0.001, 1000, 1000) == 1000  # area 1000: sizes <= 999 go
    assert pipeline.min_area(0.02, H, W) == 16  # area 15.36
    assert pipeline.min_area(0, H, W) == 0


def test_sixteen_bit_and_gray_keep_depth_and_channels(contrast_model):
    a16, b16 = smooth_image(1, dtype=np.uint16), smooth_image(2, dtype=np.uint16)
    fused = fuse([a16, b16], model=contrast_model, dtype="float32")
    expected, _ = by_hand(contrast_model, a16, b16, 0.001)
    assert fused.dtype == np.uint16
    np.testing.assert_array_equal(fused, expected.astype(np.uint16))

    ga, gb = a16[..., 1], b16[..., 1]
    gray = fuse([ga, gb], model=contrast_model)
    assert gray.shape == (H, W) and gray.dtype == np.uint16
    # the network sees gray replicated to RGB, so gray equals one channel of the replicated fusion
    rgb = fuse([np.repeat(ga[..., None], 3, -1), np.repeat(gb[..., None], 3, -1)],
               model=contrast_model)
    np.testing.assert_array_equal(gray, rgb[..., 0])


def test_source_types_give_the_same_result(contrast_model, tmp_path):
    a, b = smooth_image(1), smooth_image(2)
    expected = fuse([a, b], model=contrast_model)
    pa, pb = tmp_path / "a.png", tmp_path / "b.tif"
    io.write_image(pa, a)
    io.write_image(pb, b)
    variants = [
        [str(pa), pb],
        [Image.fromarray(a), Image.fromarray(b).convert("RGBA")],
        [torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1)],
    ]
    for sources in variants:
        np.testing.assert_array_equal(fuse(sources, model=contrast_model), expected)
    floats = fuse([a / 255.0, b / 255.0], model=contrast_model)
    assert floats.dtype == np.float32
    np.testing.assert_allclose(floats * 255, expected, atol=1e-3)


def test_mixed_gray_and_rgb_give_rgb(contrast_model):
    a, b = smooth_image(1), smooth_image(2)
    fused = fuse([a[..., 0], b], model=contrast_model)
    expected = fuse([np.repeat(a[..., :1], 3, -1), b], model=contrast_model)
    np.testing.assert_array_equal(fused, expected)


def test_stack_votes_over_all_pairs(contrast_model):
    sources = [smooth_image(s) for s in (1, 2, 3, 4)]
    fused, labels = fuse(sources, model=contrast_model, return_decision_map=True)
    wins = np.zeros((4, H, W), dtype=int)
    for i in range(4):
        for j in range(i + 1, 4):
            _, d = fuse([sources[i], sources[j]], model=contrast_model, return_decision_map=True)
            wins[i] += d == 1
            wins[j] += d == 0
    np.testing.assert_array_equal(labels, wins.argmax(0))
    assert labels.dtype == np.int64 and len(np.unique(labels)) >= 2
    picked = np.take_along_axis(np.stack(sources), labels[None, ..., None].repeat(3, -1), 0)[0]
    np.testing.assert_array_equal(fused, picked)
    grey = pipeline.decision_map_image(labels, 4)
    assert set(np.unique(grey)) <= {255, 170, 85, 0}
    assert pipeline.stack_runs(4) == 6 and pipeline.stack_runs(2) == 1


def test_large_stack_folds_pairwise(contrast_model):
    n = pipeline.VOTE_MAX_SOURCES + 1
    sources = [smooth_image(s, shape=(8, 10, 3)) for s in range(n)]
    fused, labels = fuse(sources, model=contrast_model, threshold=0, return_decision_map=True)
    running = sources[0]
    for s in sources[1:]:
        running = fuse([running, s], model=contrast_model, threshold=0)
    np.testing.assert_array_equal(fused, running)
    picked = np.take_along_axis(np.stack(sources), labels[None, ..., None].repeat(3, -1), 0)[0]
    np.testing.assert_array_equal(fused, picked)
    assert pipeline.stack_runs(n) == n - 1


def test_train_mode_model_runs_in_eval_and_is_restored(contrast_weights):
    model = weights.load_model(contrast_weights, "cpu").train()
    a, b = smooth_image(1), smooth_image(2)
    first = fuse([a, b], model=model)
    assert model.training
    np.testing.assert_array_equal(first, fuse([a, b], model=model))


def test_default_model_is_cached_and_warns_untrained(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "BUNDLED_WEIGHTS", tmp_path / "absent.pt")
    pipeline.clear_model_cache()
    a, b = smooth_image(1), smooth_image(2)
    with pytest.warns(weights.UntrainedWeightsWarning, match="UNTRAINED"):
        fuse([a, b], device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", weights.UntrainedWeightsWarning)
        model = pipeline.get_model(None, "cpu")  # cached: no second warning
        assert model is pipeline.get_model(None, "cpu")
    pipeline.clear_model_cache()


def test_bad_arguments_raise(contrast_model, contrast_weights):
    a, b = smooth_image(1), smooth_image(2)
    cases = [
        ([a], {}, ValueError, "at least two"),
        ([a, b[:20]], {}, ValueError, "differ in size"),
        ([a, smooth_image(2, dtype=np.uint16)], {}, ValueError, "bit depth"),
        ([a, b.astype(np.int32)], {}, TypeError, "dtype"),
        ([a, b / 100.0], {}, ValueError, r"\[0, 1\]"),
        ([a, np.zeros((H, W, 5), np.uint8)], {}, ValueError, "shape"),
        ([a, object()], {}, TypeError, "expected a file path"),
        ([a, b], {"threshold": -0.1}, ValueError, "threshold"),
        ([a, b], {"weights": contrast_weights}, ValueError, "not both"),
        ([a, b], {"dtype": "float16"}, ValueError, "dtype"),
    ]
    for sources, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fuse(sources, model=contrast_model, **kwargs)
    with pytest.raises(TypeError, match="sequence"):
        fuse(a, model=contrast_model)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        fuse(["missing.png", b], model=contrast_model)


class GradientDecider:
    """A decision stage without the network: D rises from 0 to 1 across the image, with a small
    island of 1 that the consistency check removes."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def __call__(self, a, b):
        self.calls.append((a.shape, b.shape))
        h, w = a.shape[:2]
        d = torch.linspace(0, 1, w).expand(h, w).clone()
        d[2:4, 2:4] = 1.0
        return d

    def memory_needed(self, height, width):
        return 0


def test_stages_compose_what_the_decision_stage_says():
    a, b, c = smooth_image(1), smooth_image(2), smooth_image(3)
    decider = GradientDecider()
    assert isinstance(decider, pipeline.Decider)
    options = pipeline.FuseOptions(threshold=0.01)
    sources = io.load_sources([a, b])
    result = pipeline.fuse_sources(sources, decider, options)
    keep = torch.linspace(0, 1, W).expand(H, W).numpy() > 0.5  # the island is gone
    np.testing.assert_array_equal(result.image, np.where(keep[..., None], a, b))
    np.testing.assert_array_equal(result.decision_map(2), keep.astype(np.float32))
    # without the check the island stays
    raw = pipeline.binarise(decider(a, b), 0, "original").numpy()
    assert raw[2:4, 2:4].all() and not keep[2:4, 2:4].any()
    # a stack asks the same stage about every pair, and reports each run
    runs = []
    decider.calls.clear()
    pipeline.fuse_sources(io.load_sources([a, b, c]), decider, options,
                          lambda: runs.append(1))
    assert len(runs) == pipeline.stack_runs(3) == 3 and len(decider.calls) == 3


def test_options_object_equals_keywords(contrast_model):
    a, b = smooth_image(1), smooth_image(2)
    options = pipeline.FuseOptions(threshold=0.05)
    np.testing.assert_array_equal(fuse([a, b], options, model=contrast_model),
                                  fuse([a, b], model=contrast_model, threshold=0.05))
    with pytest.raises(ValueError, match="either options or threshold"):
        fuse([a, b], options, model=contrast_model, threshold=0.05)
    with pytest.raises(ValueError, match="threshold"):
        pipeline.FuseOptions(threshold=1.0)
    assert isinstance(pipeline.make_decider(options, model=contrast_model), tiling.TiledDecider)
    whole = pipeline.FuseOptions(threshold=0.05, tile=None)
    decider = pipeline.make_decider(whole, model=contrast_model)
    assert isinstance(decider, pipeline.WholeImageDecider)
    assert decider.memory_needed(1000, 1000) > decider.memory_needed(100, 100) > 0
    d = decider(io.load_sources([a, b])[0], io.load_sources([a, b])[1])
    assert d.shape == (H, W) and d.dtype == torch.float32 and 0 <= d.min() <= d.max() <= 1


# --------------------------------------------------------------------------------------- weights
def test_load_model_checkpoint_formats_and_errors(tmp_path, contrast_weights):
    state = torch.load(contrast_weights, weights_only=True)
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                "epoch": 3,  # and RNG states, as msidtrans-train saves it
                "rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}}, wrapped)
    model = weights.load_model(wrapped, "cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.state_dict()["ReconstructD.0.bias"],
                       state["ReconstructD.0.bias"].half().float())

    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(ValueError, match="not an MSI-DTrans checkpoint"):
        weights.load_model(other, "cpu")
    wrong_shape = dict(state, **{"ReconstructD.0.bias": torch.zeros(2)})
    torch.save(wrong_shape, other)
    with pytest.raises(ValueError, match="another shape"):
        weights.load_model(other, "cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        weights.load_model(garbage, "cpu")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        weights.load_model(tmp_path / "nowhere.pt", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        weights.resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        weights.resolve_dtype("int8")
    assert weights.resolve_dtype("bf16") == torch.bfloat16


# -------------------------------------------------------------------------------------------- io
@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 3)])
def test_io_round_trip_is_exact(tmp_path, suffix, dtype, shape):
    array = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, dtype=dtype,
                                              endpoint=True)
    path = io.write_image(tmp_path / f"x{suffix}", array)
    back = io.read_image(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file left behind"


def test_io_formats_and_refusals(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 255, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.png"), rgba[..., :3])
    Image.fromarray(rgba[..., :3]).save(tmp_path / "a.jpg", quality=95)
    assert io.read_image(tmp_path / "a.jpg").shape == (5, 6, 3)
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "p.bmp")
    np.testing.assert_array_equal(io.read_image(tmp_path / "p.bmp"),
                                  np.asarray(palette.convert("RGB")))

    target = tmp_path / "out.png"
    io.write_image(target, rgba[..., 0])
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        io.write_image(target, rgba[..., 1])
    assert target.read_bytes() == before
    io.write_image(target, rgba[..., 1], overwrite=True)
    np.testing.assert_array_equal(io.read_image(target), rgba[..., 1])
    with pytest.raises(ValueError, match="8-bit"):
        io.write_image(tmp_path / "x.jpg", rgba[..., 0].astype(np.uint16))
    with pytest.raises(ValueError, match="unsupported output format"):
        io.write_image(tmp_path / "x.gif", rgba[..., 0])
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(io.ImageFormatError, match="t.png"):
        io.read_image(tmp_path / "t.png")
    assert sorted(os.listdir(tmp_path)) == ["a.jpg", "a.png", "out.png", "p.bmp", "t.png"]
