// The CPU gradient pool (see grad_pool.h for what it promises).
#include "grad_pool.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>

#if defined(__linux__) || defined(__APPLE__)
#define LSR_FUSED_GRAD_POOL_MMAP 1
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace lsr_fused {
namespace grad_pool {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t round_up(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

size_t page_size() {
#if defined(LSR_FUSED_GRAD_POOL_MMAP)
  static const size_t page = [] {
    const long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<size_t>(p) : size_t{4096};
  }();
  return page;
#else
  return 4096;
#endif
}

// Capacity of a new mapping for nbytes: whole huge pages from 4 MiB on (2 MiB-aligned), else whole
// pages.
size_t capacity_for(size_t nbytes) {
  return nbytes >= 2 * kHugePage ? round_up(nbytes, kHugePage) : round_up(nbytes, page_size());
}

// Without mmap (not Linux or macOS) the pool is off: its bound is 0 whatever is asked.
int64_t supported_bound(int64_t max_bytes) {
#if defined(LSR_FUSED_GRAD_POOL_MMAP)
  return max_bytes;
#else
  (void)max_bytes;
  return 0;
#endif
}

// LSR_FUSED_GRAD_POOL_BYTES: a byte count, optionally with a K/M/G (binary) suffix, "KiB"/"KB"
// spellings accepted; unset, empty or unparsable: the default.
int64_t env_max_bytes() {
  const char* env = std::getenv("LSR_FUSED_GRAD_POOL_BYTES");
  if (env == nullptr || *env == '\0') return kDefaultMaxBytes;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  if (end == env || value < 0) return kDefaultMaxBytes;
  std::string suffix;
  for (const char* c = end; *c != '\0'; ++c) {
    if (!std::isspace(static_cast<unsigned char>(*c))) {
      suffix += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
    }
  }
  int shift = 0;
  if (!suffix.empty()) {
    const std::string unit = suffix.substr(1);
    if (unit != "" && unit != "b" && unit != "ib") return kDefaultMaxBytes;
    switch (suffix[0]) {
      case 'k': shift = 10; break;
      case 'm': shift = 20; break;
      case 'g': shift = 30; break;
      default: return kDefaultMaxBytes;
    }
  }
  if (value > (INT64_MAX >> shift)) return INT64_MAX;
  return static_cast<int64_t>(value) << shift;
}

// One mapping: data is both the start of the mapping and of the usable buffer.
struct Block {
  void* data;
  size_t capacity;
  size_t handed;  // bytes reported to the profiler for the current hand-out
};

Block* map_block(size_t capacity) {
#if defined(LSR_FUSED_GRAD_POOL_MMAP)
  const bool huge = capacity >= 2 * kHugePage;
  const size_t align = huge ? kHugePage : page_size();
  const size_t length = capacity + (huge ? align : 0);
  void* raw = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (base + align - 1) & ~(static_cast<uintptr_t>(align) - 1);
  const size_t head = aligned - base;
  const size_t tail = length - head - capacity;
  if (head != 0) (void)munmap(raw, head);
  if (tail != 0) (void)munmap(reinterpret_cast<void*>(aligned + capacity), tail);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Fresh, untouched and 2 MiB-aligned: every 2 MiB of it can be one huge page. (ops.cpp's
  // advise_huge_pages_for_fresh_output would ask too; asking here covers the whole buffer.)
  if (huge && thp_enabled()) (void)madvise(reinterpret_cast<void*>(aligned), capacity, MADV_HUGEPAGE);
#endif
  return new Block{reinterpret_cast<void*>(aligned), capacity, 0};
#else
  (void)capacity;
  return nullptr;
#endif
}

void unmap_block(Block* block) {
#if defined(LSR_FUSED_GRAD_POOL_MMAP)
  (void)munmap(block->data, block->capacity);
#endif
  delete block;
}

class Pool {
 public:
  Pool() : max_bytes_(supported_bound(env_max_bytes())) {}

  // A cached buffer of at least nbytes (and not much more), else a new mapping; nullptr when the
  // pool is off or the mapping failed.
  Block* acquire(size_t nbytes) {
    const size_t wanted = capacity_for(nbytes);
    std::vector<Block*> victims;
    Block* found = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (max_bytes_ <= 0) return nullptr;
      // Best fit among buffers no more than 1/8 larger than a new mapping would be.
      auto best = cached_.end();
      for (auto it = cached_.begin(); it != cached_.end(); ++it) {
        const size_t cap = (*it)->capacity;
        if (cap >= nbytes && cap <= wanted + wanted / 8 &&
            (best == cached_.end() || cap < (*best)->capacity)) {
          best = it;
        }
      }
      if (best != cached_.end()) {
        found = *best;
        cached_.erase(best);
        cached_bytes_ -= static_cast<int64_t>(found->capacity);
        ++hits_;
      } else {
        ++misses_;
        // The new buffer comes back to the pool when released: make room for it now, so that what
        // the pool keeps plus what it hands out stays near the bound.
        while (!cached_.empty() && cached_bytes_ + static_cast<int64_t>(wanted) > max_bytes_) {
          victims.push_back(cached_.back());
          cached_bytes_ -= static_cast<int64_t>(cached_.back()->capacity);
          cached_.pop_back();
        }
      }
    }
    for (Block* victim : victims) unmap_block(victim);
    if (found == nullptr) found = map_block(wanted);
    if (found == nullptr) return nullptr;
    found->handed = nbytes;
    int64_t outstanding = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      outstanding_bytes_ += static_cast<int64_t>(found->capacity);
      ++outstanding_buffers_;
      outstanding = outstanding_bytes_;
      reserved = outstanding_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(found->data, static_cast<int64_t>(nbytes),
                                     static_cast<size_t>(outstanding),
                                     static_cast<size_t>(reserved), c10::Device(c10::kCPU));
    return found;
  }

  // The storage's deleter: keep the buffer (most recently released first), unmapping the least
  // recently released ones beyond the bound. Never throws.
  void release(Block* block) noexcept {
    std::vector<Block*> victims;
    int64_t outstanding = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      outstanding_bytes_ -= static_cast<int64_t>(block->capacity);
      --outstanding_buffers_;
      if (static_cast<int64_t>(block->capacity) > max_bytes_) {
        victims.push_back(block);
      } else {
        cached_.push_front(block);
        cached_bytes_ += static_cast<int64_t>(block->capacity);
        while (cached_bytes_ > max_bytes_) {
          victims.push_back(cached_.back());
          cached_bytes_ -= static_cast<int64_t>(cached_.back()->capacity);
          cached_.pop_back();
        }
      }
      outstanding = outstanding_bytes_;
      reserved = outstanding_bytes_ + cached_bytes_;
    }
    try {
      c10::reportMemoryUsageToProfiler(block->data, -static_cast<int64_t>(block->handed),
                                       static_cast<size_t>(outstanding),
                                       static_cast<size_t>(reserved), c10::Device(c10::kCPU));
    } catch (...) {
    }
    for (Block* victim : victims) unmap_block(victim);
  }

  int64_t set_max_bytes(int64_t max_bytes) {
    std::vector<Block*> victims;
    int64_t previous = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = max_bytes_;
      max_bytes_ = supported_bound(max_bytes < 0 ? env_max_bytes() : max_bytes);
      while (!cached_.empty() && cached_bytes_ > max_bytes_) {
        victims.push_back(cached_.back());
        cached_bytes_ -= static_cast<int64_t>(cached_.back()->capacity);
        cached_.pop_back();
      }
    }
    for (Block* victim : victims) unmap_block(victim);
    return previous;
  }

  int64_t trim() {
    std::list<Block*> victims;
    int64_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      victims.swap(cached_);
      released = cached_bytes_;
      cached_bytes_ = 0;
    }
    for (Block* victim : victims) unmap_block(victim);
    return released;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {max_bytes_,           cached_bytes_, static_cast<int64_t>(cached_.size()),
            outstanding_bytes_,   outstanding_buffers_, hits_, misses_};
  }

 private:
  std::mutex mutex_;
  std::list<Block*> cached_;  // released buffers, most recently released first
  int64_t max_bytes_;
  int64_t cached_bytes_ = 0;
  int64_t outstanding_bytes_ = 0;
  int64_t outstanding_buffers_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// Never destroyed: gradients may be released during interpreter shutdown, after static
// destructors have run.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

void release_block(void* ctx) { pool().release(static_cast<Block*>(ctx)); }

}  // namespace

bool thp_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("LSR_FUSED_THP");
    return env == nullptr || std::string(env) != "0";
  }();
  return enabled;
}

at::Tensor empty_grad(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "lsr_fused: empty_grad is for CPU tensors, got ",
              logits.device());
  const int64_t nbytes = logits.numel() * static_cast<int64_t>(logits.element_size());
  if (nbytes < kMinPooledBytes) return at::empty_like(logits);
  Block* block = pool().acquire(static_cast<size_t>(nbytes));
  if (block == nullptr) return at::empty_like(logits);
  // at::empty_like's layout: a non-overlapping and dense tensor's strides, else contiguous.
  std::vector<int64_t> strides;
  if (logits.is_non_overlapping_and_dense()) {
    strides = logits.strides().vec();
  } else {
    strides.assign(logits.dim(), 1);
    for (int64_t d = logits.dim() - 2; d >= 0; --d) {
      strides[d] = strides[d + 1] * std::max<int64_t>(logits.size(d + 1), 1);
    }
  }
  // The context's deleter owns the block from here on, even if make_tensor throws. A resizable
  // storage with the CPU allocator: resizing the gradient moves it to torch's allocator and
  // releases this buffer to the pool.
  return at::for_blob(block->data, logits.sizes())
      .strides(strides)
      .context(block, &release_block)
      .options(logits.options())
      .allocator(c10::GetCPUAllocator())
      .resizeable_storage()
      .make_tensor();
}

int64_t set_max_bytes(int64_t max_bytes) { return pool().set_max_bytes(max_bytes); }

int64_t trim() { return pool().trim(); }

std::vector<int64_t> stats() { return pool().stats(); }

}  // namespace grad_pool
}  // namespace lsr_fused
