"""One reader, one folder listing and one pairing rule for fusing, training and evaluation."""

import warnings

import numpy as np
import pytest

from msidtrans_fast import cli, datasets, evaluate, io


def gradient16(h=12, w=16):
    """A 16-bit grayscale ramp over the whole range (most values are not multiples of 257)."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def test_sixteen_bit_png_is_read_the_same_by_every_tool(tmp_path):
    image = gradient16()
    path = io.write_image(tmp_path / "g16.png", image)
    np.testing.assert_array_equal(io.read_image(path), image)
    # fusing: the source array is the file's values
    np.testing.assert_array_equal(io.load_sources([path, path])[0][..., 0], image)
    # evaluation: the 8-bit scale of the same values
    np.testing.assert_allclose(evaluate._read(path), image / 257.0)
    # training: the same values at 8 bits, gray replicated to RGB (not clipped to white)
    rgb = np.asarray(datasets.load_image(path, "RGB"))
    expected8 = np.round(image / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.repeat(expected8[..., None], 3, -1))
    np.testing.assert_array_equal(np.asarray(datasets.load_image(path, "L")), expected8)
    assert (rgb == 255).mean() < 0.01


def test_eight_bit_training_images_are_unchanged_by_the_shared_reader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    images = {"rgb.png": Image.fromarray(rgb), "gray.png": Image.fromarray(rgb[..., 0]),
              "pal.png": Image.fromarray(rgb).quantize(16), "q.jpg": Image.fromarray(rgb)}
    for name, img in images.items():
        img.save(tmp_path / name)
        for mode in ("RGB", "L"):
            with Image.open(tmp_path / name) as pil:
                want = np.asarray(pil.convert(mode))
            np.testing.assert_array_equal(np.asarray(datasets.load_image(tmp_path / name, mode)),
                                          want, err_msg=f"{name} {mode}")


@pytest.fixture()
def layout_with_stray_file(tmp_path):
    """The original layout (two pairs), with a README.txt in sourceA."""
    root = tmp_path / "Set"
    rng = np.random.default_rng(1)
    for sub in datasets.FOLDER_NAMES:
        (root / sub).mkdir(parents=True)
        for i in (1, 2):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            io.write_image(root / sub / f"p{i:02d}.png", img[..., 0] if sub == "decisionmap"
                           else img)
    (root / "sourceA" / "README.txt").write_text("notes")
    (root / "sourceA" / ".DS_Store").write_bytes(b"\0")
    return root


def test_stray_text_file_is_handled_the_same_by_fuse_train_and_eval(layout_with_stray_file,
                                                                   tmp_path, capsys):
    root = layout_with_stray_file
    want = [root / "sourceA" / "p01.png", root / "sourceA" / "p02.png"]
    with pytest.warns(io.SkippedFilesWarning, match="README.txt") as record:
        assert io.list_images(root / "sourceA") == want
    assert len(record) == 1 and ".DS_Store" not in str(record[0].message)

    # fusing: both pairs fused, the stray file named once on stderr
    out = tmp_path / "fused"
    assert cli.main(["--dataset", str(root), "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("README.txt") == 1 and err.startswith("msidtrans-fuse: warning: skipped 1")
    assert sorted(p.name for p in out.iterdir()) == ["Set-01.png", "Set-02.png"]

    # training: the same pairs, the same warning
    with pytest.warns(io.SkippedFilesWarning, match="README.txt"):
        pairs = datasets.FolderPairs(root, resize=16, crop=16)
    assert [p[0] for p in pairs.files] == want and len(pairs[0]["A"]) == 3

    # evaluation: the same pairs, the warning once as one line
    assert evaluate.main(["--sources", str(root), "--fused", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("README.txt") == 1 and err.startswith("msidtrans-eval: warning: skipped 1")


def test_pairing_rule_is_shared(tmp_path):
    a = [tmp_path / "a" / f"x_{i:02d}.png" for i in (1, 2, 3)]
    b = [tmp_path / "b" / f"y_{i:02d}.png" for i in (1, 2, 4)]
    with pytest.raises(ValueError, match="y_04.png does not line up with x_03.png"):
        io.pair_images(a, b)
    shifted = [tmp_path / "b" / f"y_{i:02d}.png" for i in (11, 12, 13)]
    assert io.pair_images(a, shifted) == list(zip(a, shifted, strict=True))
    with pytest.raises(ValueError, match="3 images .* but 2"):
        io.pair_images(a, b[:2])
    with pytest.raises(evaluate.EvaluationError, match="line up"):
        evaluate.check_source_pairs(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="holds no image file"):
            io.list_images(tmp_path)
