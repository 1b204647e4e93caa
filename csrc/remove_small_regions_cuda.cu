// Connected-component labelling on the GPU for the consistency check, no host round trip.
//
// Union-find over pixel indices in the style of Playne & Hawick (IEEE TPDS 2018): every pixel
// starts as its own root; each pixel unites itself with its left and upper neighbours of the same
// value (union by smaller index through atomicMin, retried until the hook lands on a root); a
// compression pass points every pixel at its root. Component sizes are accumulated at the roots
// with warp-aggregated atomics (lanes holding the same root add once, __match_any_sync), and a
// last pass flips the pixels of components smaller than min_area. This runs once for value 1 and
// once for value 0 of the updated map. Labels are flat indices over the whole batch; unions
// never cross image or row boundaries, so each map of the batch is labelled on its own.
// Requires compute capability 7.0+ (__match_any_sync). No torch headers.
#include "remove_small_regions_cuda.h"

namespace msidtrans {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int32_t find_root(const int32_t* labels, int32_t x) {
  int32_t parent = labels[x];
  while (parent != x) {
    x = parent;
    parent = labels[x];
  }
  return x;
}

__device__ __forceinline__ void unite(int32_t* labels, int32_t a, int32_t b) {
  bool done = false;
  while (!done) {
    a = find_root(labels, a);
    b = find_root(labels, b);
    if (a < b) {
      const int32_t old = atomicMin(&labels[b], a);
      done = old == b;
      b = old;
    } else if (b < a) {
      const int32_t old = atomicMin(&labels[a], b);
      done = old == a;
      a = old;
    } else {
      done = true;
    }
  }
}

__global__ void init_kernel(int32_t* labels, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) labels[i] = static_cast<int32_t>(i);
}

__global__ void merge_kernel(const uint8_t* __restrict__ mask, int32_t* labels, int64_t height,
                             int64_t width, int64_t n, uint8_t value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || mask[i] != value) return;
  const int64_t x = i % width, y = (i / width) % height;
  if (x > 0 && mask[i - 1] == value) unite(labels, static_cast<int32_t>(i), static_cast<int32_t>(i - 1));
  if (y > 0 && mask[i - width] == value)
    unite(labels, static_cast<int32_t>(i), static_cast<int32_t>(i - width));
}

__global__ void compress_kernel(const uint8_t* __restrict__ mask, int32_t* labels, int64_t n,
                                uint8_t value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || mask[i] != value) return;
  labels[i] = find_root(labels, static_cast<int32_t>(i));
}

// All threads of a warp take part in __match_any_sync, so no thread returns before it.
__global__ void count_kernel(const uint8_t* __restrict__ mask, const int32_t* __restrict__ labels,
                             int32_t* sizes, int64_t n, uint8_t value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int32_t key = (i < n && mask[i] == value) ? labels[i] : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, key);
  const int lane = threadIdx.x & 31;
  if (key >= 0 && lane == __ffs(peers) - 1) atomicAdd(&sizes[key], __popc(peers));
}

__global__ void flip_kernel(uint8_t* mask, const int32_t* __restrict__ labels,
                            const int32_t* __restrict__ sizes, int64_t n, int64_t min_area,
                            uint8_t value) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || mask[i] != value) return;
  if (sizes[labels[i]] < min_area) mask[i] = static_cast<uint8_t>(1 - value);
}

cudaError_t flip_small(uint8_t* mask, int32_t* labels, int32_t* sizes, int64_t height,
                       int64_t width, int64_t n, int64_t min_area, uint8_t value,
                       cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  init_kernel<<<blocks, kThreads, 0, stream>>>(labels, n);
  merge_kernel<<<blocks, kThreads, 0, stream>>>(mask, labels, height, width, n, value);
  compress_kernel<<<blocks, kThreads, 0, stream>>>(mask, labels, n, value);
  cudaError_t err = cudaMemsetAsync(sizes, 0, sizeof(int32_t) * n, stream);
  if (err != cudaSuccess) return err;
  count_kernel<<<blocks, kThreads, 0, stream>>>(mask, labels, sizes, n, value);
  flip_kernel<<<blocks, kThreads, 0, stream>>>(mask, labels, sizes, n, min_area, value);
  return cudaGetLastError();
}

}  // namespace

cudaError_t remove_small_regions_cuda(uint8_t* mask, int32_t* labels, int32_t* sizes,
                                      int64_t batch, int64_t height, int64_t width,
                                      int64_t min_area, cudaStream_t stream) {
  const int64_t n = batch * height * width;
  if (n == 0 || min_area <= 1) return cudaSuccess;
  cudaError_t err = flip_small(mask, labels, sizes, height, width, n, min_area, 1, stream);
  if (err != cudaSuccess) return err;
  return flip_small(mask, labels, sizes, height, width, n, min_area, 0, stream);
}

}  // namespace msidtrans
