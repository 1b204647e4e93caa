// Haar split entry points (haar_split.cpp).
#pragma once

#include <vector>

#include <ATen/ATen.h>

namespace msidtrans {

// x: (b, C, H, W); float32/float64 on CPU, float32/float64/float16/bfloat16 on CUDA. Contiguous,
// or on the CPU also channels_last. Returns {low (b, C, ceil(H/2), ceil(W/2)),
// high (b, 3C, ceil(H/2), ceil(W/2))} in x's layout.
std::vector<at::Tensor> haar_split_forward(const at::Tensor& x);

// The adjoint of haar_split_forward for an input of size (height, width). grad_low and grad_high
// both contiguous, or on the CPU both channels_last; grad_x (b, C, height, width) in that layout.
at::Tensor haar_split_backward(const at::Tensor& grad_low, const at::Tensor& grad_high,
                               int64_t height, int64_t width);

}  // namespace msidtrans
