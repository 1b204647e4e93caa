// A scope in which large CPU tensors reuse the memory of freed ones instead of returning it to
// the system: glibc hands every block above its mmap threshold back to the kernel when it is
// freed, so each new activation of a forward is faulted in (and zeroed) page by page again.
#pragma once

#include <cstdint>
#include <vector>

namespace msidtrans {

// Enter or leave the scope (nested and concurrent scopes count; the allocator is swapped in by
// the first enter and restored by the last exit). Idle blocks stay for the next scope.
void block_cache_enter();
void block_cache_exit();

// Frees the idle blocks and forgets the peak they were bounded by.
void block_cache_release();

// {hits, misses, idle bytes, bytes held (idle + in use), scopes open}.
std::vector<int64_t> block_cache_stats();

}  // namespace msidtrans
