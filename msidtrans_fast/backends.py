"""Backend names and their resolution.

A backend is a way of running the network's special operations (multi-scale attention, token
embedding, wavelet split) with the same weights. ``"reference"`` is plain PyTorch and runs
everywhere. ``"auto"`` resolves per device to the fastest backend that can run there.
Fused backends register themselves with :func:`register_backend` when their module is imported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

REFERENCE = "reference"
AUTO = "auto"

# name -> (can_run(device) -> reason or None, priority for "auto" on a device type)
_BACKENDS: dict[str, tuple[Callable[[torch.device], str | None], dict[str, int]]] = {
    REFERENCE: (lambda device: None, {"cpu": 0, "cuda": 0}),
}


def register_backend(name: str, can_run: Callable[[torch.device], str | None],
                     auto_priority: dict[str, int]) -> None:
    """Registers a backend.

    Args:
        name: the name users pass as ``backend=``.
        can_run: returns None when the backend can run on the device, else the reason it cannot.
        auto_priority: device type -> priority; "auto" picks the runnable backend of highest
            priority for the device's type. Device types missing here are never picked by "auto".
    """
    _BACKENDS[name] = (can_run, dict(auto_priority))


def available_backends() -> list[str]:
    """All backend names that can be requested (``"auto"`` included)."""
    return [AUTO, *_BACKENDS]


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Resolves ``name`` ("auto" or a backend name) for tensors on ``device``.

    Raises:
        ValueError: unknown name, or a named backend that cannot run on ``device`` (the message
            says why).
    """
    device = torch.device(device)
    if name == AUTO:
        candidates = [(prio[device.type], n) for n, (can_run, prio) in _BACKENDS.items()
                      if device.type in prio and can_run(device) is None]
        return max(candidates)[1] if candidates else REFERENCE
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {available_backends()}")
    reason = _BACKENDS[name][0](device)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run on {device}: {reason}")
    return name
