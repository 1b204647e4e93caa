"""The energy-of-Laplacian baseline and the ``msidtrans-eval`` command line."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import REPO_ROOT, shared_path

from msidtrans_fast import evaluate as ev
from msidtrans_fast import metrics as m

Image = pytest.importorskip("PIL.Image")
ndimage = pytest.importorskip("scipy.ndimage")


@pytest.fixture(autouse=True)
def _quiet_fallback_warning():
    # ops.remove_small_regions warns once when the compiled extension is not built.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def sharp_image(h=48, w=64, seed=0, channels=0):
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels else (h, w)
    s = ndimage.gaussian_filter(rng.normal(size=shape), (1.0, 1.0, 0) if channels else 1.0)
    return np.clip((s - s.min()) / (s.max() - s.min()) * 255 + 0.5, 0, 255).astype(np.uint8)


def blur(img, sigma=2.5):
    sig = (sigma, sigma, 0) if img.ndim == 3 else sigma
    return np.clip(ndimage.gaussian_filter(img.astype(float), sig) + 0.5, 0, 255).astype(np.uint8)


def half_blurred_pair(img):
    """A: left half sharp, right blurred; B: the opposite. Returns (a, b, true map)."""
    w = img.shape[1]
    bl = blur(img)
    left = np.zeros(img.shape[:2], bool)
    left[:, : w // 2] = True
    sel = left if img.ndim == 2 else left[..., None]
    return np.where(sel, img, bl), np.where(sel, bl, img), left


# -------------------------------------------------------------------------------- baseline
@pytest.mark.parametrize("channels", [0, 3])
def test_baseline_picks_the_sharp_side(channels):
    img = sharp_image(channels=channels)
    a, b, truth = half_blurred_pair(img)
    fused, decision = ev.laplacian_energy_fuse(a, b, window=9)
    assert decision.shape == truth.shape and decision.dtype == bool
    assert fused.dtype == np.uint8 and fused.shape == img.shape
    # Every fused pixel is a source pixel, chosen by the map.
    sel = decision if img.ndim == 2 else decision[..., None]
    assert np.array_equal(fused, np.where(sel, a, b))
    # Away from the seam (the focus window straddles it), the sharp side is chosen.
    interior = np.ones_like(truth)
    interior[:, 64 // 2 - 6: 64 // 2 + 6] = False
    assert (decision == truth)[interior].mean() > 0.99
    # The fusion is much closer to the all-in-focus image than either source.
    assert m.psnr(fused, img) > m.psnr(a, img) + 10
    assert m.qabf(a, b, fused) > m.qabf(a, b, a)


def test_baseline_with_swapped_sources_mirrors_the_map():
    img = sharp_image(seed=3)
    a, b, _ = half_blurred_pair(img)
    _, d_ab = ev.laplacian_energy_fuse(a, b, window=7)
    _, d_ba = ev.laplacian_energy_fuse(b, a, window=7)
    assert (d_ab != d_ba).mean() > 0.98  # only exact ties (flat spots) go to the first source


def test_baseline_clean_up_removes_small_regions():
    skimage_measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(0)
    # Two independent textures: the raw choose-max map is speckled.
    a, b = sharp_image(seed=1), sharp_image(seed=2)
    a = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    _, raw = ev.laplacian_energy_fuse(a, b, window=3, threshold=0)
    threshold = 0.01
    _, clean = ev.laplacian_energy_fuse(a, b, window=3, threshold=threshold)
    area = math.ceil(threshold * a.shape[0] * a.shape[1])

    def smallest(mask):
        sizes = []
        for value in (True, False):
            lab = skimage_measure.label(mask == value, connectivity=1)
            sizes += list(np.bincount(lab.ravel())[1:])
        return min(sizes)

    assert smallest(raw) < area
    assert smallest(clean) >= area


def test_laplacian_energy_known_answers():
    flat = np.full((20, 30), 77, np.uint8)
    assert np.array_equal(ev.laplacian_energy(flat, 5), np.zeros((20, 30)))
    # A single bright pixel: Laplacian -4v at it and v at its 4 neighbours -> energy 20 v^2
    # in every window covering all five.
    dot = np.zeros((21, 21))
    dot[10, 10] = 3.0
    e = ev.laplacian_energy(dot, 5)
    assert e[10, 10] == pytest.approx(20 * 9)
    assert e[0, 0] == 0


def test_baseline_bad_inputs():
    a = sharp_image()
    with pytest.raises(ValueError, match="odd"):
        ev.laplacian_energy_fuse(a, a, window=4)
    with pytest.raises(TypeError, match="window"):
        ev.laplacian_energy_fuse(a, a, window=3.0)
    with pytest.raises(ValueError, match="same shape"):
        ev.laplacian_energy_fuse(a, a[:-1])
    with pytest.raises(ValueError, match="same dtype"):
        ev.laplacian_energy_fuse(a, a.astype(np.uint16))
    with pytest.raises(ValueError, match="threshold"):
        ev.laplacian_energy_fuse(a, a, threshold=1.5)
    with pytest.raises(TypeError, match="numpy"):
        ev.laplacian_energy_fuse(a.tolist(), a)


# ------------------------------------------------------------------------------------ CLI
def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_dataset(root, n=3, fused_names=None, gray=False):
    """sourceA/sourceB/groundtruth with n half-blurred pairs (40x48), plus fused/ = groundtruth
    for pair 0 and the average of A and B for the others."""
    fused_names = fused_names or [f"set-{i + 1:02d}.png" for i in range(n)]
    for i in range(n):
        img = sharp_image(40, 48, seed=10 + i, channels=0 if gray else 3)
        a, b, _ = half_blurred_pair(img)
        save(root / "sourceA" / f"pic_{i + 1}_A.png", a)
        save(root / "sourceB" / f"pic_{i + 1}_B.png", b)
        save(root / "groundtruth" / f"pic_{i + 1}.png", img)
        fused = img if i == 0 else ((a.astype(int) + b) // 2).astype(np.uint8)
        save(root / "fused" / fused_names[i], fused)
    return root


def run_cli(args, capsys):
    rc = ev.main([str(x) for x in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_end_to_end(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    out_json = tmp_path / "scores.json"
    saved = tmp_path / "baseline_out"
    rc, out, err = run_cli(["--sources", root, "--fused", root / "fused", "--baseline",
                            "--window", "7", "--json", out_json, "--save-baseline", saved], capsys)
    assert rc == 0, err
    assert "mean" in out and "baseline" in out and "pic_1" in out
    result = json.loads(out_json.read_text())
    assert result["metrics"] == list(m.FUSION_METRICS + m.REFERENCE_METRICS)
    rows = result["methods"]["fused"]["images"]
    assert [r["name"] for r in rows] == ["pic_1", "pic_2", "pic_3"]
    assert rows[1]["fused"].endswith("set-02.png")
    # Values are those of the metric functions on the files.
    a = np.asarray(Image.open(root / "sourceA" / "pic_2_A.png"))
    b = np.asarray(Image.open(root / "sourceB" / "pic_2_B.png"))
    f = np.asarray(Image.open(root / "fused" / "set-02.png"))
    gt = np.asarray(Image.open(root / "groundtruth" / "pic_2.png"))
    expected = {**m.fusion_metrics(a, b, f), **m.reference_metrics(f, gt)}
    for k, v in expected.items():
        assert rows[1][k] == pytest.approx(v, rel=1e-12), k
    # Fused = ground truth: PSNR is infinite, written as null.
    assert rows[0]["PSNR"] is None and rows[0]["SSIM"] == pytest.approx(1.0)
    mean = result["methods"]["fused"]["mean"]
    assert mean["Qabf"] == pytest.approx(np.mean([r["Qabf"] for r in rows]))
    assert mean["PSNR"] == pytest.approx(np.mean([ev.PSNR_CAP, rows[1]["PSNR"], rows[2]["PSNR"]]))
    # The baseline beats averaging on the ground-truth metrics and was saved.
    base = result["methods"]["baseline"]
    assert base["window"] == 7 and len(base["images"]) == 3
    for i in (1, 2):
        assert base["images"][i]["PSNR"] > rows[i]["PSNR"]
    fused_b, _ = ev.laplacian_energy_fuse(a, b, window=7)
    assert np.array_equal(np.asarray(Image.open(saved / "pic_2.png")), fused_b)


def test_cli_gray_sources_rgb_fused_and_fusing_cli_numbering(tmp_path, capsys):
    # Sources pic_1..pic_11 (unpadded): the fusing CLI numbers its outputs over the sources in
    # sorted-name order (pic_10, pic_11, pic_1, pic_2, ...), as NAME-01.png, NAME-02.png, ...
    n = 11
    order = sorted(f"pic_{i}_A.png" for i in range(1, n + 1))
    fused_names = [""] * n
    for k, src in enumerate(order):
        fused_names[int(src.split("_")[1]) - 1] = f"data-{k + 1:02d}.png"
    root = make_dataset(tmp_path, n=n, fused_names=fused_names, gray=True)
    # An RGB copy of the ground truth of pair pic_10 (and a decision map, ignored).
    gt = np.asarray(Image.open(root / "groundtruth" / "pic_10.png"))
    save(root / "fused" / fused_names[9], np.stack([gt] * 3, -1))
    save(root / "fused" / "data-02-dm.png", np.zeros_like(gt))
    out_json = tmp_path / "s.json"
    rc, _, err = run_cli(["--sources", root, "--fused", root / "fused", "--json", out_json], capsys)
    assert rc == 0, err
    rows = json.loads(out_json.read_text())["methods"]["fused"]["images"]
    assert [r["name"] for r in rows] == [s[:-6] for s in order]
    k = order.index("pic_10_A.png")
    assert k == 0 and rows[k]["name"] == "pic_10"
    assert rows[k]["fused"].endswith(f"data-{k + 1:02d}.png")
    assert rows[k]["SSIM"] == pytest.approx(1.0)
    assert rows[k]["groundtruth"].endswith("pic_10.png")
    # make_dataset's fused image of pic_1 is its ground truth too; the others are A/B averages.
    assert all(r["SSIM"] < 0.99 for r in rows if r["name"] not in ("pic_1", "pic_10"))


def test_fused_files_matched_by_name(tmp_path, capsys):
    names = [f"pic_{i}.png" for i in range(1, 12)]
    root = make_dataset(tmp_path, n=11, fused_names=names)
    gt = np.asarray(Image.open(root / "groundtruth" / "pic_2.png"))
    save(root / "fused" / "pic_2.png", gt)
    out_json = tmp_path / "s.json"
    rc, _, err = run_cli(["--sources", root, "--fused", root / "fused", "--json", out_json], capsys)
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out_json.read_text())["methods"]["fused"]["images"]}
    assert rows["pic_2"]["fused"].endswith("pic_2.png") and rows["pic_2"]["PSNR"] is None


def test_cli_baseline_only_and_default_groundtruth(tmp_path, capsys):
    root = make_dataset(tmp_path, n=2)
    rc, out, err = run_cli(["--sources", root, "--baseline"], capsys)
    assert rc == 0, err
    assert "PSNR" in out and "fused images" not in out


def test_matching_on_the_published_names():
    root = shared_path("data", "dev_eval", "MFFW")
    files_a = ev.list_images(root / "sourceA", "sourceA")
    files_b = ev.list_images(root / "sourceB", "sourceB")
    ev.check_source_pairs(files_a, files_b)
    names = [ev._pair_name(a, b) for a, b in zip(files_a, files_b, strict=True)]
    assert names[:2] == ["mffw_01", "mffw_02"]
    files_f = ev.match_files(names, files_a,
                             ev.list_images(root / "published_msidtrans", "fused"), "fused")
    assert [p.name for p in files_f] == [f"MFFW-{i:02d}.png" for i in range(1, len(files_a) + 1)]


def assert_one_line_error(rc, err, pattern):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("msidtrans-eval: error:")
    assert pattern in lines[0], lines[0]


def test_cli_bad_inputs(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", n=3)
    fused = root / "fused"
    cases = [
        (["--sources", tmp_path / "nope", "--fused", fused], "sources folder not found"),
        (["--sources", root, "--fused", tmp_path / "nope"], "fused folder not found"),
        (["--sources", root], "nothing to score"),
        (["--fused", fused], "--sources"),
        (["--sources", root, "--fused", fused, "--bogus"], "unrecognized"),
        (["--sources", root, "--baseline", "--window", "4"], "odd"),
        (["--sources", root, "--fused", fused, "--json", tmp_path / "no" / "x.json"], "--json"),
    ]
    for args, pattern in cases:
        rc, _, err = run_cli(args, capsys)
        assert_one_line_error(rc, err, pattern)

    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(["--sources", root, "--fused", tmp_path / "empty"], capsys)
    assert_one_line_error(rc, err, "no images")

    (fused / "set-04.png").write_bytes((fused / "set-03.png").read_bytes())
    rc, _, err = run_cli(["--sources", root, "--fused", fused], capsys)
    assert_one_line_error(rc, err, "4 fused images")

    (fused / "set-04.png").unlink()
    (fused / "set-03.png").rename(fused / "set-07.png")  # same count, wrong numbering
    rc, _, err = run_cli(["--sources", root, "--fused", fused], capsys)
    assert_one_line_error(rc, err, "do not line up")

    (fused / "set-07.png").write_bytes(b"this is not a png")
    (fused / "set-07.png").rename(fused / "set-03.png")
    rc, _, err = run_cli(["--sources", root, "--fused", fused], capsys)
    assert_one_line_error(rc, err, "set-03.png")

    save(fused / "set-03.png", np.zeros((40, 47, 3), np.uint8))
    rc, _, err = run_cli(["--sources", root, "--fused", fused], capsys)
    assert_one_line_error(rc, err, "sizes differ")

    rc, _, err = run_cli(["--sources", root, "--fused", fused, "--groundtruth",
                          tmp_path / "none"], capsys)
    assert_one_line_error(rc, err, "groundtruth folder not found")

    (root / "sourceB" / "pic_3_B.png").unlink()
    rc, _, err = run_cli(["--sources", root, "--fused", fused], capsys)
    assert_one_line_error(rc, err, "sourceB")


def test_console_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "msidtrans_fast.evaluate", "--sources",
                           str(tmp_path / "missing"), "--baseline"], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"msidtrans-eval: error: sources folder not found: {tmp_path / 'missing'}"]
