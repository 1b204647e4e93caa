"""Backends: the one registry of backend names, what each can run on, and their resolution.

A backend is a way of running the network's attention layers (channel LayerNorm, multi-scale
token embedding and attention) with the same weights. ``"reference"`` is plain PyTorch and runs
everywhere. ``"auto"`` resolves per device to the fastest backend that can run there. Fused
backends register themselves with :func:`register_backend` when their module is imported;
:func:`load_backend` imports one and records why, if it cannot be loaded
(:func:`unavailable_backends`), so that a broken installation is reported instead of silently
falling back.

The model resolves its backend once per forward call (:func:`resolve_backend`) and passes the
name to its attention layers, which look their implementation up in :data:`ATTENTION_IMPLS`.
The compiled C++/CUDA operations (:mod:`msidtrans_fast.ops`) do not depend on the backend: they
run wherever they are built.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch

REFERENCE = "reference"
AUTO = "auto"

# name -> (can_run(device) -> reason or None, priority for "auto" on a device type)
_BACKENDS: dict[str, tuple[Callable[[torch.device], str | None], dict[str, int]]] = {
    REFERENCE: (lambda device: None, {"cpu": 0, "cuda": 0}),
}
# name -> why it could not be loaded
_FAILED: dict[str, str] = {}

#: backend name -> ``impl(block: AttentionPreNorm, x, perm) -> fn(cLN(x), perm)``, the attention
#: branch of one layer (before the residual add). "reference" has no entry: the modules' own code.
ATTENTION_IMPLS: dict[str, Callable] = {}


def register_backend(name: str, can_run: Callable[[torch.device], str | None],
                     auto_priority: dict[str, int], attention: Callable | None = None) -> None:
    """Registers a backend.

    Args:
        name: the name users pass as ``backend=``.
        can_run: returns None when the backend can run on the device, else the reason it cannot.
        auto_priority: device type -> priority; "auto" picks the runnable backend of highest
            priority for the device's type. Device types missing here are never picked by "auto".
        attention: the backend's attention implementation (see :data:`ATTENTION_IMPLS`).
    """
    _BACKENDS[name] = (can_run, dict(auto_priority))
    _FAILED.pop(name, None)
    if attention is not None:
        ATTENTION_IMPLS[name] = attention


def load_backend(name: str, module: str) -> str | None:
    """Imports ``module``, which registers backend ``name``; returns None when it did, else the
    reason it could not be loaded (also listed by :func:`unavailable_backends`).

    A missing optional dependency (the module ``triton`` not installed) is an expected state and
    is only recorded; any other failure (a broken installation) also warns with a RuntimeWarning.
    """
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any failure of an optional backend is reported
        missing = getattr(error, "name", None)
        if isinstance(error, ModuleNotFoundError) and missing and "." not in missing:
            reason = f"the package {missing!r} is not installed"
        else:
            reason = f"{type(error).__name__}: {error}"
            warnings.warn(f"msidtrans_fast: backend {name!r} failed to load ({reason})",
                          RuntimeWarning, stacklevel=2)
        _FAILED[name] = reason
        return reason
    if name not in _BACKENDS:
        _FAILED[name] = f"{module} did not register it"
        return _FAILED[name]
    return None


def available_backends() -> list[str]:
    """All backend names that can be requested (``"auto"`` included)."""
    return [AUTO, *_BACKENDS]


def unavailable_backends() -> dict[str, str]:
    """Backends that could not be loaded: name -> the reason."""
    return dict(_FAILED)


def check_name(name: str) -> str:
    """``name`` if it can be requested; ValueError saying why not otherwise."""
    if name == AUTO or name in _BACKENDS:
        return name
    if name in _FAILED:
        raise ValueError(f"backend {name!r} is unavailable: {_FAILED[name]}")
    raise ValueError(f"unknown backend {name!r}; choose one of {available_backends()}")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Resolves ``name`` ("auto" or a backend name) for tensors on ``device``.

    Raises:
        ValueError: unknown name, a backend that could not be loaded, or a named backend that
            cannot run on ``device`` (the message says why).
    """
    device = torch.device(device)
    if check_name(name) == AUTO:
        candidates = [(prio[device.type], n) for n, (can_run, prio) in _BACKENDS.items()
                      if device.type in prio and can_run(device) is None]
        return max(candidates)[1] if candidates else REFERENCE
    reason = _BACKENDS[name][0](device)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run on {device}: {reason}")
    return name
