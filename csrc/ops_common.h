// Argument checking and RowArgs packing shared by the CPU and CUDA op implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
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

// The mixed-target tensors of a call (undefined when off), kept alive until the kernels are done.
struct MixInputs {
  at::Tensor target;
  at::Tensor lambda;
};

// softcap and the mixed targets (forward and backward alike): checked and packed into args.
inline MixInputs prepare_options(double softcap, const std::optional<at::Tensor>& mix_target,
                                 const std::optional<at::Tensor>& mix_lambda,
                                 const at::Tensor& logits, RowArgs& args) {
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0,
                    "lsr_fused: softcap must be finite and >= 0 (0 = off), got ", softcap);
  args.softcap = softcap;
  MixInputs mix;
  const bool has_target = mix_target.has_value() && mix_target->defined();
  const bool has_lambda = mix_lambda.has_value() && mix_lambda->defined();
  TORCH_CHECK_VALUE(has_target == has_lambda,
                    "lsr_fused: mix_target and mix_lambda go together, got only ",
                    has_target ? "mix_target" : "mix_lambda");
  if (!has_target) return mix;
  const int64_t rows = args.rows();
  check_same_device(*mix_target, logits, "mix_target");
  TORCH_CHECK_VALUE(mix_target->scalar_type() == at::kLong,
                    "lsr_fused: mix_target must be int64, got ", mix_target->scalar_type());
  TORCH_CHECK_VALUE(mix_target->numel() == rows, "lsr_fused: mix_target has ",
                    mix_target->numel(), " elements but logits have ", rows, " rows");
  if (rows == 0) return mix;
  mix.target = mix_target->reshape({-1}).contiguous();
  args.mix_target = mix.target.const_data_ptr<int64_t>();
  mix.lambda = row_vector(*mix_lambda, rows, accumulation_type(logits), logits, "mix_lambda",
                          args.mix_lambda_stride);
  args.mix_lambda = mix.lambda.const_data_ptr();
  return mix;
}

// One (rows,) statistics output: the exact dtype (the kernels write it in place), any stride.
inline void check_stats_output(const at::Tensor& out, at::ScalarType dtype, int64_t rows,
                               const at::Tensor& logits, const char* name) {
  check_same_device(out, logits, name);
  TORCH_CHECK_VALUE(out.scalar_type() == dtype, "lsr_fused: ", name, " must be ", dtype,
                    ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == rows, "lsr_fused: ", name,
                    " must have shape (", rows, ",), got ", out.sizes());
  TORCH_CHECK_VALUE(rows <= 1 || out.stride(0) != 0, "lsr_fused: ", name,
                    " must not be a broadcast (stride 0) view: every row writes its own value");
}

// The forward statistics outputs (both or neither): checked and packed into args. Returns whether
// they are written.
inline bool prepare_stats(const std::optional<at::Tensor>& stats_lse,
                          const std::optional<at::Tensor>& stats_argmax, const at::Tensor& logits,
                          RowArgs& args) {
  const bool has_lse = stats_lse.has_value() && stats_lse->defined();
  const bool has_argmax = stats_argmax.has_value() && stats_argmax->defined();
  TORCH_CHECK_VALUE(has_lse == has_argmax,
                    "lsr_fused: stats_lse and stats_argmax go together, got only ",
                    has_lse ? "stats_lse" : "stats_argmax");
  if (!has_lse) return false;
  const int64_t rows = args.rows();
  check_stats_output(*stats_lse, accumulation_type(logits), rows, logits, "stats_lse");
  check_stats_output(*stats_argmax, at::kLong, rows, logits, "stats_argmax");
  if (rows == 0) return true;
  args.stats_lse = stats_lse->mutable_data_ptr();
  args.stats_lse_stride = stats_lse->stride(0);
  args.stats_argmax = stats_argmax->mutable_data_ptr<int64_t>();
  args.stats_argmax_stride = stats_argmax->stride(0);
  return true;
}

// One forward call, packed: RowArgs plus every tensor its pointers refer to (outputs included),
// which must stay alive until the kernels are done. Shared by the CPU and CUDA ops.
struct ForwardCall {
  RowArgs args;
  PreparedInputs inputs;
  at::Tensor guess;  // undefined unless the gradient is written in forward
  at::Tensor loss;
  at::Tensor lse;
  MixInputs mix;
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
  MixInputs mix;
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
