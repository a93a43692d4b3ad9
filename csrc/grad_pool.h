// The CPU gradient pool: logits-sized gradient buffers the C++ backend hands out and takes back.
//
// A training step's default mode returns a fresh logits-sized gradient each step. Allocated by
// torch's CPU allocator (malloc, so mmap for large sizes), every step's buffer is fresh memory:
// its first write page-faults once per 4 KiB (or 2 MiB) page, and with other large tensors
// allocated and freed between two loss calls (a real training step) the kernel sometimes stalls
// for hundreds of milliseconds compacting memory for a huge page (issue 14). The pool keeps the
// pages instead: lsr_fused_C::empty_grad returns a tensor whose storage's deleter puts the
// (already faulted-in) buffer back into a small pool, and the next step's gradient reuses it.
//
// * Only buffers of at least kMinPooledBytes (1 MiB) go through the pool; smaller ones are plain
//   at::empty_like (torch's allocator is fast there).
// * A buffer is reused only once its storage is gone: a gradient the user still holds (logits.grad,
//   any view of it) is never handed out again.
// * The bound: at most max_bytes of released buffers are kept (least recently released ones are
//   unmapped first; a buffer larger than the bound is unmapped at once). Default 1 GiB,
//   LSR_FUSED_GRAD_POOL_BYTES overrides it (bytes, or with a K/M/G suffix, binary units); 0
//   disables the pool (empty_grad is then at::empty_like). set_max_bytes() changes it at run time
//   and trim() unmaps every cached buffer. Unmapped memory goes back to the system (munmap).
// * Buffers are mmap'ed, 2 MiB-aligned when at least 4 MiB (so that every huge page of them can be
//   a transparent huge page: madvise(MADV_HUGEPAGE) unless LSR_FUSED_THP=0), page-aligned (4 KiB,
//   so 64-byte aligned for the vector kernels) otherwise.
// * Thread-safe (one mutex); buffers may be released from any thread. Hand-outs and releases are
//   reported to torch's profiler as allocations and frees, so memory measurements see a pooled
//   gradient as the allocation it is for the caller.
// * Linux and macOS (mmap); elsewhere the pool is off and empty_grad is at::empty_like.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace lsr_fused {
namespace grad_pool {

constexpr int64_t kMinPooledBytes = int64_t{1} << 20;
constexpr int64_t kDefaultMaxBytes = int64_t{1} << 30;

// Whether LSR_FUSED_THP allows asking for transparent huge pages (unset or anything but "0").
bool thp_enabled();

// A tensor with the shape, dtype and (for a non-overlapping and dense one) strides of logits, as
// at::empty_like would make, its memory from the pool when large enough and the pool is on.
at::Tensor empty_grad(const at::Tensor& logits);

// Sets the bound in bytes (0 disables the pool; negative: the default, LSR_FUSED_GRAD_POOL_BYTES or
// 1 GiB), unmapping cached buffers beyond it; returns the previous bound.
int64_t set_max_bytes(int64_t max_bytes);

// Unmaps every cached buffer; returns the bytes released to the system.
int64_t trim();

// [max_bytes, cached_bytes, cached_buffers, outstanding_bytes, outstanding_buffers, hits, misses]:
// the bound, the released buffers kept, the pooled buffers handed out and still alive, and how many
// hand-outs reused a cached buffer / mapped a new one.
std::vector<int64_t> stats();

}  // namespace grad_pool
}  // namespace lsr_fused
