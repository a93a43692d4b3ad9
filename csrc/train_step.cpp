// lsr_fused_C::train_step: the whole "sum" / "mean" loss of (N, C) CPU logits, with its autograd
// node, in C++.
//
// Why: at the shapes of image classification (C = 10 or 1000, a few hundred rows) a training step
// costs tens of microseconds, and the Python around the kernels (checks, row view, mean
// denominator, an autograd.Function and its Python backward) cost more than the kernels. This op
// is the same computation as the Python route of lsr_fused/functional.py for the plain options
// (class weights that need no gradient; no mixed targets, softcap or statistics; not in place):
// the same kernels
// (forward_cpu / backward_cpu of ops.cpp), the same ATen reductions in the same order, hence the
// same bits. lsr_fused/fast_step.py decides when a call may take it (eager CPU calls on plain
// tensors) and tests/test_fast_step.py compares the two routes bit for bit.
//
// Forward: loss = sum_r l_r [/ d], d = sum of w[y_r] over r with y_r != ignore_index (their count
// without weights), and, when the
// logits require grad, the gradient for the upstream value backward() sends (1, or 1 / d) is
// written in the same pass (row by row, while the row is in cache). Backward for an upstream g:
// every row's upstream is u = g [/ d]; when u equals that guess the forward's gradient is the
// answer; otherwise the kernel rewrites the rows (all of them: they share u). A second backward
// (retain_graph) redoes the forward's gradient first, so that repeated backward passes agree
// bitwise. Under create_graph=True the gradient is the composite's (lsr_fused/composite.py),
// reached through the lsr_fused::composite_logits_grad op so that the formula lives once.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "cpu_ops.h"
#include "grad_pool.h"

namespace lsr_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The (N, 1, C) row view the kernels read: the logits themselves when every row is dense in its
// classes (gaps between rows allowed), else a contiguous copy; the rule of policy.row_view.
at::Tensor row_view(const at::Tensor& logits) {
  const int64_t num_classes = logits.size(1);
  const bool unit_class_stride = logits.stride(1) == 1 || num_classes == 1;
  const bool rows_apart = logits.size(0) <= 1 || logits.stride(0) >= num_classes;
  const bool keep = logits.is_non_overlapping_and_dense() || (unit_class_stride && rows_apart);
  return (keep ? logits : logits.contiguous()).unsqueeze(1);
}

// The scalar options, as the training step carries them from forward to backward.
struct StepOptions {
  double target_extra;
  double other_mass;
  double z_loss;
  int64_t ignore_index;
};

// Class weights as the kernels read them (policy.class_weights): in the accumulation type,
// contiguous, with their (1,) sum; both undefined without weights.
struct ClassWeights {
  at::Tensor weight;
  at::Tensor total;

  ClassWeights() = default;
  ClassWeights(const std::optional<at::Tensor>& given, at::ScalarType acc) {
    if (!given.has_value() || !given->defined()) return;
    weight = given->to(acc).contiguous();
    total = weight.sum().reshape({1});
  }
  std::optional<at::Tensor> weight_or_none() const {
    return weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt;
  }
  std::optional<at::Tensor> total_or_none() const {
    return total.defined() ? std::optional<at::Tensor>(total) : std::nullopt;
  }
};

std::tuple<at::Tensor, at::Tensor> kernel_forward(const at::Tensor& rows, const at::Tensor& target,
                                                  const ClassWeights& w, const StepOptions& o,
                                                  const std::optional<at::Tensor>& grad,
                                                  const std::optional<at::Tensor>& guess) {
  return forward_cpu(rows, target, w.weight_or_none(), w.total_or_none(), o.target_extra,
                     o.other_mass, o.z_loss, o.ignore_index, grad, guess, 0.0, std::nullopt,
                     std::nullopt, std::nullopt, std::nullopt);
}

// sum_r l_r [/ d]: the ATen ops of policy.reduce, in its order.
at::Tensor reduced(const at::Tensor& row_loss, const at::Tensor& denominator) {
  at::Tensor total = row_loss.sum();
  return denominator.defined() ? at::div(total, denominator) : total;
}

// d of "mean" as policy.mean_denominator computes it, in its order of ATen ops (undefined for
// "sum"). The clamp keeps a bad target from indexing out of bounds; the kernel refuses it anyway.
at::Tensor mean_denominator(const at::Tensor& target, const ClassWeights& w, int64_t num_classes,
                            int64_t ignore_index, bool mean, at::ScalarType acc) {
  if (!mean) return at::Tensor();
  const at::Tensor counted = target.ne(ignore_index);
  if (!w.weight.defined()) return counted.sum(acc);
  return at::mul(w.weight.gather(0, target.clamp(0, num_classes - 1)), counted).sum();
}

// The upstream value of every row when backward() starts from 1: 1 or 1 / d (IEEE reciprocal,
// as the backward's g / d is for g = 1).
at::Tensor upstream_guess(const at::Tensor& denominator, const at::Tensor& logits,
                          at::ScalarType acc) {
  if (!denominator.defined()) return at::ones({1}, logits.options().dtype(acc));
  return denominator.reshape({1}).reciprocal();
}

at::Tensor composite_gradient(const at::Tensor& upstream, const at::Tensor& logits,
                              const at::Tensor& target, const ClassWeights& w,
                              const StepOptions& o) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lsr_fused::composite_logits_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::ArrayRef<double>, int64_t)>();
  const std::vector<double> params = {o.target_extra, o.other_mass, o.z_loss, 0.0};
  return op.call(upstream, logits, target, w.weight_or_none(), params, o.ignore_index);
}

at::ScalarType accumulation_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The forward's gradient, handed to autograd once: a second backward (retain_graph) finds it gone.
at::Tensor take_saved_gradient(AutogradContext* ctx) {
  at::Tensor grad;
  const auto saved = ctx->saved_data.find("grad");
  if (saved != ctx->saved_data.end()) {
    grad = saved->second.toTensor();
    ctx->saved_data.erase(saved);
  }
  return grad;
}

struct TrainStep : public torch::autograd::Function<TrainStep> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            double target_extra, double other_mass, double z_loss,
                            int64_t ignore_index, bool mean) {
    const StepOptions o{target_extra, other_mass, z_loss, ignore_index};
    const at::ScalarType acc = accumulation_of(logits);
    const ClassWeights w(weight, acc);
    const at::Tensor rows = row_view(logits);
    const at::Tensor denominator =
        mean_denominator(target, w, logits.size(1), ignore_index, mean, acc);
    const at::Tensor guess = upstream_guess(denominator, logits, acc);
    at::Tensor grad = grad_pool::empty_grad(rows);
    auto [row_loss, lse] = kernel_forward(rows, target, w, o, grad, guess);
    ctx->save_for_backward({logits, target, lse, guess, w.weight, w.total});
    ctx->saved_data["grad"] = grad;
    if (denominator.defined()) ctx->saved_data["denominator"] = denominator;
    ctx->saved_data["options"] = std::vector<double>{target_extra, other_mass, z_loss};
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->set_materialize_grads(false);
    return reduced(row_loss, denominator);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(8);
    const at::Tensor& grad_total = grad_outputs[0];
    if (!grad_total.defined()) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &target = saved[1], &lse = saved[2], &guess = saved[3];
    ClassWeights w;
    w.weight = saved[4];
    w.total = saved[5];
    const std::vector<double> scalars = ctx->saved_data["options"].toDoubleVector();
    const StepOptions o{scalars[0], scalars[1], scalars[2], ctx->saved_data["ignore_index"].toInt()};
    const auto saved_denominator = ctx->saved_data.find("denominator");
    at::Tensor upstream = saved_denominator == ctx->saved_data.end()
                              ? grad_total
                              : at::div(grad_total, saved_denominator->second.toTensor());
    upstream = upstream.reshape({1});
    const int64_t num_rows = logits.size(0);
    if (at::GradMode::is_enabled()) {
      grads[0] = composite_gradient(upstream.expand({num_rows}), logits, target, w, o);
      return grads;
    }
    at::Tensor grad = take_saved_gradient(ctx);
    const at::Tensor rows = row_view(logits);
    if (grad.defined() && at::equal(upstream, guess)) {
      grads[0] = grad.view(logits.sizes());
      return grads;
    }
    if (!grad.defined()) {
      grad = grad_pool::empty_grad(rows);
      kernel_forward(rows, target, w, o, grad, guess);
    }
    backward_cpu(upstream.expand({num_rows}), rows, target, w.weight_or_none(), w.total_or_none(),
                 lse, o.target_extra, o.other_mass, o.z_loss, o.ignore_index, grad, guess, 0.0,
                 std::nullopt, std::nullopt);
    grads[0] = grad.view(logits.sizes());
    return grads;
  }
};

void check_step_inputs(const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "lsr_fused: train_step takes (N, C) logits, got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0) &&
                        target.scalar_type() == at::kLong && target.is_contiguous(),
                    "lsr_fused: train_step takes (N,) contiguous int64 targets");
  TORCH_CHECK_VALUE(!weight.has_value() || !weight->defined() ||
                        (weight->dim() == 1 && weight->size(0) == logits.size(1) &&
                         !weight->requires_grad()),
                    "lsr_fused: train_step takes (C,) class weights that need no gradient");
}

// No autograd (the logits do not require grad, grad mode is off, or inference mode): the loss.
at::Tensor train_step_loss(const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, double target_extra,
                           double other_mass, double z_loss, int64_t ignore_index, bool mean) {
  check_step_inputs(logits, target, weight);
  const StepOptions o{target_extra, other_mass, z_loss, ignore_index};
  const at::ScalarType acc = accumulation_of(logits);
  const ClassWeights w(weight, acc);
  const at::Tensor denominator =
      mean_denominator(target, w, logits.size(1), ignore_index, mean, acc);
  auto [row_loss, lse] = kernel_forward(row_view(logits), target, w, o, std::nullopt, std::nullopt);
  return reduced(row_loss, denominator);
}

at::Tensor train_step_autograd(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double target_extra,
                               double other_mass, double z_loss, int64_t ignore_index, bool mean) {
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return train_step_loss(logits, target, weight, target_extra, other_mass, z_loss, ignore_index,
                           mean);
  }
  check_step_inputs(logits, target, weight);
  return TrainStep::apply(logits, target, weight, target_extra, other_mass, z_loss, ignore_index,
                          mean);
}

}  // namespace
}  // namespace lsr_fused

TORCH_LIBRARY_FRAGMENT(lsr_fused_C, m) {
  m.def(
      "train_step(Tensor logits, Tensor target, Tensor? weight, float target_extra, "
      "float other_mass, float z_loss, int ignore_index, bool mean) -> Tensor");
}

TORCH_LIBRARY_IMPL(lsr_fused_C, CPU, m) { m.impl("train_step", &lsr_fused::train_step_loss); }

TORCH_LIBRARY_IMPL(lsr_fused_C, Autograd, m) {
  m.impl("train_step", &lsr_fused::train_step_autograd);
}
