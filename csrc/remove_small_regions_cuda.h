// Launcher of the connected-component CUDA kernels (remove_small_regions_cuda.cu). Plain C++: no
// torch headers, so the .cu compiles on its own with nvcc.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace msidtrans {

// mask: (batch, height, width) uint8 0/1 on the device, modified in place. labels and sizes:
// device scratch of batch * height * width int32 each (batch * height * width < 2^31).
// Flips the 4-connected components of value 1 with fewer than min_area pixels to 0, then the
// 4-connected components of value 0 of the result with fewer than min_area pixels to 1.
// Everything is queued on `stream`; nothing is copied to the host. Returns the launch error.
cudaError_t remove_small_regions_cuda(uint8_t* mask, int32_t* labels, int32_t* sizes,
                                      int64_t batch, int64_t height, int64_t width,
                                      int64_t min_area, cudaStream_t stream);

}  // namespace msidtrans
