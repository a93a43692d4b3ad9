// Argument checking and RowArgs packing shared by the CPU and CUDA op implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "lsr_args.h"

namespace lsr_fused {

inline LogitsType logits_type(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return LogitsType::kFloat32;
    case at::kDouble:
      return LogitsType::kFloat64;
    case at::kHalf:
      return LogitsType::kFloat16;
    case at::kBFloat16:
      return LogitsType::kBFloat16;
    default:
      TORCH_CHECK(false, "lsr_fused: logits must be float16, bfloat16, float32 or float64, got ",
                  logits.scalar_type());
  }
}

inline at::ScalarType accumulation_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Tensors kept alive for the duration of a call (converted/contiguous copies of the inputs).
struct PreparedInputs {
  at::Tensor logits;
  at::Tensor target;
  at::Tensor weight;        // undefined when absent
  at::Tensor weight_total;  // undefined when absent
};

inline void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), "lsr_fused: ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
}

inline PreparedInputs prepare_inputs(const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& weight_total,
                                     RowArgs& args) {
  TORCH_CHECK(logits.dim() == 3, "lsr_fused: logits must be (B, S, C), got ", logits.sizes());
  PreparedInputs p;
  p.logits = logits;
  args.dtype = logits_type(logits);
  const at::ScalarType acc = accumulation_type(logits);
  args.batch = logits.size(0);
  args.inner = logits.size(1);
  args.num_classes = logits.size(2);
  args.stride_b = logits.stride(0);
  args.stride_s = logits.stride(1);
  args.stride_c = logits.stride(2);
  args.logits = logits.const_data_ptr();

  check_same_device(target, logits, "target");
  TORCH_CHECK(target.scalar_type() == at::kLong, "lsr_fused: target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.numel() == args.rows(), "lsr_fused: target has ", target.numel(),
              " elements but logits have ", args.rows(), " rows");
  p.target = target.contiguous();
  args.target = p.target.const_data_ptr<int64_t>();

  if (weight.has_value() && weight->defined()) {
    check_same_device(*weight, logits, "weight");
    TORCH_CHECK(weight->numel() == args.num_classes, "lsr_fused: weight has ", weight->numel(),
                " elements but there are ", args.num_classes, " classes");
    p.weight = weight->reshape({-1}).to(acc).contiguous();
    args.weight = p.weight.const_data_ptr();
    if (weight_total.has_value() && weight_total->defined()) {
      check_same_device(*weight_total, logits, "weight_total");
      TORCH_CHECK(weight_total->numel() == 1, "lsr_fused: weight_total must hold one value");
      p.weight_total = weight_total->reshape({1}).to(acc).contiguous();
    } else {
      p.weight_total = p.weight.sum().reshape({1});
    }
    args.weight_total = p.weight_total.const_data_ptr();
  }
  return p;
}

inline void set_scalars(RowArgs& args, double target_extra, double other_mass, double z_loss,
                        int64_t ignore_index) {
  args.target_extra = target_extra;
  args.other_mass = other_mass;
  args.z_loss = z_loss;
  args.ignore_index = ignore_index;
}

// A (rows,) accumulation-type vector with a single stride (0 allowed). Converts when needed.
inline at::Tensor row_vector(const at::Tensor& t, int64_t rows, at::ScalarType acc,
                             const at::Tensor& logits, const char* name, int64_t& stride) {
  check_same_device(t, logits, name);
  TORCH_CHECK(t.numel() == rows || t.numel() == 1, "lsr_fused: ", name, " has ", t.numel(),
              " elements, expected ", rows);
  at::Tensor v = t.scalar_type() == acc ? t : t.to(acc);
  if (v.numel() == 1 && rows != 1) {
    v = v.reshape({1});
    stride = 0;
    return v;
  }
  if (v.dim() != 1) v = v.reshape({-1});
  stride = v.stride(0);
  return v;
}

inline void check_grad_logits(const at::Tensor& grad_logits, const at::Tensor& logits,
                              RowArgs& args) {
  check_same_device(grad_logits, logits, "grad_logits");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "lsr_fused: grad_logits has shape ",
              grad_logits.sizes(), " but logits have ", logits.sizes());
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(),
              "lsr_fused: grad_logits must have the logits' dtype ", logits.scalar_type(),
              ", got ", grad_logits.scalar_type());
  args.grad = grad_logits.mutable_data_ptr();
  args.grad_stride_b = grad_logits.stride(0);
  args.grad_stride_s = grad_logits.stride(1);
  args.grad_stride_c = grad_logits.stride(2);
}

// The optional (1,) upstream guess of the gradient-in-forward path, converted to the accumulation
// type (kept alive by the returned tensor; undefined when absent). Never read on the host here.
inline at::Tensor prepare_guess(const std::optional<at::Tensor>& grad_guess,
                                const at::Tensor& logits, RowArgs& args) {
  if (!grad_guess.has_value() || !grad_guess->defined()) return at::Tensor();
  check_same_device(*grad_guess, logits, "grad_guess");
  TORCH_CHECK(grad_guess->numel() == 1, "lsr_fused: grad_guess must hold one value, got ",
              grad_guess->numel());
  at::Tensor guess = grad_guess->reshape({1}).to(accumulation_type(logits)).contiguous();
  args.grad_guess = guess.const_data_ptr();
  return guess;
}

// Forward arguments of the gradient-in-forward path: both grad_logits and grad_guess, or neither.
// Returns whether the forward writes the gradient.
inline bool check_forward_grad_args(const std::optional<at::Tensor>& grad_logits,
                                    const std::optional<at::Tensor>& grad_guess) {
  const bool has_grad = grad_logits.has_value() && grad_logits->defined();
  const bool has_guess = grad_guess.has_value() && grad_guess->defined();
  TORCH_CHECK(has_grad == has_guess,
              "lsr_fused: forward takes grad_logits and grad_guess together (the gradient is "
              "written for upstream grad_guess), got only ",
              has_grad ? "grad_logits" : "grad_guess");
  return has_grad;
}

// One forward call, packed: RowArgs plus every tensor its pointers refer to (outputs included),
// which must stay alive until the kernels are done. Shared by the CPU and CUDA ops.
struct ForwardCall {
  RowArgs args;
  PreparedInputs inputs;
  at::Tensor guess;  // undefined unless the gradient is written in forward
  at::Tensor loss;
  at::Tensor lse;
  bool write_grad = false;
};

inline ForwardCall prepare_forward(const at::Tensor& logits, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& weight_total,
                                   double target_extra, double other_mass, double z_loss,
                                   int64_t ignore_index,
                                   const std::optional<at::Tensor>& grad_logits,
                                   const std::optional<at::Tensor>& grad_guess) {
  ForwardCall call;
  call.inputs = prepare_inputs(logits, target, weight, weight_total, call.args);
  set_scalars(call.args, target_extra, other_mass, z_loss, ignore_index);
  call.write_grad = check_forward_grad_args(grad_logits, grad_guess);
  if (call.write_grad) {
    check_grad_logits(*grad_logits, logits, call.args);
    call.guess = prepare_guess(grad_guess, logits, call.args);
  }
  const auto opts = logits.options().dtype(accumulation_type(logits));
  call.loss = at::empty({call.args.rows()}, opts);
  call.lse = at::empty({call.args.rows()}, opts);
  call.args.loss = call.loss.mutable_data_ptr();
  call.args.lse_out = call.lse.mutable_data_ptr();
  return call;
}

// One backward call, packed like ForwardCall; grad_logits belongs to the caller.
struct BackwardCall {
  RowArgs args;
  PreparedInputs inputs;
  at::Tensor guess;      // undefined unless rows matching the guess are skipped
  at::Tensor grad_loss;  // accumulation-type copies when the inputs had another dtype
  at::Tensor lse;
};

inline BackwardCall prepare_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                     const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& weight_total,
                                     const at::Tensor& lse, double target_extra,
                                     double other_mass, double z_loss, int64_t ignore_index,
                                     const at::Tensor& grad_logits,
                                     const std::optional<at::Tensor>& grad_guess) {
  BackwardCall call;
  call.inputs = prepare_inputs(logits, target, weight, weight_total, call.args);
  set_scalars(call.args, target_extra, other_mass, z_loss, ignore_index);
  check_grad_logits(grad_logits, logits, call.args);
  call.guess = prepare_guess(grad_guess, logits, call.args);
  const int64_t rows = call.args.rows();
  if (rows == 0) return call;
  const at::ScalarType acc = accumulation_type(logits);
  call.grad_loss =
      row_vector(grad_loss, rows, acc, logits, "grad_loss", call.args.grad_loss_stride);
  call.lse = row_vector(lse, rows, acc, logits, "lse", call.args.lse_stride);
  call.args.grad_loss = call.grad_loss.const_data_ptr();
  call.args.lse_in = call.lse.const_data_ptr();
  return call;
}

}  // namespace lsr_fused
