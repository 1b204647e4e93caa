"""One table of test tolerances (add yours here).

Relative errors are ``max|ours - ref| / max|ref|`` (see :func:`rel_err`).
"""

from __future__ import annotations

import torch

#: fp32 fused op against the fp32 reference ops (issue 3): forward.
FP32_FWD_REL = 1e-5
#: fp32 fused op against the reference ops: gradients. The same bound as the forward: flash
#: backward only reorders fp32 sums of O(N) terms, far from 1e-5 at test sizes.
FP32_GRAD_REL = 1e-5
#: Whole model, "triton" against "reference", fp32: forward and every parameter's gradient
#: (errors of ~20 layers compound; BatchNorm divides by small batch deviations).
MODEL_REL = 1e-4
#: Whole-model gradients are compared relative to ``max(max|ref grad|, MODEL_GRAD_FLOOR * largest
#: gradient of the model)``, so that near-zero gradients are not held to a bound below rounding.
MODEL_GRAD_FLOOR = 1e-3
#: A convolution bias in front of a train-mode BatchNorm has a true gradient of exactly 0 (the
#: normalisation removes any constant shift); both backends must give at most this fraction of
#: the model's largest gradient there. What they carry is fp32 rounding noise, measured at about
#: 1e-7 of the largest gradient, which differs between any two summation orders.
ZERO_GRAD_REL = 1e-6
#: gradcheck in float64 (``torch.autograd.gradcheck`` defaults, written out).
GRADCHECK = {"eps": 1e-6, "atol": 1e-5, "rtol": 1e-3}

#: Low-precision rule of flash-attention's tests: our fp16/bf16 error against the fp32 reference
#: must be at most LOWP_FACTOR times the error of the same computation done by PyTorch in that
#: dtype, plus a floor of about one unit in the last place at magnitude 1 (fp16: 2**-10,
#: bf16: 2**-7), which covers the output's own final rounding.
LOWP_FACTOR = 2.0
LOWP_FLOOR = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|ours - ref| / max|ref|`` in float64 (0 when both are zero)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    return diff / scale if scale > 0 else diff
