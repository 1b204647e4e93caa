"""Triton kernels of msidtrans_fast (installed as ``msidtrans_fast.kernels``)."""

from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device):
    """Context in which launches go to ``device``: Triton launches on the current CUDA device,
    not on the tensors' one, so every launcher enters this first (a no-op off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device)
