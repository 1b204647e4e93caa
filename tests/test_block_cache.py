"""The CPU block cache (csrc/block_cache.cpp, ``ops.reuse_cpu_blocks``)."""

import threading

import pytest
import torch

from msidtrans_fast import MSIDTrans, ops

pytestmark = pytest.mark.skipif(not ops.block_cache_stats(),
                                reason="needs the compiled extension msidtrans_fast._C")

MIB = 1 << 20


@pytest.fixture(autouse=True)
def empty_cache():
    ops.release_cpu_blocks()
    yield
    ops.release_cpu_blocks()


def stats():
    return ops.block_cache_stats()


def test_a_freed_block_is_reused_and_data_is_kept():
    with ops.reuse_cpu_blocks():
        a = torch.full((4 * MIB // 4,), 3.0)
        ptr = a.data_ptr()
        del a
        before = stats()
        b = torch.empty(4 * MIB // 4)
        assert b.data_ptr() == ptr and stats()["hits"] == before["hits"] + 1
        b.fill_(5.0)
        small = torch.ones(10)  # below the block size: not cached, still valid
    assert stats()["scopes"] == 0
    assert float(b.sum()) == 5.0 * b.numel() and float(small.sum()) == 10.0
    outside = stats()
    c = torch.empty(4 * MIB // 4)  # outside any scope: the default allocator
    assert c.data_ptr() != ptr and stats()["hits"] == outside["hits"]
    assert stats()["misses"] == outside["misses"]
    del b  # freed after the scope closed: kept idle for the next scope, within the peak
    assert stats()["idle_bytes"] == 4 * MIB
    ops.release_cpu_blocks()
    assert stats()["idle_bytes"] == 0 and stats()["held_bytes"] == 0


def test_holds_at_most_the_peak_in_use_plus_a_bounded_spare():
    """Idle blocks may add as much again as the most in use at once, at most 256 MiB."""
    with ops.reuse_cpu_blocks():
        a, b = torch.empty(8 * MIB // 4), torch.empty(8 * MIB // 4)
        del a, b                                  # 16 MiB idle; peak 16, limit 32
        c = torch.empty(16 * MIB // 4)            # no idle block is large enough: a new one
        assert stats()["held_bytes"] == 32 * MIB
        d = torch.empty(12 * MIB // 4)            # over the limit: idle blocks are freed first
        assert stats()["held_bytes"] <= 2 * 28 * MIB and stats()["idle_bytes"] == 0
        del c, d
        e = torch.empty(12 * MIB // 4)            # an idle block of its size serves it
        assert stats()["held_bytes"] == 28 * MIB
        del e
    ops.release_cpu_blocks()
    with ops.reuse_cpu_blocks():                  # large blocks (never touched: no memory used)
        x = torch.empty(300 * MIB // 4)
        del x                                     # 300 MiB idle; limit 300 + 256 MiB
        y = torch.empty(400 * MIB // 4)           # 700 > 556: the idle block goes first
        assert stats()["held_bytes"] == 400 * MIB
        del y                                     # limit now 400 + 256: kept idle
        assert stats()["idle_bytes"] == 400 * MIB


def test_nested_and_concurrent_scopes_restore_the_allocator():
    errors = []

    def work():
        try:
            for _ in range(20):
                with ops.reuse_cpu_blocks():
                    with ops.reuse_cpu_blocks():
                        x = torch.randn(MIB // 2)
                        y = torch.randn(MIB // 2)
                    assert torch.equal(x + y, y + x)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and stats()["scopes"] == 0


def test_model_output_is_the_same_with_reused_blocks():
    torch.manual_seed(0)
    model = MSIDTrans().eval()
    a, b = (torch.rand(1, 3, 96, 80) * 2 - 1 for _ in range(2))
    with torch.inference_mode():
        expected = model(a, b)
        for _ in range(2):  # the second forward runs in blocks the first one freed
            with ops.reuse_cpu_blocks():
                got = model(a, b)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert stats()["hits"] > 0
