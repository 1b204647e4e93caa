"""Fusing with alignment: the align stage of the pipeline, ``fuse(..., align=...)`` and the
``msidtrans-fuse --align`` options, on small synthetic moved pairs and stacks."""

import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from msidtrans_fast import align as al
from msidtrans_fast import fuse, io, weights
from msidtrans_fast.cli import main
from msidtrans_fast.pipeline import AlignmentWarning, FuseOptions, fuse_sources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_align import defocus, moved, scene, similarity, to_dtype  # noqa: E402
from test_fuse_api import make_contrast_state_dict  # noqa: E402

H, W = 192, 256


class FocusDecider:
    """A stand-in decision stage: 1 where ``a`` has the larger local Laplacian energy."""

    device = torch.device("cpu")

    def __call__(self, a, b):
        def energy(x):
            lap = cv2.Laplacian(al.luminance(x), cv2.CV_32F)
            return cv2.blur(lap * lap, (9, 9))

        return torch.from_numpy((energy(a) > energy(b)).astype(np.float32))

    def memory_needed(self, height, width):
        return 0


@pytest.fixture(scope="module")
def moved_pair():
    """(truth, a, b, transform): a sharp on the right, b sharp on the left and moved."""
    s = scene(10, H, W)
    truth = similarity(1.02, 0.7, 6.0, -4.0, H, W)
    a = to_dtype(defocus(s, left=True), np.uint8)
    b = moved(to_dtype(defocus(s, left=False), np.uint8), truth)
    return to_dtype(s, np.uint8), a, b, truth


def error(x, truth, region=np.s_[16:-16, 16:-16]):
    return np.abs(x[region].astype(float) - truth[region].astype(float)).mean()


def test_options_validate_the_alignment_fields():
    assert FuseOptions(align=True).align == "similarity"
    assert FuseOptions(align=False).align is None
    with pytest.raises(ValueError, match="align must be one of similarity, affine, homography"):
        FuseOptions(align="rigid")
    with pytest.raises(ValueError, match="align_crop needs align"):
        FuseOptions(align_crop=True)
    with pytest.raises(ValueError, match="align_fallback needs align"):
        FuseOptions(align_fallback=True)


def test_aligned_pair_is_fused_in_the_first_sources_frame(moved_pair):
    truth_img, a, b, truth = moved_pair
    sources = [a, b]
    plain = fuse_sources(sources, FocusDecider(), FuseOptions(threshold=0))
    result = fuse_sources(sources, FocusDecider(), FuseOptions(threshold=0, align="similarity"),
                          names=["a.png", "b.png"])
    assert result.image.shape == a.shape and result.labels.shape == (H, W)
    assert result.crop is None
    assert al.corner_error(result.aligned.alignments[1].matrix, truth, H, W) < 0.3
    # where the moved source has no content, the first source is taken
    valid = result.aligned.valid[1]
    assert 0.8 < valid.mean() < 1 and (result.labels[~valid] == 0).all()
    assert np.array_equal(result.image[~valid], a[~valid])
    # both halves come from the right source: close to the truth, unlike the unaligned fusion
    assert (result.labels[:, 20:W // 2 - 20][valid[:, 20:W // 2 - 20]] == 1).mean() > 0.9
    assert error(result.image, truth_img) < 0.5 * error(plain.image, truth_img)
    seen = result.aligned_images()
    assert seen[0] is not None and np.array_equal(seen[0], a)
    assert np.array_equal(seen[1], result.aligned.images[1])


def test_align_crop_cuts_output_and_map_to_the_common_area(moved_pair):
    _, a, b, _ = moved_pair
    full = fuse_sources([a, b], FocusDecider(), FuseOptions(threshold=0, align="similarity"))
    crop = fuse_sources([a, b], FocusDecider(),
                        FuseOptions(threshold=0, align="similarity", align_crop=True))
    t, bottom, left, r = crop.crop
    assert crop.aligned.valid[1][t:bottom, left:r].all()
    assert crop.image.shape == (bottom - t, r - left, 3)
    assert np.array_equal(crop.image, full.image[t:bottom, left:r])
    assert np.array_equal(crop.labels, full.labels[t:bottom, left:r])
    assert crop.decision_map(2).shape == crop.image.shape[:2]
    assert [x.shape[:2] for x in crop.aligned_images()] == [crop.image.shape[:2]] * 2
    assert (bottom - t) * (r - left) > 0.75 * H * W


def test_stack_of_three_is_aligned_by_composed_neighbours():
    s = scene(11, H, W)
    m1 = similarity(1.01, 0.3, 3.0, -2.0, H, W)
    m2 = similarity(1.025, 0.8, 7.0, -5.0, H, W)
    thirds = np.linspace(0, W, 4).astype(int)

    def sharp_in(k):
        img = cv2.GaussianBlur(s, (0, 0), 3.0)
        img[:, thirds[k]:thirds[k + 1]] = s[:, thirds[k]:thirds[k + 1]]
        return to_dtype(img, np.uint8)

    frames = [sharp_in(0), moved(sharp_in(1), m1), moved(sharp_in(2), m2)]
    result = fuse_sources(frames, FocusDecider(), FuseOptions(threshold=0, align="similarity"))
    found = result.aligned.alignments
    assert al.corner_error(found[1].matrix, m1, H, W) < 0.3
    assert al.corner_error(found[2].matrix, m2, H, W) < 0.3
    for k in (1, 2):  # a source is never taken where it has no content
        assert not (result.labels[~result.aligned.valid[k]] == k).any()
    for k in range(3):  # each third comes from the frame sharp there
        middle = result.labels[20:-20, thirds[k] + 12:thirds[k + 1] - 12]
        assert (middle == k).mean() > 0.9
    plain = fuse_sources(frames, FocusDecider(), FuseOptions(threshold=0))
    truth = to_dtype(s, np.uint8)
    assert error(result.image, truth) < 0.5 * error(plain.image, truth)


def test_failure_raises_or_falls_back(moved_pair):
    _, a, _, _ = moved_pair
    flat = np.full_like(a, 90)
    with pytest.raises(al.AlignmentError, match="cannot align flat.png: too little texture"):
        fuse_sources([a, flat], FocusDecider(), FuseOptions(align="similarity", threshold=0),
                     names=["a.png", "flat.png"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fuse_sources([a, flat], FocusDecider(),
                              FuseOptions(align="similarity", align_fallback=True,
                                          threshold=0),
                              names=["a.png", "flat.png"])
    caught = [w for w in caught if w.category is AlignmentWarning]
    assert len(caught) == 1
    assert "flat.png" in str(caught[0].message) and "unaligned" in str(caught[0].message)
    assert result.aligned is None
    plain = fuse_sources([a, flat], FocusDecider(), FuseOptions(threshold=0))
    assert np.array_equal(result.image, plain.image)


def test_fuse_api_takes_align_keywords(moved_pair, files):
    _, a, b, _ = moved_pair
    model = weights.load_model(files["weights"], "cpu")
    fused, dm = fuse([a, b], model=model, align="similarity", align_crop=True,
                     return_decision_map=True)
    aligned = al.align_sources([a, b])
    t, bottom, left, r = aligned.crop()
    assert fused.shape == (bottom - t, r - left, 3) and dm.shape == fused.shape[:2]
    assert 0 < dm.mean() < 1  # the contrast weights mix both sources
    expected = np.where(dm[..., None] == 1, a[t:bottom, left:r],
                        aligned.images[1][t:bottom, left:r])
    assert np.array_equal(fused, expected)
    with pytest.raises(ValueError, match="pass either options or align"):
        fuse([a, b], FuseOptions(), model=model, align="affine")


@pytest.fixture(scope="module")
def files(tmp_path_factory, moved_pair):
    root = tmp_path_factory.mktemp("align_cli")
    w = root / "contrast.pt"
    torch.save(make_contrast_state_dict(), w)
    _, a, b, _ = moved_pair
    flat = np.full_like(a, 90)
    return {"root": root, "weights": str(w), "a": io.write_image(root / "near.png", a),
            "b": io.write_image(root / "far.png", b),
            "flat": io.write_image(root / "flat.png", flat)}


def test_cli_align_writes_output_map_and_aligned_sources(files, tmp_path, capsys):
    out, saved = tmp_path / "fused.png", tmp_path / "seen"
    code = main(["--align", str(files["a"]), str(files["b"]), "-o", str(out), "--weights",
                 files["weights"], "--save-decision-map", "--save-aligned", str(saved)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    line = next(x for x in captured.out.splitlines() if x.startswith(f"aligned {files['b']}:"))
    assert abs(float(line.split("scale ")[1].split(",")[0]) - 1.02) < 0.002
    fused, dm = io.read_image(out), io.read_image(tmp_path / "fused-dm.png")
    assert fused.shape == (H, W, 3) and dm.shape == (H, W)
    seen_a = io.read_image(saved / "sourceA" / "near.png")
    seen_b = io.read_image(saved / "sourceB" / "far.png")
    assert np.array_equal(seen_a, io.read_image(files["a"]))
    a, b = io.read_image(files["a"]), io.read_image(files["b"])
    assert np.array_equal(seen_b, al.align_sources([a, b]).images[1])
    assert 0 < (dm == 255).mean() < 1  # the contrast weights mix both sources
    assert np.array_equal(fused, np.where(dm[..., None] == 255, seen_a, seen_b))


def test_cli_align_crop_and_model_choice(files, tmp_path, capsys):
    out = tmp_path / "fused.png"
    code = main([str(files["a"]), str(files["b"]), "-o", str(out), "--weights", files["weights"],
                 "--align", "affine", "--align-crop", "--save-decision-map", "-q"])
    assert code == 0, capsys.readouterr().err
    fused, dm = io.read_image(out), io.read_image(tmp_path / "fused-dm.png")
    assert fused.shape[:2] == dm.shape and fused.shape[0] < H and fused.shape[1] < W
    assert capsys.readouterr().out == ""


def test_cli_alignment_failure_exits_2_and_writes_nothing(files, tmp_path, capsys):
    out, saved = tmp_path / "fused.png", tmp_path / "seen"
    code = main(["--align", str(files["a"]), str(files["flat"]), "-o", str(out), "--weights",
                 files["weights"], "--save-aligned", str(saved)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot align {files['flat']}: too little texture" in err and "--align-fallback" in err
    assert list(tmp_path.iterdir()) == []

    code = main(["--align", "--align-fallback", str(files["a"]), str(files["flat"]), "-o",
                 str(out), "--weights", files["weights"], "-q", "--save-decision-map"])
    err = capsys.readouterr().err
    assert code == 0 and "warning: cannot align" in err and "unaligned" in err
    a, flat = io.read_image(files["a"]), io.read_image(files["flat"])
    dm = io.read_image(tmp_path / "fused-dm.png")
    assert dm.shape == (H, W)
    assert np.array_equal(io.read_image(out), np.where(dm[..., None] == 255, a, flat))


@pytest.mark.parametrize("flag", ["--align-crop", "--align-fallback", "--save-aligned=x"])
def test_cli_alignment_flags_need_align(files, tmp_path, capsys, flag):
    code = main([str(files["a"]), str(files["b"]), "-o", str(tmp_path / "f.png"), flag])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag.split('=')[0]} needs --align" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_align_crop_bar_counts_the_tiles_that_run(files, tmp_path, capsys):
    """With --align-crop the decision map is still computed on the first source's whole frame
    (the consistency check sees the whole map, then the result is cut): the bar counts those
    tiles and ends at its total."""
    from msidtrans_fast import tiling

    out = tmp_path / "fused.png"
    code = main([str(files["a"]), str(files["b"]), "-o", str(out), "--weights", files["weights"],
                 "--align", "--align-crop", "--tile", "64", "--tile-overlap", "16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    tiles = len(tiling.plan_tiles(H, W, 64, 16))
    assert f"{tiles}/{tiles}" in captured.err and f"{tiles} tiles of 64 px" in captured.out
    assert io.read_image(out).shape[0] < H
