"""Mixed precision: float32 activations with bfloat16 products where they pay.

Inside :func:`bf16_products`, every float32 ``conv2d`` whose weights do enough arithmetic per
element it reads and writes (:func:`worth_bf16`: the 3x3, 5x5 and 7x7 convolutions of 32 or more
channels, which hold most of the network's arithmetic) computes on bfloat16 copies of its
operands (oneDNN accumulates in float32) and hands back a float32 result. Everything else stays
float32: the small and 1x1 convolutions (there the two casts cost more than bf16 saves), the
attention (PyTorch's bf16 CPU attention is no faster than its float32 one), the element-wise
work, the residual sums, normalisation, the wavelet split, the decision head, the weights and
every stored activation. On a CPU with native bf16 (AVX512-BF16, AMX) those convolutions run
about twice as fast, while the decisions stay as close to float32 as other harmless changes
(measured in docs/fusing.md, "Precision"): rounding the products' operands is benign, rounding
the stored activations (the sums above all) is not.

Usage (any model, any device; the pipeline does this for ``dtype="mixed"``)::

    with torch.inference_mode(), bf16_products():
        D = model(A, B)          # A, B, the weights and D float32
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CONVOLUTIONS = (F.conv2d, torch.conv2d)
#: Least multiply-adds per element a convolution reads and writes for bf16 to pay for its casts:
#: ``kh * kw * Cin * Cout / (Cin + Cout)``, per group. Measured per convolution of the network at
#: 520x520 on one core of an AVX512-BF16 CPU (benchmarks/RESULTS.md): 3x3 with 32 channels in
#: and out (144) gains, 3x3 from 16 channels (96) and every 1x1 (at most 57) lose.
MIN_INTENSITY = 128


def worth_bf16(weight: torch.Tensor) -> bool:
    """Whether a convolution with this (Cout, Cin/groups, kh, kw) weight computes in bf16 under
    :func:`bf16_products`."""
    cout, cin, kh, kw = weight.shape
    return kh * kw * cin * cout >= MIN_INTENSITY * (cin + cout)


class _BF16Products(TorchFunctionMode):
    """The mode behind :func:`bf16_products`. Each convolution casts its own input, so no
    bf16 copy outlives its product (the parallel block's three convolutions at full resolution
    are the forward's peak of memory)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS and args[0].dtype == torch.float32 and worth_bf16(args[1]):
            x, weight, rest = args[0], args[1], list(args[2:])
            bias = rest.pop(0) if rest else kwargs.pop("bias", None)
            out = func(x.to(torch.bfloat16), weight.to(torch.bfloat16),
                       None if bias is None else bias.to(torch.bfloat16), *rest, **kwargs)
            return out.to(torch.float32)
        return func(*args, **kwargs)


@contextlib.contextmanager
def bf16_products() -> Iterator[None]:
    """Within this context, the float32 convolutions :func:`worth_bf16` picks compute in
    bfloat16 (results float32); see the module's docstring. Thread-local: enter it in the thread
    that runs the model."""
    with _BF16Products():
        yield


def products_context(products: torch.dtype | None) -> contextlib.AbstractContextManager:
    """:func:`bf16_products` for ``products=torch.bfloat16``, else a context that does nothing."""
    if products is None:
        return contextlib.nullcontext()
    if products != torch.bfloat16:
        raise ValueError(f"products in {products} are not supported (only torch.bfloat16)")
    return bf16_products()
