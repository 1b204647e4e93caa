"""Fusing images with MSI-DTrans: the original ``Eval.py`` pipeline as an API, as a chain of stages.

:func:`fuse` is the entry point; the command line runs the same stages. For the sources of one
fusion the stages are:

1. **load** (:func:`msidtrans_fast.io.load_sources`): files, arrays, PIL images or tensors become
   (H, W, C) arrays of one size and dtype;
2. **align** (optional, :func:`align_stage`, :mod:`msidtrans_fast.align`): every source is
   registered to the first and warped onto its pixel grid; where a warped source has no content
   (its border) it holds the first source's pixels and the decisions take the first source;
   with ``align_crop`` the result is cut to the area every source covers;
3. **decision map** (a :class:`Decider`, made by :func:`make_decider`): for a pair (a, b), the
   network's soft map D, (H, W) float32 in [0, 1], large where ``a`` is sharp. The pixels enter
   the network as RGB in [-1, 1] (value / 255 or / 65535, gray replicated, then mean 0.5 / std 0.5)
   in eval mode, under ``torch.inference_mode``: at full resolution, batch 1
   (:class:`WholeImageDecider`, the original's way), or on overlapping tiles blended into one map
   (:class:`msidtrans_fast.tiling.TiledDecider`, for large camera frames; ``tile="auto"`` keeps
   the whole-image path up to :data:`msidtrans_fast.tiling.AUTO_WHOLE_MAX_PIXELS`);
4. **binarise** (:func:`binarise`): ``D > 0.5``; the decision rule (``options.decision_rule``:
   ``"original"`` adds nothing, ``"flat"`` gives each flat region one source, see
   :mod:`msidtrans_fast.decision`); then the consistency check on the whole map: with
   ``area = threshold * H * W``, 4-connected foreground then background components of strictly
   fewer than ``area`` pixels are flipped (:func:`msidtrans_fast.ops.remove_small_regions` with
   ``min_area = ceil(area)``, which removes exactly the components of size ``s < area``);
   ``threshold = 0`` disables it;
5. **compose** (:func:`compose`): every fused pixel is copied from the source the binary decisions
   chose, so the output keeps the sources' dtype exactly (the original's ``A * D + B * (1 - D)``
   with a binary D);
6. **write**: the caller's (``msidtrans-fuse`` writes atomically with
   :func:`msidtrans_fast.io.write_image`).

Focus stacks (n > 2 sources) run stages 3-4 on pairs of sources. Up to :data:`VOTE_MAX_SOURCES`
sources every pair (i, j) gets a binary decision map (n(n-1)/2 network runs) and each pixel takes
the source that wins the most of its pairwise comparisons (ties: the lowest index): a per-pixel
choice over all sources that does not depend on their order. Larger stacks are folded pairwise,
``F = fuse(fuse(fuse(S0, S1), S2), ...)`` (n - 1 runs). ``tools/compare_stack_schemes.py`` measured
both on stacks made from real photos (docs/fusing.md): equal at n = 3, the vote +0.9 dB PSNR at
n = 4 and +2.9 dB at n = 5, because a fold's errors and seams carry over into every later
comparison. Either way every fused pixel is a source pixel, and the map of which source it came
from is returned.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from . import align as _align
from . import decision as _decision
from . import io as _io
from . import ops as _ops
from . import tiling as _tiling
from . import weights as _weights
from .model import MSIDTrans

#: Binarisation level of the soft decision map (stage 3).
BINARY_LEVEL = 0.5

#: One source in the layout every stage takes (defined in :mod:`msidtrans_fast.io`).
as_source_array = _io.as_source_array

_MODEL_CACHE: dict[tuple[str, str, torch.dtype], torch.nn.Module] = {}
_MODEL_LOCK = threading.Lock()


def get_model(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """The model :func:`fuse` uses: loaded once per (weights, device, dtype) and cached.

    See :func:`msidtrans_fast.weights.load_model` for the arguments and errors.
    """
    dev = _weights.resolve_device(device)
    dt = _weights.resolve_dtype(_weights.AUTO_DTYPE if dtype is None else dtype, dev)
    key = (str(os.path.abspath(weights)) if weights is not None else "", str(dev), dt)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = _weights.load_model(weights, dev, dt)
        return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    """Forgets the models cached by :func:`get_model` and frees their memory, and the idle
    activation blocks CPU forwards keep for the next call
    (:func:`msidtrans_fast.ops.reuse_cpu_blocks`)."""
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()
    _ops.release_cpu_blocks()


# ------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class FuseOptions:
    """How to fuse: the settings every stage reads.

    Attributes:
        device: "auto" / None (CUDA if available, else the CPU), "cpu", "cuda", "cuda:N" or a
            ``torch.device``. With a given model: None means the model's device.
        dtype: compute precision of the network: "auto" (the default, None: "mixed" on a CPU
            with native bf16, else float32; see :func:`msidtrans_fast.weights.auto_precision`;
            with a given model: its dtype, and for a float32 model the products "auto" picks),
            "float32" (exact), "mixed" (float32 with the heavy convolutions computed in
            bfloat16, :mod:`msidtrans_fast.precision`),
            "bfloat16", "float16" (CUDA only), or a ``torch.dtype``.
        threshold: consistency-check fraction of H * W in [0, 1); 0 disables the check.
        decision_rule: how the binarise stage turns D into source choices, a name of
            :data:`msidtrans_fast.decision.DECISION_RULES` (default
            :data:`msidtrans_fast.decision.DEFAULT_RULE`; ``"original"`` is the original's).
        align: register the sources to the first before fusing, with this motion model:
            "similarity" (scale, rotation, shift; ``True`` means it), "affine" or "homography";
            None or False: the sources are fused as given (see :mod:`msidtrans_fast.align`).
        align_crop: cut the output (and decision map) to the largest rectangle every aligned
            source covers; otherwise the output has the first source's size.
        align_fallback: when a source cannot be aligned, warn (:class:`AlignmentWarning`) and
            fuse the sources unaligned instead of raising
            :class:`~msidtrans_fast.align.AlignmentError`.
        tile: how the decision map is computed: "auto" (the whole image at once up to
            :data:`~msidtrans_fast.tiling.AUTO_WHOLE_MAX_PIXELS`, tiles of
            :data:`~msidtrans_fast.tiling.DEFAULT_TILE` px above), None or "off" (always the
            whole image), or a tile side in pixels (>= 64).
        tile_overlap: least overlap of neighbouring tiles in pixels, 0 to half the tile.

    Raises:
        ValueError: a threshold outside [0, 1), an unknown decision rule or alignment model, a
            bad tile or overlap (device and dtype are checked when the network is loaded, by
            :func:`make_decider`).
    """

    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    threshold: float = 0.001
    tile: int | str | None = "auto"
    tile_overlap: int = _tiling.DEFAULT_OVERLAP
    decision_rule: str = _decision.DEFAULT_RULE
    align: str | None = None
    align_crop: bool = False
    align_fallback: bool = False

    def __post_init__(self):
        _decision.check_rule(self.decision_rule)
        t = self.threshold
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not 0 <= t < 1:
            raise ValueError(f"threshold must be a number in [0, 1), got {t!r}")
        _tiling.check_tile_option(self.tile, self.tile_overlap)
        if self.align is True:
            object.__setattr__(self, "align", "similarity")
        elif self.align is False:
            object.__setattr__(self, "align", None)
        if self.align is not None and self.align not in _align.MODELS:
            raise ValueError(f"align must be one of {', '.join(_align.MODELS)} (or None), got "
                             f"{self.align!r}")
        for name in ("align_crop", "align_fallback"):
            if getattr(self, name) and self.align is None:
                raise ValueError(f"{name} needs align (a motion model)")


# ------------------------------------------------------------------------------- align stage
class AlignmentWarning(UserWarning):
    """A source could not be aligned and the sources are fused unaligned (``align_fallback``)."""


def estimate_alignment(sources: Sequence[np.ndarray], options: FuseOptions,
                       names: Sequence[str] | None = None) -> list[_align.Alignment] | None:
    """The estimating half of the align stage: one :class:`~msidtrans_fast.align.Alignment` per
    source (neighbours registered, transforms composed), or None when alignment is off, or
    failed and ``options.align_fallback`` asks to fuse unaligned (an :class:`AlignmentWarning`
    names the source and the reason).

    Raises:
        msidtrans_fast.align.AlignmentError: a source cannot be aligned (without fallback).
    """
    if options.align is None:
        return None
    try:
        return _align.estimate_stack(sources, options.align, names=names)
    except _align.AlignmentError as e:
        if not options.align_fallback:
            raise
        warnings.warn(f"{e}; fusing the sources unaligned", AlignmentWarning, stacklevel=2)
        return None


def align_stage(sources: Sequence[np.ndarray], options: FuseOptions,
                names: Sequence[str] | None = None,
                alignments: Sequence[_align.Alignment] | None = None
                ) -> _align.AlignedSources | None:
    """The align stage: the sources on the first source's grid, or None when they are fused as
    given (alignment off, or failed with ``align_fallback``). ``alignments`` may carry an
    estimate made earlier (:func:`estimate_alignment`) to skip estimating again."""
    if alignments is None:
        alignments = estimate_alignment(sources, options, names)
    if alignments is None:
        return None
    return _align.warp_sources(sources, alignments)


def content_aware(decide: Callable[..., np.ndarray], aligned: _align.AlignedSources
                  ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``decide(a, b, valid)`` for aligned sources: ``valid`` ((H, W) bool, or None where both
    have content everywhere) is where both have content; then where ``b`` has no content ``a`` is
    taken, where only ``a`` has none ``b`` is. Sources are recognised by identity; any other
    array (a fold's running result) counts as having content everywhere."""
    valid = {id(img): v for img, v in zip(aligned.images, aligned.valid, strict=True)}

    def wrapped(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        va, vb = valid.get(id(a)), valid.get(id(b))
        both = va if vb is None else vb if va is None else va & vb
        keep = decide(a, b, both)
        if va is not None:
            keep = keep & va
        if vb is not None:
            keep = keep | ~vb
        return keep

    return wrapped


# ---------------------------------------------------------------------------- decision stage
def _pixel_scale(dtype: np.dtype) -> float:
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    return 1.0  # float32 in [0, 1]


def to_network_input(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W, C) source -> (1, 3, H, W) tensor in [-1, 1] (gray replicated to RGB); an
    (N, H, W, C) stack of crops -> (N, 3, H, W).

    The result is a channels-last view of the pixels (the layout of the network's weights on the
    CPU, and the source's own interleaved layout): one conversion to float32 and three in-place
    passes, ``(x / scale - 0.5) / 0.5`` as the original.
    """
    x = torch.tensor(array, dtype=torch.float32, device=device)  # a copy, read-only arrays too
    x = x.div_(_pixel_scale(array.dtype)).sub_(0.5).div_(0.5)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3).contiguous()
    return x.permute(0, 3, 1, 2).to(dtype)


@runtime_checkable
class Decider(Protocol):
    """The decision stage: the soft decision map of one pair of sources.

    ``decider(a, b)`` takes two sources as :func:`msidtrans_fast.io.load_sources` returns them,
    (H, W, C) numpy arrays of one size, C and dtype (C = 1 or 3; uint8, uint16, or float32 in
    [0, 1]), and returns D: a (H, W) ``torch.float32`` tensor with values in [0, 1], large where
    ``a`` is in focus, on :attr:`device` (the device the binarise stage then runs on). It must not
    change its inputs, must give the same D for the same inputs, and reads the whole image (a
    tiled decider assembles D from tiles).

    ``decider.memory_needed(H, W)`` is the peak memory, in bytes, one call on H x W sources is
    expected to take on :attr:`device` (an estimate for refusing or warning before the run).
    """

    device: torch.device

    def __call__(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor: ...

    def memory_needed(self, height: int, width: int) -> int: ...


class WholeImageDecider:
    """The network on the whole image at once: ``model(A, B)`` at full resolution, batch 1.

    The model runs in eval mode (its train/eval mode is restored after each call) on its own
    device and dtype, within :func:`msidtrans_fast.ops.network_call` (``products``, reused CPU
    blocks); D comes back as float32 on that device.
    """

    def __init__(self, model: torch.nn.Module, products: torch.dtype | None = None):
        self.model, self.products = model, products
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def __call__(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        A = to_network_input(a, self.device, self.dtype)
        B = to_network_input(b, self.device, self.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            with _ops.network_call(self.device, self.products):
                # The sources were checked on the host (io.load_sources): no device sync here.
                kwargs = {"check_finite": False} if isinstance(self.model, MSIDTrans) else {}
                return self.model(A, B, **kwargs)[0, 0].float()
        finally:
            self.model.train(was_training)

    def memory_needed(self, height: int, width: int) -> int:
        return estimate_memory(height, width, self.dtype)


def make_decider(options: FuseOptions, *, model: torch.nn.Module | None = None,
                 weights: str | os.PathLike | None = None) -> Decider:
    """The decision stage for ``options``: the given ``model``, or the bundled (or ``weights``)
    checkpoint loaded on ``options.device`` in ``options.dtype`` (cached, see :func:`get_model`).

    Raises:
        ValueError: both model and weights; a device or dtype that differs from the given model's
            or is not usable here; unreadable weights.
        FileNotFoundError: a weights file that does not exist.
    """
    if model is None:
        model = get_model(weights, options.device, options.dtype)
        dtype = _weights.AUTO_DTYPE if options.dtype is None else options.dtype
        return _decider(model, options,
                        _weights.products_dtype(dtype, next(model.parameters()).device))
    if weights is not None:
        raise ValueError("pass either model or weights, not both")
    param = next(model.parameters())
    if options.device is not None and options.device != "auto" and \
            _weights.resolve_device(options.device) != param.device:
        raise ValueError(f"device {options.device!r} differs from the model's device "
                         f"{param.device}")
    if options.dtype not in (None, _weights.AUTO_DTYPE) and \
            _weights.resolve_dtype(options.dtype) != param.dtype:
        raise ValueError(f"dtype {options.dtype!r} differs from the model's dtype {param.dtype}")
    if options.dtype not in (None, _weights.AUTO_DTYPE):
        return _decider(model, options, _weights.products_dtype(options.dtype))
    # "auto" keeps the model's dtype; a float32 model gets the products "auto" picks here
    auto = _weights.products_dtype(_weights.AUTO_DTYPE, param.device)
    return _decider(model, options, auto if param.dtype == torch.float32 else None)


def _decider(model: torch.nn.Module, options: FuseOptions,
             products: torch.dtype | None) -> Decider:
    if options.tile is None or options.tile == "off":
        return WholeImageDecider(model, products)
    return _tiling.TiledDecider(model, options.tile, options.tile_overlap, products=products)


# ------------------------------------------------------------------------------ binarise stage
def min_area(threshold: float, height: int, width: int) -> int:
    """Smallest component size the consistency check keeps: ``ceil(threshold * H * W)``.

    The original removes components of ``size < area`` with ``area = threshold * H * W`` (a real
    number); for integer sizes that is ``size < ceil(area)``. The product is evaluated in the
    original's order so that float rounding is the same.
    """
    return math.ceil(threshold * height * width)


def binarise(soft: torch.Tensor, threshold: float, rule: str = _decision.DEFAULT_RULE,
             a: np.ndarray | None = None, b: np.ndarray | None = None,
             valid: np.ndarray | None = None) -> torch.Tensor:
    """The binarise stage: ``soft > 0.5``, the decision rule, then the consistency check on the
    whole map.

    Args:
        soft: (H, W) float32 soft decision map D in [0, 1] (from a :class:`Decider`).
        threshold: consistency-check fraction of H * W, in [0, 1); 0 disables the check.
        rule: a name of :data:`msidtrans_fast.decision.DECISION_RULES`: ``"original"`` (nothing
            between the threshold and the check) or ``"flat"`` (each flat region takes one
            source, :func:`msidtrans_fast.decision.fill_flat_regions`).
        a, b: the pair's sources, (H, W, C) as :func:`msidtrans_fast.io.load_sources` returns
            them; the ``"flat"`` rule needs them.
        valid: (H, W) bool, where both sources have content (aligned sources); flat regions
            are sought only there. None: everywhere.

    Returns:
        (H, W) bool tensor on ``soft``'s device, True where the first source is taken.
    """
    _decision.check_rule(rule)
    with torch.inference_mode():
        mask = soft > BINARY_LEVEL
        if rule == "flat":
            if a is None or b is None:
                raise ValueError("the 'flat' decision rule needs the sources a and b")
            flat = _decision.flat_regions(a, b)
            if valid is not None:
                flat &= valid
            # host arrays: the labelling runs on the host whatever the map's device
            mask = _decision.fill_flat_regions(mask, torch.from_numpy(flat))
        if threshold > 0:
            from .ops import remove_small_regions

            area = min_area(threshold, *mask.shape)
            mask = remove_small_regions(mask[None, None], area)[0, 0]
    return mask


def pair_decision(decider: Decider, a: np.ndarray, b: np.ndarray, threshold: float,
                  rule: str = _decision.DEFAULT_RULE, valid: np.ndarray | None = None
                  ) -> np.ndarray:
    """Decision map then binarise for one pair: (H, W) bool numpy array, True where ``a`` is
    taken. ``a``, ``b``: (H, W, C) sources as :func:`msidtrans_fast.io.load_sources` returns;
    ``valid``: see :func:`binarise`."""
    return binarise(decider(a, b), threshold, rule, a, b, valid).cpu().numpy()


# ------------------------------------------------------------------------------- compose stage
def fold_stack(arrays: Sequence[np.ndarray],
               decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
               progress: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise fold over sources of one size, channels and dtype (for two sources: the pair).

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


@dataclass(frozen=True)
class Fused:
    """The result of one fusion.

    Attributes:
        image: (H, W) for grayscale or (H, W, 3) for RGB sources, the sources' dtype.
        labels: (H, W) int64, the index of the source each pixel was taken from.
        aligned: with alignment, the sources as the decision stage saw them (on the first
            source's grid) and their transforms; None otherwise.
        crop: with ``align_crop``, the ``(top, bottom, left, right)`` rectangle of the first
            source's grid that ``image`` and ``labels`` cover; None otherwise.
    """

    image: np.ndarray
    labels: np.ndarray
    aligned: _align.AlignedSources | None = field(default=None, repr=False)
    crop: tuple[int, int, int, int] | None = None

    def aligned_images(self) -> list[np.ndarray] | None:
        """The aligned sources cut like ``image`` ((H, W) or (H, W, 3), the sources' dtype), or
        None without alignment."""
        if self.aligned is None:
            return None
        t, b, left, r = self.crop or (0, self.labels.shape[0], 0, self.labels.shape[1])
        return [img[t:b, left:r, 0] if img.shape[-1] == 1 else img[t:b, left:r]
                for img in self.aligned.images]

    def decision_map(self, num_sources: int) -> np.ndarray:
        """What :func:`fuse` returns as the decision map: for a pair, (H, W) float32 D in {0, 1},
        1 where the first source was taken (the original's binary map); for a stack, labels."""
        return (self.labels == 0).astype(np.float32) if num_sources == 2 else self.labels


def compose(sources: Sequence[np.ndarray],
            decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
            progress: Callable[[], None] | None = None) -> Fused:
    """The compose stage: a pair, a vote (up to :data:`VOTE_MAX_SOURCES`) or a fold, driven by
    ``decide(a, b)`` -> (H, W) bool, True where ``a`` is taken; ``progress()`` after each."""
    scheme = vote_stack if 2 < len(sources) <= VOTE_MAX_SOURCES else fold_stack
    fused, labels = scheme(sources, decide, progress)
    return Fused(fused[..., 0] if fused.shape[-1] == 1 else fused, labels)


def fuse_sources(sources: Sequence[np.ndarray], decider: Decider, options: FuseOptions,
                 progress: Callable[[], None] | None = None, *,
                 names: Sequence[str] | None = None,
                 alignments: Sequence[_align.Alignment] | None = None) -> Fused:
    """The stages after loading, for sources as :func:`msidtrans_fast.io.load_sources` returns
    them: align (if ``options.align``), decision map and binarise for each pair the compose
    stage asks about, then compose. ``progress()`` is called after each pair decision
    (:func:`stack_runs` in all). ``names`` name the sources in alignment messages;
    ``alignments`` reuse an earlier :func:`estimate_alignment`.

    Raises:
        msidtrans_fast.align.AlignmentError: a source cannot be aligned (without fallback).
    """
    aligned = align_stage(sources, options, names, alignments)

    def decide(a, b, valid=None):
        return pair_decision(decider, a, b, options.threshold, options.decision_rule, valid)

    if aligned is None:
        return compose(sources, decide, progress)
    result = compose(aligned.images, content_aware(decide, aligned), progress)
    if not options.align_crop:
        return Fused(result.image, result.labels, aligned)
    t, b, left, r = aligned.crop()
    return Fused(result.image[t:b, left:r], result.labels[t:b, left:r], aligned, (t, b, left, r))


# ------------------------------------------------------------------------------------- the API
_UNSET = object()


def fuse(images, options: FuseOptions | None = None, *, model: torch.nn.Module | None = None,
         weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, threshold: float | None = None,
         decision_rule: str | None = None, align: str | bool | None = None,
         align_crop: bool | None = None, align_fallback: bool | None = None,
         tile=_UNSET, tile_overlap: int | None = None,
         return_decision_map: bool = False, progress: Callable[[], None] | None = None):
    """Fuses two or more images of one scene focused at different depths.

    Args:
        images: a sequence of two or more sources of one size: file paths, numpy arrays (H, W) or
            (H, W, C), PIL images (both turned upright by their EXIF orientation) or torch tensors
            (H, W) or (C, H, W); 8-bit (uint8), 16-bit (uint16) or floating point in [0, 1];
            grayscale or RGB (alpha is dropped). All sources
            must share the bit depth; gray and RGB may be mixed (the result is then RGB). More
            than two sources form a focus stack: all are fused (see the module docstring).
        options: a :class:`FuseOptions`; or give its fields ``device``, ``dtype``, ``threshold``,
            ``decision_rule``, ``align``, ``align_crop``, ``align_fallback``, ``tile``,
            ``tile_overlap`` as keywords (not both). Default threshold: 0.001, as the original;
            default decision rule ``"flat"`` (each flat region where the sources differ in
            brightness takes one source); ``decision_rule="original"`` binarises as the
            original does; no alignment.
            ``align="similarity"`` (or ``"affine"``, ``"homography"``) registers every source to
            the first before the decision map (for handheld or refocused stacks); the output then
            has the first source's size (``align_crop=True``: the area every source covers).
            ``tile="auto"`` (default) runs the whole image up to 1024 x 1024 pixels and tiles
            above; ``tile=None`` always runs the whole image, ``tile=N`` tiles of N px.
        model: an :class:`~msidtrans_fast.model.MSIDTrans` to use (put in eval mode for the call;
            inputs go to its device and dtype). Default: the bundled weights, loaded once and
            cached, on ``device`` in ``dtype``.
        weights: a checkpoint path to use instead of the bundled weights (not with ``model``).
        return_decision_map: also return the decision map.
        progress: called with no argument after each network run (:func:`stack_runs` in all).

    Returns:
        ``fused``: (H, W) for grayscale or (H, W, 3) for RGB sources, with the sources' dtype.
        With ``return_decision_map``, ``(fused, decision_map)``: for a pair, (H, W) float32 D in
        {0, 1}, 1 where the first source was taken (the original's binary decision map); for a
        stack, (H, W) int64, the index of the source each pixel was taken from. The decision map
        is in the first source's frame (cut like ``fused`` with ``align_crop``).

    Raises:
        FileNotFoundError, ValueError, TypeError: unreadable sources, fewer than two, different
            sizes or bit depths, a bad threshold, weights, device, dtype or alignment model.
        msidtrans_fast.align.AlignmentError: a source cannot be aligned (a ValueError naming
            it), unless ``align_fallback``.
        torch.OutOfMemoryError: the image does not fit the device (see :func:`estimate_memory`).
    """
    fields = {k: v for k, v in (("device", device), ("dtype", dtype), ("threshold", threshold),
                                ("decision_rule", decision_rule), ("align", align),
                                ("align_crop", align_crop), ("align_fallback", align_fallback),
                                ("tile_overlap", tile_overlap)) if v is not None}
    if tile is not _UNSET:
        fields["tile"] = tile
    if options is None:
        options = FuseOptions(**fields)
    elif fields:
        raise ValueError(f"pass either options or {', '.join(fields)}, not both")
    if not isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor)):
        images = list(images)  # read twice: the sources, then their names
    sources = _io.load_sources(images)
    decider = make_decider(options, model=model, weights=weights)
    result = fuse_sources(sources, decider, options, progress,
                          names=_io.source_names(images))
    if not return_decision_map:
        return result.image
    return result.image, result.decision_map(len(sources))


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
