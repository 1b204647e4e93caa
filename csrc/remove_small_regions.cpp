// Consistency check: argument checks, device dispatch, and the CPU implementation.
//
// CPU: one raster scan of union-find per value (1, then 0 on the updated map), near linear time.
// Each pixel of the value links to its left or upper neighbour's parent; when both neighbours
// match and the upper-left one does too, they are already in one tree (4-connectivity through the
// corner) and no union is needed. Parents always have smaller indices than their children, so a
// second raster scan resolves every pixel to its root in one read and counts the sizes at the
// roots; a third flips the pixels of small components. Images of a batch run in parallel.
#include "remove_small_regions.h"

#include <ATen/Parallel.h>

#include "common.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "remove_small_regions_cuda.h"
#endif

namespace msidtrans {
namespace {

inline int64_t find_root(int64_t* parent, int64_t x) {
  while (parent[x] != x) {
    parent[x] = parent[parent[x]];  // path halving
    x = parent[x];
  }
  return x;
}

inline int64_t unite(int64_t* parent, int64_t a, int64_t b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  if (a < b) {
    parent[b] = a;
    return a;
  }
  parent[a] = b;
  return b;
}

// Flips the 4-connected components of `value` with fewer than min_area pixels, in place.
// parent and size: scratch of height * width entries.
void flip_small(uint8_t* mask, int64_t* parent, int64_t* size, int64_t height, int64_t width,
                uint8_t value, int64_t min_area) {
  for (int64_t y = 0; y < height; ++y) {
    const int64_t row = y * width;
    for (int64_t x = 0; x < width; ++x) {
      const int64_t p = row + x;
      if (mask[p] != value) continue;
      const bool left = x > 0 && mask[p - 1] == value;
      const bool up = y > 0 && mask[p - width] == value;
      if (left && up) {
        parent[p] = mask[p - width - 1] == value ? parent[p - 1] : unite(parent, p - 1, p - width);
      } else if (left) {
        parent[p] = parent[p - 1];
      } else if (up) {
        parent[p] = parent[p - width];
      } else {
        parent[p] = p;
      }
    }
  }
  const int64_t n = height * width;
  for (int64_t p = 0; p < n; ++p) {
    if (mask[p] != value) continue;
    const int64_t root = parent[parent[p]];  // parent[p] < p is already resolved
    parent[p] = root;
    if (root == p) size[p] = 0;
    ++size[root];
  }
  for (int64_t p = 0; p < n; ++p) {
    if (mask[p] == value && size[parent[p]] < min_area) mask[p] = static_cast<uint8_t>(1 - value);
  }
}

}  // namespace

at::Tensor remove_small_regions(const at::Tensor& mask, int64_t min_area) {
  MSID_CHECK_DEVICE(mask);
  MSID_CHECK_DIM(mask, 3);
  MSID_CHECK_CONTIGUOUS(mask);
  MSID_CHECK_DTYPE(mask, at::kByte);
  TORCH_CHECK(min_area >= 0, "min_area must be >= 0, got ", min_area);
  const int64_t batch = mask.size(0), height = mask.size(1), width = mask.size(2);
  auto out = mask.clone();
  if (out.numel() == 0 || min_area <= 1) return out;
  if (mask.is_cuda()) {
#ifdef WITH_CUDA
    TORCH_CHECK(out.numel() < (int64_t{1} << 31),
                "remove_small_regions on CUDA handles fewer than 2^31 pixels per call, got ",
                out.numel());
    const c10::cuda::CUDAGuard guard(mask.device());
    auto labels = at::empty({out.numel()}, mask.options().dtype(at::kInt));
    auto sizes = at::empty({out.numel()}, mask.options().dtype(at::kInt));
    const auto err = remove_small_regions_cuda(out.data_ptr<uint8_t>(), labels.data_ptr<int32_t>(),
                                               sizes.data_ptr<int32_t>(), batch, height, width,
                                               min_area, c10::cuda::getCurrentCUDAStream());
    MSID_CHECK_CUDA_ERROR(err);
    return out;
#else
    TORCH_CHECK(false, "msidtrans_fast._C was built without CUDA");
#endif
  }
  const int64_t n = height * width;
  auto parent = at::empty({batch, n}, mask.options().dtype(at::kLong));
  auto size = at::empty({batch, n}, mask.options().dtype(at::kLong));
  uint8_t* out_ptr = out.data_ptr<uint8_t>();
  int64_t* parent_ptr = parent.data_ptr<int64_t>();
  int64_t* size_ptr = size.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint8_t* m = out_ptr + i * n;
      flip_small(m, parent_ptr + i * n, size_ptr + i * n, height, width, 1, min_area);
      flip_small(m, parent_ptr + i * n, size_ptr + i * n, height, width, 0, min_area);
    }
  });
  return out;
}

}  // namespace msidtrans
