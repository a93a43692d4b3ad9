// CUDA row kernels of the fused label-smoothed cross-entropy.
//
// One thread block per row (grid-stride over rows): each thread keeps an online (max, sum-exp)
// pair plus the (weighted) sum of its logits, the block merges them, and thread 0 writes loss and
// lse. The backward recomputes softmax from the stored lse and writes every gradient once. With
// RowArgs::grad set, the forward block also writes its row's gradient for upstream *grad_guess
// right after the statistics (a second, mostly L2-resident read of the row), and the backward given
// the same grad_guess skips the rows whose upstream equals it. float32
// accumulation (float64 for float64 logits), int64 offsets, 16-byte vector loads when a row is
// contiguous and aligned. Targets outside [0, C) (other than ignore_index) give NaN loss/gradient
// rows and are never used as an index.
//
// This file includes no torch header (only the CUDA toolkit and lsr_args.h), so that it compiles
// with any torch build; the op glue lives in ops_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace lsr_fused {
namespace cuda {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}
template <typename A>
__device__ __forceinline__ A pos_inf() {
  return static_cast<A>(INFINITY);
}
template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return static_cast<A>(NAN);
}

// Elements per 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union Pack {
    uint4 raw;
    T v[kSize];
  };
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Per-thread online statistics of a row.
template <typename A>
struct Stats {
  A m;     // running max
  A s;     // sum of exp(x - m)
  A sumx;  // sum of (weighted) logits
  int nan;

  __device__ __forceinline__ void init() {
    m = neg_inf<A>();
    s = A(0);
    sumx = A(0);
    nan = 0;
  }

  // -inf-safe: an element equal to -inf never evaluates exp(-inf - -inf).
  __device__ __forceinline__ void add(A x) {
    if (x > m) {
      s = s * acc_exp(m - x) + A(1);  // m == -inf -> s * 0 + 1
      m = x;
    } else if (x != neg_inf<A>()) {
      s += acc_exp(x - m);  // NaN x (or +inf == m) poisons s; handled by `nan` / the +inf rule
    }
    nan |= (x != x);
  }

  __device__ __forceinline__ void merge(A om, A os, A osumx, int onan) {
    const A nm = om > m ? om : m;
    if (nm == neg_inf<A>() || nm == pos_inf<A>()) {
      s = s + os;  // both empty (0) or lse = +inf anyway
    } else {
      s = s * acc_exp(m - nm) + os * acc_exp(om - nm);
    }
    m = nm;
    sumx += osumx;
    nan |= onan;
  }

  __device__ __forceinline__ A lse() const {
    if (nan) return quiet_nan<A>();
    if (m == neg_inf<A>() || m == pos_inf<A>()) return m;
    return m + acc_log(s);
  }
};

template <typename A>
__device__ __forceinline__ void warp_merge(Stats<A>& st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A om = __shfl_xor_sync(0xffffffffu, st.m, offset);
    const A os = __shfl_xor_sync(0xffffffffu, st.s, offset);
    const A ox = __shfl_xor_sync(0xffffffffu, st.sumx, offset);
    const int on = __shfl_xor_sync(0xffffffffu, st.nan, offset);
    st.merge(om, os, ox, on);
  }
}

// Reduces the block's statistics into thread 0 (other threads' results are unspecified).
template <typename A, int kThreads>
__device__ __forceinline__ void block_merge(Stats<A>& st) {
  constexpr int kWarps = kThreads / 32;
  __shared__ A sm[kWarps];
  __shared__ A ss[kWarps];
  __shared__ A sx[kWarps];
  __shared__ int sn[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  warp_merge(st);
  if (kWarps == 1) return;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sx[warp] = st.sumx;
    sn[warp] = st.nan;
  }
  __syncthreads();
  if (warp == 0) {
    if (lane < kWarps) {
      st.m = sm[lane];
      st.s = ss[lane];
      st.sumx = sx[lane];
      st.nan = sn[lane];
    } else {
      st.init();
    }
    warp_merge(st);
  }
  __syncthreads();  // the shared slots are reused by the next row
}

struct RowPos {
  int64_t in_offset;
  int64_t out_offset;
};

__device__ __forceinline__ RowPos row_pos(const RowArgs& a, int64_t r) {
  const int64_t b = r / a.inner;
  const int64_t s = r - b * a.inner;
  return RowPos{b * a.stride_b + s * a.stride_s, b * a.grad_stride_b + s * a.grad_stride_s};
}

// minBlocksPerMultiprocessor for __launch_bounds__. With kThreads alone, ptxas (CUDA 13) picks its
// own register target (as low as 32-40 for some of these kernels, below the 128 allowed) and spills
// loop-invariant row constants to local memory (4-24 bytes: STL before the grid-stride loop, LDL
// inside it, around the 64-bit r / inner subroutine call). Asking for 1024 resident threads per SM
// instead fixes the budget at 64 registers (32 warps per SM), which every float/half/bfloat16
// kernel fits without spilling; the float64 ones (two registers per value) need more and get 128.
template <typename T, int kThreads>
constexpr int kMinBlocks = (sizeof(typename AccOf<T>::type) == 8 ? 512 : 1024) / kThreads;

// Writes one row of the gradient for upstream g; called by every thread of the block with the same
// arguments. Ignored rows get zeros, invalid targets NaN.
template <typename T, bool kWeighted, int kThreads>
__device__ __forceinline__ void write_grad_row(const RowArgs& a, const T* row, T* out, int64_t y,
                                               typename AccOf<T>::type g,
                                               typename AccOf<T>::type lse) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = Vec<T>::kSize;
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const int64_t sc = a.stride_c;
  const int64_t gsc = a.grad_stride_c;
  const bool ignored = y == a.ignore_index;
  const bool invalid = !ignored && (y < 0 || y >= C);
  if (ignored || invalid) {
    const T fill = from_acc<T>(ignored ? A(0) : quiet_nan<A>());
    for (int64_t i = threadIdx.x; i < C; i += kThreads) out[i * gsc] = fill;
    return;
  }
  const A w_y = w != nullptr ? w[y] : A(1);
  const A total_w = a.weight_total != nullptr ? *static_cast<const A*>(a.weight_total)
                                              : static_cast<A>(C);
  const A total_mass = static_cast<A>(a.other_mass) * total_w +
                       static_cast<A>(a.target_extra) * w_y;
  const A coef = g * (total_mass + static_cast<A>(2.0 * a.z_loss) * lse);
  const A gb = g * static_cast<A>(a.other_mass);
  const A gt = g * static_cast<A>(a.target_extra) * w_y;
  auto grad_at = [&](A x, int64_t i) -> A {
    A gi = coef * acc_exp(x - lse);
    if constexpr (kWeighted) {
      gi -= gb * w[i];
    } else {
      gi -= gb;
    }
    if (i == y) gi -= gt;
    return gi;
  };
  if (sc == 1 && gsc == 1 && aligned16(row) && aligned16(out)) {
    const int64_t nvec = C / kVec;
    const uint4* vin = reinterpret_cast<const uint4*>(row);
    uint4* vout = reinterpret_cast<uint4*>(out);
    for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
      typename Vec<T>::Pack pin, pout;
      pin.raw = vin[v];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        pout.v[j] = from_acc<T>(grad_at(to_acc(pin.v[j]), v * kVec + j));
      }
      vout[v] = pout.raw;
    }
    for (int64_t i = nvec * kVec + threadIdx.x; i < C; i += kThreads) {
      out[i] = from_acc<T>(grad_at(to_acc(row[i]), i));
    }
  } else {
    for (int64_t i = threadIdx.x; i < C; i += kThreads) {
      out[i * gsc] = from_acc<T>(grad_at(to_acc(row[i * sc]), i));
    }
  }
}

// kSum: 0 = no logit sum (other_mass == 0), 1 = plain sum, 2 = weighted sum.
template <typename T, int kSum, int kThreads>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, kThreads>))
    forward_kernel(const RowArgs a) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = Vec<T>::kSize;
  const T* logits = static_cast<const T*>(a.logits);
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const int64_t sc = a.stride_c;
  const int64_t rows = a.rows();
  A* loss_out = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse_out);
  T* grad = static_cast<T*>(a.grad);
  const A guess = grad != nullptr ? *static_cast<const A*>(a.grad_guess) : A(0);
  __shared__ A row_lse;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const RowPos pos = row_pos(a, r);
    const T* row = logits + pos.in_offset;
    Stats<A> st;
    st.init();
    auto visit = [&](A x, int64_t i) {
      st.add(x);
      if constexpr (kSum == 1) st.sumx += x;
      if constexpr (kSum == 2) st.sumx += x * w[i];
    };
    if (sc == 1 && aligned16(row)) {
      const int64_t nvec = C / kVec;
      const uint4* vrow = reinterpret_cast<const uint4*>(row);
      for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
        typename Vec<T>::Pack pack;
        pack.raw = vrow[v];
#pragma unroll
        for (int j = 0; j < kVec; ++j) visit(to_acc(pack.v[j]), v * kVec + j);
      }
      for (int64_t i = nvec * kVec + threadIdx.x; i < C; i += kThreads) visit(to_acc(row[i]), i);
    } else {
      for (int64_t i = threadIdx.x; i < C; i += kThreads) visit(to_acc(row[i * sc]), i);
    }
    block_merge<A, kThreads>(st);

    if (threadIdx.x == 0) {
      const int64_t y = a.target[r];
      const bool ignored = y == a.ignore_index;
      const bool invalid = !ignored && (y < 0 || y >= C);
      const A lse = st.lse();
      double loss;
      if (ignored) {
        loss = 0.0;
      } else if (invalid) {
        loss = quiet_nan<double>();
      } else {
        const double w_y = w != nullptr ? static_cast<double>(w[y]) : 1.0;
        const double total_w = a.weight_total != nullptr
                                   ? static_cast<double>(*static_cast<const A*>(a.weight_total))
                                   : static_cast<double>(C);
        const double total_mass = a.other_mass * total_w + a.target_extra * w_y;
        const double l = static_cast<double>(lse);
        loss = total_mass * l;
        if (a.other_mass != 0.0) loss -= a.other_mass * static_cast<double>(st.sumx);
        if (a.target_extra != 0.0) {
          loss -= a.target_extra * w_y * static_cast<double>(to_acc(row[y * sc]));
        }
        if (a.z_loss != 0.0) loss += a.z_loss * l * l;
      }
      loss_out[r] = static_cast<A>(loss);
      lse_out[r] = lse;
      row_lse = lse;
    }
    if (grad != nullptr) {  // uniform over the grid: the barriers below are reached by all
      __syncthreads();
      // kSum == 2 exactly when the gradient has a weighted smoothing term (weight and b != 0).
      write_grad_row<T, (kSum == 2), kThreads>(a, row, grad + pos.out_offset, a.target[r], guess,
                                             row_lse);
      __syncthreads();  // row_lse is rewritten for the next row
    }
  }
}

template <typename T, bool kWeighted, int kThreads>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, kThreads>))
    backward_kernel(const RowArgs a) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const A* grad_loss = static_cast<const A*>(a.grad_loss);
  const A* lse_in = static_cast<const A*>(a.lse_in);
  // With a guess, the forward already wrote every row for upstream == *guess.
  const A* guess_ptr = static_cast<const A*>(a.grad_guess);
  const bool skip_guessed = guess_ptr != nullptr;
  const A guess = skip_guessed ? *guess_ptr : A(0);
  const int64_t rows = a.rows();

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const A g = grad_loss[r * a.grad_loss_stride];
    if (skip_guessed && g == guess) continue;  // the same decision in every thread of the block
    const RowPos pos = row_pos(a, r);
    write_grad_row<T, kWeighted, kThreads>(a, logits + pos.in_offset, grad + pos.out_offset,
                                           a.target[r], g, lse_in[r * a.lse_stride]);
  }
}

constexpr int64_t kMaxGrid = int64_t{1} << 20;

inline unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
}

template <typename T>
int forward_typed(const RowArgs& a, cudaStream_t stream) {
  const unsigned grid = grid_for(a.rows());
  const int kind = a.other_mass == 0.0 ? 0 : (a.weight == nullptr ? 1 : 2);
  const bool small = a.num_classes <= 2048;
#define LSR_LAUNCH_FWD(KSUM)                                                 \
  if (small) {                                                                \
    forward_kernel<T, KSUM, 128><<<grid, 128, 0, stream>>>(a);                \
  } else {                                                                    \
    forward_kernel<T, KSUM, 512><<<grid, 512, 0, stream>>>(a);                \
  }
  switch (kind) {
    case 0:
      LSR_LAUNCH_FWD(0);
      break;
    case 1:
      LSR_LAUNCH_FWD(1);
      break;
    default:
      LSR_LAUNCH_FWD(2);
      break;
  }
#undef LSR_LAUNCH_FWD
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward_typed(const RowArgs& a, cudaStream_t stream) {
  const unsigned grid = grid_for(a.rows());
  const bool weighted = a.weight != nullptr && a.other_mass != 0.0;
  const bool small = a.num_classes <= 2048;
#define LSR_LAUNCH_BWD(KW)                                                   \
  if (small) {                                                                \
    backward_kernel<T, KW, 128><<<grid, 128, 0, stream>>>(a);                 \
  } else {                                                                    \
    backward_kernel<T, KW, 512><<<grid, 512, 0, stream>>>(a);                 \
  }
  if (weighted) {
    LSR_LAUNCH_BWD(true);
  } else {
    LSR_LAUNCH_BWD(false);
  }
#undef LSR_LAUNCH_BWD
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_forward(const RowArgs& args, void* stream) {
  if (args.rows() == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case LogitsType::kFloat32:
      return forward_typed<float>(args, s);
    case LogitsType::kFloat64:
      return forward_typed<double>(args, s);
    case LogitsType::kFloat16:
      return forward_typed<__half>(args, s);
    case LogitsType::kBFloat16:
      return forward_typed<__nv_bfloat16>(args, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_backward(const RowArgs& args, void* stream) {
  if (args.rows() == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case LogitsType::kFloat32:
      return backward_typed<float>(args, s);
    case LogitsType::kFloat64:
      return backward_typed<double>(args, s);
    case LogitsType::kFloat16:
      return backward_typed<__half>(args, s);
    case LogitsType::kBFloat16:
      return backward_typed<__nv_bfloat16>(args, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace cuda
}  // namespace lsr_fused
