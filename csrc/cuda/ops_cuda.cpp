// CUDA implementation of the lsr_fused_C ops: argument checks and packing here, kernels in
// kernels.cu (torch-free). Compiled only into CUDA builds (setup.py defines LSR_FUSED_WITH_CUDA).
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

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& weight_total,
                                                double target_extra, double other_mass,
                                                double z_loss, int64_t ignore_index,
                                                const std::optional<at::Tensor>& grad_logits,
                                                const std::optional<at::Tensor>& grad_guess) {
  const c10::cuda::CUDAGuard guard(logits.device());
  RowArgs args;
  PreparedInputs keep = prepare_inputs(logits, target, weight, weight_total, args);
  set_scalars(args, target_extra, other_mass, z_loss, ignore_index);
  at::Tensor guess;
  if (check_forward_grad_args(grad_logits, grad_guess)) {
    check_grad_logits(*grad_logits, logits, args);
    guess = prepare_guess(grad_guess, logits, args);  // read by the kernel, on the device
  }
  const int64_t rows = args.rows();
  const auto opts = logits.options().dtype(accumulation_type(logits));
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor lse = at::empty({rows}, opts);
  if (rows == 0) return {loss, lse};
  args.loss = loss.mutable_data_ptr();
  args.lse_out = lse.mutable_data_ptr();
  check_launch(cuda::launch_forward(args, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return {loss, lse};
}

void backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& weight_total, const at::Tensor& lse,
                   double target_extra, double other_mass, double z_loss, int64_t ignore_index,
                   const at::Tensor& grad_logits, const std::optional<at::Tensor>& grad_guess) {
  const c10::cuda::CUDAGuard guard(logits.device());
  RowArgs args;
  PreparedInputs keep = prepare_inputs(logits, target, weight, weight_total, args);
  set_scalars(args, target_extra, other_mass, z_loss, ignore_index);
  check_grad_logits(grad_logits, logits, args);
  const at::Tensor guess = prepare_guess(grad_guess, logits, args);
  const int64_t rows = args.rows();
  if (rows == 0) return;
  const at::ScalarType acc = accumulation_type(logits);
  at::Tensor g = row_vector(grad_loss, rows, acc, logits, "grad_loss", args.grad_loss_stride);
  at::Tensor l = row_vector(lse, rows, acc, logits, "lse", args.lse_stride);
  args.grad_loss = g.const_data_ptr();
  args.lse_in = l.const_data_ptr();
  check_launch(cuda::launch_backward(args, c10::cuda::getCurrentCUDAStream().stream()),
               "backward");
}

}  // namespace
}  // namespace lsr_fused

TORCH_LIBRARY_IMPL(lsr_fused_C, CUDA, m) {
  m.impl("forward", &lsr_fused::forward_cuda);
  m.impl("backward", &lsr_fused::backward_cuda);
}
