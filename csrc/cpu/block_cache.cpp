// A CPU allocator that keeps large freed blocks for the next tensor of about their size.
//
// Why: a packed multi-candidate output is hundreds of MiB, freed a moment after its consumer
// ran, and the next call asks for the same size again. glibc hands such a block back to the
// heap (or, untuned, unmaps it); small allocations made in between are then carved out of the
// freed hole, the next large request no longer fits in it and takes fresh pages, and touching
// fresh pages costs about as much as the convolution itself on a virtual machine (page faults,
// zeroing, huge-page compaction: benchmarks/RESULTS.md). Keeping the block itself, whole, for
// the next request of about its size removes those faults.
//
// What: requests of at least `min_bytes` are served from the idle blocks (the smallest whose
// capacity is in [n, n + n / 4]) or, on a miss, by the allocator that was installed before
// (torch's default), rounded up to 2 MiB so that nearby sizes share blocks. A freed large
// block becomes idle; idle blocks beyond `keep_bytes` in all are returned to that allocator,
// oldest first. Smaller requests go straight to the previous allocator. keep_bytes = 0
// returns every idle block and caches nothing from then on.
//
// The allocator is installed once per process (c10::SetCPUAllocator) by the first
// configure call and never removed (tensors it allocated may outlive any switch back);
// configure only changes its two limits. Python face: fastsupernet.allocator.
#include <torch/library.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastsupernet {
namespace {

constexpr size_t kRound = size_t{2} << 20;  // capacities are multiples of 2 MiB

// Users of the raw interface (oneDNN through ideep) need a data pointer that is its own
// context and a deleter taking only that pointer; the live large blocks are therefore found
// by their address.
class BlockCache final : public c10::Allocator {
 public:
  explicit BlockCache(c10::Allocator* fallback) : fallback_(fallback), fallback_raw_(fallback->raw_deleter()) {}

  c10::DataPtr allocate(size_t n) override {
    size_t min_bytes, keep_bytes;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      min_bytes = min_bytes_;
      keep_bytes = keep_bytes_;
    }
    if (keep_bytes == 0 || n < min_bytes) return fallback_->allocate(n);
    std::unique_ptr<Block> block = take_idle(n);
    if (!block) {
      const size_t capacity = (n + kRound - 1) / kRound * kRound;
      block = std::make_unique<Block>(Block{fallback_->allocate(capacity), capacity});  // may throw
    }
    void* data = block->memory.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_.emplace(data, std::move(block));
    }
    return c10::DataPtr(data, data, &BlockCache::release, c10::Device(c10::DeviceType::CPU));
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void configure(size_t keep_bytes, size_t min_bytes) {
    std::vector<std::unique_ptr<Block>> evicted;
    std::lock_guard<std::mutex> lock(mutex_);
    keep_bytes_ = keep_bytes;
    min_bytes_ = min_bytes;
    evict_locked(evicted);
  }  // evicted blocks are freed here, after the lock is released (declared before it)

  // hits, misses, idle blocks, idle bytes, keep_bytes, min_bytes
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(hits_),        static_cast<int64_t>(misses_),
            static_cast<int64_t>(idle_.size()), static_cast<int64_t>(idle_bytes_),
            static_cast<int64_t>(keep_bytes_),  static_cast<int64_t>(min_bytes_)};
  }

  static BlockCache* instance;  // the installed one (set once, never reset)

 private:
  struct Block {
    c10::DataPtr memory;  // owned: freed through the previous allocator's deleter
    size_t capacity;
  };

  // The smallest idle block that fits n without wasting more than a quarter of it; null if none.
  std::unique_ptr<Block> take_idle(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      const size_t c = (*it)->capacity;
      if (c >= n && c - n <= n / 4 && (best == idle_.end() || c < (*best)->capacity)) best = it;
    }
    if (best == idle_.end()) {
      ++misses_;
      return nullptr;
    }
    std::unique_ptr<Block> block = std::move(*best);
    idle_.erase(best);
    idle_bytes_ -= block->capacity;
    ++hits_;
    return block;
  }

  // Deleter of every block this allocator handed out, and of the previous allocator's small
  // blocks when they come back through the raw interface.
  static void release(void* data) {
    BlockCache* self = instance;
    std::vector<std::unique_ptr<Block>> evicted;
    std::lock_guard<std::mutex> lock(self->mutex_);
    auto it = self->live_.find(data);
    if (it == self->live_.end()) {
      self->fallback_raw_(data);
      return;
    }
    self->idle_bytes_ += it->second->capacity;
    self->idle_.push_back(std::move(it->second));  // newest last
    self->live_.erase(it);
    self->evict_locked(evicted);
  }  // evicted blocks are freed after the lock is released

  void evict_locked(std::vector<std::unique_ptr<Block>>& evicted) {
    while (!idle_.empty() && idle_bytes_ > keep_bytes_) {
      idle_bytes_ -= idle_.front()->capacity;
      evicted.push_back(std::move(idle_.front()));
      idle_.pop_front();
    }
  }

  c10::Allocator* fallback_;
  c10::DeleterFnPtr fallback_raw_;
  std::mutex mutex_;
  std::unordered_map<void*, std::unique_ptr<Block>> live_;
  std::list<std::unique_ptr<Block>> idle_;
  size_t idle_bytes_ = 0;
  size_t keep_bytes_ = 0;
  size_t min_bytes_ = SIZE_MAX;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

BlockCache* BlockCache::instance = nullptr;

// Installed by the first configure call and never destroyed: tensors it allocated may be
// freed at any time, up to the interpreter's last moments.
std::mutex install_mutex;

BlockCache* installed_cache(bool install) {
  std::lock_guard<std::mutex> lock(install_mutex);
  if (BlockCache::instance == nullptr && install) {
    c10::Allocator* previous = c10::GetCPUAllocator();
    TORCH_CHECK(previous->raw_deleter() != nullptr,
                "_cpu_block_cache: the installed CPU allocator has no raw deleter; the cache needs one");
    BlockCache::instance = new BlockCache(previous);
    c10::SetCPUAllocator(BlockCache::instance, /*priority=*/1);
  }
  return BlockCache::instance;
}

std::vector<int64_t> cpu_block_cache(int64_t keep_bytes, int64_t min_bytes) {
  TORCH_CHECK(keep_bytes >= 0, "_cpu_block_cache: keep_bytes must be >= 0, got ", keep_bytes);
  TORCH_CHECK(min_bytes >= 1, "_cpu_block_cache: min_bytes must be >= 1, got ", min_bytes);
  BlockCache* cache = installed_cache(true);
  cache->configure(static_cast<size_t>(keep_bytes), static_cast<size_t>(min_bytes));
  return cache->stats();
}

// Empty when the cache was never installed.
std::vector<int64_t> cpu_block_cache_stats() {
  BlockCache* cache = installed_cache(false);
  return cache == nullptr ? std::vector<int64_t>{} : cache->stats();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastsupernet, m) {
  // Installs (once) and configures the CPU block cache; both return its statistics
  // [hits, misses, idle blocks, idle bytes, keep_bytes, min_bytes] (stats: [] if not installed).
  m.def("_cpu_block_cache(int keep_bytes, int min_bytes) -> int[]", &cpu_block_cache);
  m.def("_cpu_block_cache_stats() -> int[]", &cpu_block_cache_stats);
}

}  // namespace fastsupernet
