// In-place Mish entry point (mish.cpp).
#pragma once

#include <ATen/ATen.h>

namespace msidtrans {

// x <- x * tanh(softplus(x)), in place, for a CPU float32 or bfloat16 tensor whose elements fill its storage
// span without gaps or overlaps (contiguous, channels_last, any dense permutation).
void mish_(const at::Tensor& x);

}  // namespace msidtrans
