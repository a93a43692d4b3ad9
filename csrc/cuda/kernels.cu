// CUDA row kernels of the fused label-smoothed cross-entropy.
//
// One thread block per row (grid-stride over rows): each thread keeps an online (max, sum-exp)
// pair plus the (weighted) sum of its logits, the block merges them, and thread 0 writes loss and
// lse. Everything is relative to the row's reference r (see lsr_fused/backends/__init__.py and
// Shift): its first logit, or its max where the first logit is not finite or far below the max; the
// saved lse is log(sum exp(x - r)) (encoded as -(1 + lse) for r = max), so that logits sharing a
// large offset keep their accuracy. The backward recomputes softmax from the stored lse and writes
// every gradient once; given a grad_guess it skips the rows whose upstream equals it. (These kernels
// do not write the gradient in forward: ops_cuda.cpp rejects grad_logits there.) float32
// accumulation (float64 for float64 logits), int64 offsets, 16-byte vector loads when a row is
// contiguous and aligned, two of them in flight per thread. Targets outside [0, C) (other than
// ignore_index) give NaN loss/gradient rows and are never used as an index. A +inf logit makes its
// row NaN, as in F.cross_entropy.
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
// max ignoring a NaN operand (a NaN logit reaches the sum through exp instead).
__device__ __forceinline__ float acc_max(float x, float y) { return fmaxf(x, y); }
__device__ __forceinline__ double acc_max(double x, double y) { return fmax(x, y); }

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

// Per-thread online statistics of a row: the running max m, s = sum exp(x - m) and the (weighted)
// sum of x - r. A NaN logit makes s NaN for good (NaN * anything, NaN + anything); a +inf one makes
// m = +inf; lse() turns both into NaN.
template <typename A>
struct Stats {
  A m;     // running max
  A s;     // sum of exp(x - m)
  A sumx;  // sum of (weighted) x - r

  __device__ __forceinline__ void init() {
    m = neg_inf<A>();
    s = A(0);
    sumx = A(0);
  }

  // Adds N logits with at most one rescale of s: N exponentials, plus one when the max grows.
  // -inf-safe: with m == -inf (nothing finite yet) every x is -inf and adds exp(-inf - 0) = 0.
  template <int N>
  __device__ __forceinline__ void add(const A (&x)[N]) {
    A group_max = x[0];
#pragma unroll
    for (int j = 1; j < N; ++j) group_max = acc_max(group_max, x[j]);
    if (group_max > m) {
      s *= acc_exp(m - group_max);  // m == -inf: s is 0 and exp(-inf) = 0
      m = group_max;
    }
    const A base = m == neg_inf<A>() ? A(0) : m;
#pragma unroll
    for (int j = 0; j < N; ++j) s += acc_exp(x[j] - base);
  }

  __device__ __forceinline__ void merge(A om, A os, A osumx) {
    const A nm = om > m ? om : m;
    if (nm == neg_inf<A>() || nm == pos_inf<A>()) {
      s = s + os;  // both empty (0) or lse = NaN anyway
    } else {
      s = s * acc_exp(m - nm) + os * acc_exp(om - nm);
    }
    m = nm;
    sumx += osumx;
  }

  // log(sum exp(x - m)): -inf for an all -inf row, NaN with a NaN or +inf logit.
  __device__ __forceinline__ A log_sum() const {
    if (m == pos_inf<A>()) return quiet_nan<A>();
    return acc_log(s);
  }
};

template <typename A>
__device__ __forceinline__ void warp_merge(Stats<A>& st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A om = __shfl_xor_sync(0xffffffffu, st.m, offset);
    const A os = __shfl_xor_sync(0xffffffffu, st.s, offset);
    const A ox = __shfl_xor_sync(0xffffffffu, st.sumx, offset);
    st.merge(om, os, ox);
  }
}

// Reduces the block's statistics into thread 0 (other threads' results are unspecified).
template <typename A, int kThreads>
__device__ __forceinline__ void block_merge(Stats<A>& st) {
  constexpr int kWarps = kThreads / 32;
  __shared__ A sm[kWarps];
  __shared__ A ss[kWarps];
  __shared__ A sx[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  warp_merge(st);
  if (kWarps == 1) return;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
    sx[warp] = st.sumx;
  }
  __syncthreads();
  if (warp == 0) {
    if (lane < kWarps) {
      st.m = sm[lane];
      st.s = ss[lane];
      st.sumx = sx[lane];
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

// The row's first logit where finite, else 0: what the forward sums are taken against, and the
// reference r in the common case (see Shift).
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type row_reference(const T* row, int64_t C) {
  using A = typename AccOf<T>::type;
  if (C == 0) return A(0);
  const A first = to_acc(row[0]);
  return isfinite(first) ? first : A(0);
}

// FIRST_LOGIT_MAX_GAP of lsr_fused/backends/__init__.py.
constexpr double kFirstLogitMaxGap = 64.0;

// r, lse_r and the value saved for backward (lsr_fused/backends/__init__.py) of a row with first
// logit `first`, maximum row_max and log_sum = log(sum exp(x - row_max)): r is the first logit
// where finite and at most kFirstLogitMaxGap below the max (saved: lse_r >= 0), else the max
// (saved: -(1 + lse_r)); NaN and all -inf rows keep log_sum (NaN, -inf) with r = row_reference.
template <typename A>
struct Shift {
  A ref;
  A lse;
  A saved;
  bool from_max;

  __device__ __forceinline__ static Shift choose(A first, A row_max, A log_sum) {
    if (!isfinite(log_sum)) return Shift{isfinite(first) ? first : A(0), log_sum, log_sum, false};
    if (isfinite(first) && row_max - first <= static_cast<A>(kFirstLogitMaxGap)) {
      const A lse = (row_max - first) + log_sum;
      return Shift{first, lse, lse > A(0) ? lse : A(0), false};  // >= 0 but for rounding
    }
    return Shift{row_max, log_sum, A(-1) - log_sum, true};
  }
};

// The sum (kMax false) or max (kMax true) of v over the block, returned to every thread. Called by
// every thread of the block.
template <bool kMax, typename A, int kThreads>
__device__ __forceinline__ A block_reduce(A v) {
  constexpr int kWarps = kThreads / 32;
  __shared__ A partial[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = kMax ? acc_max(v, other) : v + other;
  }
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  A total = partial[0];
#pragma unroll
  for (int k = 1; k < kWarps; ++k) total = kMax ? acc_max(total, partial[k]) : total + partial[k];
  __syncthreads();  // partial is reused by the next call
  return total;
}

// The reference r and lse_r of a row from forward's saved value: a finite negative one means the
// row max (recomputed here by the whole block; uniform over the block), else row_reference.
template <typename T, int kThreads>
__device__ __forceinline__ void decode_shift(const T* row, int64_t C, int64_t sc,
                                             typename AccOf<T>::type saved,
                                             typename AccOf<T>::type& ref,
                                             typename AccOf<T>::type& lse) {
  using A = typename AccOf<T>::type;
  if (isfinite(saved) && saved < A(0)) {
    A m = neg_inf<A>();
    for (int64_t i = threadIdx.x; i < C; i += kThreads) m = acc_max(m, to_acc(row[i * sc]));
    ref = block_reduce<true, A, kThreads>(m);
    lse = A(-1) - saved;
  } else {
    ref = row_reference(row, C);
    lse = saved;
  }
}

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

// Writes one row of the gradient for upstream g, softmax = exp((x - ref) - lse) with lse the
// shifted lse; called by every thread of the block with the same arguments. Ignored rows get zeros,
// invalid targets NaN.
template <typename T, bool kWeighted, int kThreads>
__device__ __forceinline__ void write_grad_row(const RowArgs& a, const T* row, T* out, int64_t y,
                                               typename AccOf<T>::type g,
                                               typename AccOf<T>::type ref,
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
  const A coef = g * (total_mass + static_cast<A>(2.0 * a.z_loss) * (ref + lse));
  const A gb = g * static_cast<A>(a.other_mass);
  const A gt = g * static_cast<A>(a.target_extra) * w_y;
  auto grad_at = [&](A x, int64_t i) -> A {
    A gi = coef * acc_exp((x - ref) - lse);
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

// One thread's share of a row into st: x - ref summed (weighted by w when kSum == 2; not at all
// when kSum == 0). Contiguous aligned rows: two 16-byte packs per iteration, both loads issued
// before any arithmetic, so that two are in flight per thread; other layouts: four elements.
template <typename T, int kSum, int kThreads>
__device__ __forceinline__ void accumulate_row(const T* row, const typename AccOf<T>::type* w,
                                               int64_t C, int64_t sc, typename AccOf<T>::type ref,
                                               Stats<typename AccOf<T>::type>& st) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = Vec<T>::kSize;
  auto sum_term = [&](A x, int64_t i) {
    if constexpr (kSum == 1) st.sumx += x - ref;
    if constexpr (kSum == 2) st.sumx += (x - ref) * w[i];
  };
  auto add_one = [&](A x, int64_t i) {
    const A one[1] = {x};
    st.add(one);
    sum_term(x, i);
  };
  if (sc == 1 && aligned16(row)) {
    const int64_t nvec = C / kVec;
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    int64_t v = threadIdx.x;
    for (; v + kThreads < nvec; v += 2 * kThreads) {
      typename Vec<T>::Pack p0, p1;
      p0.raw = vrow[v];
      p1.raw = vrow[v + kThreads];
      A x[2 * kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        x[j] = to_acc(p0.v[j]);
        x[kVec + j] = to_acc(p1.v[j]);
      }
      st.add(x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        sum_term(x[j], v * kVec + j);
        sum_term(x[kVec + j], (v + kThreads) * kVec + j);
      }
    }
    if (v < nvec) {
      typename Vec<T>::Pack p0;
      p0.raw = vrow[v];
      A x[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = to_acc(p0.v[j]);
      st.add(x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum_term(x[j], v * kVec + j);
    }
    for (int64_t i = nvec * kVec + threadIdx.x; i < C; i += kThreads) add_one(to_acc(row[i]), i);
  } else {
    constexpr int kGroup = 4;
    int64_t i = threadIdx.x;
    for (; i + (kGroup - 1) * kThreads < C; i += kGroup * kThreads) {
      A x[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) x[k] = to_acc(row[(i + k * kThreads) * sc]);
      st.add(x);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) sum_term(x[k], i + k * kThreads);
    }
    for (; i < C; i += kThreads) add_one(to_acc(row[i * sc]), i);
  }
}

// kSum: 0 = no logit sum (other_mass == 0), 1 = plain sum, 2 = weighted sum.
template <typename T, int kSum, int kThreads>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<T, kThreads>))
    forward_kernel(const RowArgs a) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(a.logits);
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const int64_t sc = a.stride_c;
  const int64_t rows = a.rows();
  A* loss_out = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse_out);

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const RowPos pos = row_pos(a, r);
    const T* row = logits + pos.in_offset;
    const A ref = row_reference(row, C);
    Stats<A> st;
    st.init();
    accumulate_row<T, kSum, kThreads>(row, w, C, sc, ref, st);
    block_merge<A, kThreads>(st);

    // Thread 0 holds the row's statistics; where r is the row max, the block sums again against
    // it (rare: a first logit masked with a large finite value, or -inf).
    __shared__ A shared_ref;
    __shared__ int shared_from_max;
    const Shift<A> shift =
        Shift<A>::choose(C > 0 ? to_acc(row[0]) : neg_inf<A>(), st.m, st.log_sum());
    if constexpr (kSum != 0) {
      if (threadIdx.x == 0) {
        shared_ref = shift.ref;
        shared_from_max = shift.from_max;
      }
      __syncthreads();
      if (shared_from_max) {  // uniform over the block
        const A max_ref = shared_ref;
        A partial = A(0);
        for (int64_t i = threadIdx.x; i < C; i += kThreads) {
          const A d = to_acc(row[i * sc]) - max_ref;
          partial += kSum == 2 ? d * w[i] : d;
        }
        st.sumx = block_reduce<false, A, kThreads>(partial);
      }
    }

    if (threadIdx.x == 0) {
      const int64_t y = a.target[r];
      const bool ignored = y == a.ignore_index;
      const bool invalid = !ignored && (y < 0 || y >= C);
      const A lse = shift.lse;
      const A ref_r = shift.ref;
      double loss;
      if (ignored) {
        loss = 0.0;
      } else if (invalid) {
        loss = quiet_nan<double>();
      } else {
        // loss = S lse - b sum w (x - r) - (a - b) w_y (x_y - r) + z (r + lse)^2
        const double w_y = w != nullptr ? static_cast<double>(w[y]) : 1.0;
        const double total_w = a.weight_total != nullptr
                                   ? static_cast<double>(*static_cast<const A*>(a.weight_total))
                                   : static_cast<double>(C);
        const double total_mass = a.other_mass * total_w + a.target_extra * w_y;
        const double l = static_cast<double>(lse);
        const double ref_d = static_cast<double>(ref_r);
        loss = total_mass * l;
        if (a.other_mass != 0.0) loss -= a.other_mass * static_cast<double>(st.sumx);
        if (a.target_extra != 0.0) {
          loss -= a.target_extra * w_y * (static_cast<double>(to_acc(row[y * sc])) - ref_d);
        }
        if (a.z_loss != 0.0) loss += a.z_loss * (ref_d + l) * (ref_d + l);
      }
      loss_out[r] = static_cast<A>(loss);
      lse_out[r] = shift.saved;
    }
    if constexpr (kSum != 0) __syncthreads();  // shared_ref is rewritten for the next row
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
  const int64_t C = a.num_classes;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const A g = grad_loss[r * a.grad_loss_stride];
    if (skip_guessed && g == guess) continue;  // the same decision in every thread of the block
    const RowPos pos = row_pos(a, r);
    const T* row = logits + pos.in_offset;
    A ref, lse;
    decode_shift<T, kThreads>(row, C, a.stride_c, lse_in[r * a.lse_stride], ref, lse);
    // Every thread has read r before any writes: the gradient may overwrite the logits.
    __syncthreads();
    write_grad_row<T, kWeighted, kThreads>(a, row, grad + pos.out_offset, a.target[r], g, ref,
                                           lse);
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
