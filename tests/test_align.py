"""Registration of the sources (msidtrans_fast.align) on small synthetic moved pairs."""

import math

import cv2
import numpy as np
import pytest

from msidtrans_fast import align as al

H, W = 360, 480  # long side above COARSE_SIDE: two pyramid levels


def scene(seed: int = 0, height: int = H, width: int = W) -> np.ndarray:
    """A textured RGB float scene in [0, 1]: noise smoothed at several scales."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for sigma, weight in ((1.2, 0.35), (4.0, 0.4), (12.0, 0.25)):
        noise = rng.normal(size=(height, width, 3)).astype(np.float32)
        layer = cv2.GaussianBlur(noise, (0, 0), sigma)
        out += weight * layer / layer.std()
    out = (out - out.min()) / (out.max() - out.min())
    return out


def similarity(scale: float, degrees: float, dx: float, dy: float, height: int = H,
               width: int = W) -> np.ndarray:
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    t = math.radians(degrees)
    lin = scale * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = centre + (dx, dy) - lin @ centre
    return m


def to_dtype(img: np.ndarray, dtype) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.clip(np.rint(img * top), 0, top).astype(dtype)


def defocus(img: np.ndarray, left: bool, sigma: float = 3.0) -> np.ndarray:
    """``img`` with its left (or right) half blurred."""
    blurred = cv2.GaussianBlur(img, (0, 0), sigma)
    out = img.copy()
    half = img.shape[1] // 2
    if left:
        out[:, :half] = blurred[:, :half]
    else:
        out[:, half:] = blurred[:, half:]
    return out


def moved(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``img`` seen through ``matrix`` (reference-to-moved): moved(matrix @ p) = img(p)."""
    return al.warp(img, np.linalg.inv(matrix), "lanczos")[0]


def pair(matrix, dtype=np.uint8, seed=0, gain=1.0, offset=0.0):
    s = scene(seed)
    a = defocus(s, left=False)
    b = np.clip(defocus(s, left=True) * gain + offset, 0, 1)
    return to_dtype(a, dtype), moved(to_dtype(b, dtype), matrix)


@pytest.mark.parametrize("model", al.MODELS)
def test_recovers_similarity_with_defocus_difference(model):
    truth = similarity(1.02, 0.8, 7.5, -5.0)
    a, b = pair(truth)
    found = al.estimate(a, b, model)
    assert al.corner_error(found.matrix, truth, H, W) < 0.3
    assert found.model == model and found.correlation > 0.9
    if model == "similarity":
        lin = found.matrix[:2, :2]
        assert lin[0, 0] == pytest.approx(lin[1, 1]) and lin[0, 1] == pytest.approx(-lin[1, 0])


def test_sixteen_bit_pair_and_exposure_change():
    truth = similarity(0.975, -0.6, -9.0, 4.0)
    a, b = pair(truth, np.uint16, seed=1, gain=1.08, offset=-0.03)
    assert a.dtype == b.dtype == np.uint16
    found = al.estimate(a, b)
    assert al.corner_error(found.matrix, truth, H, W) < 0.3


def edges_scene(seed: int) -> np.ndarray:
    """:func:`scene` at half contrast with 40 solid rectangles on it (strong, sparse edges)."""
    out = scene(seed) * 0.5 + 0.25
    rng = np.random.default_rng(seed + 10)
    for _ in range(40):
        x, y = rng.integers(0, W - 40), rng.integers(0, H - 40)
        w, h = rng.integers(8, 60, 2)
        colour = [float(v) for v in rng.uniform(0, 1, 3)]
        cv2.rectangle(out, (int(x), int(y)), (int(x + w), int(y + h)), colour, -1)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defocus_matching_removes_the_focus_bias(seed):
    # As in a depth-of-field pair: the first source is sharp except in a small region near the
    # top, which is the only sharp part of the second source; the blur is a disc of radius 5.
    truth = similarity(1.02, 0.8, 7.5, -5.0)
    s = edges_scene(seed)
    blurred = cv2.filter2D(s, -1, al.disc_kernel(5.0), borderType=cv2.BORDER_REFLECT)
    region = np.zeros((H, W, 1), bool)
    region[: int(0.3 * H), int(0.3 * W): int(0.6 * W)] = True
    a = to_dtype(np.where(region, blurred, s), np.uint8)
    b = moved(to_dtype(np.where(region, s, blurred), np.uint8), truth)
    plain = al.estimate(a, b, match=False)
    found = al.estimate(a, b)
    assert al.corner_error(plain.matrix, truth, H, W) > 0.06
    assert al.corner_error(found.matrix, truth, H, W) < 0.03


def test_disc_kernel_and_defocus_radii():
    k = al.disc_kernel(3.0)
    assert k.shape == (7, 7) and k.sum() == pytest.approx(1.0)
    assert k[3, 3] == pytest.approx(k.max()) and k[0, 0] == 0
    lum = al.luminance(scene(3))
    sharper = np.zeros(lum.shape, bool)
    sharper[:, : W // 2] = True  # the reference is sharp on the left, the other on the right
    blurred = al.defocus(lum, 3.0)
    reference = np.where(sharper, lum, blurred)
    other = np.where(sharper, blurred, lum)
    valid = np.ones(lum.shape, bool)
    assert al.defocus_radii(reference, other, sharper, valid) == (3.0, 3.0)
    ref2, other2, keep = al.match_defocus(reference, other, sharper, (3.0, 3.0), margin=5)
    # Alike away from the boundary between the halves, which is left out (2 * 3 + 5 px each side).
    assert not keep[:, W // 2 - 11: W // 2 + 11].any() and keep[:, : W // 2 - 11].all()
    inner = keep.copy()
    inner[:8], inner[-8:], inner[:, :8], inner[:, -8:] = False, False, False, False
    assert np.abs(ref2 - other2)[inner].max() < 1e-5


def test_recovers_affine_and_homography():
    truth = similarity(1.01, 0.5, 3.0, 2.0)
    truth[:2, :2] = truth[:2, :2] @ np.array([[1.01, 0.008], [0.0, 0.995]])
    a, b = pair(truth, seed=2)
    assert al.corner_error(al.estimate(a, b, "affine").matrix, truth, H, W) < 0.3
    persp = truth.copy()
    persp[2, :2] = (1.5e-5, -1e-5)
    a, b = pair(persp, seed=2)
    assert al.corner_error(al.estimate(a, b, "homography").matrix, persp, H, W) < 0.3
    # a similarity cannot follow the perspective: the richer model is closer
    assert al.corner_error(al.estimate(a, b, "similarity").matrix, persp, H, W) > 0.5


def test_stack_of_three_registers_neighbours_and_composes():
    s = scene(3)
    m1 = similarity(1.012, 0.3, 4.0, -2.0)
    m2 = similarity(1.025, 0.7, 9.0, -5.5)
    frames = [to_dtype(defocus(s, left=False), np.uint8),
              moved(to_dtype(cv2.GaussianBlur(s, (0, 0), 1.5), np.uint8), m1),
              moved(to_dtype(defocus(s, left=True), np.uint8), m2)]
    result = al.estimate_stack(frames, names=["f0", "f1", "f2"])
    assert np.array_equal(result[0].matrix, np.eye(3))
    assert al.corner_error(result[1].matrix, m1, H, W) < 0.3
    assert al.corner_error(result[2].matrix, m2, H, W) < 0.3
    # the last transform is the composition of the neighbour registrations
    step = al.estimate(frames[1], frames[2])
    assert np.allclose(result[2].matrix, step.matrix @ result[1].matrix, atol=1e-9)


def test_align_sources_warps_onto_the_first_grid():
    truth = similarity(1.02, 0.8, 7.5, -5.0)
    s = to_dtype(scene(4), np.uint8)
    a, b = s, moved(s, truth)
    aligned = al.align_sources([a, b], names=["a", "b"])
    assert aligned.images[0] is a
    out, valid = aligned.images[1], aligned.valid[1]
    assert out.shape == a.shape and out.dtype == np.uint8
    assert aligned.valid[0].all() and 0.8 < valid.mean() < 1.0
    # no content: filled with the first source
    assert np.array_equal(out[~valid], a[~valid])
    t, b_, left, r = aligned.crop()
    assert valid[t:b_, left:r].all() and (b_ - t) * (r - left) > 0.8 * H * W
    inside = np.s_[t + 4:b_ - 4, left + 4:r - 4]
    err = np.abs(out[inside].astype(float) - a[inside].astype(float))
    assert err.mean() < 1.5  # a round trip through two Lanczos resamplings
    lines = al.report(aligned.alignments, ["a", "b"], H, W)
    assert len(lines) == 1 and lines[0].startswith("b: scale 1.02")


def test_warp_identity_is_exact_and_mask_follows_geometry():
    img = to_dtype(scene(5), np.uint16)
    for interp in al.INTERPOLATIONS:
        out, valid = al.warp(img, np.eye(3), interp)
        assert np.array_equal(out, img) and valid.all()
    shift = np.eye(3)
    shift[:2, 2] = (10.25, -3.5)  # the content moves left and down
    out, valid = al.warp(img[..., 0], shift, "cubic")
    assert out.shape == img.shape[:2]
    cols, rows = np.flatnonzero(valid[H // 2]), np.flatnonzero(valid[:, W // 2])
    assert cols[0] == 0 and cols[-1] == W - 1 - 11  # x + 10.25 <= W - 1
    assert rows[0] == 4 and rows[-1] == H - 1  # y - 3.5 >= 0
    assert not valid[:, W - 11:].any() and not valid[:4].any()


def test_common_area_of_nothing_in_common():
    with pytest.raises(ValueError, match="no area in common"):
        al.common_area([np.zeros((5, 5), bool)])


def test_too_little_texture_names_the_source():
    a = to_dtype(scene(6), np.uint8)
    flat = np.full_like(a, 120)
    flat += np.random.default_rng(0).integers(0, 2, flat.shape, dtype=np.uint8)  # sensor noise
    with pytest.raises(al.AlignmentError, match=r"cannot align flat\.png: too little texture"):
        al.estimate(a, flat, name="flat.png")
    with pytest.raises(al.AlignmentError, match="too little texture in the reference"):
        al.estimate(flat, a, name="b.png")


def test_motion_out_of_range():
    truth = similarity(1.03, 1.0, 24.0, 0.0)
    a, b = pair(truth, seed=7)
    with pytest.raises(al.AlignmentError, match="far.png: a corner would move by 3.* more than "
                                                "the expected 12 px"):
        al.estimate(a, b, name="far.png", max_motion=0.02)
    found = al.estimate(a, b)  # within the default range
    assert al.corner_error(found.matrix, truth, H, W) < 0.3
    # a stack checks the composed transform too
    frames = [a, moved(a, similarity(1.0, 0.0, 9.0, 0.0)), moved(a, similarity(1.0, 0.0, 18.0, 0))]
    with pytest.raises(al.AlignmentError, match="source 2: relative to the first source, a corner"):
        al.estimate_stack(frames, max_motion=0.025)


def test_unrelated_images_fail():
    a = to_dtype(scene(8), np.uint8)
    b = to_dtype(scene(9), np.uint8)
    with pytest.raises(al.AlignmentError, match="other.png"):
        al.estimate(a, b, name="other.png")


def test_range_check_rejects_flips_and_degenerate():
    flip = np.diag([-1.0, 1.0, 1.0])
    flip[0, 2] = W - 1
    assert "flips" in al.check_range(flip, H, W, max_motion=10)
    assert "degenerate" in al.check_range(np.full((3, 3), np.nan), H, W)
    assert al.check_range(np.eye(3), H, W) is None


def test_bad_arguments():
    a = to_dtype(scene(0), np.uint8)
    with pytest.raises(ValueError, match="unknown alignment model"):
        al.estimate(a, a, "projective")
    with pytest.raises(ValueError, match="unknown interpolation"):
        al.warp(a, np.eye(3), "nearest")
    with pytest.raises(ValueError, match="differs from the reference"):
        al.estimate(a, a[:-1], name="small.png")
