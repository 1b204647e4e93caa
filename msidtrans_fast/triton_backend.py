"""The "triton" backend: fused Triton kernels for every Transformer attention layer.

Importing this module registers the backend with :mod:`msidtrans_fast.backends` (``"auto"`` picks
it for CUDA tensors; on the CPU ``"auto"`` stays ``"reference"``) with its attention implementation
``backends.ATTENTION_IMPLS["triton"]``, which replaces ``AttentionPreNorm``'s
``fn(cLN(x), perm)`` (before the residual add) by the fused path:

    cLN + three-scale token embedding  ->  q (b, 3, d, N), k/v (b, 3, d, Nk)   (embedding.py)
    multi-scale flash attention        ->  (b, 3d, H, W)                       (attention.py)
    to_out (1x1 convolution + dropout, unchanged module)

The same weights and ``state_dict`` as the reference path; BatchNorm in train mode uses batch
statistics and updates the running statistics as ``nn.BatchNorm2d`` does. CUDA tensors run compiled
Triton; CPU tensors run the same kernels in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported (tests only: slow).
"""

from __future__ import annotations

import os

import torch

from . import backends, modules
from .attention import msa_attention
from .embedding import token_embedding
from .kernels import msa_attention as _attention_kernels

NAME = "triton"


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET at import)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    kernel = _attention_kernels._msa_fwd_kernel
    while isinstance(kernel, Autotuner):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def can_run(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    device = torch.device(device)
    if device.type == "cuda":
        if _interpreted():
            return ("triton was imported with TRITON_INTERPRET set: kernels run only in the "
                    "interpreter, on CPU tensors; unset it to run them on the GPU")
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if _interpreted():
            return None
        flag = os.environ.get("TRITON_INTERPRET")
        return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
                f"imported (it is {flag!r} now, or was set too late)")
    return f"no Triton support for device type {device.type!r}"


def attention_block(block: modules.AttentionPreNorm, x: torch.Tensor, perm) -> torch.Tensor:
    """``block.fn(block.norm(x), perm)`` through the fused kernels.

    Args:
        block: an ``AttentionPreNorm`` (``block.norm.g/.b``; ``block.fn`` a MultiScaleAttention).
        x: (b, dim, H, W), the un-normalised input of the layer.
        perm: permutation of (0, 1, 2).

    Returns:
        (b, dim, H, W), the attention branch before the residual add.
    """
    attn = block.fn
    h, w = x.shape[-2:]
    q, k, v = token_embedding(x, block.norm, attn)
    out = msa_attention(q, k, v, perm, (h, w))
    return attn.to_out(out)


backends.register_backend(NAME, can_run, {"cuda": 10}, attention=attention_block)
