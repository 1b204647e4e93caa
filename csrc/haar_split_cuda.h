// Launchers of the Haar split CUDA kernels (haar_split_cuda.cu). Plain C++: no torch headers,
// so the .cu compiles on its own with nvcc (see tests/test_ops_nvcc.py).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace msidtrans {

// x: (batch, channels, height, width) contiguous; low: (batch, channels, h2, w2);
// high: (batch, 3 * channels, h2, w2) with h2 = ceil(height / 2), w2 = ceil(width / 2).
// kind: 0 float32, 1 float64, 2 float16, 3 bfloat16 (msidtrans::Kind). Half types accumulate in
// float32. Returns the launch error (cudaSuccess on success).
cudaError_t haar_split_forward_cuda(int kind, const void* x, void* low, void* high, int64_t batch,
                                    int64_t channels, int64_t height, int64_t width,
                                    cudaStream_t stream);

// The adjoint: grad_low (batch, channels, h2, w2), grad_high (batch, 3 * channels, h2, w2) ->
// grad_x (batch, channels, height, width), padded row/column dropped.
cudaError_t haar_split_backward_cuda(int kind, const void* grad_low, const void* grad_high,
                                     void* grad_x, int64_t batch, int64_t channels, int64_t height,
                                     int64_t width, cudaStream_t stream);

}  // namespace msidtrans
