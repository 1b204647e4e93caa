"""Decision rules of the binarise stage on constructed pairs and soft maps."""

import numpy as np
import pytest
import torch

from msidtrans_fast import decision as dr
from msidtrans_fast import io, metrics, pipeline
from msidtrans_fast.cli import build_parser
from msidtrans_fast.ops import remove_small_regions


def backdrop_pair(h=64, w=96, offset=5, seed=0):
    """uint8 (H, W, 1) sources A, B: a flat backdrop, B brighter by ``offset`` (an exposure
    change); a textured block at the top left, sharp in A, box-blurred in B. Also the block."""
    rng = np.random.default_rng(seed)
    a = np.full((h, w), 100, np.uint8)
    block = (slice(6, 30), slice(6, 36))
    a[block] = rng.integers(40, 200, size=(24, 30))
    k = np.ones(5) / 5
    smooth = np.apply_along_axis(np.convolve, 1, a[block].astype(float), k, "same")
    b = a.astype(np.int64) + offset
    b[block] = np.round(np.apply_along_axis(np.convolve, 0, smooth, k, "same")) + offset
    return a[..., None], np.clip(b, 0, 255).astype(np.uint8)[..., None], block


def blotchy_soft_map(block, h=64, w=96):
    """D: A (0.9) on the block, B (0.1) on the backdrop but for three confident A blotches."""
    soft = torch.full((h, w), 0.1)
    soft[block] = 0.9
    for y, x in ((40, 50), (48, 70), (20, 70)):
        soft[y:y + 8, x:x + 10] = 0.95
    return soft


class SoftMapDecider:
    """A decision stage that returns a fixed soft map."""

    device = torch.device("cpu")

    def __init__(self, soft):
        self.soft = soft

    def __call__(self, a, b):
        return self.soft.clone()

    def memory_needed(self, height, width):
        return 0


def test_original_rule_is_threshold_then_consistency_check():
    soft = torch.rand(40, 50, generator=torch.Generator().manual_seed(1))
    expected = remove_small_regions((soft > 0.5)[None, None], 2)[0, 0]  # ceil(0.001 * 2000)
    assert torch.equal(pipeline.binarise(soft, 0.001, "original"), expected)
    assert torch.equal(pipeline.binarise(soft, 0, "original"), soft > 0.5)


def test_flat_rule_removes_blotches_and_keeps_the_textured_decision():
    a, b, block = backdrop_pair()
    soft = blotchy_soft_map(block)
    original = pipeline.binarise(soft, 0, "original").numpy()
    flat = pipeline.binarise(soft, 0, "flat", a, b).numpy()
    fused = {k: np.where(d, a[..., 0], b[..., 0]) for k, d in (("orig", original), ("flat", flat))}
    assert metrics.blotch(a, b, fused["orig"]) > 1.0
    assert metrics.blotch(a, b, fused["flat"]) == 0.0
    assert flat[block].all()  # the sharp block stays with A
    assert not flat[40:60, 40:].any()  # the backdrop is B throughout, as most of it was
    textured = ~dr.flat_regions(a, b)
    assert textured[block].all()
    np.testing.assert_array_equal(flat[textured], original[textured])
    # with the consistency check, as the pipeline runs it
    checked = pipeline.binarise(soft, 0.001, "flat", a, b)
    expected = remove_small_regions(torch.from_numpy(flat)[None, None], 7)[0, 0]
    assert torch.equal(checked, expected)


def test_fill_flat_regions_majority_per_component():
    decision = torch.zeros(6, 9, dtype=torch.bool)
    flat = torch.zeros(6, 9, dtype=torch.bool)
    flat[:, :4] = True  # left component: 13 of 24 True -> True
    decision[:, :4] = (torch.arange(24) < 13).view(6, 4)
    flat[:, 5:] = True  # right component: 12 of 24 True, a tie -> False
    decision[:3, 5:] = True
    decision[:, 4] = torch.tensor([True, False, True, False, True, False])  # not flat
    out = dr.fill_flat_regions(decision, flat)
    assert out[:, :4].all() and not out[:, 5:].any()
    assert torch.equal(out[:, 4], decision[:, 4])
    assert torch.equal(dr.fill_flat_regions(decision, torch.zeros_like(flat)), decision)


def test_flat_regions_on_every_source_scale():
    a, b, _ = backdrop_pair()
    ref = dr.flat_regions(a, b)
    assert ref.shape == a.shape[:2] and ref.any() and not ref.all()
    a16, b16 = (x.astype(np.uint16) * 257 for x in (a, b))
    np.testing.assert_array_equal(dr.flat_regions(a16, b16), ref)
    af, bf = (x.astype(np.float32) / 255 for x in (a, b))
    np.testing.assert_array_equal(dr.flat_regions(af, bf), ref)
    rgb = [np.repeat(x, 3, -1) for x in (a, b)]
    np.testing.assert_array_equal(dr.flat_regions(*rgb), ref)


def test_fuse_with_each_rule_and_bad_rules():
    a, b, block = backdrop_pair()
    decider = SoftMapDecider(blotchy_soft_map(block))
    sources = io.load_sources([a, b])
    fused = {rule: pipeline.fuse_sources(sources, decider, pipeline.FuseOptions(
        threshold=0, decision_rule=rule)).image for rule in dr.DECISION_RULES}
    assert metrics.blotch(a, b, fused["original"]) > 1.0
    assert metrics.blotch(a, b, fused["flat"]) == 0.0
    default = pipeline.fuse_sources(sources, decider, pipeline.FuseOptions(threshold=0)).image
    np.testing.assert_array_equal(default, fused[dr.DEFAULT_RULE])
    with pytest.raises(ValueError, match="unknown decision rule"):
        pipeline.FuseOptions(decision_rule="smooth")
    with pytest.raises(ValueError, match="needs the sources"):
        pipeline.binarise(torch.zeros(8, 8), 0, "flat")
    args = build_parser().parse_args(["x.png", "y.png", "-o", "f.png"])
    assert args.decision_rule == dr.DEFAULT_RULE
    args = build_parser().parse_args(["x.png", "y.png", "-o", "f.png", "--decision-rule", "flat"])
    assert args.decision_rule == "flat"


def test_flat_regions_follow_the_metrics_definition_on_a_photo():
    """The float32 OpenCV computation against the float64 reference of ``metrics``."""
    data = pipeline.__file__.replace("pipeline.py", "data/")
    a, b = io.load_sources([data + "sample_near.png", data + "sample_far.png"])
    b = np.clip(np.round(b * 1.03 + 3), 0, 255).astype(np.uint8)  # an exposure change
    for level in (1.0, 2.0):
        got = dr.flat_regions(a, b, level)
        ya, yb = metrics.to_luminance(a), metrics.to_luminance(b)
        want = metrics.flat_mask(ya, yb, level) & metrics.brightness_differs(ya, yb)
        assert want.sum() > 0.02 * want.size  # the photo has flat regions to find
        assert (got != want).mean() < 1e-4


def test_flat_rule_ignores_pixels_without_content():
    """Aligned sources: pixels where a warped source has no content neither join flat regions
    nor vote in them."""
    a, b, block = backdrop_pair()
    soft = blotchy_soft_map(block)
    soft[:, 60:] = 0.9  # the right part chose A (say, a warped source's empty border)
    valid = np.ones(soft.shape, dtype=bool)
    valid[:, 60:] = False
    everywhere = pipeline.binarise(soft, 0, "flat", a, b).numpy()
    inside = pipeline.binarise(soft, 0, "flat", a, b, valid).numpy()
    assert everywhere[40:60, :60].all()  # the border's votes won the whole backdrop for A
    assert not inside[40:60, :60].any()  # among pixels with content, B holds the majority
    np.testing.assert_array_equal(inside[:, 60:], soft[:, 60:].numpy() > 0.5)
