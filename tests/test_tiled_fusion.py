"""Tiled fusion through the API (``fuse(..., tile=...)``) and the command line (``--tile``)."""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from msidtrans_fast import FuseOptions, fuse, io, tiling
from msidtrans_fast.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli import run_cli  # noqa: E402
from test_fuse_api import make_contrast_state_dict, smooth_image  # noqa: E402

H, W = 100, 150  # --tile 64 --tile-overlap 16: 2 x 3 tiles


class SharperRed(torch.nn.Module):
    """A pointwise stand-in network: D = 0.9 where A's red value exceeds B's, else 0.1. Tiling
    cannot change a pointwise map, so tiled and whole fusion must agree exactly."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0
        self.lock = threading.Lock()  # tiles may run on several threads

    def forward(self, A, B):
        with self.lock:
            self.calls += 1
        return 0.1 + 0.8 * (A[:, :1] > B[:, :1]).float() + self.unused


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled")
    weights = root / "contrast.pt"
    torch.save(make_contrast_state_dict(), weights)
    pair = [io.write_image(root / f"src{i}.png", smooth_image(s, shape=(H, W, 3)))
            for i, s in enumerate((11, 12))]
    return {"root": root, "weights": weights, "pair": pair}


def test_stacks_and_pairs_are_tiled_the_same_way():
    net = SharperRed()
    stack = [smooth_image(s, shape=(H, W, 3)) for s in (1, 2, 3)]
    whole, labels = fuse(stack, model=net, tile=None, threshold=0, return_decision_map=True)
    assert net.calls == 3  # one whole-image run per pair of the vote
    net.calls = 0
    tiled, tiled_labels = fuse(stack, model=net, tile=64, tile_overlap=16, threshold=0,
                               return_decision_map=True)
    batch = tiling.batch_size(64, 64, torch.device("cpu"), torch.float32)
    assert net.calls == 3 * -(-6 // batch)  # 6 tiles per pair, one network call per batch
    np.testing.assert_array_equal(tiled, whole)
    np.testing.assert_array_equal(tiled_labels, labels)
    assert len(np.unique(labels)) == 3
    pair, dm = fuse(stack[:2], model=net, tile=64, tile_overlap=16, return_decision_map=True)
    np.testing.assert_array_equal(dm, fuse(stack[:2], model=net, tile="off",
                                           return_decision_map=True)[1])


def test_auto_keeps_small_images_whole(files):
    a, b = files["pair"]
    from msidtrans_fast import weights

    model = weights.load_model(files["weights"], "cpu")
    auto = fuse([a, b], model=model, return_decision_map=True)
    whole = fuse([a, b], model=model, tile=None, return_decision_map=True)
    for x, y in zip(auto, whole, strict=True):
        np.testing.assert_array_equal(x, y)


def test_api_refuses_bad_tile_options():
    a, b = smooth_image(1), smooth_image(2)
    for kwargs in ({"tile": 32}, {"tile": "big"}, {"tile": 256.0},
                   {"tile": 128, "tile_overlap": 65}, {"tile_overlap": -1}):
        with pytest.raises(ValueError, match="tile"):
            fuse([a, b], model=SharperRed(), **kwargs)
    with pytest.raises(ValueError, match="not both"):
        fuse([a, b], FuseOptions(), tile=128)
    assert FuseOptions().tile == "auto"


def test_cli_tiles_with_a_bar_over_tiles_and_says_so(files, capsys):
    a, b = files["pair"]
    out = files["root"] / "tiled.png"
    code = main([str(a), str(b), "-o", str(out), "--weights", str(files["weights"]),
                 "--tile", "64", "--tile-overlap", "16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "6 tiles of 64 px, overlap 16" in captured.out
    assert "6/6" in captured.err and "tile" in captured.err
    from msidtrans_fast import weights

    model = weights.load_model(files["weights"], "cpu")
    np.testing.assert_array_equal(io.read_image(out),
                                  fuse([a, b], model=model, tile=64, tile_overlap=16))
    out2 = files["root"] / "whole.png"
    assert main([str(a), str(b), "-o", str(out2), "--weights", str(files["weights"])]) == 0
    assert "whole image" in capsys.readouterr().out


def test_cli_dataset_bar_counts_tiles_when_an_image_is_tiled(files, tmp_path, capsys):
    root = tmp_path / "set"
    for k, seeds in enumerate(((31, 32), (33, 34)), start=1):
        for folder, seed in zip(("sourceA", "sourceB"), seeds, strict=True):
            (root / folder).mkdir(parents=True, exist_ok=True)
            io.write_image(root / folder / f"{k:02d}.png", smooth_image(seed, shape=(H, W, 3)))
    common = ["--dataset", str(root), "--weights", str(files["weights"])]
    assert main([*common, "-o", str(tmp_path / "tiled"), "--tile", "64",
                 "--tile-overlap", "16"]) == 0
    captured = capsys.readouterr()
    assert "12/12" in captured.err and "tile" in captured.err  # 2 pairs of 6 tiles
    assert "2 of 2 images tiled" in captured.out
    assert main([*common, "-o", str(tmp_path / "whole")]) == 0  # nothing tiled: images
    captured = capsys.readouterr()
    assert "2/2" in captured.err and "image" in captured.err and "tile" not in captured.err


def test_cli_bad_tile_values_exit_2_with_one_line(files, capsys, monkeypatch):
    from msidtrans_fast import cli

    a, b = files["pair"]
    new = files["root"] / "never.png"
    cases = [(["--tile", "10"], "--tile"), (["--tile", "abc"], "--tile"),
             (["--tile", "12.5"], "--tile"), (["--tile", "256", "--tile-overlap", "200"],
                                              "--tile-overlap"),
             (["--tile-overlap", "x"], "--tile-overlap"), (["--tile-overlap", "-1"],
                                                            "--tile-overlap")]
    for extra, needle in cases:
        code = main([str(a), str(b), "-o", str(new), *extra])
        err = capsys.readouterr().err.splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
    # --tile off refuses, before any work, a whole image that does not fit in memory
    monkeypatch.setattr(cli, "available_memory", lambda device: 1 << 20)
    code = main([str(a), str(b), "-o", str(new), "--weights", str(files["weights"]),
                 "--tile", "off"])
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]
    assert code == 2 and len(err) == 1 and "--tile auto" in err[0], err
    assert not new.exists()
    # end to end, as a user runs it
    code, _, err = run_cli(a, b, "-o", new, "--tile", "whole")
    assert code == 2 and err.strip().count("\n") == 0 and "--tile" in err
    assert not new.exists()


def test_cli_carries_exif_and_icc_and_keeps_portrait(files, capsys):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the photo is portrait
    exif[0x010F] = "Maker"
    sources = []
    for i, seed in enumerate((21, 22)):
        path = files["root"] / f"cam{i}.jpg"
        Image.fromarray(smooth_image(seed, shape=(30, 40, 3))).save(
            path, quality=95, exif=exif.tobytes(), icc_profile=icc)
        sources.append(str(path))
    for suffix in (".jpg", ".tif", ".png"):
        out = files["root"] / f"cam-fused{suffix}"
        assert main([*sources, "-o", str(out), "--weights", str(files["weights"]), "-q"]) == 0
        meta = io.read_metadata(out)
        assert io.read_image(out).shape[:2] == (40, 30)
        assert meta.icc_profile == icc and meta.orientation == 1
        back = Image.Exif()
        back.load(meta.exif)
        assert back[0x010F] == "Maker"
    capsys.readouterr()
