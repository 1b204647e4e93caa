// The Python module msidtrans_fast._C: bindings only (kernels and checks live in the per-op files).
#include <torch/extension.h>

#include "block_cache.h"
#include "haar_split.h"
#include "mish.h"
#include "remove_small_regions.h"

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msidtrans_fast compiled ops: Haar split, Mish, the fusing consistency check and the "
            "CPU block cache";
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were built");
  m.def("haar_split_forward", &msidtrans::haar_split_forward, py::arg("x"),
        "(b, C, H, W) contiguous (or channels_last on the CPU) -> [low (b, C, H', W'), "
        "high (b, 3C, H', W')] in x's layout, H' = ceil(H/2)");
  m.def("haar_split_backward", &msidtrans::haar_split_backward, py::arg("grad_low"),
        py::arg("grad_high"), py::arg("height"), py::arg("width"),
        "Adjoint of haar_split_forward for an input of size (height, width)");
  m.def("mish_", &msidtrans::mish_, py::arg("x"),
        "In place x * tanh(softplus(x)) for a dense CPU float32/bfloat16 tensor");
  m.def("remove_small_regions", &msidtrans::remove_small_regions, py::arg("mask"),
        py::arg("min_area"),
        "(b, H, W) uint8 0/1 -> uint8: drop 1-components then 0-components with < min_area pixels");
  m.def("block_cache_enter", &msidtrans::block_cache_enter,
        "Open a scope in which large CPU tensors reuse freed blocks (nested scopes count)");
  m.def("block_cache_exit", &msidtrans::block_cache_exit,
        "Close a scope; the last one restores the allocator (idle blocks stay for the next)");
  m.def("block_cache_release", &msidtrans::block_cache_release,
        "Free the idle blocks of the CPU block cache");
  m.def("block_cache_stats", &msidtrans::block_cache_stats,
        "[hits, misses, idle bytes, bytes held, scopes open]");
}
