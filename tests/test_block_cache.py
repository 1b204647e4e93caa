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


def test_never_holds_more_than_the_most_in_use_at_once():
    with ops.reuse_cpu_blocks():
        a, b = torch.empty(8 * MIB // 4), torch.empty(8 * MIB // 4)
        del a, b                                  # 16 MiB idle, peak 16 MiB
        c = torch.empty(16 * MIB // 4)            # no idle block fits: idle ones are freed
        assert stats()["held_bytes"] <= 16 * MIB
        d = torch.empty(3 * MIB // 4)             # in use 19 MiB: the peak grows
        del c, d
        assert stats()["held_bytes"] <= 19 * MIB
        e = torch.empty(12 * MIB // 4)            # an idle 16 MiB block serves 12 MiB
        assert stats()["held_bytes"] <= 19 * MIB
        del e


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
