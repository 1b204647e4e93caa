// Consistency-check entry point (remove_small_regions.cpp).
#pragma once

#include <ATen/ATen.h>

namespace msidtrans {

// mask: (b, H, W) uint8 holding 0/1, contiguous, CPU or CUDA. Returns a new uint8 map where the
// 4-connected 1-components with fewer than min_area pixels are 0, and then the 4-connected
// 0-components (of that result) with fewer than min_area pixels are 1.
at::Tensor remove_small_regions(const at::Tensor& mask, int64_t min_area);

}  // namespace msidtrans
