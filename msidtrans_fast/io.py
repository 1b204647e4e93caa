"""Reading and writing images: 8 and 16 bits per channel, grayscale and RGB; the one image reader,
folder listing (:func:`list_images`) and pairing rule (:func:`pair_images`) of every tool, and the
load stage of fusing (:func:`load_sources`).

Arrays are ``numpy.ndarray`` of dtype ``uint8`` or ``uint16``, shaped (H, W) for grayscale and
(H, W, 3) for RGB. Alpha channels are dropped on reading (the network sees RGB, as the original);
palette, bilevel, CMYK and YCbCr images are converted to RGB or grayscale.

Which library does what, and why (measured with Pillow 13, tifffile 2026.3, pypng 0.2022):

- Pillow reads and writes 8-bit images of every common format and 16-bit *grayscale* PNG/TIFF,
  but it has no 16-bit RGB mode: it refuses to write (H, W, 3) uint16 arrays and silently truncates
  16-bit RGB PNG and TIFF files to 8 bits when reading them. So it is used only where it is exact.
- TIFF goes through ``tifffile`` (numpy only, about 0.3 MB): exact 16-bit RGB reading and writing,
  uncompressed, deflate and LZMA built in. LZW/JPEG/PackBits-compressed TIFFs need the optional
  ``imagecodecs`` package; without it such files are read by Pillow when they are 8-bit or grayscale
  (where Pillow is exact), otherwise a clear error says what to install.
- 16-bit PNG goes through ``pypng`` (pure Python, no dependencies, 58 KB): exact for gray and RGB.
  It decodes a 1024x768 16-bit RGB PNG in about 0.1-0.5 s, fine next to the network's run time.
- OpenCV (``opencv-python-headless``) would do all of this and faster, but it is a 61 MB wheel for a
  job three small libraries do exactly; it was measured and not chosen.

Camera metadata (:func:`read_metadata`, Pillow reads it from every format without decoding the
pixels): the EXIF orientation is applied on reading, so a portrait photo stays portrait, and
:func:`write_image` can carry the EXIF block (orientation reset to "upright") and the ICC colour
profile of a source into JPEG and PNG outputs; TIFF outputs get the ICC profile and the EXIF
description tags (camera make and model, date, author, copyright), not the EXIF exposure directory,
which ``tifffile`` cannot write.

Writes are atomic: the image goes to a temporary file in the target directory, which is then moved
into place (``os.link`` when the target must not be overwritten, so an existing file is never
clobbered, else ``os.replace``). A failed write leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")
JPEG_SUFFIXES = (".jpg", ".jpeg")
#: Output formats :func:`write_image` can produce, by file suffix.
WRITE_SUFFIXES = PNG_SUFFIXES + TIFF_SUFFIXES + JPEG_SUFFIXES

#: File name endings every tool reads as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ImageFormatError(ValueError):
    """A file that is not an image this module can read exactly (the message names the file)."""


class SkippedFilesWarning(UserWarning):
    """Files of an image folder that are not images (by suffix) and were left out."""


# ------------------------------------------------------------------------------------- folders
def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of ``folder`` (not recursive), sorted by name: the listing rule of every
    tool (fusing, training, evaluation).

    A file is an image when its suffix is one of :data:`IMAGE_SUFFIXES` (any case). Hidden files
    (name starting with ".") and sub-folders are ignored silently; any other file is left out
    and named in one :class:`SkippedFilesWarning` per call.

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no image file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        raise ValueError(f"image folder {folder} holds no image file (looked for "
                         f"{', '.join(IMAGE_SUFFIXES)})")
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3
                                          else "")
        warnings.warn(f"skipped {len(skipped)} non-image file{'s' if len(skipped) > 1 else ''} "
                      f"in {folder}: {shown}", SkippedFilesWarning, stacklevel=2)
    return images


def _last_number(stem: str) -> int | None:
    found = re.findall(r"\d+", stem)
    return int(found[-1]) if found else None


def pair_images(*lists: list[Path]) -> list[tuple[Path, ...]]:
    """The pairing rule of every tool: image lists (as :func:`list_images` returns them, e.g.
    ``sourceA`` and ``sourceB``) pair by sorted position, as the original ``Eval.py``.

    The lists must have one length; and when every name of a list ends in a number and those
    numbers are distinct, the numbers of the k-th files must differ from those of the first files
    by one constant offset per list (``a_07.png`` must not pair with ``b_08.png`` when ``a_01``
    paired with ``b_01``: a file is missing or extra).

    Returns:
        One tuple per position, ``(lists[0][k], lists[1][k], ...)``.

    Raises:
        ValueError: different lengths, or numbered names that do not line up (naming the files).
    """
    first = lists[0]
    for other in lists[1:]:
        if len(other) != len(first):
            raise ValueError(f"{len(first)} images in {first[0].parent} but {len(other)} in "
                             f"{other[0].parent}; the folders pair by sorted name")
    numbers = [[_last_number(p.stem) for p in files] for files in lists]
    numbered = [None not in nums and len(set(nums)) == len(nums) for nums in numbers]
    for other, nums, ok in zip(lists[1:], numbers[1:], numbered[1:], strict=True):
        if not (ok and numbered[0]):
            continue
        for pa, pb, na, nb in zip(first, other, numbers[0], nums, strict=True):
            if nb - na != nums[0] - numbers[0][0]:
                raise ValueError(f"{pb.name} does not line up with {pa.name} (the folders "
                                 f"pair by sorted name: is a file missing or extra?)")
    return list(zip(*lists, strict=True))


#: EXIF tags of the first directory that describe the photo (not the file's layout) and are
#: carried into outputs: description, make, model, software, date, artist, copyright.
EXIF_DESCRIPTION_TAGS = (0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x013B, 0x8298)
_EXIF_ORIENTATION = 0x0112
#: EXIF sub-directories carried into JPEG and PNG outputs: the EXIF (exposure) and GPS data.
_EXIF_SUB_IFDS = (0x8769, 0x8825)


@dataclass(frozen=True)
class ImageMetadata:
    """Camera metadata of an image file.

    ``orientation``: the EXIF orientation (1-8; 1 = upright), which :func:`read_image` applies.
    ``exif``: the EXIF block as Pillow writes it (``b"Exif\\0\\0"`` + a TIFF structure) with the
    orientation set to 1, holding the description tags and the EXIF and GPS directories; or None.
    ``icc_profile``: the embedded ICC colour profile, or None.
    """

    orientation: int = 1
    exif: bytes | None = None
    icc_profile: bytes | None = None


def read_metadata(path: str | os.PathLike) -> ImageMetadata:
    """The EXIF orientation, EXIF block and ICC profile of an image file (empty metadata when
    the file has none or Pillow cannot parse its header)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            source = im.getexif()
            icc = im.info.get("icc_profile") or None
            exif = Image.Exif()
            for tag in EXIF_DESCRIPTION_TAGS:
                if tag in source:
                    exif[tag] = source[tag]
            for tag in _EXIF_SUB_IFDS:
                if tag in source:
                    exif.get_ifd(tag).update(source.get_ifd(tag))
            orientation = source.get(_EXIF_ORIENTATION, 1)
    except Exception:  # no parsable header: the pixels may still be readable, by another decoder
        return ImageMetadata()
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    if len(exif) or any(exif.get_ifd(t) for t in _EXIF_SUB_IFDS):
        exif[_EXIF_ORIENTATION] = 1
        return ImageMetadata(orientation, exif.tobytes(), icc)
    return ImageMetadata(orientation, None, icc)


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turns an (H, W[, C]) array as stored in a file into its upright view, for EXIF
    orientation 1-8 (as Pillow's ``ImageOps.exif_transpose``); other values leave it as is."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, 1)
    return array


# ------------------------------------------------------------------------------------- reading
def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file, turned upright by its EXIF orientation.

    The format is recognised from the file's content, not its name: PNG and TIFF at 8 or 16 bits,
    JPEG, and anything else Pillow opens at 8 bits (BMP, WebP, ...).

    Returns:
        (H, W) or (H, W, 3) array of dtype uint8 or uint16 (a portrait photo stored sideways with
        an EXIF orientation comes back H > W).

    Raises:
        FileNotFoundError: no such file.
        ImageFormatError: not an image, a damaged image, or an unsupported pixel type (for example
            32-bit or floating-point samples).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ImageFormatError(f"is a directory, not an image: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise ImageFormatError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        if head.startswith(_PNG_MAGIC) and len(head) >= 26 and head[24] == 16:
            array = _read_png16(path)
        elif head[:4] in _TIFF_MAGICS:
            array = _read_tiff(path)
        else:
            array = _read_pillow(path)
    except ImageFormatError:
        raise
    except Exception as e:  # any decoder failure means a damaged or foreign file
        raise ImageFormatError(f"not a readable image: {path} ({type(e).__name__}: {e})") from e
    array = _canonical(array, path)
    return np.ascontiguousarray(apply_orientation(array, read_metadata(path).orientation))


def _canonical(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8/uint16 from what a decoder returned (alpha dropped)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageFormatError(f"unsupported sample type {array.dtype} (8- or 16-bit unsigned "
                               f"integers only): {path}")
    if array.ndim == 3 and array.shape[-1] in (1, 2):  # gray, gray + alpha
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] == 4:  # RGBA
        array = array[..., :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3) or 0 in array.shape:
        raise ImageFormatError(f"unsupported image layout {array.shape} (expected a single "
                               f"grayscale or RGB image): {path}")
    return np.ascontiguousarray(array)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return _pillow_to_array(im, path)
    except UnidentifiedImageError as e:
        raise ImageFormatError(f"not an image (unrecognised format): {path}") from e


def _pillow_to_array(im, path: Path) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        array = np.asarray(im)
        if array.min() < 0 or array.max() > 0xFFFF:
            raise ImageFormatError(f"unsupported 32-bit integer samples: {path}")
        return array.astype(np.uint16)
    if mode == "F":
        raise ImageFormatError(f"unsupported floating-point samples: {path}")
    if mode in ("1", "L", "LA"):
        return np.asarray(im.convert("L"))
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode not in ("RGB", "RGBA"):
        im = im.convert("RGB")
    return np.asarray(im)


def _read_png16(path: Path) -> np.ndarray:
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    return array.reshape(height, width, planes)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        try:
            array = page.asarray()
        except (KeyError, ValueError, NotImplementedError, ImportError) as e:
            # A compression tifffile cannot decode without imagecodecs: Pillow is exact for 8-bit
            # and grayscale TIFFs, not for 16-bit colour.
            if page.bitspersample <= 8 or page.samplesperpixel == 1:
                return _read_pillow(path)
            raise ImageFormatError(f"cannot decode this {page.bitspersample}-bit colour TIFF "
                                   f"({page.compression.name} compression; `pip install "
                                   f"imagecodecs` adds it): {path}") from e
        if array.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
            array = np.moveaxis(array, 0, -1)
        return array


# ------------------------------------------------------------------------------------- sources
def as_source_array(image, name: str = "source") -> np.ndarray:
    """One source of a fusion as an (H, W, C) array, C = 1 (gray) or 3 (RGB), dtype uint8, uint16
    or float32 (values in [0, 1]).

    Accepted: a file path (read by :func:`read_image`); a numpy array (H, W) or (H, W, C); a PIL
    image (turned upright by its EXIF orientation, as files are); a torch tensor (H, W) or
    (C, H, W) (channels first, as torchvision). C may be 1, 3 or 4
    (alpha is dropped). Integer data must be uint8 or uint16; floating data must lie in [0, 1].

    Raises:
        FileNotFoundError, ImageFormatError: unreadable files.
        TypeError, ValueError: other objects, dtypes, layouts or value ranges (the message starts
            with ``name``).
    """
    import torch

    if isinstance(image, (str, os.PathLike)):
        array = read_image(image)
    elif type(image).__module__.startswith("PIL."):
        array = _canonical(_pillow_to_array(image, name), name)
        array = apply_orientation(array, _pillow_orientation(image))
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        if t.dtype == torch.uint16:
            array = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            array = t.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"{name}: expected a file path, numpy array, PIL image or torch tensor, "
                        f"got {type(image).__name__}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected (H, W) or (H, W, C) with C in 1, 3, 4 (tensors: (H, W) "
                         f"or (C, H, W)), got shape {tuple(array.shape)}")
    if array.shape[-1] == 4:
        array = array[..., :3]
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name}: empty image, shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name}: floating-point images must hold values in [0, 1]")
    elif array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"{name}: unsupported dtype {array.dtype} (use uint8, uint16 or floats "
                        f"in [0, 1])")
    return np.ascontiguousarray(array)


def _pillow_orientation(image) -> int:
    """The EXIF orientation (1-8) of a PIL image, 1 when it has none or an invalid one."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # an unparsable EXIF block: the pixels are still usable
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def source_names(images) -> list[str]:
    """Names for messages: a path as given, else ``"source i"``."""
    return [str(x) if isinstance(x, (str, os.PathLike)) else f"source {i}"
            for i, x in enumerate(images)]


def check_sources(arrays, names) -> None:
    """Checks that (H, W, C) sources can be fused together: two or more, one size, one dtype.

    Raises:
        ValueError: fewer than two sources, or sizes or bit depths that differ (naming them).
    """
    if len(arrays) < 2:
        raise ValueError(f"need at least two source images, got {len(arrays)}")
    h, w = arrays[0].shape[:2]
    for a, n in zip(arrays[1:], names[1:], strict=True):
        if a.shape[:2] != (h, w):
            raise ValueError(f"sources differ in size: {names[0]} is {w}x{h} (WxH), {n} is "
                             f"{a.shape[1]}x{a.shape[0]}")
    for a, n in zip(arrays[1:], names[1:], strict=True):
        if a.dtype != arrays[0].dtype:
            raise ValueError(f"sources differ in bit depth: {names[0]} is {arrays[0].dtype}, {n} "
                             f"is {a.dtype}")


def load_sources(images) -> list[np.ndarray]:
    """The first stage of fusing: reads and checks the sources of one fusion.

    Args:
        images: a sequence of two or more sources, each anything :func:`as_source_array` takes.

    Returns:
        A list of n >= 2 arrays (H, W, C) of one size and one dtype (uint8, uint16, or float32 in
        [0, 1]), C = 1 for all when every source is grayscale, else C = 3 for all (grayscale
        sources are replicated to RGB).

    Raises:
        TypeError: ``images`` is a single path, array or tensor rather than a sequence, or a
            source of an unsupported type.
        FileNotFoundError, ImageFormatError, ValueError: see :func:`as_source_array` and
            :func:`check_sources`.
    """
    import torch

    if isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)):
        raise TypeError("images must be a sequence of two or more sources (a list of paths, "
                        "arrays, PIL images or tensors)")
    images = list(images)
    names = source_names(images)
    arrays = [as_source_array(x, n) for x, n in zip(images, names, strict=True)]
    check_sources(arrays, names)
    if any(a.shape[-1] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    return arrays


# ------------------------------------------------------------------------------------- writing
def check_writable(path: str | os.PathLike, *, overwrite: bool = False,
                   create_dirs: bool = False) -> Path:
    """Checks, before any work, that ``path`` can be written by :func:`write_image`.

    The folder is tested by creating and removing a hidden temporary file in it (permission bits
    alone do not say whether root may write, nor whether a file system such as ``/sys`` accepts a
    new file).

    Args:
        overwrite: an existing file is acceptable (it would be replaced).
        create_dirs: the parent folder may be missing (the caller creates it); the nearest
            existing ancestor must then be a writable folder.

    Raises:
        ValueError: unsupported suffix.
        FileExistsError: the file exists and ``overwrite`` is false, or the path is a folder.
        NotADirectoryError: a parent on the way is a file.
        FileNotFoundError: the parent folder does not exist (without ``create_dirs``).
        PermissionError: the folder cannot be written.
    """
    path = Path(path)
    if path.suffix.lower() not in WRITE_SUFFIXES:
        raise ValueError(f"unsupported output format {path.suffix or '(no suffix)'!r} (use one of "
                         f"{', '.join(WRITE_SUFFIXES)}): {path}")
    if path.is_dir():
        raise FileExistsError(f"output is a directory: {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output exists (pass --overwrite / overwrite=True to replace "
                              f"it): {path}")
    folder = path.parent
    while not folder.exists() and not folder.is_symlink():
        if not create_dirs:
            raise FileNotFoundError(f"output directory does not exist: {folder}")
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: cannot write {path}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".msidtrans-write-check-", suffix=".tmp")
    except OSError as e:
        raise PermissionError(f"cannot write into folder {folder} ({e.strerror or e}): "
                              f"{path}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def write_image(path: str | os.PathLike, array: np.ndarray, *, overwrite: bool = False,
                metadata: ImageMetadata | None = None) -> Path:
    """Writes an image atomically; the format follows the suffix.

    Args:
        path: ``.png`` (8/16-bit, gray/RGB), ``.tif``/``.tiff`` (8/16-bit, gray/RGB, deflate) or
            ``.jpg``/``.jpeg`` (8-bit only, quality 95).
        array: (H, W) or (H, W, 3), uint8 or uint16 ((H, W, 1) is written as grayscale).
        overwrite: replace an existing file; otherwise an existing file raises FileExistsError
            and is left untouched.
        metadata: EXIF and ICC profile to embed (see :func:`read_metadata`; its orientation is
            not used: ``array`` is written upright). JPEG and PNG get both; TIFF the ICC profile
            and the EXIF description tags.

    Returns:
        The path written.
    """
    path = check_writable(path, overwrite=overwrite)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"images are written from uint8 or uint16 arrays, got {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) array, got shape {array.shape}")
    suffix = path.suffix.lower()
    if suffix in JPEG_SUFFIXES and array.dtype != np.uint8:
        raise ValueError(f"JPEG holds 8-bit images only; write 16-bit images as PNG or TIFF: "
                         f"{path}")

    meta = metadata or ImageMetadata()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        if suffix in TIFF_SUFFIXES:
            _write_tiff(tmp, array, meta)
        else:
            with open(tmp, "wb") as f:
                if suffix in PNG_SUFFIXES:
                    _write_png(f, array, meta)
                else:
                    from PIL import Image

                    Image.fromarray(array).save(f, format="JPEG", quality=95,
                                                **_pillow_metadata(meta))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        _move_into_place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _pillow_metadata(meta: ImageMetadata) -> dict:
    """Keyword arguments of Pillow's ``save`` embedding ``meta``."""
    kwargs = {}
    if meta.exif:
        kwargs["exif"] = meta.exif
    if meta.icc_profile:
        kwargs["icc_profile"] = meta.icc_profile
    return kwargs


def _write_png(f, array: np.ndarray, meta: ImageMetadata) -> None:
    if array.dtype == np.uint8:
        from PIL import Image

        Image.fromarray(array).save(f, format="PNG", **_pillow_metadata(meta))
        return
    import png

    height, width = array.shape[:2]
    planes = 1 if array.ndim == 2 else 3
    writer = png.Writer(width, height, greyscale=planes == 1, bitdepth=16)
    rows = array.reshape(height, width * planes)
    if not (meta.exif or meta.icc_profile):
        writer.write(f, rows)
        return
    # pypng writes no iCCP or eXIf chunk: add them after IHDR (both must precede IDAT)
    buffer = io.BytesIO()
    writer.write(buffer, rows)
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    extra = []
    if meta.icc_profile:
        extra.append((b"iCCP", b"ICC profile\0\0" + zlib.compress(meta.icc_profile)))
    if meta.exif:
        extra.append((b"eXIf", meta.exif.removeprefix(b"Exif\0\0")))
    png.write_chunks(f, chunks[:1] + extra + chunks[1:])


def _write_tiff(path: Path, array: np.ndarray, meta: ImageMetadata) -> None:
    import tifffile
    from PIL import Image

    tags, named = [], {"software": False, "description": None}  # no tifffile signature or JSON
    if meta.exif:
        exif = Image.Exif()
        exif.load(meta.exif)
        for tag in EXIF_DESCRIPTION_TAGS:
            value = exif.get(tag)
            if not (isinstance(value, str) and value and value.isascii()):
                continue
            if tag in (0x010E, 0x0131):  # tifffile writes these two itself
                named["description" if tag == 0x010E else "software"] = value
            else:
                tags.append((tag, "s", 0, value, True))
    tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else "minisblack",
                     compression="zlib", iccprofile=meta.icc_profile, extratags=tags,
                     metadata=None, **named)


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: never clobbers a file created meanwhile
    except FileExistsError:
        raise FileExistsError(f"output exists (pass --overwrite / overwrite=True to replace "
                              f"it): {path}") from None
    except OSError:  # file system without hard links
        if path.exists():
            raise FileExistsError(f"output exists: {path}") from None
        os.replace(tmp, path)
