// The CPU implementations of lsr_fused_C::forward and lsr_fused_C::backward (ops.cpp), for the
// other translation units that call them directly (train_step.cpp), without the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace lsr_fused {

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
                                               const std::optional<at::Tensor>& stats_argmax);

void backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& weight_total, const at::Tensor& lse,
                  double target_extra, double other_mass, double z_loss, int64_t ignore_index,
                  const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_guess,
                  double softcap, const std::optional<at::Tensor>& mix_target,
                  const std::optional<at::Tensor>& mix_lambda);

}  // namespace lsr_fused
