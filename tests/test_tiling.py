"""Tests of the tiled decision map (msidtrans_fast.tiling)."""

import threading

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
        self.threads = set()

    def forward(self, A, B):
        self.batches.append(A.shape[0])
        self.threads.add(threading.get_ident())
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


def test_workers_give_the_same_map_in_the_same_order(model):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    kwargs = {"tile": 64, "overlap": 16, "batch": 1}
    alone = tiling.tiled_decision_map(model, a, b, workers=1, **kwargs)
    done = []
    side_by_side = tiling.tiled_decision_map(model, a, b, workers=3, progress=done.append,
                                             **kwargs)
    # one thread per call instead of all: float rounding only
    np.testing.assert_allclose(side_by_side, alone, atol=1e-5)
    assert done == [1] * len(tiling.plan_tiles(150, 170, 64, 16))
    again = tiling.tiled_decision_map(model, a, b, workers=3, **kwargs)
    np.testing.assert_array_equal(again, side_by_side)  # the tiles are added in a fixed order
    net = SourceAsMap()
    ramp = ramp_image(150, 170)
    d = tiling.tiled_decision_map(net, ramp, ramp, workers=2, **kwargs)
    np.testing.assert_allclose(d, ramp[..., 0] / 65535.0, atol=2e-6)
    assert threading.get_ident() not in net.threads and 1 <= len(net.threads) <= 2


def test_threads_are_restored_also_after_a_failure():
    threads = torch.get_num_threads()

    class Failing(SourceAsMap):
        def forward(self, A, B):
            if len(self.batches) > 2:
                raise RuntimeError("no memory")
            return super().forward(A, B)

    a = ramp_image(200, 300, np.uint8)
    with pytest.raises(RuntimeError, match="no memory"):
        tiling.tiled_decision_map(Failing(), a, a, tile=64, overlap=16, batch=1, workers=2)
    assert torch.get_num_threads() == threads


def test_cpu_workers_share_the_threads_within_the_memory_budget(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert tiling.cpu_workers(256, 256, torch.float32, 1, 486) == (2, 1)
        assert tiling.cpu_workers(256, 256, torch.float32, 1, 1) == (1, 2)  # one call: all threads
        monkeypatch.setattr(tiling, "CPU_TILE_BYTES", 1)
        assert tiling.cpu_workers(256, 256, torch.float32, 1, 486) == (1, 2)
    finally:
        torch.set_num_threads(threads)
    assert tiling.batch_size(256, 256, torch.device("cpu"), torch.float32) == 1


def test_batched_network_input_equals_one_tile_at_a_time():
    rng = np.random.default_rng(3)
    cpu = torch.device("cpu")
    for shape, dtype in (((4, 20, 30, 3), np.uint8), ((3, 20, 30, 1), np.uint16)):
        crops = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
        batch = pipeline.to_network_input(crops, cpu, torch.float32)
        one = torch.cat([pipeline.to_network_input(c, cpu, torch.float32) for c in crops])
        assert batch.shape == (shape[0], 3, 20, 30)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(batch, one, rtol=0, atol=0)
