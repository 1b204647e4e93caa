// Haar split: argument checks, device dispatch, and the CPU implementation.
//
// Same rule as pywt.dwt2(x, 'haar', mode='zero') (see haar_split_cuda.cu for the formulas). The
// CPU takes two layouts and writes its outputs in the input's layout:
// - contiguous (NCHW): (batch * channel) planes in parallel; an odd last row/column is handled
//   outside the inner loop so that the interior has no branches;
// - channels_last (NHWC): output rows in parallel, the inner loop over channels; a missing
//   (padded) neighbour reads from a row of zeros, a missing gradient target writes to scratch.
// The CUDA kernels take contiguous tensors only.
#include "haar_split.h"

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "common.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "haar_split_cuda.h"
#endif

namespace msidtrans {
namespace {

template <typename T>
void forward_cpu(const T* x, T* low, T* high, int64_t batch, int64_t channels, int64_t height,
                 int64_t width) {
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2, band = channels * h2 * w2;
  const int64_t full_rows = height / 2, full_cols = width / 2;
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / channels, c = plane % channels;
      const T* src = x + plane * height * width;
      T* lo = low + plane * h2 * w2;
      T* hh = high + (n * 3 * channels + c) * h2 * w2;
      T* hv = hh + band;
      T* hd = hh + 2 * band;
      for (int64_t i = 0; i < h2; ++i) {
        const T* r0 = src + 2 * i * width;
        const T* r1 = i < full_rows ? r0 + width : nullptr;
        const int64_t o = i * w2;
        if (r1 != nullptr) {
          for (int64_t j = 0; j < full_cols; ++j) {
            const T a = r0[2 * j], b = r0[2 * j + 1], cc = r1[2 * j], d = r1[2 * j + 1];
            const T top = a + b, bottom = cc + d, dt = a - b, db = cc - d;
            lo[o + j] = (top + bottom) * T(0.5);
            hh[o + j] = (top - bottom) * T(0.5);
            hv[o + j] = (dt + db) * T(0.5);
            hd[o + j] = (dt - db) * T(0.5);
          }
          if (full_cols < w2) {  // odd width: b = d = 0
            const T a = r0[width - 1], cc = r1[width - 1];
            lo[o + full_cols] = (a + cc) * T(0.5);
            hh[o + full_cols] = (a - cc) * T(0.5);
            hv[o + full_cols] = (a + cc) * T(0.5);
            hd[o + full_cols] = (a - cc) * T(0.5);
          }
        } else {  // odd height, last row: c = d = 0
          for (int64_t j = 0; j < w2; ++j) {
            const T a = r0[2 * j], b = 2 * j + 1 < width ? r0[2 * j + 1] : T(0);
            lo[o + j] = (a + b) * T(0.5);
            hh[o + j] = (a + b) * T(0.5);
            hv[o + j] = (a - b) * T(0.5);
            hd[o + j] = (a - b) * T(0.5);
          }
        }
      }
    }
  });
}

template <typename T>
void backward_cpu(const T* grad_low, const T* grad_high, T* grad_x, int64_t batch,
                  int64_t channels, int64_t height, int64_t width) {
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2, band = channels * h2 * w2;
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / channels, c = plane % channels;
      T* dst = grad_x + plane * height * width;
      const T* ga = grad_low + plane * h2 * w2;
      const T* gh = grad_high + (n * 3 * channels + c) * h2 * w2;
      const T* gv = gh + band;
      const T* gd = gh + 2 * band;
      for (int64_t i = 0; i < h2; ++i) {
        T* r0 = dst + 2 * i * width;
        T* r1 = 2 * i + 1 < height ? r0 + width : nullptr;
        for (int64_t j = 0; j < w2; ++j) {
          const int64_t o = i * w2 + j;
          const T s = ga[o] + gh[o], t = ga[o] - gh[o], u = gv[o] + gd[o], v = gv[o] - gd[o];
          const bool right = 2 * j + 1 < width;
          r0[2 * j] = (s + u) * T(0.5);
          if (right) r0[2 * j + 1] = (s - u) * T(0.5);
          if (r1 != nullptr) {
            r1[2 * j] = (t + v) * T(0.5);
            if (right) r1[2 * j + 1] = (t - v) * T(0.5);
          }
        }
      }
    }
  });
}

// One 2x2 block over all channels (NHWC): a, b top-left/right, c, d bottom-left/right pixels.
template <typename T>
inline void forward_block_cl(const T* __restrict a, const T* __restrict b, const T* __restrict c,
                             const T* __restrict d, T* __restrict lo, T* __restrict hh,
                             T* __restrict hv, T* __restrict hd, int64_t channels) {
  for (int64_t k = 0; k < channels; ++k) {
    const T top = a[k] + b[k], bottom = c[k] + d[k], dt = a[k] - b[k], db = c[k] - d[k];
    lo[k] = (top + bottom) * T(0.5);
    hh[k] = (top - bottom) * T(0.5);
    hv[k] = (dt + db) * T(0.5);
    hd[k] = (dt - db) * T(0.5);
  }
}

template <typename T>
inline void backward_block_cl(const T* __restrict ga, const T* __restrict gh,
                              const T* __restrict gv, const T* __restrict gd, T* __restrict a,
                              T* __restrict b, T* __restrict c, T* __restrict d,
                              int64_t channels) {
  for (int64_t k = 0; k < channels; ++k) {
    const T s = ga[k] + gh[k], t = ga[k] - gh[k], u = gv[k] + gd[k], v = gv[k] - gd[k];
    a[k] = (s + u) * T(0.5);
    b[k] = (s - u) * T(0.5);
    c[k] = (t + v) * T(0.5);
    d[k] = (t - v) * T(0.5);
  }
}

// Output rows per parallel chunk: at least ~16k output values each.
inline int64_t row_grain(int64_t values_per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, values_per_row));
}

template <typename T>
void forward_cpu_cl(const T* x, T* low, T* high, int64_t batch, int64_t channels, int64_t height,
                    int64_t width) {
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2, row = width * channels;
  const std::vector<T> zeros(channels, T(0));
  at::parallel_for(0, batch * h2, row_grain(4 * w2 * channels), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / h2, i = r % h2;
      const T* r0 = x + (n * height + 2 * i) * row;
      const bool below = 2 * i + 1 < height;
      T* lo = low + r * w2 * channels;
      T* hi = high + r * w2 * 3 * channels;
      for (int64_t j = 0; j < w2; ++j) {
        const bool right = 2 * j + 1 < width;
        const T* a = r0 + 2 * j * channels;
        const T* b = right ? a + channels : zeros.data();
        const T* c = below ? a + row : zeros.data();
        const T* d = right && below ? a + row + channels : zeros.data();
        T* hh = hi + j * 3 * channels;
        forward_block_cl(a, b, c, d, lo + j * channels, hh, hh + channels, hh + 2 * channels,
                         channels);
      }
    }
  });
}

template <typename T>
void backward_cpu_cl(const T* grad_low, const T* grad_high, T* grad_x, int64_t batch,
                     int64_t channels, int64_t height, int64_t width) {
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2, row = width * channels;
  at::parallel_for(0, batch * h2, row_grain(4 * w2 * channels), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(3 * channels);  // receives the values of padded (dropped) pixels
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / h2, i = r % h2;
      T* r0 = grad_x + (n * height + 2 * i) * row;
      const bool below = 2 * i + 1 < height;
      const T* ga = grad_low + r * w2 * channels;
      const T* gh = grad_high + r * w2 * 3 * channels;
      for (int64_t j = 0; j < w2; ++j) {
        const bool right = 2 * j + 1 < width;
        T* a = r0 + 2 * j * channels;
        T* b = right ? a + channels : scratch.data();
        T* c = below ? a + row : scratch.data() + channels;
        T* d = right && below ? a + row + channels : scratch.data() + 2 * channels;
        const T* g = gh + j * 3 * channels;
        backward_block_cl(ga + j * channels, g, g + channels, g + 2 * channels, a, b, c, d,
                          channels);
      }
    }
  });
}

// Whether a CPU tensor is read as channels_last: dense NHWC and not also dense NCHW (a tensor
// that is both, e.g. with one channel, has the same addresses in either reading).
bool is_nhwc(const at::Tensor& t) {
  return t.is_cpu() && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

#ifdef WITH_CUDA
int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return static_cast<int>(Kind::F32);
    case at::kDouble: return static_cast<int>(Kind::F64);
    case at::kHalf: return static_cast<int>(Kind::F16);
    case at::kBFloat16: return static_cast<int>(Kind::BF16);
    default: TORCH_CHECK(false, "haar_split on CUDA supports float32/float64/float16/bfloat16, got ", t);
  }
  return -1;
}
#endif

}  // namespace

std::vector<at::Tensor> haar_split_forward(const at::Tensor& x) {
  MSID_CHECK_DEVICE(x);
  MSID_CHECK_DIM(x, 4);
  const bool nhwc = is_nhwc(x);
  TORCH_CHECK(nhwc || x.is_contiguous(),
              "x must be contiguous (or channels_last on the CPU), got strides ", x.strides());
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  TORCH_CHECK(height > 0 && width > 0, "haar_split needs H, W > 0, got shape ", x.sizes());
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2;
  const auto options = x.options().memory_format(
      nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  auto low = at::empty({batch, channels, h2, w2}, options);
  auto high = at::empty({batch, 3 * channels, h2, w2}, options);
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const auto err = haar_split_forward_cuda(kind_of(x.scalar_type()), x.data_ptr(),
                                             low.data_ptr(), high.data_ptr(), batch, channels,
                                             height, width, c10::cuda::getCurrentCUDAStream());
    MSID_CHECK_CUDA_ERROR(err);
    return {low, high};
#else
    TORCH_CHECK(false, "msidtrans_fast._C was built without CUDA");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "haar_split_forward", [&] {
    (nhwc ? forward_cpu_cl<scalar_t> : forward_cpu<scalar_t>)(
        x.data_ptr<scalar_t>(), low.data_ptr<scalar_t>(), high.data_ptr<scalar_t>(), batch,
        channels, height, width);
  });
  return {low, high};
}

at::Tensor haar_split_backward(const at::Tensor& grad_low, const at::Tensor& grad_high,
                               int64_t height, int64_t width) {
  MSID_CHECK_DEVICE(grad_low);
  MSID_CHECK_SAME_DEVICE(grad_low, grad_high);
  MSID_CHECK_DIM(grad_low, 4);
  MSID_CHECK_DIM(grad_high, 4);
  const bool contiguous = grad_low.is_contiguous() && grad_high.is_contiguous();
  const bool nhwc = !contiguous && grad_low.is_cpu() &&
                    grad_low.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                    grad_high.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(contiguous || nhwc,
              "grad_low and grad_high must both be contiguous (or both channels_last on the CPU)");
  TORCH_CHECK(grad_low.scalar_type() == grad_high.scalar_type(),
              "grad_low and grad_high must have the same dtype");
  const int64_t batch = grad_low.size(0), channels = grad_low.size(1);
  const int64_t h2 = (height + 1) / 2, w2 = (width + 1) / 2;
  TORCH_CHECK(height > 0 && width > 0, "haar_split_backward needs height, width > 0");
  TORCH_CHECK(grad_low.size(2) == h2 && grad_low.size(3) == w2,
              "grad_low must be (b, C, ceil(H/2), ceil(W/2)), got ", grad_low.sizes());
  TORCH_CHECK(grad_high.size(0) == batch && grad_high.size(1) == 3 * channels &&
                  grad_high.size(2) == h2 && grad_high.size(3) == w2,
              "grad_high must be (b, 3C, ceil(H/2), ceil(W/2)), got ", grad_high.sizes());
  auto grad_x = at::empty({batch, channels, height, width},
                          grad_low.options().memory_format(
                              nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (grad_low.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad_low.device());
    const auto err = haar_split_backward_cuda(
        kind_of(grad_low.scalar_type()), grad_low.data_ptr(), grad_high.data_ptr(),
        grad_x.data_ptr(), batch, channels, height, width, c10::cuda::getCurrentCUDAStream());
    MSID_CHECK_CUDA_ERROR(err);
    return grad_x;
#else
    TORCH_CHECK(false, "msidtrans_fast._C was built without CUDA");
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(grad_low.scalar_type(), "haar_split_backward", [&] {
    (nhwc ? backward_cpu_cl<scalar_t> : backward_cpu<scalar_t>)(
        grad_low.data_ptr<scalar_t>(), grad_high.data_ptr<scalar_t>(),
        grad_x.data_ptr<scalar_t>(), batch, channels, height, width);
  });
  return grad_x;
}

}  // namespace msidtrans
