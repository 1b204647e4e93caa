"""Tests of the tiled decision map (msidtrans_fast.tiling)."""

import numpy as np
import pytest
import torch

from msidtrans_fast import pipeline, tiling, weights


class SourceAsMap(torch.nn.Module):
    """A stand-in network whose decision map is a function of the first source's pixels only:
    D = (A[:, 0] + 1) / 2, the first source's red channel scaled back to [0, 1]. Tiled output must
    then equal that map exactly wherever the tiles are placed. Counts its calls and batch sizes."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.batches = []

    def forward(self, A, B):
        self.batches.append(A.shape[0])
        return (A[:, :1] + 1) / 2 * self.scale


def ramp_image(height, width, dtype=np.uint16):
    """A smooth diagonal ramp over the full range of ``dtype`` (H, W, 3)."""
    top = np.iinfo(dtype).max
    y, x = np.mgrid[:height, :width]
    ramp = np.round(top * (y / max(1, height - 1) + x / max(1, width - 1)) / 2).astype(dtype)
    return np.repeat(ramp[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def model():
    return weights._untrained_model().eval()


@pytest.mark.parametrize("length,tile,overlap", [
    (1000, 256, 32), (1000, 256, 0), (257, 256, 64), (300, 128, 64), (4000, 512, 64),
    (97, 64, 32), (50, 64, 16), (513, 100, 50)])
def test_axis_weights_sum_to_one_and_cover_the_axis(length, tile, overlap):
    starts = tiling.tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    steps = np.diff(starts)
    assert (steps <= size - overlap).all(), "neighbours overlap by less than asked"
    total = np.zeros(length)
    for s, w in zip(starts, tiling.axis_weights(length, starts, size, overlap), strict=True):
        assert w.shape == (size,) and w.dtype == np.float32 and (w >= 0).all()
        total[s:s + size] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_window_is_smooth():
    starts = tiling.tile_starts(1000, 256, 64)
    w = tiling.axis_weights(1000, starts, 256, 64)[1]
    assert np.abs(np.diff(w)).max() < 2.0 / 64, "a jump in the window"
    assert w[0] < 1e-3 and w[128] == 1.0 and w[-1] < 1e-3


def test_constant_map_stays_constant_and_ramp_survives():
    net = SourceAsMap()
    a = ramp_image(301, 517)
    d = tiling.tiled_decision_map(net, a, a, tile=128, overlap=32, batch=5)
    np.testing.assert_allclose(d, a[..., 0] / 65535.0, atol=2e-6)
    const = np.full((301, 517, 3), 40000, np.uint16)
    d = tiling.tiled_decision_map(net, const, const, tile=128, overlap=32, batch=5)
    np.testing.assert_allclose(d, 40000 / 65535.0, atol=2e-6)
    assert d.dtype == np.float32 and d.shape == (301, 517)


def test_batches_are_one_call_each_and_progress_counts_tiles():
    net = SourceAsMap()
    a = ramp_image(200, 300, np.uint8)
    done = []
    grid = tiling.plan_tiles(200, 300, 96, 16)
    tiling.tiled_decision_map(net, a, a, tile=96, overlap=16, batch=4, progress=done.append)
    assert net.batches == [4] * (len(grid) // 4) + ([len(grid) % 4] if len(grid) % 4 else [])
    assert sum(done) == len(grid) == 3 * 4


def test_one_tile_equals_whole_image(model):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    with torch.inference_mode():  # as the decision stages run it
        whole = model(pipeline.to_network_input(a, torch.device("cpu"), torch.float32),
                      pipeline.to_network_input(b, torch.device("cpu"), torch.float32))
    for tile in (90, 128, 1000):  # exactly the image, and larger than it
        d = tiling.tiled_decision_map(model, a, b, tile=tile, overlap=32)
        np.testing.assert_array_equal(d, whole[0, 0].detach().numpy())


def test_odd_sizes_and_batch_consistency(model):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 65536, (101, 77, 1), dtype=np.uint16)  # grayscale, odd, one axis < tile
    b = rng.integers(0, 65536, (101, 77, 1), dtype=np.uint16)
    one = tiling.tiled_decision_map(model, a, b, tile=80, overlap=24, batch=1)
    many = tiling.tiled_decision_map(model, a, b, tile=80, overlap=24, batch=8)
    assert one.shape == (101, 77) and np.isfinite(one).all()
    assert (0 <= one).all() and (one <= 1).all()
    np.testing.assert_allclose(one, many, atol=1e-5)


@pytest.mark.parametrize("tile,overlap", [(63, 0), (128, 65), (128, -1), (128.0, 8), ("big", 8),
                                          (True, 8), (128, 8.5)])
def test_bad_tile_and_overlap_are_refused(tile, overlap):
    with pytest.raises(ValueError, match="tile"):
        tiling.plan_tiles(500, 500, tile, overlap)


def test_auto_policy():
    assert tiling.resolve_tile("auto", 520, 520) is None
    assert tiling.resolve_tile("auto", 1024, 1024) is None  # every benchmark size stays whole
    assert tiling.AUTO_WHOLE_MAX_PIXELS >= 1 << 20
    assert tiling.resolve_tile("auto", 4000, 6000) == tiling.DEFAULT_TILE
    h = tiling.AUTO_WHOLE_MAX_PIXELS // 1000
    assert tiling.resolve_tile("auto", h, 1000) is None
    assert tiling.resolve_tile("auto", h + 1, 1000) == tiling.DEFAULT_TILE
    assert tiling.resolve_tile(None, 9000, 9000) is None
    assert tiling.resolve_tile("off", 9000, 9000) is None
    assert tiling.resolve_tile(256, 100, 100) == 256
    for bad in ("256", 10, "whole", 1.5):
        with pytest.raises(ValueError, match="tile"):
            tiling.resolve_tile(bad, 100, 100)
