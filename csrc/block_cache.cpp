// The CPU block cache (see block_cache.h).
//
// While a scope is open, the process's CPU allocator is this one: requests of at least
// kMinBlock bytes get a page-aligned mapped block, preferably an idle one of the same size (or
// up to half as large again); smaller ones come from c10::alloc_cpu and go back to
// c10::free_cpu, as with the default allocator (whose blocks this deleter may also be handed:
// raw_deallocate looks the deleter up when it frees). A freed block stays idle in the cache as
// long as the blocks held (idle and in use) stay within limit(): the most ever in use at once
// plus a bounded spare; a request the idle blocks cannot serve first frees idle blocks to stay
// within it. Idle blocks stay across scopes (the next forward reuses them) until
// block_cache_release.
#include "block_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define MSID_HAVE_MMAP 1
#endif

namespace msidtrans {
namespace {

constexpr size_t kMinBlock = size_t(1) << 20;
constexpr size_t kPage = 4096;
constexpr size_t kSpare = size_t(256) << 20;

// Large blocks are mapped from the kernel directly where possible: glibc would serve blocks
// below its (growing) mmap threshold from its heap, where freed and kept blocks fragment it.
void* map_block(size_t size) {
#ifdef MSID_HAVE_MMAP
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "block cache: out of memory mapping ", size, " bytes");
  return p;
#else
  return c10::alloc_cpu(size);
#endif
}

void unmap_block(void* p, size_t size) {
#ifdef MSID_HAVE_MMAP
  munmap(p, size);
#else
  c10::free_cpu(p);
#endif
}
constexpr uint8_t kPriority = 255;  // SetCPUAllocator replaces only at >= the current priority

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* block = nbytes < kMinBlock ? c10::alloc_cpu(nbytes) : take(nbytes);
    return {block, block, &BlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (scopes_++ == 0) {
      previous_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, kPriority);
    }
  }

  void exit() {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(scopes_ > 0, "block cache: exit without enter");
    if (--scopes_ == 0) {
      c10::SetCPUAllocator(previous_, kPriority);
      previous_ = nullptr;
    }
  }

  void release_idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    free_idle(idle_bytes_);
    peak_ = in_use_;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_, int64_t(idle_bytes_), int64_t(idle_bytes_ + in_use_), scopes_};
  }

  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: blocks may outlive exit
    return *cache;
  }

 private:
  void* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t size = (nbytes + kPage - 1) / kPage * kPage;
    auto it = idle_.lower_bound(size);
    void* block = nullptr;
    if (it != idle_.end() && it->first - size <= size / 2) {
      size = it->first;
      block = it->second;
      idle_.erase(it);
      idle_bytes_ -= size;
      ++hits_;
    } else {
      ++misses_;
      if (idle_bytes_ + in_use_ + size > limit()) {
        free_idle(idle_bytes_ + in_use_ + size - limit());
      }
      block = map_block(size);
    }
    in_use_ += size;
    peak_ = std::max(peak_, in_use_);
    sizes_[block] = size;
    return block;
  }

  void give_back(void* block) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = sizes_.find(block);
    if (it == sizes_.end()) {  // a small block, or one from the default allocator (same heap)
      c10::free_cpu(block);
      return;
    }
    const size_t size = it->second;
    sizes_.erase(it);
    in_use_ -= size;
    if (idle_bytes_ + in_use_ + size <= limit()) {
      idle_.emplace(size, block);
      idle_bytes_ += size;
    } else {
      unmap_block(block, size);
    }
  }

  // Frees idle blocks, largest first, until at least `bytes` are returned or none is left.
  void free_idle(size_t bytes) {
    size_t freed = 0;
    while (freed < bytes && !idle_.empty()) {
      auto last = std::prev(idle_.end());
      freed += last->first;
      idle_bytes_ -= last->first;
      unmap_block(last->second, last->first);
      idle_.erase(last);
    }
  }

  // The most the cache holds (idle and in use): the most ever in use at once, plus as much
  // again for idle blocks whose sizes the next requests do not quite match, up to kSpare. On
  // repeated 520x520 fuse() calls (2 cores, peak in use 220 MiB) no spare maps 51 fresh blocks a
  // call and takes 1.07-1.16 s at a 664 MiB process peak; the full spare maps none: 0.86-0.88 s
  // at 790 MiB. Larger images keep at most kSpare above their own peak.
  size_t limit() const { return peak_ + std::min(peak_, kSpare); }

  static void release(void* block) { instance().give_back(block); }

  std::mutex mutex_;
  c10::Allocator* previous_ = nullptr;
  int64_t scopes_ = 0;
  std::multimap<size_t, void*> idle_;       // size -> block
  std::unordered_map<void*, size_t> sizes_;  // every block handed out and not yet freed
  size_t idle_bytes_ = 0, in_use_ = 0, peak_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

void block_cache_enter() { BlockCache::instance().enter(); }
void block_cache_exit() { BlockCache::instance().exit(); }
void block_cache_release() { BlockCache::instance().release_idle(); }
std::vector<int64_t> block_cache_stats() { return BlockCache::instance().stats(); }

}  // namespace msidtrans
