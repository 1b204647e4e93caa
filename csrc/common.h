// Shared argument checks for the msidtrans_fast._C entry points (ATen headers only; the pybind11
// module file alone includes torch/extension.h, which keeps compile times down).
#pragma once

#include <ATen/ATen.h>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define MSID_CHECK_DEVICE(x) \
  TORCH_CHECK((x).is_cpu() || (x).is_cuda(), #x " must be a CPU or CUDA tensor, got ", (x).device())
#define MSID_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define MSID_CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), #x " must have " #d " dimensions, got shape ", (x).sizes())
#define MSID_CHECK_DTYPE(x, t) \
  TORCH_CHECK((x).scalar_type() == (t), #x " must be " #t ", got ", (x).scalar_type())
#define MSID_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device())
#define MSID_CHECK_CUDA_ERROR(err) \
  TORCH_CHECK((err) == cudaSuccess, "CUDA kernel launch failed: ", msidtrans::cuda_error_string(err))

namespace msidtrans {

#ifdef WITH_CUDA
inline const char* cuda_error_string(cudaError_t err) { return cudaGetErrorString(err); }
#endif

// Element kinds the CUDA launchers take (they see raw pointers, never torch types).
enum class Kind : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

}  // namespace msidtrans
