"""Training data for MSI-DTrans (docs/design.md, "Training"; the data used: docs/data.md).

Two sources, both yielding the same samples: a dict with

- ``"A"``, ``"B"``: (3, h, w) float32 source images in [-1, 1],
- ``"GT"``: (3, h, w) float32 all-in-focus image in [-1, 1],
- ``"DM"``: (1, h, w) float32 decision map in [0, 1], 1 where A is the sharp source.

:class:`FolderPairs` reads the original folder layout (``sourceA``, ``sourceB``, ``groundtruth``,
``decisionmap`` under ``train/`` or ``validate/``, matched by sorted file name) with the original
augmentation. :class:`SyntheticPairs` builds pairs on the fly from any folder of sharp photos.

Randomness: every random draw of a sample comes from a NumPy generator seeded with
``(seed, epoch, index)``; call ``set_epoch`` before each epoch. A sample therefore depends only on
the seed, the epoch and its index, never on the number of DataLoader workers, the process or the
order of loading, which makes runs reproducible and resumable bit for bit.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from . import io as _io
from .metrics import LUMA_WEIGHTS

#: Sub-folders of the original layout, in the order (A, B, GT, DM).
FOLDER_NAMES = ("sourceA", "sourceB", "groundtruth", "decisionmap")

Sample = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------- files
def list_images(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (not recursive), sorted by name: the listing rule of every
    tool, :func:`msidtrans_fast.io.list_images`.

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no image file.
    """
    return _io.list_images(folder)


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Reads an image with the reader of every tool (:func:`msidtrans_fast.io.read_image`) as a
    Pillow image in ``mode`` ("RGB" or "L"), for the augmentation's resizing.

    16-bit images are brought to 8 bits (``round(v / 257)``), the precision the training samples
    have; 8-bit images give exactly what Pillow's ``convert(mode)`` gives.

    Raises:
        ValueError: the file is missing or cannot be decoded as an image.
    """
    try:
        array = _io.read_image(path)
    except (FileNotFoundError, _io.ImageFormatError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (c, h, w) float32 in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seeds Python's and NumPy's RNG from the worker's torch seed
    (itself derived from the loader's seed and the worker id) and keeps each worker on one
    thread."""
    del worker_id
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------- folder layout
class FolderPairs(Dataset):
    """Pairs in the original folder layout: ``root/sourceA``, ``root/sourceB``,
    ``root/groundtruth``, ``root/decisionmap``, matched by sorted file name.

    ``root`` is one split folder (the original's ``train/`` or ``validate/``).

    Augmentation (``augment=True``, the original's): resize every image to ``resize`` x ``resize``
    (bilinear), take the same random ``crop`` x ``crop`` window from A, B, GT and DM, flip all four
    horizontally and vertically with probability 1/2 each. Without augmentation: resize, then the
    central crop (a fixed validation set).

    Raises:
        ValueError: a sub-folder is missing or empty, the four folders hold different numbers of
            images, or ``crop`` exceeds ``resize``. Unreadable images raise ValueError when read.
    """

    def __init__(self, root: str | Path, resize: int = 256, crop: int = 224,
                 augment: bool = True, seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data folder {self.root} does not exist or is not a folder")
        if crop < 1 or resize < crop:
            raise ValueError(f"need 1 <= crop <= resize, got crop={crop}, resize={resize}")
        lists = [list_images(self.root / name) for name in FOLDER_NAMES]
        counts = {name: len(files) for name, files in zip(FOLDER_NAMES, lists, strict=True)}
        if len(set(counts.values())) != 1:
            raise ValueError(f"mismatched image counts in {self.root}: {counts}; every sub-folder "
                             "must hold one image per pair, matched by sorted file name")
        try:
            self.files = _io.pair_images(*lists)
        except ValueError as e:
            raise ValueError(f"mismatched image folders in {self.root}: {e}") from None
        self.resize, self.crop, self.augment, self.seed = resize, crop, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the random draws of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        paths = self.files[index]
        size = (self.resize, self.resize)
        imgs = [load_image(p, "L" if name == "decisionmap" else "RGB").resize(size, Image.BILINEAR)
                for p, name in zip(paths, FOLDER_NAMES, strict=True)]
        tensors = [_to_tensor(img) for img in imgs]
        c = self.crop
        if self.augment:
            rng = _sample_rng(self.seed, self.epoch, index)
            top = int(rng.integers(0, self.resize - c + 1))
            left = int(rng.integers(0, self.resize - c + 1))
            flip_h, flip_v = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        else:
            top = left = (self.resize - c) // 2
            flip_h = flip_v = False
        out = []
        for t in tensors:
            t = t[:, top:top + c, left:left + c]
            if flip_h:
                t = t.flip(-1)
            if flip_v:
                t = t.flip(-2)
            out.append(t.contiguous())
        a, b, gt, dm = out
        return {"A": a * 2 - 1, "B": b * 2 - 1, "GT": gt * 2 - 1, "DM": dm}


# ------------------------------------------------------------------------------------ synthetic
def _gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding.

    img: (c, h, w) float32; returns the same shape."""
    radius = max(1, min(int(math.ceil(3 * sigma)), min(img.shape[-2:]) - 1))
    k = _gaussian_kernel1d(sigma, radius)
    c = img.shape[0]
    x = F.pad(img[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def disk_blur(img: torch.Tensor, radius: float) -> torch.Tensor:
    """Defocus-like blur: mean over a disk of ``radius`` px (anti-aliased rim), reflect padding.
    img: (c, h, w) float32; returns the same shape."""
    r = max(1, min(int(math.ceil(radius)), min(img.shape[-2:]) - 1))
    y, x = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    k = (radius + 0.5 - torch.sqrt(x * x + y * y)).clamp(0, 1)
    k = k / k.sum()
    c = img.shape[0]
    xpad = F.pad(img[None], (r, r, r, r), mode="reflect")
    return F.conv2d(xpad, k.expand(c, 1, 2 * r + 1, 2 * r + 1), groups=c)[0]


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random blobs: a coarse Gaussian noise field upsampled and thresholded."""
    cells = int(rng.integers(2, 9))  # fewer cells -> fewer, larger blobs
    noise = torch.from_numpy(rng.standard_normal((1, 1, cells, cells)).astype(np.float32))
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    q = float(rng.uniform(0.25, 0.75))
    return (field > torch.quantile(field.flatten(), q)).numpy()


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One to four random ellipses or star-shaped polygons of varied size."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.12, 0.5) * size
        if rng.random() < 0.5:
            rx, ry = r * rng.uniform(0.5, 1.0, 2)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        else:
            n = int(rng.integers(3, 10))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = r * rng.uniform(0.4, 1.0, n)
            pts = [(float(cx + q * np.cos(a)), float(cy + q * np.sin(a)))
                   for a, q in zip(angles, radii, strict=True)]
            draw.polygon(pts, fill=255)
    return np.asarray(img) > 127


def _half_plane_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A near/far split: a straight or gently curved boundary across the image."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    t = xx * np.cos(angle) + yy * np.sin(angle)
    s = -xx * np.sin(angle) + yy * np.cos(angle)
    wave = rng.uniform(0, 0.1) * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * s + rng.uniform(0, 6.3))
    return t + wave > rng.uniform(-0.3, 0.3)


def random_focus_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random binary focus mask, (size, size) bool, covering between 5% and 95% of the area:
    smooth blobs, shapes or a near/far split, randomly inverted."""
    makers = (_blob_mask, _shape_mask, _half_plane_mask)
    for _ in range(20):
        kind = int(rng.choice(3, p=[0.45, 0.4, 0.15]))
        mask = makers[kind](rng, size)
        if rng.random() < 0.5:
            mask = ~mask
        if 0.05 <= mask.mean() <= 0.95:
            return mask
    # Fallback (rare): left half in focus.
    mask = np.zeros((size, size), dtype=bool)
    mask[:, : size // 2] = True
    return mask


def split_images(paths: Sequence[Path], val_fraction: float, seed: int = 0
                 ) -> tuple[list[Path], list[Path]]:
    """A fixed, seeded split of image paths into (train, validation).

    The split depends only on the sorted file names and ``seed``. At least one image stays on each
    side when ``val_fraction > 0`` and there are two or more images.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    paths = sorted(Path(p) for p in paths)
    if val_fraction == 0:
        return paths, []
    if len(paths) < 2:
        raise ValueError(f"need at least 2 images for a validation split, got {len(paths)}")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919]).permutation(len(paths))
    n_val = min(len(paths) - 1, max(1, round(val_fraction * len(paths))))
    val = sorted(paths[i] for i in order[:n_val])
    train = sorted(paths[i] for i in order[n_val:])
    return train, val


class SyntheticPairs(Dataset):
    """Multi-focus pairs made on the fly from sharp photos.

    For sample ``index`` of epoch ``epoch`` (all draws from ``(seed, epoch, index)``):

    1. photo ``images[index % len(images)]``, rescaled so that its short side is a random length in
       ``[crop, max(crop, min(short side, 2.5 crop))]`` (antialiased), a random ``crop`` x ``crop``
       window, random horizontal/vertical flips: GT, the all-in-focus image; with probability
       ``gray_prob`` GT becomes its luma (ITU-R 601) in all three channels, as a grayscale source
       is read;
    2. a random focus mask M (smooth blobs, shapes or a near/far split; varied size and count);
       DM = M;
    3. the compositing weight W = M, or with probability ``soft_edge_prob`` M blurred with a
       Gaussian of sigma in [0.5, 3] (soft focus transition);
    4. two defocused copies of GT, each a Gaussian (sigma) or disk (radius 1.5 sigma) blur with
       sigma log-uniform in ``blur_sigma``;
    5. ``A = W GT + (1 - W) blur_a(GT)`` and ``B = (1 - W) GT + W blur_b(GT)``;
    6. with probability ``camera_prob``, what a camera adds after the lens, to both sources alike:
       Gaussian sensor noise (one std, uniform in [0, ``noise_std``], independent draws for A and
       B), rounding to 8 bits, and for half of these pairs JPEG compression of A and B (one quality,
       70-95). GT takes the same changes where each source is sharp:
       ``GT += W (A' - A) + (1 - W) (B' - B)``.

    So A equals GT where W = 1 (DM = 1 away from soft edges), B equals GT where W = 0, and each is
    defocused elsewhere. Step 6 removes a cue real pairs lack: without it the defocused side is
    free of the noise and compression artefacts of the sharp photo, while in real pairs both
    sources carry the same noise in flat areas.

    Args:
        images: paths of sharp photos (e.g. from :func:`list_images` / :func:`split_images`).
        length: samples per epoch.
        crop: output size (square).
        seed: base seed.
        blur_sigma: (low, high) range of the defocus sigma in px.
        soft_edge_prob: share of pairs with a soft focus transition.
        gray_prob: share of grayscale pairs (0 leaves the random draws of every sample as they
            are without the option).
        camera_prob: share of pairs given step 6 (0, likewise, changes no draw).
        noise_std: the largest sensor-noise std of step 6, in units of the [0, 1] range.
        fixed: ignore ``set_epoch`` (epoch 0 always): a fixed validation set.
    """

    def __init__(self, images: Sequence[str | Path], length: int, crop: int = 224, seed: int = 0,
                 blur_sigma: tuple[float, float] = (0.7, 4.0), soft_edge_prob: float = 0.5,
                 gray_prob: float = 0.0, camera_prob: float = 0.0, noise_std: float = 2.5 / 255,
                 fixed: bool = False):
        self.images = [Path(p) for p in images]
        if not self.images:
            raise ValueError("SyntheticPairs needs at least one sharp image, got none")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if crop < 8:
            raise ValueError(f"crop must be >= 8, got {crop}")
        lo, hi = blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, "
                             f"got {blur_sigma}")
        for name, prob in (("gray_prob", gray_prob), ("camera_prob", camera_prob)):
            if not 0 <= prob <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {prob}")
        if not 0 <= noise_std <= 0.1:
            raise ValueError(f"noise_std must be in [0, 0.1], got {noise_std}")
        self.length, self.crop, self.seed = int(length), int(crop), int(seed)
        self.blur_sigma, self.soft_edge_prob, self.fixed = (lo, hi), soft_edge_prob, fixed
        self.gray_prob = float(gray_prob)
        self.camera_prob, self.noise_std = float(camera_prob), float(noise_std)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the random draws of ``epoch`` (no effect when ``fixed``)."""
        if not self.fixed:
            self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _defocus(self, rng: np.random.Generator, img: torch.Tensor) -> torch.Tensor:
        lo, hi = self.blur_sigma
        sigma = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        if rng.random() < 0.65:
            return gaussian_blur(img, sigma)
        return disk_blur(img, 1.5 * sigma)

    def _camera(self, rng: np.random.Generator, a: torch.Tensor, b: torch.Tensor, gray: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 6 on (3, h, w) sources in [0, 1]; grey sources stay grey."""
        std = float(rng.uniform(0, self.noise_std))
        quality = int(rng.integers(70, 96)) if rng.random() < 0.5 else None
        out = []
        for src in (a, b):
            shape = (1 if gray else 3, *src.shape[1:])
            noise = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            u8 = ((src + std * noise) * 255).round().clamp(0, 255).to(torch.uint8)
            if quality is not None:
                arr = u8[0].numpy() if gray else u8.permute(1, 2, 0).numpy()  # L or RGB
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
                u8 = torch.from_numpy(np.asarray(Image.open(buf)).copy())
                u8 = u8[None] if gray else u8.permute(2, 0, 1)
            out.append((u8.float() / 255).expand_as(src).contiguous())
        return out[0], out[1]

    def sharp_crop(self, rng: np.random.Generator, path: Path) -> torch.Tensor:
        """Step 1: (3, crop, crop) float32 in [0, 1]."""
        img = load_image(path, "RGB")
        c = self.crop
        w, h = img.size
        short = min(w, h)
        target = int(rng.uniform(c, max(c, min(short, 2.5 * c)) + 1))
        scale = max(target / short, c / w, c / h)
        nw, nh = max(c, round(w * scale)), max(c, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
        top = int(rng.integers(0, nh - c + 1))
        left = int(rng.integers(0, nw - c + 1))
        t = _to_tensor(img.crop((left, top, left + c, top + c))).clamp(0, 1)
        if rng.random() < 0.5:
            t = t.flip(-1)
        if rng.random() < 0.5:
            t = t.flip(-2)
        return t.contiguous()

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = _sample_rng(self.seed, self.epoch, index)
        gt = self.sharp_crop(rng, self.images[index % len(self.images)])
        gray = self.gray_prob > 0 and rng.random() < self.gray_prob
        if gray:
            luma = torch.tensordot(torch.tensor(LUMA_WEIGHTS), gt, dims=1)
            gt = luma.expand(3, -1, -1).contiguous()
        mask = torch.from_numpy(random_focus_mask(rng, self.crop).astype(np.float32))[None]
        weight = mask
        if rng.random() < self.soft_edge_prob:
            weight = gaussian_blur(mask, float(rng.uniform(0.5, 3.0))).clamp(0, 1)
        blur_a = self._defocus(rng, gt)
        blur_b = self._defocus(rng, gt)
        a = weight * gt + (1 - weight) * blur_a
        b = (1 - weight) * gt + weight * blur_b
        if self.camera_prob > 0 and rng.random() < self.camera_prob:
            a2, b2 = self._camera(rng, a, b, gray)
            gt = (gt + weight * (a2 - a) + (1 - weight) * (b2 - b)).clamp(0, 1)
            a, b = a2, b2
        return {"A": a * 2 - 1, "B": b * 2 - 1, "GT": gt * 2 - 1, "DM": mask}
