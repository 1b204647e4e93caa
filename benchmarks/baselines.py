"""The two baselines the whole-model benchmarks measure against, and the runners that time them.

A *runner* is a callable ``(A, B) -> D`` built from a model by :func:`build_runner`; it works on
its own deep copy of the model (the caller's model is never changed), with fixed attention
permutations and, optionally, bf16/fp16 autocast. Four names:

* ``"triton"``, ``"reference"``: our model with that backend, eager.
* ``"original"`` (baseline 1, the original code's costs on our reference path, eager):
  attention materialises every ``softmax(q k^T / sqrt(d))`` matrix
  (``reference.multi_scale_attention(..., materialize=True)``; tu2 alone holds
  :func:`materialized_attention_bytes`, about 0.023 x side^4 bytes in fp32), and every Haar split
  is the original's round trip: tensor to the CPU, ``pywt.dwt2(x, 'haar', mode='zero')`` there, the
  four coefficient arrays back to the device one by one, detached from the graph. What it does not
  reproduce: the original's batch > 1 mixing of images (it stays batch-consistent), its random
  permutations in eval (they are passed in), and its second Encoder1 call (ours runs A and B as one
  batch in eval mode, so there are 5 round trips per forward instead of 6).
* ``"pytorch_best"`` (baseline 2, the best plain-PyTorch port): the reference path (SDPA attention,
  Haar split as device tensor ops, BatchNorm folded into the convolutions in eval mode, as
  :func:`msidtrans_fast.modules.conv_bn` does), weights and inputs in ``channels_last``, and
  ``torch.compile(mode="max-autotune", dynamic=False)``, which on CUDA also replays the whole
  forward as CUDA graphs (``compile=False`` gives the same path eager, for tests and for CPUs).
  The model's own input check (``torch.isfinite(x).all()`` on A and B) stays, as in every other
  runner: it is the only graph break (two small graphs and one host sync per call before the
  whole network's graph).

How the original's costs are put in without touching the library: on the copy, every
``MultiScaleAttention`` becomes a :class:`MaterializedMultiScaleAttention` and every ``HaarSplit`` a
:class:`NumpyHaarSplit` (subclasses; ``module.__class__`` is reassigned, so parameter names,
``state_dict`` and backend dispatch stay as they are). Nothing global is patched, so other models
in the same process, and the model the runner was built from, keep their own behaviour.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch

from msidtrans_fast import MSIDTrans, reference
from msidtrans_fast.model import NUM_ATTENTION_CALLS
from msidtrans_fast.modules import HaarSplit, MultiScaleAttention

BACKEND_RUNNERS = ("triton", "reference")
BASELINES = ("original", "pytorch_best")
RUNNERS = BACKEND_RUNNERS + BASELINES

#: torch.compile mode of "pytorch_best": autotuned kernels, and CUDA graphs on CUDA.
COMPILE_MODE = "max-autotune"

#: Bytes per element of the two N x Nk buffers the materialised attention holds at its peak
#: (the scaled scores and their softmax): fp32 4 + 4; under fp16/bf16 autocast the scores are
#: 2 bytes and the softmax (an fp32 op under autocast) 4.
_MATRIX_BYTES = {None: 4 + 4, torch.float16: 2 + 4, torch.bfloat16: 2 + 4}


def _import_pywt():
    try:
        import pywt
    except ImportError as error:
        raise ImportError("the 'original' baseline runs the original's wavelet split with "
                          "PyWavelets, which is not installed: pip install PyWavelets") from error
    return pywt


class NumpyHaarSplit(HaarSplit):
    """The original's Haar split: a detached round trip through numpy and ``pywt.dwt2``.

    (b, C, H, W) -> ``(low (b, C, H', W'), high (b, 3C, H', W'))``, ``H' = ceil(H/2)``, on the
    input's device and dtype. The input is copied to the CPU (bf16/fp16 as float32, which numpy
    and PyWavelets need), split there, and the coefficients cA, cH, cV, cD are moved back one by
    one, as the original does. The outputs carry no gradient, whatever ``detach`` says.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pywt = _import_pywt()
        host = x.detach().cpu()
        if host.dtype not in (torch.float32, torch.float64):
            host = host.float()
        c_a, (c_h, c_v, c_d) = pywt.dwt2(host.numpy(), "haar", mode="zero")
        low, c_h, c_v, c_d = (torch.from_numpy(c).to(x.device, x.dtype)
                              for c in (c_a, c_h, c_v, c_d))
        return low, torch.cat([c_h, c_v, c_d], dim=1)


class MaterializedMultiScaleAttention(MultiScaleAttention):
    """:class:`MultiScaleAttention` that builds every (b, 3, N, Nk) attention matrix, as the
    original does (same input, output and weights)."""

    def forward(self, x: torch.Tensor, perm) -> torch.Tensor:
        qs, ks, vs = self.embed(x)
        out = reference.multi_scale_attention(qs, ks, vs, perm, x.shape[-2:], materialize=True)
        return self.to_out(out)


def _check_model(model) -> None:
    if not isinstance(model, MSIDTrans):
        raise TypeError(f"expected an MSIDTrans model, got {type(model).__name__}")


def original_emulation(model: MSIDTrans) -> MSIDTrans:
    """A deep copy of ``model`` that runs the original's costs (baseline 1), backend "reference".

    Same weights, same train/eval mode, same device. Its attention materialises every N x Nk
    matrix and its Haar splits go through numpy and PyWavelets on the CPU, detached (so, in
    training, nothing upstream of a split gets a gradient, as in the original).

    Raises:
        TypeError: ``model`` is not an :class:`MSIDTrans`.
        ImportError: PyWavelets is missing.
    """
    _check_model(model)
    _import_pywt()
    emulation = copy.deepcopy(model)
    emulation.backend = "reference"
    for module in emulation.modules():
        if type(module) is MultiScaleAttention:
            module.__class__ = MaterializedMultiScaleAttention
        elif type(module) is HaarSplit:
            module.__class__ = NumpyHaarSplit
    return emulation


def materialized_attention_bytes(height: int, width: int, batch: int = 1,
                                 autocast_dtype: torch.dtype | None = None) -> int:
    """Peak bytes of the attention matrices of baseline 1 for a (batch, 3, height, width) input.

    The largest of the four attention calls (tu2 from about 16x16 up: (H/4)^2 queries against
    (H/8)^2 keys), counting the two buffers alive at once: the scaled scores and their softmax,
    3 groups x N x Nk each. About ``0.0234 * side^4`` bytes for a square fp32 input of batch 1.
    """
    if height < 1 or width < 1 or batch < 1:
        raise ValueError(f"height, width and batch must be >= 1, got {height}, {width}, {batch}")
    if autocast_dtype not in _MATRIX_BYTES:
        raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, "
                         f"got {autocast_dtype}")
    sizes, (h, w) = [], (height, width)
    for _ in range(4):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    (h2, w2), (h3, w3), (h4, w4) = sizes[1], sizes[2], sizes[3]
    tu2 = h2 * w2 * ((h2 - 1) // 2 + 1) * ((w2 - 1) // 2 + 1)
    elements = 3 * batch * max(tu2, (h3 * w3) ** 2, (h4 * w4) ** 2)
    return elements * _MATRIX_BYTES[autocast_dtype]


class Runner:
    """``runner(A, B) -> D``: one way of running the network, on its own copy of the weights.

    Attributes:
        name: one of :data:`RUNNERS`.
        module: the :class:`MSIDTrans` it runs (for ``.parameters()``, ``.train()``, ``.eval()``).
        compiled: whether ``torch.compile`` wraps the forward.

    A and B are (b, 3, H, W) floating tensors on the module's device; D is (b, 1, H, W) in the
    autocast dtype when autocast is on, else in the input dtype. Gradient mode is the caller's:
    wrap the call in ``torch.no_grad()`` for inference.
    """

    def __init__(self, name: str, module: MSIDTrans, forward: Callable, compiled: bool):
        self.name = name
        self.module = module
        self.compiled = compiled
        self._forward = forward

    def __call__(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            # Each call is a new step for CUDA graph trees (training reuses their output memory).
            torch.compiler.cudagraph_mark_step_begin()
        return self._forward(A, B)

    def __repr__(self) -> str:
        return f"Runner({self.name!r}, compiled={self.compiled})"


def build_runner(name: str, model: MSIDTrans, *, q_perms: Sequence[Sequence[int]] | None = None,
                 autocast_dtype: torch.dtype | None = None, channels_last: bool = True,
                 compile: bool = True, compile_mode: str = COMPILE_MODE) -> Runner:
    """Builds runner ``name`` (one of :data:`RUNNERS`) on a deep copy of ``model``.

    Args:
        name: "triton" or "reference" (our backends, eager), "original" (baseline 1, see
            :func:`original_emulation`) or "pytorch_best" (baseline 2).
        model: the network whose weights, device and train/eval mode the runner copies.
        q_perms: four permutations of (0, 1, 2) passed to every forward (see
            :meth:`MSIDTrans.forward`); None keeps the model's default (identity in eval, random
            in train, which a compiled runner would recompile for: pass them when compiling).
        autocast_dtype: None (no autocast) or the dtype of ``torch.autocast`` on the model's
            device type (torch.bfloat16, torch.float16).
        channels_last, compile, compile_mode: "pytorch_best" only: weights and inputs in
            channels_last; ``torch.compile(mode=compile_mode, dynamic=False)``.

    Raises:
        ValueError: unknown name, or q_perms that are not four permutations of (0, 1, 2).
        TypeError: ``model`` is not an :class:`MSIDTrans`.
        ImportError: "original" without PyWavelets.
    """
    _check_model(model)
    if name not in RUNNERS:
        raise ValueError(f"unknown runner {name!r}; choose one of {RUNNERS}")
    if autocast_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, "
                         f"got {autocast_dtype}")
    if q_perms is not None:
        q_perms = [tuple(int(i) for i in p) for p in q_perms]
        if len(q_perms) != NUM_ATTENTION_CALLS or any(sorted(p) != [0, 1, 2] for p in q_perms):
            raise ValueError(f"q_perms must be {NUM_ATTENTION_CALLS} permutations of (0, 1, 2), "
                             f"got {q_perms!r}")
    if name == "original":
        module = original_emulation(model)
    else:
        module = copy.deepcopy(model)
        module.backend = "reference" if name == "pytorch_best" else name
    use_channels_last = name == "pytorch_best" and channels_last
    if use_channels_last:
        module = module.to(memory_format=torch.channels_last)
    device_type = next(module.parameters()).device.type
    enabled = autocast_dtype is not None

    def forward(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if use_channels_last:
            A = A.contiguous(memory_format=torch.channels_last)
            B = B.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=enabled):
            return module(A, B, q_perms=q_perms)

    compiled = name == "pytorch_best" and compile
    if compiled:
        forward = torch.compile(forward, mode=compile_mode, dynamic=False)
    return Runner(name, module, forward, compiled)
