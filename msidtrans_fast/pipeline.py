"""Fusing images with MSI-DTrans: the original ``Eval.py`` pipeline (SPEC.md, "Fusing") as an API.

For a pair A, B (each 8- or 16-bit, grayscale or RGB):

1. normalise: pixel values to [0, 1] (divide by 255 or 65535), grayscale replicated to three
   channels (the network sees RGB, as the original reads it), then mean 0.5 / std 0.5, so [-1, 1];
2. ``D = model(A, B)`` at full resolution, batch 1, eval mode, under ``torch.inference_mode``;
3. binarise: ``D > 0.5``;
4. consistency check: with ``area = threshold * H * W``, 4-connected foreground then background
   components of strictly fewer than ``area`` pixels are flipped
   (:func:`msidtrans_fast.ops.remove_small_regions` with ``min_area = ceil(area)``, which removes
   exactly the components of size ``s < area``); ``threshold = 0`` disables it;
5. blend ``A * D + B * (1 - D)`` on the original pixel values. D is binary, so every fused pixel is
   a copy of a source pixel and the output keeps the sources' dtype exactly.

Focus stacks (n > 2 sources). Up to :data:`VOTE_MAX_SOURCES` sources, every pair (i, j) gets a
binary decision map (n(n-1)/2 network runs) and each pixel takes the source that wins the most of
its pairwise comparisons (ties: the lowest index): a per-pixel choice over all sources that does not
depend on their order. Larger stacks are folded pairwise, ``F = fuse(fuse(fuse(S0, S1), S2), ...)``
(n - 1 runs). ``tools/compare_stack_schemes.py`` measured both on stacks made from real photos
(docs/fusing.md): equal at n = 3, the vote +0.9 dB PSNR at n = 4 and +2.9 dB at n = 5, because a
fold's errors and seams carry over into every later comparison. Either way every fused pixel is a
source pixel, and the map of which source it came from is returned.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import io as _io
from . import weights as _weights

#: Binarisation level of the decision map (SPEC "Fusing", step 3).
BINARY_LEVEL = 0.5

_MODEL_CACHE: dict[tuple[str, str, torch.dtype], torch.nn.Module] = {}
_MODEL_LOCK = threading.Lock()


def get_model(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """The model :func:`fuse` uses: loaded once per (weights, device, dtype) and cached.

    See :func:`msidtrans_fast.weights.load_model` for the arguments and errors.
    """
    dev = _weights.resolve_device(device)
    dt = _weights.resolve_dtype(dtype)
    key = (str(os.path.abspath(weights)) if weights is not None else "", str(dev), dt)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = _weights.load_model(weights, dev, dt)
        return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    """Forgets the models cached by :func:`get_model` (frees their memory)."""
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()


# ------------------------------------------------------------------------------------- sources
def _pixel_scale(dtype: np.dtype) -> float:
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    return 1.0  # float32 in [0, 1]


def as_source_array(image, name: str = "source") -> np.ndarray:
    """One source as an (H, W, C) array, C = 1 (gray) or 3 (RGB), dtype uint8, uint16 or float32.

    Accepted: a file path; a numpy array (H, W) or (H, W, C); a PIL image; a torch tensor
    (H, W) or (C, H, W) (channels first, as torchvision). C may be 1, 3 or 4 (alpha is dropped).
    Integer data must be uint8 or uint16; floating data must lie in [0, 1] (fused as float32).

    Raises:
        FileNotFoundError, msidtrans_fast.io.ImageFormatError: unreadable files.
        TypeError, ValueError: other objects, dtypes, layouts or value ranges.
    """
    if isinstance(image, (str, os.PathLike)):
        array = _io.read_image(image)
    elif type(image).__module__.startswith("PIL."):
        array = _io._canonical(_io._pillow_to_array(image, name), name)
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


def _check_sources(arrays: Sequence[np.ndarray], names: Sequence[str]) -> None:
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


# ---------------------------------------------------------------------------------- pair steps
def min_area(threshold: float, height: int, width: int) -> int:
    """Smallest component size the consistency check keeps: ``ceil(threshold * H * W)``.

    The original removes components of ``size < area`` with ``area = threshold * H * W`` (a real
    number); for integer sizes that is ``size < ceil(area)``. The product is evaluated in the
    original's order so that float rounding is the same.
    """
    return math.ceil(threshold * height * width)


def to_network_input(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W, C) source -> (1, 3, H, W) tensor in [-1, 1] (gray replicated to RGB)."""
    x = torch.from_numpy(array.astype(np.float32) / np.float32(_pixel_scale(array.dtype)))
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, 3)
    x = (x - 0.5) / 0.5
    return x.permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype).contiguous()


def binary_decision(model: torch.nn.Module, a: np.ndarray, b: np.ndarray,
                    threshold: float) -> np.ndarray:
    """Steps 1-4 for one pair: (H, W) bool, True where ``a`` is taken.

    ``a``, ``b``: (H, W, C) source arrays (see :func:`as_source_array`) of the same size.
    """
    param = next(model.parameters())
    A = to_network_input(a, param.device, param.dtype)
    B = to_network_input(b, param.device, param.dtype)
    with torch.inference_mode():
        D = model(A, B)
        mask = D.float() > BINARY_LEVEL
        if threshold > 0:
            from .ops import remove_small_regions

            mask = remove_small_regions(mask, min_area(threshold, a.shape[0], a.shape[1]))
    return mask[0, 0].cpu().numpy()


def fold_stack(arrays: Sequence[np.ndarray],
               decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
               progress: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise fold over sources of one size, channels and dtype.

    ``decide(a, b)`` returns an (H, W) bool map, True where ``a`` is taken. Returns the fused
    (H, W, C) array and an (H, W) int64 map of the source index each pixel came from.
    """
    fused = arrays[0]
    labels = np.zeros(arrays[0].shape[:2], dtype=np.int64)
    for k in range(1, len(arrays)):
        keep = decide(fused, arrays[k])
        fused = np.where(keep[..., None], fused, arrays[k])
        labels = np.where(keep, labels, k)
        if progress is not None:
            progress()
    return fused, labels


def vote_stack(arrays: Sequence[np.ndarray],
               decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
               progress: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel vote over all pairwise decisions (same arguments and results as
    :func:`fold_stack`): each pixel takes the source that wins the most comparisons, ties going
    to the lowest index."""
    n = len(arrays)
    wins = np.zeros((n, *arrays[0].shape[:2]), dtype=np.int64)
    for i in range(n):
        for j in range(i + 1, n):
            keep = decide(arrays[i], arrays[j])
            wins[i] += keep
            wins[j] += ~keep
            if progress is not None:
                progress()
    labels = wins.argmax(0)
    stack = np.stack(arrays)
    index = np.broadcast_to(labels[None, ..., None], (1, *stack.shape[1:]))
    return np.take_along_axis(stack, index, 0)[0], labels


#: Stacks of up to this many sources are fused by :func:`vote_stack` (at most 28 network runs),
#: larger ones by :func:`fold_stack`.
VOTE_MAX_SOURCES = 8


def stack_runs(num_sources: int) -> int:
    """Network runs :func:`fuse` makes for ``num_sources`` sources."""
    if 2 < num_sources <= VOTE_MAX_SOURCES:
        return num_sources * (num_sources - 1) // 2
    return num_sources - 1


# ------------------------------------------------------------------------------------- the API
def fuse(images, *, model: torch.nn.Module | None = None,
         weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, threshold: float = 0.001,
         return_decision_map: bool = False):
    """Fuses two or more images of one scene focused at different depths.

    Args:
        images: a sequence of two or more sources of one size: file paths, numpy arrays (H, W) or
            (H, W, C), PIL images or torch tensors (H, W) or (C, H, W); 8-bit (uint8), 16-bit
            (uint16) or floating point in [0, 1]; grayscale or RGB (alpha is dropped). All sources
            must share the bit depth; gray and RGB may be mixed (the result is then RGB). More
            than two sources form a focus stack: all are fused (see the module docstring).
        model: an :class:`~msidtrans_fast.model.MSIDTrans` to use (put in eval mode for the call;
            inputs go to its device and dtype). Default: the bundled weights, loaded once and
            cached, on ``device`` in ``dtype``.
        weights: a checkpoint path to use instead of the bundled weights (not with ``model``).
        device: "auto" / None (CUDA if available, else CPU), "cpu", "cuda", "cuda:N".
        dtype: compute dtype, "float32" (default), "float16" or "bfloat16".
        threshold: consistency-check fraction of H * W (SPEC "Fusing", step 4); 0 disables it.
        return_decision_map: also return the decision map.

    Returns:
        ``fused``: (H, W) for grayscale or (H, W, 3) for RGB sources, with the sources' dtype.
        With ``return_decision_map``, ``(fused, decision_map)``: for a pair, (H, W) float32 D in
        {0, 1}, 1 where the first source was taken (the original's binary decision map); for a
        stack, (H, W) int64, the index of the source each pixel was taken from.

    Raises:
        FileNotFoundError, ValueError, TypeError: unreadable sources, fewer than two, different
            sizes or bit depths, a bad threshold, weights, device or dtype.
        torch.OutOfMemoryError: the image does not fit the device (see :func:`estimate_memory`).
    """
    return fuse_with_progress(images, model=model, weights=weights, device=device, dtype=dtype,
                              threshold=threshold, return_decision_map=return_decision_map)


def fuse_with_progress(images, *, model=None, weights=None, device=None, dtype=None,
                       threshold=0.001, return_decision_map=False,
                       progress: Callable[[], None] | None = None):
    """:func:`fuse` that calls ``progress()`` after each network run (:func:`stack_runs`)."""
    if isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)):
        raise TypeError("images must be a sequence of two or more sources (a list of paths, "
                        "arrays, PIL images or tensors)")
    images = list(images)
    names = [str(x) if isinstance(x, (str, os.PathLike)) else f"source {i}"
             for i, x in enumerate(images)]
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not (
            0 <= threshold < 1):
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
    arrays = [as_source_array(x, n) for x, n in zip(images, names, strict=True)]
    _check_sources(arrays, names)
    if any(a.shape[-1] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]

    if model is None:
        net = get_model(weights, device, dtype)
    else:
        if weights is not None:
            raise ValueError("pass either model or weights, not both")
        net = model
        param = next(net.parameters())
        if device is not None and device != "auto" and \
                _weights.resolve_device(device) != param.device:
            raise ValueError(f"device {device!r} differs from the model's device {param.device}")
        if dtype is not None and _weights.resolve_dtype(dtype) != param.dtype:
            raise ValueError(f"dtype {dtype!r} differs from the model's dtype {param.dtype}")

    scheme = vote_stack if 2 < len(arrays) <= VOTE_MAX_SOURCES else fold_stack
    was_training = net.training
    net.eval()
    try:
        fused, labels = scheme(
            arrays, lambda a, b: binary_decision(net, a, b, threshold), progress)
    finally:
        net.train(was_training)

    if fused.shape[-1] == 1:
        fused = fused[..., 0]
    if not return_decision_map:
        return fused
    if len(arrays) == 2:
        return fused, (labels == 0).astype(np.float32)
    return fused, labels


def decision_map_image(decision_map: np.ndarray, num_sources: int) -> np.ndarray:
    """An 8-bit image of a decision map returned by :func:`fuse`: white where the first source
    was taken, black for the last; stacks in even grey steps, ``255 * (n - 1 - i) / (n - 1)``."""
    if num_sources == 2:
        return (np.asarray(decision_map) * 255).round().astype(np.uint8)
    index = np.asarray(decision_map, dtype=np.float64)
    return np.round(255 * (num_sources - 1 - index) / (num_sources - 1)).astype(np.uint8)


#: Peak memory of one pair at float32, bytes per pixel: measured as the growth of peak RSS on the
#: CPU (reference backend, inference mode): 3690 B/px at 256x256 (fixed costs weigh more), 2900 at
#: 512x512. An estimate for a warning before running, not a bound.
BYTES_PER_PIXEL_FP32 = 3000


def estimate_memory(height: int, width: int, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak memory, in bytes, of fusing one pair of H x W images (activations only)."""
    scale = 0.5 if dtype in (torch.float16, torch.bfloat16) else 1.0
    return int(BYTES_PER_PIXEL_FP32 * scale * height * width) + (64 << 20)
