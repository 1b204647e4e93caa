"""Camera files: EXIF orientation on reading, EXIF and ICC profile carried into outputs."""

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from msidtrans_fast import io

MAKE, MODEL, EXPOSURE = 0x010F, 0x0110, 0x829A


@pytest.fixture(scope="module")
def icc():
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def camera_exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[MAKE] = "Maker"
    exif[MODEL] = "Body 7"
    exif.get_ifd(0x8769)[EXPOSURE] = (1, 125)
    return exif.tobytes()


def pixels(shape=(20, 30, 3), dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(tmp_path, orientation):
    path = tmp_path / "photo.png"  # lossless, so the pixels can be compared exactly
    Image.fromarray(pixels()).save(path, exif=camera_exif(orientation))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    got = io.read_image(path)
    np.testing.assert_array_equal(got, upright)
    assert io.read_metadata(path).orientation == orientation


def test_portrait_jpeg_stays_portrait(tmp_path):
    path = tmp_path / "portrait.jpg"
    Image.fromarray(pixels((30, 40, 3))).save(path, exif=camera_exif(6))  # stored landscape
    assert io.read_image(path).shape == (40, 30, 3)


def test_sixteen_bit_tiff_orientation(tmp_path):
    import tifffile

    array = pixels((6, 9, 3), np.uint16)
    path = tmp_path / "rot.tif"
    tifffile.imwrite(path, array, photometric="rgb", extratags=[(0x0112, "H", 1, 8, True)])
    np.testing.assert_array_equal(io.read_image(path), np.rot90(array, 1))


@pytest.mark.parametrize("suffix,dtype", [(".jpg", np.uint8), (".png", np.uint8),
                                          (".png", np.uint16), (".tif", np.uint8),
                                          (".tif", np.uint16)])
def test_metadata_round_trip(tmp_path, icc, suffix, dtype):
    source = tmp_path / "camera.jpg"
    Image.fromarray(pixels()).save(source, exif=camera_exif(6), icc_profile=icc)
    meta = io.read_metadata(source)
    assert meta.orientation == 6 and meta.icc_profile == icc
    array = pixels(dtype=dtype, seed=1)
    out = io.write_image(tmp_path / f"fused{suffix}", array, metadata=meta)
    back = io.read_metadata(out)
    assert back.icc_profile == icc
    assert back.orientation == 1  # written upright: a reader must not rotate it again
    exif = Image.Exif()
    exif.load(back.exif)
    assert exif[MAKE] == "Maker" and exif[MODEL] == "Body 7"
    if suffix != ".tif":  # tifffile cannot write the EXIF exposure directory
        assert exif.get_ifd(0x8769)[EXPOSURE] == (1, 125)
    if suffix != ".jpg":
        np.testing.assert_array_equal(io.read_image(out), array)


def test_files_without_metadata(tmp_path):
    for suffix in (".png", ".tif", ".jpg"):
        out = io.write_image(tmp_path / f"plain{suffix}", pixels())
        assert io.read_metadata(out) == io.ImageMetadata(1, None, None)
    (tmp_path / "junk.bin").write_bytes(b"not an image")
    assert io.read_metadata(tmp_path / "junk.bin") == io.ImageMetadata()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_pil_images_are_turned_upright_as_files_are(tmp_path, orientation):
    path = tmp_path / "photo.png"
    Image.fromarray(pixels()).save(path, exif=camera_exif(orientation))
    with Image.open(path) as im:
        from_pil = io.as_source_array(im)
        # an image already turned upright (exif_transpose drops the tag) is not turned again
        upright = io.as_source_array(ImageOps.exif_transpose(im))
    np.testing.assert_array_equal(from_pil, io.as_source_array(path))
    np.testing.assert_array_equal(upright, from_pil)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(pixels((30, 40, 3))).save(jpeg, exif=camera_exif(orientation))
    with Image.open(jpeg) as im:
        np.testing.assert_array_equal(io.load_sources([im, im])[0], io.read_image(jpeg))
