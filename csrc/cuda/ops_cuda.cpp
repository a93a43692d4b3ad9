// CUDA implementation of the lsr_fused_C ops: argument checks and packing here, kernels in
// kernels.cu (torch-free). Compiled only into CUDA builds (lsr_fused/_build_config.py defines
// LSR_FUSED_WITH_CUDA).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "../lsr_args.h"
#include "../ops_common.h"
#include "launch.h"

namespace lsr_fused {
namespace {

void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, "lsr_fused: CUDA ", what, " kernel launch failed: ",
              cuda::error_string(error));
}

// The CUDA kernels implement none of issue 22's options (lsr_fused/backends/cpp_backend.py
// declines them before calling; this is the op-level guard).
void check_no_options(double softcap, const std::optional<at::Tensor>& mix_target,
                      const std::optional<at::Tensor>& mix_lambda) {
  TORCH_CHECK_NOT_IMPLEMENTED(softcap == 0.0,
                              "lsr_fused: softcap is not supported by the CUDA C++ kernels; use "
                              "backend='triton' or 'torch'");
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(mix_target.has_value() && mix_target->defined()) &&
          !(mix_lambda.has_value() && mix_lambda->defined()),
      "lsr_fused: mix is not supported by the CUDA C++ kernels; use backend='triton' or 'torch'");
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& target,
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
  check_no_options(softcap, mix_target, mix_lambda);
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(stats_lse.has_value() && stats_lse->defined()) &&
          !(stats_argmax.has_value() && stats_argmax->defined()),
      "lsr_fused: stats is not supported by the CUDA C++ kernels; use backend='triton' or "
      "'torch'");
  // The gradient-in-forward path is CPU-only (cpp_backend.WRITES_GRAD_IN_FORWARD): on CUDA the
  // Triton backend writes it, and the C++ kernels compute the gradient in backward.
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(grad_logits.has_value() && grad_logits->defined()) &&
          !(grad_guess.has_value() && grad_guess->defined()),
      "lsr_fused: the CUDA C++ forward does not write the gradient (grad_logits and grad_guess "
      "are CPU-only); call backward instead");
  const c10::cuda::CUDAGuard guard(logits.device());
  ForwardCall call = prepare_forward(logits, target, weight, weight_total, target_extra,
                                     other_mass, z_loss, ignore_index, grad_logits, grad_guess);
  if (call.args.rows() == 0) return {call.loss, call.lse};
  check_launch(cuda::launch_forward(call.args, c10::cuda::getCurrentCUDAStream().stream()),
               "forward");
  return {call.loss, call.lse};
}

void backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& weight_total, const at::Tensor& lse,
                   double target_extra, double other_mass, double z_loss, int64_t ignore_index,
                   const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_guess,
                   double softcap, const std::optional<at::Tensor>& mix_target,
                   const std::optional<at::Tensor>& mix_lambda) {
  check_no_options(softcap, mix_target, mix_lambda);
  const c10::cuda::CUDAGuard guard(logits.device());
  BackwardCall call = prepare_backward(grad_loss, logits, target, weight, weight_total, lse,
                                       target_extra, other_mass, z_loss, ignore_index, grad_logits,
                                       grad_guess);
  if (call.args.rows() == 0) return;
  check_launch(cuda::launch_backward(call.args, c10::cuda::getCurrentCUDAStream().stream()),
               "backward");
}

}  // namespace
}  // namespace lsr_fused

TORCH_LIBRARY_IMPL(lsr_fused_C, CUDA, m) {
  m.impl("forward", &lsr_fused::forward_cuda);
  m.impl("backward", &lsr_fused::backward_cuda);
}
