// Plain argument block shared by the op glue and every kernel (CPU variants and CUDA).
//
// This header deliberately includes no torch header: the CPU kernel translation units are compiled
// for several instruction sets and the CUDA kernels are compiled by nvcc without ATen, so the only
// thing they share with the glue is this struct of raw pointers, int64 extents/strides and scalars.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LSR_HOST_DEVICE __host__ __device__
#else
#define LSR_HOST_DEVICE
#endif

namespace lsr_fused {

// Element type of the logits (and of grad_logits). The accumulation type is double for kFloat64
// and float for every other type; loss, lse, grad_loss, weight and weight_total use it.
enum class LogitsType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct RowArgs {
  LogitsType dtype = LogitsType::kFloat32;

  // logits (B, S, C): row r = b * S + s starts at b * stride_b + s * stride_s (in elements).
  const void* logits = nullptr;
  int64_t batch = 0;
  int64_t inner = 0;
  int64_t num_classes = 0;
  int64_t stride_b = 0;
  int64_t stride_s = 0;
  int64_t stride_c = 1;

  // (B * S,) int64, contiguous.
  const int64_t* target = nullptr;

  // (C,) contiguous, accumulation type, or nullptr (all ones).
  const void* weight = nullptr;
  // (1,) accumulation type: sum(weight); nullptr without weight (then W = C).
  const void* weight_total = nullptr;

  double target_extra = 0.0;  // a - b
  double other_mass = 0.0;    // b
  double z_loss = 0.0;
  int64_t ignore_index = -100;

  // Forward outputs, (B * S,) contiguous, accumulation type.
  void* loss = nullptr;
  void* lse_out = nullptr;

  // Backward inputs, (B * S,) accumulation type with a row stride (0 is allowed).
  const void* grad_loss = nullptr;
  int64_t grad_loss_stride = 1;
  const void* lse_in = nullptr;
  int64_t lse_stride = 1;

  // Backward output (B, S, C), same element type as the logits, may alias them. Also a forward
  // output when set there: the forward then writes the gradient for upstream *grad_guess.
  void* grad = nullptr;
  int64_t grad_stride_b = 0;
  int64_t grad_stride_s = 0;
  int64_t grad_stride_c = 1;
  // CPU: write grad with non-temporal stores (a large output that does not alias the logits).
  bool stream_grad = false;

  // (1,) accumulation type or nullptr. Forward (with grad): the upstream value to write the
  // gradient for. Backward: rows whose grad_loss equals it are left untouched (the forward wrote
  // them already). Read on the device, never on the host, for CUDA.
  const void* grad_guess = nullptr;

  // Options of issue 22 (CPU kernels only; off by default). softcap c > 0: every logit x is read
  // as c * tanh(x / c).
  double softcap = 0.0;
  // Mixed targets: y2, (B * S,) int64 contiguous, and lam, accumulation type with a row stride
  // (0 allowed); nullptr: off. Read only for rows that are not ignored.
  const int64_t* mix_target = nullptr;
  const void* mix_lambda = nullptr;
  int64_t mix_lambda_stride = 0;
  // Forward statistics outputs, nullptr: off. Per row: the absolute log-sum-exp (accumulation
  // type) and the first argmax (int64) of the (capped) logits, each with a row stride.
  void* stats_lse = nullptr;
  int64_t stats_lse_stride = 1;
  int64_t* stats_argmax = nullptr;
  int64_t stats_argmax_stride = 1;

  LSR_HOST_DEVICE int64_t rows() const { return batch * inner; }
};

// CPU kernels: one implementation compiled once per instruction set (see csrc/cpu/). Each processes
// the rows [row_begin, row_end); the caller has already validated the targets.
struct CpuKernels {
  const char* name;
  void (*forward)(const RowArgs& args, int64_t row_begin, int64_t row_end);
  void (*backward)(const RowArgs& args, int64_t row_begin, int64_t row_end);
};

namespace cpu_default {
CpuKernels kernels();
}
namespace cpu_avx2 {
// Returns kernels with name == nullptr when this variant was not compiled in (non-x86, MSVC).
CpuKernels kernels();
}
namespace cpu_avx512 {
CpuKernels kernels();
}

}  // namespace lsr_fused
