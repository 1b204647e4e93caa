// Haar split CUDA kernels: one thread per 2x2 input block (one output pixel of each band).
//
// Forward: block [[a, b], [c, d]] (b, c, d read as 0 past an odd edge) gives
//   cA = (a+b+c+d)/2, cH = (a+b-c-d)/2, cV = (a-b+c-d)/2, cD = (a-b-c+d)/2,
// i.e. pywt.dwt2(x, 'haar', mode='zero'). The block matrix is symmetric and orthogonal, so the
// backward applies the same sums to (gA, gH, gV, gD) and stores those that fall inside the image.
// Arithmetic in float32 for float16/bfloat16 and float32, in float64 for float64. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "haar_split_cuda.h"

namespace msidtrans {
namespace {

constexpr int kThreads = 256;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename Acc, typename T> __device__ __forceinline__ Acc load(const T* p) {
  return static_cast<Acc>(*p);
}
template <> __device__ __forceinline__ float load<float, __half>(const __half* p) {
  return __half2float(*p);
}
template <> __device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename T, typename Acc> __device__ __forceinline__ void store(T* p, Acc v) {
  *p = static_cast<T>(v);
}
template <> __device__ __forceinline__ void store<__half, float>(__half* p, float v) {
  *p = __float2half_rn(v);
}
template <> __device__ __forceinline__ void store<__nv_bfloat16, float>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

template <typename T>
__global__ void haar_forward_kernel(const T* __restrict__ x, T* __restrict__ low,
                                    T* __restrict__ high, int64_t channels, int64_t height,
                                    int64_t width, int64_t h2, int64_t w2, int64_t total) {
  using Acc = typename AccOf<T>::type;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t j = idx % w2;
  const int64_t i = (idx / w2) % h2;
  const int64_t plane = idx / (w2 * h2);  // n * channels + c
  const int64_t n = plane / channels, c = plane % channels;
  const T* src = x + plane * height * width + (2 * i) * width + 2 * j;
  const bool has_right = 2 * j + 1 < width, has_below = 2 * i + 1 < height;
  const Acc zero = Acc(0);
  const Acc a = load<Acc>(src);
  const Acc b = has_right ? load<Acc>(src + 1) : zero;
  const Acc cc = has_below ? load<Acc>(src + width) : zero;
  const Acc d = has_right && has_below ? load<Acc>(src + width + 1) : zero;
  const Acc half = Acc(0.5);
  const Acc top = a + b, bottom = cc + d, diff_top = a - b, diff_bottom = cc - d;
  const int64_t pix = i * w2 + j, band = channels * h2 * w2;
  store(low + plane * h2 * w2 + pix, (top + bottom) * half);
  T* hi = high + (n * 3 * channels + c) * h2 * w2 + pix;
  store(hi, (top - bottom) * half);
  store(hi + band, (diff_top + diff_bottom) * half);
  store(hi + 2 * band, (diff_top - diff_bottom) * half);
}

template <typename T>
__global__ void haar_backward_kernel(const T* __restrict__ grad_low,
                                     const T* __restrict__ grad_high, T* __restrict__ grad_x,
                                     int64_t channels, int64_t height, int64_t width, int64_t h2,
                                     int64_t w2, int64_t total) {
  using Acc = typename AccOf<T>::type;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t j = idx % w2;
  const int64_t i = (idx / w2) % h2;
  const int64_t plane = idx / (w2 * h2);
  const int64_t n = plane / channels, c = plane % channels;
  const int64_t pix = i * w2 + j, band = channels * h2 * w2;
  const Acc g_a = load<Acc>(grad_low + plane * h2 * w2 + pix);
  const T* hi = grad_high + (n * 3 * channels + c) * h2 * w2 + pix;
  const Acc g_h = load<Acc>(hi), g_v = load<Acc>(hi + band), g_d = load<Acc>(hi + 2 * band);
  const Acc half = Acc(0.5);
  const Acc s = g_a + g_h, t = g_a - g_h, u = g_v + g_d, v = g_v - g_d;
  T* dst = grad_x + plane * height * width + (2 * i) * width + 2 * j;
  const bool has_right = 2 * j + 1 < width, has_below = 2 * i + 1 < height;
  store(dst, (s + u) * half);
  if (has_right) store(dst + 1, (s - u) * half);
  if (has_below) store(dst + width, (t + v) * half);
  if (has_right && has_below) store(dst + width + 1, (t - v) * half);
}

template <typename T>
cudaError_t launch_forward(const void* x, void* low, void* high, int64_t batch, int64_t channels,
                           int64_t height, int64_t width, cudaStream_t stream) {
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2;
  const int64_t total = batch * channels * h2 * w2;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  haar_forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(low), static_cast<T*>(high), channels, height,
      width, h2, w2, total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* grad_low, const void* grad_high, void* grad_x,
                            int64_t batch, int64_t channels, int64_t height, int64_t width,
                            cudaStream_t stream) {
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2;
  const int64_t total = batch * channels * h2 * w2;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  haar_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_low), static_cast<const T*>(grad_high), static_cast<T*>(grad_x),
      channels, height, width, h2, w2, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t haar_split_forward_cuda(int kind, const void* x, void* low, void* high, int64_t batch,
                                    int64_t channels, int64_t height, int64_t width,
                                    cudaStream_t stream) {
  switch (kind) {
    case 0: return launch_forward<float>(x, low, high, batch, channels, height, width, stream);
    case 1: return launch_forward<double>(x, low, high, batch, channels, height, width, stream);
    case 2: return launch_forward<__half>(x, low, high, batch, channels, height, width, stream);
    case 3:
      return launch_forward<__nv_bfloat16>(x, low, high, batch, channels, height, width, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t haar_split_backward_cuda(int kind, const void* grad_low, const void* grad_high,
                                     void* grad_x, int64_t batch, int64_t channels, int64_t height,
                                     int64_t width, cudaStream_t stream) {
  switch (kind) {
    case 0:
      return launch_backward<float>(grad_low, grad_high, grad_x, batch, channels, height, width,
                                    stream);
    case 1:
      return launch_backward<double>(grad_low, grad_high, grad_x, batch, channels, height, width,
                                     stream);
    case 2:
      return launch_backward<__half>(grad_low, grad_high, grad_x, batch, channels, height, width,
                                     stream);
    case 3:
      return launch_backward<__nv_bfloat16>(grad_low, grad_high, grad_x, batch, channels, height,
                                            width, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace msidtrans
