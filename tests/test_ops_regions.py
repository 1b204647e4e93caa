"""remove_small_regions (the fusing consistency check) against scikit-image and on edge cases.

scikit-image is the oracle here only. Its 0.26 ``remove_small_objects(m, max_size=s)`` removes
components of ``size <= s``; the original called 0.2x's ``remove_small_objects(m, min_size=a)``,
which removes ``size < a``: so ``max_size = a - 1``.
"""

import warnings

import numpy as np
import pytest
import torch

from msidtrans_fast import ops
from tests.conftest import requires_cuda

morphology = pytest.importorskip("skimage.morphology")


def oracle(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The original's step 4 on one (H, W) bool map, through scikit-image."""
    if min_area <= 1:
        return mask.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only one label" warnings on uniform maps
        kept = morphology.remove_small_objects(mask, max_size=min_area - 1, connectivity=1)
        return ~morphology.remove_small_objects(~kept, max_size=min_area - 1, connectivity=1)


def fallback(mask: torch.Tensor, min_area: int) -> torch.Tensor:
    area = ops._check_mask(mask, min_area)
    if area <= 1:
        return mask.clone()
    out = ops._remove_small_regions_fallback(mask[:, 0] != 0, area)
    return out.unsqueeze(1).to(mask.dtype)


def compiled_cpu(mask: torch.Tensor, min_area: int) -> torch.Tensor:
    if not ops.compiled()["remove_small_regions"]["cpu"]:
        pytest.skip("msidtrans_fast._C is not built")
    return ops.remove_small_regions(mask, min_area)


IMPLS = {"fallback": fallback, "compiled_cpu": compiled_cpu}


def check_batch(impl, masks: np.ndarray, min_area: int) -> None:
    """masks: (b, H, W) bool."""
    got = impl(torch.from_numpy(masks).unsqueeze(1), min_area)
    assert got.dtype == torch.bool and got.shape == (masks.shape[0], 1) + masks.shape[1:]
    for i, m in enumerate(masks):
        want = oracle(m, min_area)
        np.testing.assert_array_equal(got[i, 0].numpy(), want,
                                      err_msg=f"map {i}, min_area {min_area}")


def random_masks(rng: np.random.RandomState, b: int, h: int, w: int) -> np.ndarray:
    """Maps of varied density; half are smoothed noise (bigger blobs, holes in holes)."""
    density = rng.uniform(0.05, 0.95, size=(b, 1, 1))
    noise = rng.rand(b, h, w)
    if rng.rand() < 0.5:
        padded = np.pad(noise, ((0, 0), (1, 1), (1, 1)), mode="edge")
        noise = sum(padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
        return noise > 0.5 + (0.5 - density) * 0.3
    return noise < density


@pytest.mark.parametrize("impl", IMPLS)
def test_random_against_skimage(impl):
    rng = np.random.RandomState(1234)
    count = 0
    for _ in range(60):
        h, w = rng.randint(1, 17, size=2)
        masks = random_masks(rng, 40, h, w)
        min_area = int(rng.randint(0, max(3, h * w // 3)))
        check_batch(IMPLS[impl], masks, min_area)
        count += masks.shape[0]
    assert count == 2400


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("min_area", [0, 1, 2, 3, 5, 50])
def test_edge_cases(impl, min_area):
    cases = {
        "zeros": np.zeros((6, 7), bool),
        "ones": np.ones((6, 7), bool),
        "row": np.array([[1, 1, 0, 1, 0, 0, 0, 1, 1, 1]], bool),
        "column": np.array([[1, 1, 0, 1, 0, 0, 0, 1, 1, 1]], bool).T,
        "checkerboard": (np.indices((8, 9)).sum(0) % 2).astype(bool),
        "checkerboard_inverse": (np.indices((8, 9)).sum(0) % 2 == 0),
        "one_pixel_on": np.ones((1, 1), bool),
        "one_pixel_off": np.zeros((1, 1), bool),
    }
    for name, m in cases.items():
        try:
            check_batch(IMPLS[impl], m[None], min_area)
        except AssertionError as exc:
            raise AssertionError(f"case {name}: {exc}") from None


@pytest.mark.parametrize("impl", IMPLS)
def test_checkerboard_is_four_connected(impl):
    """Diagonal neighbours are separate components: every square of a checkerboard goes."""
    board = torch.from_numpy(np.indices((6, 6)).sum(0) % 2 == 1)[None, None]
    out = IMPLS[impl](board, 2)
    # all foreground singletons removed, then the whole background is one 36-pixel component
    assert not out.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_min_area_kept_and_border_components(impl):
    m = np.zeros((9, 11), bool)
    m[0, :] = True                 # top border, 11 pixels
    m[:, 10] = True                # right border, joins top: 19 pixels
    m[8, 0:4] = True               # bottom-left, 4 pixels: exactly min_area, kept
    m[4, 0] = True                 # left border singleton: removed
    m[4:6, 4:6] = True             # interior 2x2 = 4 pixels: kept
    got = IMPLS[impl](torch.from_numpy(m)[None, None], 4)[0, 0].numpy()
    want = m.copy()
    want[4, 0] = False
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, oracle(m, 4))
    m2 = m.copy()
    m2[8, 3] = False               # now 3 pixels: removed
    got = IMPLS[impl](torch.from_numpy(m2)[None, None], 4)[0, 0].numpy()
    assert not got[8, 0:3].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_holes_inside_holes(impl):
    m = np.zeros((13, 13), bool)
    m[1:12, 1:12] = True           # big square
    m[3:10, 3:10] = False          # hole of 49 pixels (kept at min_area 10)
    m[5:8, 5:8] = True             # island of 9 inside the hole (removed at min_area 10)
    m[6, 6] = False                # hole of 1 inside the island
    got = IMPLS[impl](torch.from_numpy(m)[None, None], 10)[0, 0].numpy()
    want = m.copy()
    want[5:8, 5:8] = False         # island goes first; its inner hole merges with the big hole
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, oracle(m, 10))
    # a small hole in a big object is filled
    got = IMPLS[impl](torch.from_numpy(m)[None, None], 2)[0, 0].numpy()
    want = m.copy()
    want[6, 6] = True
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_maps_are_independent(impl):
    rng = np.random.RandomState(7)
    masks = rng.rand(5, 10, 12) < np.array([0.1, 0.3, 0.5, 0.7, 0.9])[:, None, None]
    got = IMPLS[impl](torch.from_numpy(masks)[:, None], 4)
    for i in range(5):
        alone = IMPLS[impl](torch.from_numpy(masks[i])[None, None], 4)
        assert torch.equal(got[i], alone[0])
        np.testing.assert_array_equal(got[i, 0].numpy(), oracle(masks[i], 4))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32,
                                   torch.float64])
def test_dtypes_round_trip(dtype):
    rng = np.random.RandomState(3)
    m = rng.rand(2, 1, 9, 9) < 0.5
    want = torch.from_numpy(np.stack([oracle(x[0], 3) for x in m]))[:, None]
    got = ops.remove_small_regions(torch.from_numpy(m).to(dtype), 3)
    assert got.dtype == dtype and got.shape == (2, 1, 9, 9)
    assert torch.equal(got.bool(), want)


def test_min_area_zero_changes_nothing_and_returns_a_copy():
    m = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    out = ops.remove_small_regions(m, 0)
    assert torch.equal(out, m) and out.data_ptr() != m.data_ptr()


def test_input_validation():
    good = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.remove_small_regions(np.zeros((1, 1, 4, 4), bool), 2)
    with pytest.raises(ValueError, match=r"\(b, 1, H, W\)"):
        ops.remove_small_regions(torch.zeros(4, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match=r"\(b, 1, H, W\)"):
        ops.remove_small_regions(torch.zeros(1, 2, 4, 4, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="binary"):
        ops.remove_small_regions(torch.full((1, 1, 4, 4), 0.5), 2)
    with pytest.raises(ValueError, match="binary"):
        ops.remove_small_regions(torch.full((1, 1, 4, 4), 2, dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="integer"):
        ops.remove_small_regions(good, 2.5)
    with pytest.raises(TypeError, match="integer"):
        ops.remove_small_regions(good, True)
    with pytest.raises(ValueError, match=">= 0"):
        ops.remove_small_regions(good, -1)
    assert torch.equal(ops.remove_small_regions(good, np.int64(3)), good)


def test_opcheck():
    if not ops.compiled()["remove_small_regions"]["cpu"]:
        pytest.skip("msidtrans_fast._C is not built")
    mask = (torch.rand(2, 9, 7, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.uint8)
    torch.library.opcheck(torch.ops.msidtrans_fast.remove_small_regions, (mask, 3))


def test_larger_map_against_skimage():
    rng = np.random.RandomState(11)
    masks = random_masks(rng, 2, 96, 130)
    for impl in IMPLS.values():
        if impl is compiled_cpu and not ops.compiled()["remove_small_regions"]["cpu"]:
            continue
        check_batch(impl, masks, 40)


@requires_cuda
def test_cuda_matches_cpu():
    if not ops.compiled()["remove_small_regions"]["cuda"]:
        pytest.skip("msidtrans_fast._C was built without CUDA")
    rng = np.random.RandomState(5)
    for h, w, area in [(1, 1, 2), (1, 37, 3), (41, 1, 3), (64, 64, 10), (257, 311, 60),
                       (520, 520, 271), (1031, 997, 1000)]:
        masks = torch.from_numpy(random_masks(rng, 3, h, w))[:, None]
        got = ops.remove_small_regions(masks.cuda(), area)
        assert got.is_cuda and got.dtype == torch.bool
        want = torch.from_numpy(np.stack([oracle(m[0], area) for m in masks.numpy()]))[:, None]
        assert torch.equal(got.cpu(), want), (h, w, area)
        again = ops.remove_small_regions(masks.cuda(), area)
        assert torch.equal(got, again)
