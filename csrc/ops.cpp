// The lsr_fused_C::* ops: their schemas (declared once, in TORCH_LIBRARY at the end of this file),
// the CPU implementation and the Meta (shape-only) implementation.
//
// These ops are the C++ backend's kernel entry points, as the Triton kernels are the Triton
// backend's: lsr_fused/backends/cpp_backend.py calls them from inside the lsr_fused::* custom ops
// (lsr_fused/ops.py), which are the op layer autograd and torch.compile see. They carry no autograd.
//
// The CPU kernels are compiled once per instruction set (csrc/cpu/) and selected at runtime.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>

#include "cpu_ops.h"
#include "grad_pool.h"
#include "lsr_args.h"
#include "ops_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace lsr_fused {
namespace {

// ---------------------------------------------------------------------------------------------
// Runtime selection of the CPU kernel variant.

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Kernels usable on this machine for a capability name, or name == nullptr.
CpuKernels kernels_for(const std::string& name) {
  if (name == "default") return cpu_default::kernels();
  if (name == "avx2") return cpu_has_avx2() ? cpu_avx2::kernels() : CpuKernels{};
  if (name == "avx512") return cpu_has_avx512() ? cpu_avx512::kernels() : CpuKernels{};
  return CpuKernels{};
}

CpuKernels best_kernels() {
  for (const char* name : {"avx512", "avx2"}) {
    CpuKernels k = kernels_for(name);
    if (k.name != nullptr) return k;
  }
  return cpu_default::kernels();
}

std::mutex g_kernels_mutex;
CpuKernels g_kernels{};
std::atomic<bool> g_kernels_ready{false};

// LSR_FUSED_CPU_CAPABILITY=default|avx2|avx512 caps the choice (unsupported values are ignored).
CpuKernels initial_kernels() {
  const char* env = std::getenv("LSR_FUSED_CPU_CAPABILITY");
  if (env != nullptr && *env != '\0') {
    CpuKernels k = kernels_for(env);
    if (k.name != nullptr) return k;
  }
  return best_kernels();
}

CpuKernels current_kernels() {
  if (!g_kernels_ready.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(g_kernels_mutex);
    if (!g_kernels_ready.load(std::memory_order_relaxed)) {
      g_kernels = initial_kernels();
      g_kernels_ready.store(true, std::memory_order_release);
    }
  }
  return g_kernels;
}

std::string cpu_capability() { return current_kernels().name; }

// Selects the CPU variant ("default", "avx2", "avx512" or "auto"); returns the previous one.
std::string set_cpu_capability(std::string name) {
  const std::string previous = cpu_capability();
  CpuKernels k = name == "auto" ? best_kernels() : kernels_for(name);
  TORCH_CHECK_VALUE(k.name != nullptr, "lsr_fused: CPU capability '", name,
                    "' is not available on this machine/build");
  std::lock_guard<std::mutex> lock(g_kernels_mutex);
  g_kernels = k;
  g_kernels_ready.store(true, std::memory_order_release);
  return previous;
}

// ---------------------------------------------------------------------------------------------
// CPU implementation.

void check_targets_cpu(const RowArgs& args) {
  const int64_t n = args.rows();
  const int64_t C = args.num_classes;
  const int64_t ignore = args.ignore_index;
  const int64_t* t = args.target;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t[i];
    if (v != ignore && (v < 0 || v >= C)) {
      TORCH_CHECK_VALUE(false, "target value ", v, " is out of range [0, ", C,
                        ") (ignore_index=", ignore, ", row ", i, ")");
    }
  }
}

// A freshly allocated gradient (torch.empty_like of a large tensor) is untouched memory: writing it
// costs one page fault per 4 KiB page, which on the 2-core VM this was tuned on took about twice as
// long as computing the gradient itself. Where transparent huge pages are in "madvise" mode, asking
// for them on such a buffer before the first write cuts that to one fault per 2 MiB. Only done
// for a dense output of at least 4 MiB whose first huge page is not resident yet (i.e. a fresh
// allocation); LSR_FUSED_THP=0 turns it off. It is only a hint: contents and semantics are
// unchanged (torch's own allocator does the same under THP_MEM_ALLOC_ENABLE=1). Gradients from the
// pool (grad_pool.h) were advised when mapped, and are resident from their second use on: the
// check below skips them then, and steady-state training faults no page at all.
void advise_huge_pages_for_fresh_output(const at::Tensor& out, const at::Tensor& logits) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!grad_pool::thp_enabled() || !out.is_non_overlapping_and_dense()) return;
  const uintptr_t begin_addr = reinterpret_cast<uintptr_t>(out.const_data_ptr());
  const uintptr_t bytes = static_cast<uintptr_t>(out.numel()) * out.element_size();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge || out.const_data_ptr() == logits.const_data_ptr()) return;
  const uintptr_t begin = (begin_addr + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (begin_addr + bytes) & ~(kHuge - 1);
  if (end <= begin) return;
  const long page = sysconf(_SC_PAGESIZE);
  unsigned char resident = 0;
  if (page <= 0 || mincore(reinterpret_cast<void*>(begin), static_cast<size_t>(page), &resident) != 0 ||
      (resident & 1u) != 0) {
    return;  // not a plain mapping, or already touched
  }
  (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)out;
  (void)logits;
#endif
}

// Non-temporal stores for the gradient pay off once it cannot stay in the caches anyway (they save
// the read-for-ownership of every line: ~1.5x faster backward at 2048 x 32000 float32). Never for
// the in-place mode (the lines were just read). LSR_FUSED_STREAM_MIN_BYTES overrides the 32 MiB
// threshold (a negative value disables streaming).
bool use_streaming_stores(const at::Tensor& out, const at::Tensor& logits) {
  if (out.is_alias_of(logits)) return false;
  int64_t min_bytes = int64_t{32} << 20;
  if (const char* env = std::getenv("LSR_FUSED_STREAM_MIN_BYTES")) {
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    if (end != env) min_bytes = static_cast<int64_t>(value);
  }
  return min_bytes >= 0 && out.numel() * static_cast<int64_t>(out.element_size()) >= min_bytes;
}

// Rows per task: enough elements that a task amortises the scheduling (~32K elements).
int64_t grain_rows(int64_t num_classes) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(num_classes, 1));
}

}  // namespace

// The CPU implementations (declared in cpu_ops.h: the training step of train_step.cpp calls them).
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& weight_total,
                                               double target_extra, double other_mass,
                                               double z_loss, int64_t ignore_index,
                                               const std::optional<at::Tensor>& grad_logits,
                                               const std::optional<at::Tensor>& grad_guess,
                                               double softcap,
                                               const std::optional<at::Tensor>& mix_target,
                                               const std::optional<at::Tensor>& mix_lambda,
                                               const std::optional<at::Tensor>& stats_lse,
                                               const std::optional<at::Tensor>& stats_argmax) {
  ForwardCall call = prepare_forward(logits, target, weight, weight_total, target_extra,
                                     other_mass, z_loss, ignore_index, grad_logits, grad_guess);
  call.mix = prepare_options(softcap, mix_target, mix_lambda, logits, call.args);
  prepare_stats(stats_lse, stats_argmax, logits, call.args);
  RowArgs& args = call.args;
  const int64_t rows = args.rows();
  if (rows == 0) return {call.loss, call.lse};
  check_targets_cpu(args);
  if (call.write_grad) {
    advise_huge_pages_for_fresh_output(*grad_logits, logits);
    args.stream_grad = use_streaming_stores(*grad_logits, logits);
  }
  const CpuKernels k = current_kernels();
  at::parallel_for(0, rows, grain_rows(args.num_classes),
                   [&](int64_t begin, int64_t end) { k.forward(args, begin, end); });
  return {call.loss, call.lse};
}

void backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& weight_total, const at::Tensor& lse,
                  double target_extra, double other_mass, double z_loss, int64_t ignore_index,
                  const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_guess,
                  double softcap, const std::optional<at::Tensor>& mix_target,
                  const std::optional<at::Tensor>& mix_lambda) {
  BackwardCall call = prepare_backward(grad_loss, logits, target, weight, weight_total, lse,
                                       target_extra, other_mass, z_loss, ignore_index, grad_logits,
                                       grad_guess);
  call.mix = prepare_options(softcap, mix_target, mix_lambda, logits, call.args);
  RowArgs& args = call.args;
  const int64_t rows = args.rows();
  if (rows == 0) return;
  check_targets_cpu(args);
  advise_huge_pages_for_fresh_output(grad_logits, logits);
  args.stream_grad = use_streaming_stores(grad_logits, logits);
  const CpuKernels k = current_kernels();
  at::parallel_for(0, rows, grain_rows(args.num_classes),
                   [&](int64_t begin, int64_t end) { k.backward(args, begin, end); });
}

namespace {

// ---------------------------------------------------------------------------------------------
// Meta implementation (shapes only), for calls on meta tensors. torch.compile does not need it:
// it traces the lsr_fused::* ops, whose fake implementations (lsr_fused/ops.py) never call these.

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& weight_total,
                                                double, double, double, int64_t,
                                                const std::optional<at::Tensor>& grad_logits,
                                                const std::optional<at::Tensor>& grad_guess,
                                                double, const std::optional<at::Tensor>&,
                                                const std::optional<at::Tensor>&,
                                                const std::optional<at::Tensor>&,
                                                const std::optional<at::Tensor>&) {
  TORCH_CHECK(logits.dim() == 3, "lsr_fused: logits must be (B, S, C), got ", logits.sizes());
  (void)target;
  (void)weight;
  (void)weight_total;
  if (check_forward_grad_args(grad_logits, grad_guess)) {
    TORCH_CHECK(grad_logits->sym_sizes() == logits.sym_sizes(),
                "lsr_fused: grad_logits must have the logits' shape");
  }
  const auto rows = logits.sym_size(0) * logits.sym_size(1);
  const auto opts = logits.options().dtype(accumulation_type(logits));
  return {at::empty_symint({rows}, opts), at::empty_symint({rows}, opts)};
}

void backward_meta(const at::Tensor&, const at::Tensor& logits, const at::Tensor&,
                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                   const at::Tensor&, double, double, double, int64_t,
                   const at::Tensor& grad_logits, const std::optional<at::Tensor>&, double,
                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(grad_logits.sym_sizes() == logits.sym_sizes(),
              "lsr_fused: grad_logits must have the logits' shape");
}

at::Tensor empty_grad_meta(const at::Tensor& logits) { return at::empty_like(logits); }

}  // namespace
}  // namespace lsr_fused

// The schemas, written once (lsr_fused/backends/cpp_backend.py and its tests refer here).
//
// forward -> (loss, lse): per-row loss and shifted log-sum-exp log(sum exp(x - r)) (accumulation
// dtype) of logits (B, S, C), r being the row's first logit where finite, else 0 (see
// lsr_fused/backends/__init__.py); backward takes that lse back and recomputes r.
// Gradient in forward (training steps, CPU only): given grad_logits and the (1,) grad_guess,
// forward also writes every row's gradient for upstream grad_guess, each row right after its
// statistics while it is still cached.
//
// backward writes the gradient into grad_logits (which may be the logits themselves); given the
// same grad_guess as forward, it rewrites only the rows whose grad_loss differs from it (and reads
// nothing of the others).
TORCH_LIBRARY(lsr_fused_C, m) {
  m.def(
      "forward(Tensor logits, Tensor target, Tensor? weight, Tensor? weight_total, "
      "float target_extra, float other_mass, float z_loss, int ignore_index, "
      "Tensor(a!)? grad_logits=None, Tensor? grad_guess=None, float softcap=0.0, "
      "Tensor? mix_target=None, Tensor? mix_lambda=None, Tensor(b!)? stats_lse=None, "
      "Tensor(c!)? stats_argmax=None) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor? weight_total, Tensor lse, float target_extra, float other_mass, float z_loss, "
      "int ignore_index, Tensor(a!) grad_logits, Tensor? grad_guess=None, float softcap=0.0, "
      "Tensor? mix_target=None, Tensor? mix_lambda=None) -> ()");
  m.def("cpu_capability() -> str", &lsr_fused::cpu_capability);
  m.def("set_cpu_capability(str name) -> str", &lsr_fused::set_cpu_capability);
  // The CPU gradient pool (csrc/grad_pool.h): empty_grad is empty_like(logits) whose memory, for
  // a CPU gradient of at least 1 MiB, comes from and returns to the pool.
  m.def("empty_grad(Tensor logits) -> Tensor");
  m.def("grad_pool_set_max_bytes(int max_bytes) -> int", &lsr_fused::grad_pool::set_max_bytes);
  m.def("grad_pool_trim() -> int", &lsr_fused::grad_pool::trim);
  m.def("grad_pool_stats() -> int[]", &lsr_fused::grad_pool::stats);
}

TORCH_LIBRARY_IMPL(lsr_fused_C, CPU, m) {
  m.impl("forward", &lsr_fused::forward_cpu);
  m.impl("backward", &lsr_fused::backward_cpu);
  m.impl("empty_grad", &lsr_fused::grad_pool::empty_grad);
}

TORCH_LIBRARY_IMPL(lsr_fused_C, Meta, m) {
  m.impl("forward", &lsr_fused::forward_meta);
  m.impl("backward", &lsr_fused::backward_meta);
  m.impl("empty_grad", &lsr_fused::empty_grad_meta);
}
