"""Public special operations: the Haar wavelet split, an in-place Mish and the fusing consistency
check.

They run from the compiled extension ``msidtrans_fast._C`` (sources in ``csrc/``) when it is
built, on CPU and, where it was built with CUDA, on CUDA tensors. Without the extension, or for
a device/dtype it does not cover, they run a plain-PyTorch fallback that gives the same results
(slower); the first time a fallback is used because the extension is missing, one warning says
so and how to build it. :func:`compiled` tells which ops run compiled on which devices.

Ops:

* :func:`haar_split` -- ``pywt.dwt2(x, 'haar', mode='zero')`` on (b, C, H, W) tensors,
  differentiable; on the CPU it reads and writes contiguous and channels_last tensors as they are.
* :func:`mish_` -- ``F.mish(x, inplace=True)`` for inference, compiled for CPU float32 and
  bfloat16 (one exponential per element instead of exp, log1p and tanh).
* :func:`remove_small_regions` -- the original ``Eval.py`` consistency check (docs/design.md,
  "Fusing", step 4): drop small 4-connected foreground components, then fill small background ones.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import reference
from .precision import products_context

try:
    from . import _C  # type: ignore[attr-defined]
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = str(exc)

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"
_warned = False
_warned_cuda = False

#: dtypes the compiled Haar split handles, per device type.
_HAAR_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _warn_missing() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "msidtrans_fast._C (the compiled extension: haar_split, mish_, remove_small_regions) "
            f"is missing ({_IMPORT_ERROR}); using the slower PyTorch fallbacks. To get it, "
            f"{_BUILD_HINT}.", RuntimeWarning, stacklevel=3)


_fallback_forced = False


@contextlib.contextmanager
def pytorch_fallback():
    """Within the block the ops run their plain-PyTorch fallbacks even where the extension is
    built (for parity tests against the compiled ops). Not thread-safe: it sets a module flag."""
    global _fallback_forced
    before, _fallback_forced = _fallback_forced, True
    try:
        yield
    finally:
        _fallback_forced = before


def _warn_no_cuda(device: torch.device) -> None:
    """Once: CUDA tensors take the PyTorch fallback because ``_C`` was built without CUDA."""
    global _warned_cuda
    if device.type == "cuda" and _C is not None and not _C.has_cuda() and not _warned_cuda:
        _warned_cuda = True
        warnings.warn(
            "msidtrans_fast._C was built without its CUDA kernels, so CUDA tensors use the slower "
            "PyTorch fallbacks of haar_split and remove_small_regions. To get them, install a "
            f"CUDA build of torch and nvcc (or set FORCE_CUDA=1), then {_BUILD_HINT}.",
            RuntimeWarning, stacklevel=3)


def _has_device(device: torch.device) -> bool:
    """Whether the extension is built, covers tensors on ``device`` and is not switched off by
    :func:`pytorch_fallback`."""
    if _C is None or _fallback_forced:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(_C.has_cuda())


def compiled() -> dict[str, dict[str, bool]]:
    """Which ops run from the compiled extension, per device type.

    Returns:
        ``{"extension": {"built": bool}, "haar_split": {"cpu": bool, "cuda": bool},
        "mish_": {"cpu": bool, "cuda": False}, "remove_small_regions": {"cpu": bool,
        "cuda": bool}}``. ``cuda`` is True when the extension was built with CUDA kernels
        (whether a GPU is present is not checked); ``mish_`` has no CUDA kernel.
    """
    built = _C is not None
    cuda = built and bool(_C.has_cuda())
    return {
        "extension": {"built": built},
        "haar_split": {"cpu": built, "cuda": cuda},
        "mish_": {"cpu": built, "cuda": False},
        "remove_small_regions": {"cpu": built, "cuda": cuda},
    }


# --------------------------------------------------------------------------------------------
# Haar split
# --------------------------------------------------------------------------------------------

def _nhwc(t: torch.Tensor) -> bool:
    """Whether the compiled Haar split reads ``t`` as channels_last: a CPU tensor, dense in that
    layout and not also contiguous (a tensor that is both has the same addresses either way)."""
    return (t.device.type == "cpu" and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def _haar_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the compiled Haar split takes it: channels_last CPU tensors as they are, anything
    else contiguous (the CUDA kernels read contiguous tensors only)."""
    return t if _nhwc(t) else t.contiguous()


def _empty(t: torch.Tensor, shape, nhwc: bool) -> torch.Tensor:
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)


# The compiled entries are torch.library custom ops (with fake kernels for tracing and autograd
# formulas registered on the ops themselves, which plays the part of an autograd.Function and
# keeps them usable under torch.compile and torch.library.opcheck).
if _C is not None:
    @torch.library.custom_op("msidtrans_fast::haar_split_forward", mutates_args=())
    def _haar_forward_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = _C.haar_split_forward(x)
        return low, high

    @_haar_forward_op.register_fake
    def _(x):
        b, c = x.shape[:2]
        h, w = (x.shape[2] + 1) // 2, (x.shape[3] + 1) // 2
        return _empty(x, (b, c, h, w), _nhwc(x)), _empty(x, (b, 3 * c, h, w), _nhwc(x))

    @torch.library.custom_op("msidtrans_fast::haar_split_backward", mutates_args=())
    def _haar_backward_op(grad_low: torch.Tensor, grad_high: torch.Tensor, height: int,
                          width: int) -> torch.Tensor:
        return _C.haar_split_backward(grad_low, grad_high, height, width)

    @_haar_backward_op.register_fake
    def _(grad_low, grad_high, height, width):
        nhwc = grad_low.device.type == "cpu" and not (
            grad_low.is_contiguous() and grad_high.is_contiguous())
        return _empty(grad_low, (grad_low.shape[0], grad_low.shape[1], height, width), nhwc)

    def _haar_backward_setup(ctx, inputs, output):
        pass

    def _haar_backward_grad(ctx, grad):
        # the backward is linear and its adjoint is the forward split (double backward)
        grad_low, grad_high = torch.ops.msidtrans_fast.haar_split_forward(_haar_layout(grad))
        return grad_low, grad_high, None, None

    _haar_backward_op.register_autograd(_haar_backward_grad, setup_context=_haar_backward_setup)

    def _haar_forward_setup(ctx, inputs, output):
        ctx.height, ctx.width = inputs[0].shape[2], inputs[0].shape[3]
        ctx.layout = torch.channels_last if _nhwc(inputs[0]) else torch.contiguous_format

    def _haar_forward_grad(ctx, grad_low, grad_high):
        # the adjoint: the inverse transform with the padded row/column cropped (the 2x2 Haar
        # block matrix is symmetric and orthogonal); the gradient takes the input's layout
        return torch.ops.msidtrans_fast.haar_split_backward(
            grad_low.contiguous(memory_format=ctx.layout),
            grad_high.contiguous(memory_format=ctx.layout), ctx.height, ctx.width)

    _haar_forward_op.register_autograd(_haar_forward_grad, setup_context=_haar_forward_setup)

    @torch.library.custom_op("msidtrans_fast::mish_", mutates_args=("x",))
    def _mish_op(x: torch.Tensor) -> None:
        _C.mish_(x)

    @_mish_op.register_fake
    def _(x):
        return None

    @torch.library.custom_op("msidtrans_fast::remove_small_regions", mutates_args=())
    def _regions_op(mask: torch.Tensor, min_area: int) -> torch.Tensor:
        return _C.remove_small_regions(mask, min_area)

    @_regions_op.register_fake
    def _(mask, min_area):
        return torch.empty_like(mask)


def haar_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-level 2-D Haar transform, ``pywt.dwt2(x, 'haar', mode='zero')`` on the last two axes.

    Args:
        x: (b, C, H, W) floating tensor. Compiled for float32/float64 on CPU and for
            float32/float64/float16/bfloat16 on CUDA (half types accumulate in float32); any
            other case runs :func:`msidtrans_fast.reference.haar_split`.

    Returns:
        ``(low, high)`` in x's dtype, device and, for channels_last CPU input, layout (else
        contiguous): low = cA, (b, C, ceil(H/2), ceil(W/2)); high =
        ``cat([cH, cV, cD], dim=1)``, (b, 3C, ceil(H/2), ceil(W/2)). Odd H or W is padded with
        one zero row/column at the bottom/right; each 2x2 block ``[[a, b], [c, d]]`` gives
        cA = (a+b+c+d)/2, cH = (a+b-c-d)/2, cV = (a-b+c-d)/2, cD = (a-b-c+d)/2.
        Differentiable with respect to x.

    Raises:
        TypeError: x is not a floating tensor. ValueError: x is not 4-D or has an empty axis.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"haar_split expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"haar_split expects a (b, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"haar_split expects a floating tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"haar_split got an empty tensor of shape {tuple(x.shape)}")
    if _C is None:
        _warn_missing()
        return reference.haar_split(x)
    if not _has_device(x.device) or x.dtype not in _HAAR_DTYPES.get(x.device.type, ()):
        _warn_no_cuda(x.device)
        return reference.haar_split(x)
    return torch.ops.msidtrans_fast.haar_split_forward(_haar_layout(x))


# --------------------------------------------------------------------------------------------
# Mish
# --------------------------------------------------------------------------------------------

def mish_(x: torch.Tensor) -> torch.Tensor:
    """``x * tanh(softplus(x))`` in place, as ``F.mish(x, inplace=True)``; returns ``x``.

    Compiled for contiguous or channels_last CPU float32 and bfloat16 tensors of any shape
    when no gradient is being recorded for ``x``: one exponential per element
    (``x * t / (t + 2)``, ``t = e^x (e^x + 2)``), within a few float32 ulp of ``F.mish``
    (bfloat16: computed in float32 and rounded once, as ``F.mish`` does), with the same results
    for large, infinite and NaN inputs. Anything else (other dtypes, devices or strides,
    autograd, :func:`pytorch_fallback`) runs ``F.mish``.
    """
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not (x.requires_grad and torch.is_grad_enabled())
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
        if _C is None:
            _warn_missing()
        elif not _fallback_forced:
            torch.ops.msidtrans_fast.mish_(x)
            return x
    return F.mish(x, inplace=True)


# --------------------------------------------------------------------------------------------
# Consistency check
# --------------------------------------------------------------------------------------------

def _check_mask(mask: torch.Tensor, min_area) -> int:
    if not isinstance(mask, torch.Tensor):
        raise TypeError("remove_small_regions expects a torch.Tensor mask, got "
                        f"{type(mask).__name__}")
    if mask.is_complex():
        raise TypeError("remove_small_regions expects a bool, integer or floating mask, got "
                        f"{mask.dtype}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError("remove_small_regions expects a (b, 1, H, W) mask, got shape "
                         f"{tuple(mask.shape)}")
    if isinstance(min_area, bool):
        raise TypeError("min_area must be an integer, got bool")
    try:
        area = operator.index(min_area)
    except TypeError:
        raise TypeError(f"min_area must be an integer, got {type(min_area).__name__} {min_area!r} "
                        "(for a real threshold t, 'fewer than t pixels' is 'fewer than "
                        "math.ceil(t)')") from None
    if area < 0:
        raise ValueError(f"min_area must be >= 0, got {area}")
    if mask.dtype != torch.bool and mask.numel() > 0:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("remove_small_regions expects a binary mask (values 0 and 1 only)")
    return area


def _label_4(mask: torch.Tensor) -> torch.Tensor:
    """Connected-component labels of a (b, H, W) bool map, 4-connectivity, both values.

    Every pixel gets the smallest flat index (over b*H*W) of its component of equal-valued
    pixels. Hook-and-compress label propagation (each round: every edge with different labels
    hooks the larger root under the smaller one, then pointer jumping flattens the forest), so
    the round count grows with the log of component size on typical maps.
    """
    b, h, w = mask.shape
    n = b * h * w
    flat = torch.arange(n, device=mask.device).view(b, h, w)
    same_h = mask[:, :, :-1] == mask[:, :, 1:]
    same_v = mask[:, :-1, :] == mask[:, 1:, :]
    src = torch.cat([flat[:, :, :-1][same_h], flat[:, :-1, :][same_v]])
    dst = torch.cat([flat[:, :, 1:][same_h], flat[:, 1:, :][same_v]])
    label = flat.reshape(-1).clone()
    while True:
        ls, ld = label[src], label[dst]
        new = label.scatter_reduce(0, torch.maximum(ls, ld), torch.minimum(ls, ld), "amin")
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, label):
            return label.view(b, h, w)
        label = new


def _flip_small(mask: torch.Tensor, value: bool, min_area: int) -> torch.Tensor:
    """Flip the 4-connected components of ``mask == value`` that have fewer than min_area pixels."""
    label = _label_4(mask).reshape(-1)
    sizes = torch.bincount(label, minlength=label.numel())
    small = (sizes[label] < min_area).view(mask.shape) & (mask == value)
    return mask ^ small


def _remove_small_regions_fallback(mask: torch.Tensor, min_area: int) -> torch.Tensor:
    """Plain-PyTorch version of :func:`remove_small_regions` on a (b, H, W) bool map."""
    mask = _flip_small(mask, True, min_area)
    return _flip_small(mask, False, min_area)


def remove_small_regions(mask: torch.Tensor, min_area: int) -> torch.Tensor:
    """The consistency check of the original ``Eval.py`` (docs/design.md, "Fusing", step 4).

    First every 4-connected foreground component (pixels equal to 1) with fewer than
    ``min_area`` pixels is set to 0; then, on that result, every 4-connected background
    component (pixels equal to 0) with fewer than ``min_area`` pixels is set to 1. A component
    of exactly ``min_area`` pixels stays. Components touching the border count like any other.
    Each map of the batch is processed on its own. This equals scikit-image 0.2x's
    ``remove_small_objects(m, min_size=min_area)`` then the same on the complement
    (scikit-image 0.26: ``max_size=min_area - 1``).

    Args:
        mask: (b, 1, H, W) binary map on CPU or CUDA: bool, or an integer/floating dtype holding
            only 0 and 1 (checked; the check synchronises a CUDA stream once).
        min_area: integer >= 0. 0 and 1 leave the map unchanged. For the original's real-valued
            ``area = threshold * H * W`` pass ``math.ceil(area)``.

    Returns:
        A new (b, 1, H, W) tensor with mask's dtype and device, holding 0/1 (False/True).

    Raises:
        TypeError: mask is not a tensor, or min_area is not an integer.
        ValueError: wrong shape, values other than 0/1, or min_area < 0.
    """
    area = _check_mask(mask, min_area)
    binary = mask if mask.dtype == torch.bool else mask != 0
    if mask.numel() == 0 or area <= 1:
        return mask.clone()
    if _has_device(mask.device):
        flat = binary[:, 0].to(torch.uint8).contiguous()
        out = torch.ops.msidtrans_fast.remove_small_regions(flat, area)
        return out.unsqueeze(1).to(mask.dtype)
    if _C is None:
        _warn_missing()
    _warn_no_cuda(mask.device)
    return _remove_small_regions_fallback(binary[:, 0], area).unsqueeze(1).to(mask.dtype)


@contextlib.contextmanager
def reuse_cpu_blocks() -> Iterator[None]:
    """Within this context, CPU tensors of 1 MiB and more reuse the memory of freed ones instead
    of getting fresh pages from the system (``csrc/block_cache.cpp``): a forward frees and
    reallocates its activations many times, and glibc returns every large block to the kernel on
    free, so each is faulted in and zeroed again (about 220 thousand page faults per 520x520
    forward). The cache never holds more than the most its scopes ever had in use at once; its
    idle blocks stay for the next scope until :func:`release_cpu_blocks`. Process-wide while
    open (the CPU allocator is process-wide); a no-op without the compiled extension."""
    if _C is None:
        yield
        return
    _C.block_cache_enter()
    try:
        yield
    finally:
        _C.block_cache_exit()


def release_cpu_blocks() -> None:
    """Frees the idle blocks :func:`reuse_cpu_blocks` keeps between scopes."""
    if _C is not None:
        _C.block_cache_release()


def block_cache_stats() -> dict[str, int]:
    """Counters of :func:`reuse_cpu_blocks`: hits, misses, idle and held bytes, open scopes."""
    if _C is None:
        return {}
    return dict(zip(("hits", "misses", "idle_bytes", "held_bytes", "scopes"),
                    _C.block_cache_stats(), strict=True))


@contextlib.contextmanager
def network_call(device: torch.device, products: torch.dtype | None) -> Iterator[None]:
    """How the decision stage runs the network: inference mode, ``products`` as in
    :func:`msidtrans_fast.precision.products_context`, and on the CPU the activations in reused
    blocks (:func:`reuse_cpu_blocks`)."""
    with torch.inference_mode(), products_context(products), \
            reuse_cpu_blocks() if device.type == "cpu" else contextlib.nullcontext():
        yield
