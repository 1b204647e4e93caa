"""Model weights: the bundled checkpoint, checkpoint files, devices and dtypes.

The bundled weights live in ``msidtrans_fast/data/msidtrans_weights.pt``: an fp16 state_dict of
:class:`~msidtrans_fast.model.MSIDTrans` (at most 8 MB, trained by the project; see MODEL_CARD.md).
Should the file be missing, :func:`load_model` returns an untrained network (seeded, so results
are reproducible) and warns with :class:`UntrainedWeightsWarning`: its fusions are not meaningful.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import MSIDTrans

BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "data" / "msidtrans_weights.pt"
#: Seed of the untrained network used when the bundled weights are missing.
UNTRAINED_SEED = 0

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
#: dtype names accepted by :func:`resolve_precision` and the command line ("auto":
#: :func:`auto_precision`). ``"mixed"``: float32 weights and activations, the heavy convolutions
#: computed in bfloat16 (:mod:`msidtrans_fast.precision`).
AUTO_DTYPE = "auto"
MIXED = "mixed"
DTYPE_NAMES = (AUTO_DTYPE, "float32", MIXED, "float16", "bfloat16")

UNTRAINED_MESSAGE = ("the bundled weights file msidtrans_fast/data/msidtrans_weights.pt is "
                     "missing from this installation: the model is UNTRAINED (random weights), "
                     "so its fused images and decision maps "
                     "are NOT meaningful; reinstall, or pass weights with --weights / weights=")


class UntrainedWeightsWarning(UserWarning):
    """Raised as a warning when the model runs with untrained (random) weights."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``None`` or ``"auto"`` picks CUDA when available, else the CPU.

    Raises:
        ValueError: an unknown device name, or a device this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here "
                             f"(use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available here")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles).

    Without either, torch emulates bf16 arithmetic in fp32 and bf16 runs slower than fp32.
    """
    import torch.cpu

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [getattr(torch.cpu, name)() for name in checks if hasattr(torch.cpu, name)]
    if found:
        return any(found)
    try:  # older torch: the kernel's flags (Linux)
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


#: Whether bfloat16 decisions agree with float32 ones for the bundled network (measured with
#: ``tools/dtype_agreement.py`` on the dev sets, table in docs/fusing.md, "Precision"): they do
#: not (up to 10.5% of an MFFW pair's pixels decided differently, NYU-D's Q_CB and PSNR lower), so
#: ``"auto"`` keeps float32 even where bf16 is native.
BF16_AGREES = False
#: Whether ``"mixed"`` decisions (bf16 products only) agree with float32 ones, measured the same
#: way: they do, as closely as the tiled and whole-image maps agree (docs/fusing.md,
#: "Precision"). Measured on the CPU only, so ``"auto"`` picks it on CPUs with native bf16.
MIXED_AGREES = True


def auto_precision(device: str | torch.device) -> str:
    """The precision name ``"auto"`` picks for ``device``: ``"bfloat16"`` where the device
    computes bf16 natively (a CUDA device with bf16 support; a CPU with AVX512-BF16 or AMX) and
    its decisions agree with float32 (:data:`BF16_AGREES`); else ``"mixed"`` on a CPU with
    native bf16 (:data:`MIXED_AGREES`); else ``"float32"``. Without native bf16 both would be
    emulated, slower than float32."""
    device = torch.device(device)
    if device.type == "cuda" and BF16_AGREES and torch.cuda.is_bf16_supported():
        return "bfloat16"
    if device.type == "cpu" and cpu_native_bf16():
        if BF16_AGREES:
            return "bfloat16"
        if MIXED_AGREES:
            return MIXED
    return "float32"


def resolve_precision(dtype: str | torch.dtype | None,
                      device: str | torch.device | None = None) -> str:
    """The precision's canonical name: ``"float32"``, ``"mixed"``, ``"bfloat16"`` or
    ``"float16"``. None means float32; ``"auto"`` is :func:`auto_precision` of ``device``
    (default: :func:`resolve_device`'s choice); names as in :data:`DTYPE_NAMES`, fp32/fp16/bf16,
    or a ``torch.dtype``.

    Raises:
        ValueError: an unknown or non-floating dtype.
    """
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported dtype {dtype} (use one of {', '.join(DTYPE_NAMES)})")
        return str(dtype).removeprefix("torch.")
    name = str(dtype).lower().removeprefix("torch.")
    if name == AUTO_DTYPE:
        return auto_precision(resolve_device(device))
    if name == MIXED:
        return MIXED
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPE_NAMES)})")
    return str(_DTYPES[name]).removeprefix("torch.")


def products_dtype(dtype: str | torch.dtype | None,
                   device: str | torch.device | None = None) -> torch.dtype | None:
    """The dtype the heavy convolutions' products compute in when it differs from the
    weights' (bfloat16 for ``"mixed"``), else None."""
    return torch.bfloat16 if resolve_precision(dtype, device) == MIXED else None


def describe_precision(name: str) -> str:
    """A precision name for messages: ``"mixed"`` spelled out."""
    return "float32 with bfloat16 products" if name == MIXED else name


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """The weights' dtype under ``"auto"`` (:func:`auto_precision`): float32 for ``"mixed"``."""
    return resolve_dtype(auto_precision(device))


def preferred_memory_format(device: str | torch.device) -> torch.memory_format:
    """Layout of the weights (and so of the activations) on ``device``: ``channels_last`` on the
    CPU, where oneDNN's convolutions and the element-wise work run faster in it (measured in
    benchmarks/RESULTS.md); the default contiguous layout elsewhere (the Triton kernels on CUDA
    read channel-major tensors)."""
    if torch.device(device).type == "cpu":
        return torch.channels_last
    return torch.contiguous_format


def resolve_dtype(dtype: str | torch.dtype | None,
                  device: str | torch.device | None = None) -> torch.dtype:
    """The dtype of the weights and activations for a precision (see :func:`resolve_precision`;
    float32 for ``"mixed"``).

    Raises:
        ValueError: an unknown or non-floating dtype.
    """
    name = resolve_precision(dtype, device)
    return torch.float32 if name == MIXED else _DTYPES[name]


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> None:
    """Refuses float16 on the CPU: PyTorch's CPU kernels run it far slower than float32 and
    with more memory, the opposite of what the dtype is chosen for. bfloat16 has fast CPU kernels
    (AVX512-BF16/AMX) and float32 is the reference.

    Raises:
        ValueError: float16 on a CPU device (the message says what to use instead).
    """
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("float16 is not supported on the CPU (it runs far slower than float32 "
                         "there and needs more memory): use bfloat16 or float32")


_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                  type(np.dtype(np.uint32))]


def read_checkpoint(path: str | os.PathLike, what: str = "weights file") -> Any:
    """Reads a PyTorch checkpoint file safely: the one loader of every tool.

    The file is read with ``weights_only=True``: only tensors, numbers, strings and containers
    (and NumPy's RNG state arrays, which training checkpoints hold) are accepted, so no code from
    the file runs. Tensors stay on the CPU in their stored dtype. ``what`` names the file in
    messages ("weights file", "checkpoint").

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a PyTorch checkpoint, or holds other Python objects (which
            are refused, not loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ValueError(f"cannot read {what} {path}: it holds a Python object "
                             f"({found[1]}) besides tensors and plain data; such files are "
                             f"refused because loading them could run code") from None
        raise ValueError(f"cannot read {what} {path}: not a PyTorch checkpoint (damaged, or "
                         f"another kind of file)") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except Exception:  # zip and torch errors: not a checkpoint we can read
        raise ValueError(f"cannot read {what} {path}: not a PyTorch checkpoint (damaged, or "
                         f"another kind of file)") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a checkpoint: a plain state_dict (as the original saves it) or a dict with a
    ``"model"`` entry holding one (as ``msidtrans-train`` saves it, with optimizer and RNG states
    beside it), through :func:`read_checkpoint`. Tensors stay on the CPU in their stored dtype.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable PyTorch checkpoint or holds no state_dict.
    """
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"weights file {path} holds no state_dict (expected a dict of tensors, "
                         f"or a dict with a 'model' entry holding one)")
    return obj


def _untrained_model() -> MSIDTrans:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)
        return MSIDTrans()


def load_model(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> MSIDTrans:
    """An MSI-DTrans model in eval mode, on ``device`` in ``dtype``.

    Args:
        weights: a checkpoint path (see :func:`load_state_dict`), loaded with ``strict=True``;
            ``None`` uses the bundled weights, or an untrained model (with an
            :class:`UntrainedWeightsWarning`) when that file is missing.
        device: see :func:`resolve_device`. dtype: see :func:`resolve_dtype` ("auto" for this
            device's :func:`auto_dtype`; float16 only on CUDA, see :func:`check_dtype_on_device`).

    The weights take :func:`preferred_memory_format` of the device.

    Raises:
        FileNotFoundError, ValueError: missing or unreadable file, a checkpoint of another
            architecture (the message lists what does not match), a bad device or dtype.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_dtype_on_device(dt, dev)
    model = _untrained_model()
    path = Path(weights) if weights is not None else BUNDLED_WEIGHTS
    if weights is None and not BUNDLED_WEIGHTS.is_file():
        warnings.warn(UNTRAINED_MESSAGE, UntrainedWeightsWarning, stacklevel=2)
    else:
        state = load_state_dict(path)
        _load_strict(model, state, path)
    return model.to(device=dev, dtype=dt, memory_format=preferred_memory_format(dev)).eval()


def _load_strict(model: MSIDTrans, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        raise ValueError(f"weights file {path} is not an MSI-DTrans checkpoint: "
                         f"{'; '.join(parts)} of {len(own)} entries")
    non_float = [k for k, v in state.items() if v.is_floating_point() != own[k].is_floating_point()]
    if non_float:
        raise ValueError(f"weights file {path} has entries of the wrong type (e.g. {non_float[0]})")
    model.load_state_dict(state, strict=True)
