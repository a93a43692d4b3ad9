// Host entry points of the CUDA kernels (csrc/cuda/kernels.cu). Torch-free on purpose: kernels.cu
// is compiled by nvcc with nothing but the CUDA toolkit headers and csrc/lsr_args.h, and the torch
// glue (csrc/cuda/ops_cuda.cpp) only sees these declarations.
#pragma once

#include "../lsr_args.h"

namespace lsr_fused {
namespace cuda {

// Both return a cudaError_t value (0 == cudaSuccess). `stream` is a cudaStream_t.
// The launch is asynchronous; invalid targets produce NaN loss/gradient rows, never a trap.
int launch_forward(const RowArgs& args, void* stream);
int launch_backward(const RowArgs& args, void* stream);

const char* error_string(int error);

}  // namespace cuda
}  // namespace lsr_fused
