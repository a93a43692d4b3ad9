// CPU row kernels of the fused label-smoothed cross-entropy, written once with at::vec.
//
// This header is included by one translation unit per instruction set (kernel_default.cpp,
// kernel_avx2.cpp, kernel_avx512.cpp). Each includer first selects the at::vec implementation
// (CPU_CAPABILITY / CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512) and defines LSR_CPU_NS, the
// namespace that receives the single exported symbol `kernels()`. Everything else lives in an
// anonymous namespace so that the per-ISA copies never meet at link time.
//
// Math per row (see lsr_fused/backends/__init__.py), relative to the row's reference r (its first
// logit where finite and at most kFirstLogitMaxGap below the max, else the max) so that a large
// offset shared by the row cancels exactly in x - r:
//   lse_r = log(sum_c exp(x_c - r))          (the absolute lse is r + lse_r; saved as choose_shift
//                                             says)
//   S     = b * W + (a - b) * w_y
//   loss  = S * lse_r - b * sum_c w_c (x_c - r) - (a - b) * w_y * (x_y - r) + z * (r + lse_r)^2
//   dx_i  = g * (exp((x_i - r) - lse_r) * (S + 2 z (r + lse_r)) - b * w_i - (a - b) * w_y * [i == y])
// A +inf logit makes the row NaN, as in F.cross_entropy.
//
// Training steps: with RowArgs::grad set, the forward also writes each row's gradient for
// g = *grad_guess while the row is still cached (one read of the logits from memory instead of
// two, and for contiguous rows one exp per element instead of two: forward_grad_rows_pipelined);
// the backward, given the same grad_guess, then skips the rows whose g equals it.
//
// Options of issue 22, each off by default with its code path unchanged:
// - softcap c > 0 (template switch kCap): every logit x is read as z = c tanh(x / c) (Softcap)
//   before any other use; x above stands for z, and the gradient gets the chain factor
//   dz/dx = 1 - (z / c)^2.
// - mixed targets (per-row scalars, no switch): lam of the mass (a - b) goes to y1, 1 - lam to y2
//   (RowTargets): S = b W + (a - b) (lam w_y1 + (1 - lam) w_y2), a second target logit in the loss
//   and a second target element in the gradient.
// - statistics (template switch kStats): r + lse_r and torch.argmax of z per row, the argmax
//   tracked per vector lane in the pass that finds the row max (ArgmaxLanes).
#pragma once

#ifndef LSR_CPU_NS
#error "define LSR_CPU_NS before including kernel_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../lsr_args.h"

namespace lsr_fused {
namespace LSR_CPU_NS {
namespace {

using at::vec::Vectorized;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Elements per block: the unit of the two-level sums and of the gather buffer for strided rows.
// A multiple of every chunk size below.
constexpr int64_t kBlock = 2048;

// Loads/stores one chunk of 2 accumulation vectors from/to T memory.
template <typename T>
struct Io;

template <>
struct Io<float> {
  using V = Vectorized<float>;
  static constexpr int64_t kChunk = 2 * V::size();
  static inline void load(const float* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static inline void store(float* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
};

template <>
struct Io<double> {
  using V = Vectorized<double>;
  static constexpr int64_t kChunk = 2 * V::size();
  static inline void load(const double* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static inline void store(double* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
};

template <typename R>
struct ReducedIo {
  using V = Vectorized<float>;
  static constexpr int64_t kChunk = 2 * V::size();
  static_assert(Vectorized<R>::size() == kChunk, "unexpected reduced-float vector width");
  static inline void load(const R* p, V& a, V& b) { at::vec::load_to_float<R>(p, a, b); }
  static inline void store(R* p, const V& a, const V& b) {
    at::vec::convert_from_float<R>(a, b).store(p);
  }
};
template <>
struct Io<c10::BFloat16> : ReducedIo<c10::BFloat16> {};
template <>
struct Io<c10::Half> : ReducedIo<c10::Half> {};

// Non-temporal ("streaming") chunk stores for a large output that is not read back soon: they skip
// the read-for-ownership of every destination line. p must be aligned to the vector size.
// (Portable build: plain stores.)
template <typename T>
inline void stream_chunk(T* p, const typename Io<T>::V& a, const typename Io<T>::V& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + Io<T>::V::size(), b);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm512_stream_pd(p, a);
    _mm512_stream_pd(p + Io<T>::V::size(), b);
  } else {
    const __m512i packed = at::vec::convert_from_float<T>(a, b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), packed);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + Io<T>::V::size(), b);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, a);
    _mm256_stream_pd(p + Io<T>::V::size(), b);
  } else {
    const __m256i packed = at::vec::convert_from_float<T>(a, b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
  }
#else
  Io<T>::store(p, a, b);
#endif
}

// Alignment (bytes) that stream_chunk needs.
constexpr int64_t kStreamAlign = Vectorized<float>::size() * sizeof(float);

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

static_assert(kBlock % Io<float>::kChunk == 0 && kBlock % Io<double>::kChunk == 0,
              "block must be a multiple of the chunk");

// exp of a vector whose lanes are <= ~0 (x - max or x - lse), with exactly 0 for -inf (and for
// anything below ln(FLT_MIN)) and NaN for NaN. Float on AVX2/AVX-512: Cody-Waite range reduction
// and a degree-5 polynomial (max relative error about 2e-7, i.e. 2 ulp), ~12-16 instructions.
// Otherwise at::vec's exp (Sleef for double, std::exp per lane in the portable build).
struct ExpConstants {
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;
  static constexpr float kLn2Lo = -2.12194440e-4f;
  static constexpr float kMax = 88.3762626647949f;  // exp overflows above
  static constexpr float kMin = -87.3365447505531f;  // ln(FLT_MIN): below this the result is 0
  // p(r) = 1 + r + c2 r^2 + c3 r^3 + c4 r^4 + c5 r^5 on [-ln2/2, ln2/2] (relative minimax fit).
  static constexpr float kC2 = 0.499992311000824f;
  static constexpr float kC3 = 0.16667114198207855f;
  static constexpr float kC4 = 0.041890114545822144f;
  static constexpr float kC5 = 0.008312525227665901f;
};

#if defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  using K = ExpConstants;
  __m512 x = _mm512_min_ps(_mm512_set1_ps(K::kMax), v);  // keeps NaN (second operand)
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(K::kMin), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(K::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(K::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(K::kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(K::kC5), r, _mm512_set1_ps(K::kC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::kC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(K::kC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return Vectorized<float>(_mm512_maskz_scalef_ps(keep, p, n));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  using K = ExpConstants;
  __m256 x = _mm256_min_ps(_mm256_set1_ps(K::kMax), v);  // keeps NaN (second operand)
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(K::kMin), _CMP_NLT_UQ);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(K::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(K::kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(K::kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(K::kC5), r, _mm256_set1_ps(K::kC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(K::kC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(K::kC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n for n in [-126, 128] (lanes outside are masked to 0 or are NaN anyway).
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return Vectorized<float>(_mm256_and_ps(result, keep));
}
#else
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp(); }
#endif
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// ---------------------------------------------------------------------------------------------
// Softcap: every logit x is read as z = c tanh(x / c) when c > 0 (lsr_fused/backends/__init__.py).

// tanh(u) = u + u s (k1 + k2 s + ... + k7 s^6), s = u^2, for |u| < kSmall: a relative minimax fit
// made for this file (max error 1.5 ulp in float32, evaluation included). The range reaches
// |x| = c, so that for a softcap above most logits every vector takes the polynomial alone.
struct TanhConstants {
  static constexpr float kSmall = 1.0f;
  static constexpr float kP1 = -3.3333298899e-01f;
  static constexpr float kP2 = 1.3332411451e-01f;
  static constexpr float kP3 = -5.3884106951e-02f;
  static constexpr float kP4 = 2.1499410426e-02f;
  static constexpr float kP5 = -7.9652264404e-03f;
  static constexpr float kP6 = 2.3154748114e-03f;
  static constexpr float kP7 = -3.6252545627e-04f;
};

// Lane by lane: `above` where u >= limit or u is NaN, `below` where u < limit.
inline Vectorized<float> select_below(const Vectorized<float>& u, float limit,
                                      const Vectorized<float>& below,
                                      const Vectorized<float>& above) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 k = _mm512_cmp_ps_mask(u, _mm512_set1_ps(limit), _CMP_LT_OQ);
  return Vectorized<float>(_mm512_mask_blend_ps(k, above, below));
#else
  return Vectorized<float>::blendv(above, below, u < Vectorized<float>(limit));
#endif
}

// Whether every lane of u is below limit (never for a NaN lane).
inline bool all_below(const Vectorized<float>& u, float limit) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(u, _mm512_set1_ps(limit), _CMP_LT_OQ) == 0xFFFF;
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_movemask_ps(_mm256_cmp_ps(u, _mm256_set1_ps(limit), _CMP_LT_OQ)) == 0xFF;
#else
  alignas(64) float lanes[Vectorized<float>::size()];
  u.store(lanes);
  for (int64_t i = 0; i < Vectorized<float>::size(); ++i) {
    if (!(lanes[i] < limit)) return false;
  }
  return true;
#endif
}

// 1 / d for d in [1, 2], lane by lane: the hardware estimate refined by Newton steps (about 1 ulp;
// a vector division costs several times more).
inline Vectorized<float> vrecip(const Vectorized<float>& d) {
  using V = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const V q(_mm512_rcp14_ps(d));  // 14 bits; one step doubles them
  return at::vec::fmadd(q, at::vec::fnmadd(d, q, V(1.0f)), q);
#elif defined(CPU_CAPABILITY_AVX2)
  V q(_mm256_rcp_ps(d));  // 12 bits: two steps
  q = at::vec::fmadd(q, at::vec::fnmadd(d, q, V(1.0f)), q);
  return at::vec::fmadd(q, at::vec::fnmadd(d, q, V(1.0f)), q);
#else
  return V(1.0f) / d;
#endif
}

// tanh(u) lane by lane, and its derivative 1 - tanh(u)^2 in `slope` (NaN stays NaN; +-inf gives
// +-1 and slope 0). Float: the odd polynomial above for |u| < kSmall (alone when every lane is
// there, the common case for a softcap well above the logits); beyond, t = (1 - E) / (1 + E)
// with E = exp(-2|u|) in [0, 0.14] (never overflows; E = 0 at infinity; t >= 0.76 there, so
// nothing cancels: ~2 ulp) and slope = 4 E / (1 + E)^2, which keeps its relative accuracy where t
// rounds to 1.
inline Vectorized<float> vtanh(const Vectorized<float>& u, Vectorized<float>& slope) {
  using V = Vectorized<float>;
  using K = TanhConstants;
  constexpr float kSmallSquared = K::kSmall * K::kSmall;  // exact
  const V s = u * u;
  V p = at::vec::fmadd(V(K::kP7), s, V(K::kP6));
  p = at::vec::fmadd(p, s, V(K::kP5));
  p = at::vec::fmadd(p, s, V(K::kP4));
  p = at::vec::fmadd(p, s, V(K::kP3));
  p = at::vec::fmadd(p, s, V(K::kP2));
  p = at::vec::fmadd(p, s, V(K::kP1));
  const V t_small = at::vec::fmadd(u * s, p, u);
  const V slope_small = at::vec::fnmadd(t_small, t_small, V(1.0f));
  if (all_below(s, kSmallSquared)) {
    slope = slope_small;
    return t_small;
  }
  const V sign = u & V(-0.0f);
  const V e = vexp(u.abs() * V(-2.0f));
  const V q = vrecip(V(1.0f) + e);
  const V t_large = ((V(1.0f) - e) * q) | sign;
  slope = select_below(s, kSmallSquared, slope_small, V(4.0f) * e * (q * q));
  return select_below(s, kSmallSquared, t_small, t_large);
}

// Double: at::vec's tanh (Sleef where vectorized); 1 - t^2 as (1 - t)(1 + t) (1 - t is exact
// near t = 1).
inline Vectorized<double> vtanh(const Vectorized<double>& u, Vectorized<double>& slope) {
  using V = Vectorized<double>;
  const V t = u.tanh();
  slope = (V(1.0) - t) * (V(1.0) + t);
  return t;
}

// How every logit is read: z = c tanh(x / c) with kCap (c = softcap > 0), else z = x. The chain
// rule of the gradient is d/dx = d/dz * dz/dx with dz/dx = 1 - (z / c)^2 = 1 - tanh(x / c)^2.
template <typename A, bool kCap>
struct Softcap {
  using V = Vectorized<A>;
  A c = A(0);
  A inv_c = A(0);

  explicit Softcap(double softcap) {
    if constexpr (kCap) {
      c = static_cast<A>(softcap);
      inv_c = static_cast<A>(1.0 / softcap);
    }
  }

  // z, and dz/dx in `slope` (left untouched without kCap).
  inline V apply(const V& x, V& slope) const {
    if constexpr (kCap) {
      return V(c) * vtanh(x * V(inv_c), slope);
    } else {
      (void)slope;
      return x;
    }
  }

  inline V apply(const V& x) const {
    V slope;
    return apply(x, slope);
  }

  // One value, by the lane function itself, so that scalar and vector reads of a logit agree bit
  // for bit (forward and backward recompute the same r). dz/dx in *slope when given (1 without
  // kCap).
  inline A apply(A x, A* slope = nullptr) const {
    if constexpr (kCap) {
      alignas(64) A z[V::size()];
      alignas(64) A dz[V::size()];
      V s;
      apply(V(x), s).store(z);
      s.store(dz);
      if (slope != nullptr) *slope = dz[0];
      return z[0];
    } else {
      if (slope != nullptr) *slope = A(1);
      return x;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Argmax (the statistics option): torch.argmax of z, the first maximum.

// best = x and at = chunk in the lanes where x > best (an ordered compare: NaN never enters).
template <typename A>
inline void keep_greater(Vectorized<A>& best, Vectorized<A>& at, const Vectorized<A>& x,
                         const Vectorized<A>& chunk) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __mmask16 gt = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ);
    best = Vectorized<A>(_mm512_mask_mov_ps(best, gt, x));
    at = Vectorized<A>(_mm512_mask_mov_ps(at, gt, chunk));
  } else {
    const __mmask8 gt = _mm512_cmp_pd_mask(x, best, _CMP_GT_OQ);
    best = Vectorized<A>(_mm512_mask_mov_pd(best, gt, x));
    at = Vectorized<A>(_mm512_mask_mov_pd(at, gt, chunk));
  }
#else
  const Vectorized<A> gt = x > best;
  best = Vectorized<A>::blendv(best, x, gt);
  at = Vectorized<A>::blendv(at, chunk, gt);
#endif
}

// The first maximum of a row, lane by lane over its chunks of two vectors: each lane keeps its
// best value and the chunk where it first occurred (only a strictly greater value replaces it, so
// a tie keeps the earlier chunk); resolve() then takes the lowest index holding the maximum.
// NaN is never taken here: a row with a NaN (or with only -inf) has non-finite statistics and is
// resolved by first_argmax_scan instead. Chunk numbers are held as A values (exact below 2^24).
template <typename A>
struct ArgmaxLanes {
  using V = Vectorized<A>;
  static constexpr int64_t kV = V::size();
  V best0{-std::numeric_limits<A>::infinity()};
  V best1{-std::numeric_limits<A>::infinity()};
  V at0{A(0)};
  V at1{A(0)};

  inline void add(const V& a, const V& b, int64_t chunk) {
    const V c(static_cast<A>(chunk));
    keep_greater(best0, at0, a, c);
    keep_greater(best1, at1, b, c);
  }

  // The lowest index of the maximum of the lanes and of a scalar tail (tail_best first seen at
  // tail_index, which lies after every chunk; -inf for no tail).
  int64_t resolve(A tail_best, int64_t tail_index) const {
    alignas(64) A best[2 * kV];
    alignas(64) A at[2 * kV];
    best0.store(best);
    best1.store(best + kV);
    at0.store(at);
    at1.store(at + kV);
    A m = -std::numeric_limits<A>::infinity();
    int64_t index = 0;
    for (int64_t j = 0; j < 2 * kV; ++j) {
      const int64_t i = static_cast<int64_t>(at[j]) * (2 * kV) + j;
      if (best[j] > m || (best[j] == m && i < index)) {
        m = best[j];
        index = i;
      }
    }
    return tail_best > m ? tail_index : index;
  }
};

// Software prefetch this far ahead of the loads: the per-chunk work is long enough that the
// hardware prefetcher alone leaves the forward well below the memory bandwidth (measured: ~1.6x
// faster forward at 2048 x 32000 float32 on a 2-core AVX-512 VM). Prefetches never fault, so
// running past the end of a row or of the tensor is harmless.
constexpr int64_t kPrefetchBytes = 16384;

template <typename T>
inline void prefetch_chunk(const T* p) {
#if defined(__GNUC__)
  const char* base = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t off = 0; off < Io<T>::kChunk * static_cast<int64_t>(sizeof(T)); off += 64) {
    __builtin_prefetch(base + off, 0, 3);
  }
#else
  (void)p;
#endif
}

// Prefetch of the chunk at p into L2 (not L1): the next row, in the pipelined forward pass.
template <typename T>
inline void prefetch_chunk_l2(const T* p) {
#if defined(__GNUC__)
  const char* base = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < Io<T>::kChunk * static_cast<int64_t>(sizeof(T)); off += 64) {
    __builtin_prefetch(base + off, 0, 2);
  }
#else
  (void)p;
#endif
}

template <typename A>
inline A hmax_nan(const Vectorized<A>& v) {
  alignas(64) A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A m = tmp[0];
  for (int64_t i = 1; i < Vectorized<A>::size(); ++i) {
    if (std::isnan(tmp[i]) || tmp[i] > m) m = tmp[i];
  }
  return m;
}

template <typename A>
inline double hsum(const Vectorized<A>& v) {
  alignas(64) A tmp[Vectorized<A>::size()];
  v.store(tmp);
  double s = 0.0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) s += static_cast<double>(tmp[i]);
  return s;
}

template <typename T>
inline typename AccOf<T>::type to_acc(T x) {
  return static_cast<typename AccOf<T>::type>(x);
}

template <typename T, bool kCap>
using CapOf = Softcap<typename AccOf<T>::type, kCap>;

// The row's first z where finite, else 0: the reference the forward sums are taken against (and r
// itself in the common case, see choose_shift).
template <typename T, bool kCap>
inline typename AccOf<T>::type row_reference(const T* row, int64_t C, const CapOf<T, kCap>& cap) {
  using A = typename AccOf<T>::type;
  if (C == 0) return A(0);
  const A first = cap.apply(to_acc(row[0]));
  return std::isfinite(first) ? first : A(0);
}

// The first z in double (-inf for a row without classes).
template <typename T, bool kCap>
inline double first_logit(const T* row, int64_t C, const CapOf<T, kCap>& cap) {
  return C > 0 ? static_cast<double>(cap.apply(to_acc(row[0])))
               : -std::numeric_limits<double>::infinity();
}

// FIRST_LOGIT_MAX_GAP of lsr_fused/backends/__init__.py.
constexpr double kFirstLogitMaxGap = 64.0;

// r, lse_r and the value saved for backward (lsr_fused/backends/__init__.py) of a row with first
// logit `first`, maximum row_max and log_sum = log(sum exp(x - row_max)) (NaN for a NaN or +inf
// logit, -inf for an all -inf row): r is the first logit where finite and at most
// kFirstLogitMaxGap below the max (saved: lse_r >= 0), else the max (saved: -(1 + lse_r)).
struct Shift {
  double ref;
  double lse;
  double saved;
  bool from_max;
};

inline Shift choose_shift(double first, double row_max, double log_sum) {
  if (!std::isfinite(log_sum)) {
    return Shift{std::isfinite(first) ? first : 0.0, log_sum, log_sum, false};
  }
  if (std::isfinite(first) && row_max - first <= kFirstLogitMaxGap) {
    const double lse = (row_max - first) + log_sum;
    return Shift{first, lse, std::max(lse, 0.0), false};  // >= 0 but for rounding
  }
  return Shift{row_max, log_sum, -1.0 - log_sum, true};
}

// The row max of z (NaN-free rows), for a row whose reference is its max.
template <typename T, bool kCap>
inline typename AccOf<T>::type row_max_value(const T* row, int64_t C, int64_t sc,
                                             const CapOf<T, kCap>& cap) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  V m0(std::numeric_limits<A>::lowest()), m1(std::numeric_limits<A>::lowest());
  int64_t i = 0;
  if (sc == 1) {
    for (; i + kChunk <= C; i += kChunk) {
      V a, b;
      Io<T>::load(row + i, a, b);
      m0 = at::vec::clamp_min(m0, cap.apply(a));
      m1 = at::vec::clamp_min(m1, cap.apply(b));
    }
  }
  A m = hmax_nan<A>(at::vec::clamp_min(m0, m1));
  for (; i < C; ++i) m = std::max(m, cap.apply(to_acc(row[i * sc])));
  return m;
}

// sum_c w_c (z_c - ref) in double (w nullptr: unweighted), for a row whose reference is its max
// (the fused sums were taken against its first logit).
template <typename T, bool kCap>
inline double shifted_sum(const T* row, int64_t C, int64_t sc, const typename AccOf<T>::type* w,
                          double ref, const CapOf<T, kCap>& cap) {
  double total = 0.0;
  for (int64_t i = 0; i < C; ++i) {
    const double d = static_cast<double>(cap.apply(to_acc(row[i * sc]))) - ref;
    total += w != nullptr ? d * static_cast<double>(w[i]) : d;
  }
  return total;
}

// torch.argmax of a row's z by a scalar scan: the first NaN, else the first maximum (0 for an all
// -inf row); z there in `value`. For the rows whose statistics are not finite.
template <typename T, bool kCap>
inline int64_t first_argmax_scan(const T* row, int64_t C, int64_t sc, const CapOf<T, kCap>& cap,
                                 typename AccOf<T>::type& value) {
  using A = typename AccOf<T>::type;
  A best = -std::numeric_limits<A>::infinity();
  int64_t index = 0;
  for (int64_t i = 0; i < C; ++i) {
    const A z = cap.apply(to_acc(row[i * sc]));
    if (std::isnan(z)) {
      value = z;
      return i;
    }
    if (z > best) {
      best = z;
      index = i;
    }
  }
  value = best;
  return index;
}

// Online softmax statistics of one row, kept per vector lane in a single pass over the logits:
// every chunk updates the lane maxima m (rescaling the lane sums in the rare chunks where a maximum
// grows) and adds exp(x - m). m starts at the lowest finite value, not -inf, so that -inf logits
// give exp(-inf - m) = 0 and never exp(-inf + inf) = NaN. Sums are two-level (per block, then a
// running total) to keep float32 accumulation accurate over long rows.
template <typename A>
struct LaneStats {
  using V = Vectorized<A>;
  static constexpr int kAllLanes = (1 << V::size()) - 1;

  V m{std::numeric_limits<A>::lowest()};
  V s0{A(0)};
  V s1{A(0)};
  V total{A(0)};
  A ref = A(0);       // what the sums are relative to (row_reference)
  double sumx = 0.0;  // sum of (weighted) x - ref

  inline void add_chunk(const V& a, const V& b) {
    // clamp_min is a plain max instruction (not NaN-propagating: NaN logits reach the sums
    // through vexp instead, which returns NaN for them).
    const V mn = at::vec::clamp_min(m, at::vec::clamp_min(a, b));
    if ((mn - m).zero_mask() != kAllLanes) {  // some lane max grew (or is +inf)
      const V f = vexp(m - mn);
      s0 = s0 * f;
      s1 = s1 * f;
      total = total * f;
      m = mn;
    }
    s0 = s0 + vexp(a - m);
    s1 = s1 + vexp(b - m);
  }

  inline void flush() {
    total = total + s0 + s1;
    s0 = V(A(0));
    s1 = V(A(0));
  }

  // The row max and log(sum exp(x - max)): NaN for a NaN or a +inf logit (inf - inf in softmax,
  // as F.cross_entropy gives), -inf for an all -inf (or empty) row, where every lane sum is 0.
  void finish(double& row_max_out, double& log_sum) {
    flush();
    const A row_max = hmax_nan<A>(m);
    row_max_out = static_cast<double>(row_max);
    if (std::isnan(row_max) || row_max == std::numeric_limits<A>::infinity()) {
      log_sum = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    log_sum = std::log(hsum<A>(total * vexp(m - V(row_max))));
  }
};

// The last n < kChunk elements of a row piece, read as z into a chunk padded with -inf (neutral
// for max, exp and argmax); with kCap and `slope`, dz/dx of the chunk there.
template <typename T, bool kCap>
inline void load_tail(const T* p, int64_t n, const CapOf<T, kCap>& cap,
                      typename AccOf<T>::type* chunk, typename AccOf<T>::type* slope = nullptr) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  for (int64_t j = 0; j < kChunk; ++j) chunk[j] = j < n ? to_acc(p[j]) : A(0);
  if constexpr (kCap) {
    V sa, sb;
    cap.apply(V::loadu(chunk), sa).store(chunk);
    cap.apply(V::loadu(chunk + kV), sb).store(chunk + kV);
    if (slope != nullptr) {
      sa.store(slope);
      sb.store(slope + kV);
    }
  }
  for (int64_t j = n; j < kChunk; ++j) chunk[j] = -std::numeric_limits<A>::infinity();
}

// Consumes len contiguous elements of type T (len is a multiple of the chunk except for the last
// piece of a row) whose first chunk is chunk number first_chunk of the row. kSum: 0 = no logit sum
// (other_mass == 0), 1 = plain sum, 2 = weighted sum. kStats: track the argmax in am.
template <typename T, int kSum, bool kCap, bool kStats>
inline void consume(const T* p, int64_t len, const typename AccOf<T>::type* w,
                    int64_t first_chunk, const CapOf<T, kCap>& cap,
                    LaneStats<typename AccOf<T>::type>& st,
                    ArgmaxLanes<typename AccOf<T>::type>& am) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  const V refv(st.ref);
  V vs0(A(0)), vs1(A(0));
  int64_t i = 0;
  for (; i + kChunk <= len; i += kChunk) {
    V a, b;
    prefetch_chunk<T>(p + i);
    Io<T>::load(p + i, a, b);
    if constexpr (kCap) {
      a = cap.apply(a);
      b = cap.apply(b);
    }
    st.add_chunk(a, b);
    if constexpr (kStats) am.add(a, b, first_chunk + i / kChunk);
    if constexpr (kSum == 1) {
      vs0 = vs0 + (a - refv);
      vs1 = vs1 + (b - refv);
    } else if constexpr (kSum == 2) {
      vs0 = at::vec::fmadd(a - refv, V::loadu(w + i), vs0);
      vs1 = at::vec::fmadd(b - refv, V::loadu(w + i + kV), vs1);
    }
  }
  double bsum = 0.0;
  if constexpr (kSum != 0) bsum = hsum<A>(vs0 + vs1);
  if (i < len) {
    // Tail: one padded chunk; its sum is taken separately.
    alignas(64) A tmp[kChunk];
    load_tail<T, kCap>(p + i, len - i, cap, tmp);
    for (int64_t j = i; j < len; ++j) {
      const A x = tmp[j - i];
      if constexpr (kSum == 1) bsum += static_cast<double>(x - st.ref);
      if constexpr (kSum == 2) bsum += static_cast<double>(x - st.ref) * static_cast<double>(w[j]);
    }
    const V a = V::loadu(tmp), b = V::loadu(tmp + kV);
    st.add_chunk(a, b);
    if constexpr (kStats) am.add(a, b, first_chunk + i / kChunk);
  }
  if constexpr (kSum != 0) st.sumx += bsum;
  st.flush();
}

struct RowInfo {
  int64_t in_offset;
  int64_t out_offset;
  int64_t target;
  int64_t mix_target;  // y2 of the mixed targets; -1 without them and for an ignored row
  double mix_lambda;   // lam; 1 without mixed targets
  bool ignored;
  bool invalid;  // a target (or y2) outside [0, C) in a row that is not ignored
};

template <typename A>
inline RowInfo row_info(const RowArgs& a, int64_t r, bool with_grad) {
  RowInfo info;
  const int64_t inner = a.inner;
  const int64_t b = r / inner;
  const int64_t s = r - b * inner;
  info.in_offset = b * a.stride_b + s * a.stride_s;
  info.out_offset = with_grad ? b * a.grad_stride_b + s * a.grad_stride_s : 0;
  info.target = a.target[r];
  info.ignored = info.target == a.ignore_index;
  info.invalid = !info.ignored && (info.target < 0 || info.target >= a.num_classes);
  info.mix_target = -1;
  info.mix_lambda = 1.0;
  if (a.mix_target != nullptr && !info.ignored) {  // an ignored row's y2 and lam may be garbage
    info.mix_target = a.mix_target[r];
    info.mix_lambda =
        static_cast<double>(static_cast<const A*>(a.mix_lambda)[r * a.mix_lambda_stride]);
    info.invalid = info.invalid || info.mix_target < 0 || info.mix_target >= a.num_classes;
  }
  return info;
}

// A valid row's target mass q_i w_i = (b + (a - b) [lam [i == y1] + (1 - lam) [i == y2]]) w_i
// beyond the smoothing: spikes at y1 and y2 of (a - b) share1 and (a - b) share2, share1 = lam w_y1
// and share2 = (1 - lam) w_y2 (without mixed targets: y2 = -1, share1 = w_y, share2 = 0).
struct RowTargets {
  int64_t y1;
  int64_t y2;
  double share1;
  double share2;
  // Whether each target term enters the loss: not for lam = 0 (1), so that a masked z there
  // gives 0 and not 0 * inf = NaN (as the whole target term is skipped for a - b = 0).
  bool in_loss1;
  bool in_loss2;

  double weight() const { return share1 + share2; }  // lam w_y1 + (1 - lam) w_y2
};

template <typename A>
inline RowTargets row_targets(const RowInfo& info, const A* w) {
  const int64_t y1 = info.target;
  const double w1 = w != nullptr ? static_cast<double>(w[y1]) : 1.0;
  if (info.mix_target < 0) return RowTargets{y1, -1, w1, 0.0, true, false};
  const int64_t y2 = info.mix_target;
  const double w2 = w != nullptr ? static_cast<double>(w[y2]) : 1.0;
  const double lam = info.mix_lambda;
  return RowTargets{y1, y2, lam * w1, (1.0 - lam) * w2, lam != 0.0, lam != 1.0};
}

// The gradient values of a row's target elements, stored after the vector loop (which wrote
// those elements without the target spikes). y1 == y2 is one element carrying both shares.
struct TargetFixes {
  int64_t index[2] = {-1, -1};
  double value[2] = {0.0, 0.0};

  template <typename T, typename A>
  inline void store(T* out, int64_t stride) const {
    for (int k = 0; k < 2; ++k) {
      if (index[k] >= 0) out[index[k] * stride] = static_cast<T>(static_cast<A>(value[k]));
    }
  }
};

// value_at(i, share): the gradient at element i when it carries target share `share`.
template <typename ValueAt>
inline TargetFixes target_fixes(const RowTargets& t, ValueAt value_at) {
  TargetFixes f;
  const bool same = t.y2 == t.y1;
  f.index[0] = t.y1;
  f.value[0] = value_at(t.y1, same ? t.share1 + t.share2 : t.share1);
  if (t.y2 >= 0 && !same) {
    f.index[1] = t.y2;
    f.value[1] = value_at(t.y2, t.share2);
  }
  return f;
}

// The gradient lanes of grad_block: (coef exp((z - ref) - lse) - bw w) dz/dx with z = cap(x)
// (without kCap, dz/dx = 1 and z = x).
template <typename A, bool kWeighted, bool kCap>
struct GradLanes {
  using V = Vectorized<A>;
  A ref, lse, coef, bw;
  Softcap<A, kCap> cap;

  // The logits x (their weights at wp when kWeighted).
  inline V operator()(const V& x, const A* wp) const {
    V slope;
    const V z = cap.apply(x, slope);
    V g;
    if constexpr (kWeighted) {
      g = at::vec::fmsub(vexp((z - V(ref)) - V(lse)), V(coef), V(bw) * V::loadu(wp));
    } else {
      g = at::vec::fmsub(vexp((z - V(ref)) - V(lse)), V(coef), V(bw));
    }
    if constexpr (kCap) g = g * slope;
    return g;
  }
};

// grad_block's elements [from, to) outside its vector loop: one by one, or with kCap as padded
// chunks of the lane function (z is computed by it everywhere).
template <typename T, bool kWeighted, bool kCap>
inline void grad_rest(const T* in, T* out, int64_t from, int64_t to,
                      const GradLanes<typename AccOf<T>::type, kWeighted, kCap>& lanes,
                      const typename AccOf<T>::type* w) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  if constexpr (!kCap) {
    for (int64_t i = from; i < to; ++i) {
      const A e = static_cast<A>(std::exp((to_acc(in[i]) - lanes.ref) - lanes.lse));
      const A wi = kWeighted ? w[i] : A(1);
      out[i] = static_cast<T>(e * lanes.coef - lanes.bw * wi);
    }
  } else {
    for (int64_t i = from; i < to; i += kChunk) {
      const int64_t n = std::min(kChunk, to - i);
      alignas(64) A x[kChunk];
      alignas(64) A wt[kChunk];
      for (int64_t j = 0; j < kChunk; ++j) {
        x[j] = j < n ? to_acc(in[i + j]) : A(0);
        wt[j] = kWeighted && j < n ? w[i + j] : A(0);
      }
      const V ga = lanes(V::loadu(x), wt), gb = lanes(V::loadu(x + kV), wt + kV);
      ga.store(x);
      gb.store(x + kV);
      for (int64_t j = 0; j < n; ++j) out[i + j] = static_cast<T>(x[j]);
    }
  }
}

// The gradient lanes over len contiguous elements (in and out may alias unless kStream, which
// writes with non-temporal stores once out is aligned).
template <typename T, bool kWeighted, bool kStream, bool kCap>
inline void grad_block(const T* in, T* out, int64_t len,
                       const GradLanes<typename AccOf<T>::type, kWeighted, kCap>& lanes,
                       const typename AccOf<T>::type* w) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  int64_t i = 0;
  if constexpr (kStream) {
    // Peel elements until out is aligned for the streaming stores (T's size divides the alignment).
    const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kStreamAlign);
    const int64_t head = misalign == 0 || misalign % static_cast<int64_t>(sizeof(T)) != 0
                             ? (misalign == 0 ? 0 : len)
                             : std::min(len, (kStreamAlign - misalign) / static_cast<int64_t>(sizeof(T)));
    grad_rest<T, kWeighted, kCap>(in, out, 0, head, lanes, w);
    i = head;
  }
  for (; i + kChunk <= len; i += kChunk) {
    V a, b;
    prefetch_chunk<T>(in + i);
    Io<T>::load(in + i, a, b);
    const V ga = lanes(a, kWeighted ? w + i : nullptr);
    const V gb = lanes(b, kWeighted ? w + i + kV : nullptr);
    if constexpr (kStream) {
      stream_chunk<T>(out + i, ga, gb);
    } else {
      Io<T>::store(out + i, ga, gb);
    }
  }
  grad_rest<T, kWeighted, kCap>(in, out, i, len, lanes, w);
}

template <typename T>
inline void fill_row(T* out, int64_t C, int64_t sc, double value) {
  if (sc == 1 && value == 0.0) {
    std::memset(static_cast<void*>(out), 0, static_cast<size_t>(C) * sizeof(T));
    return;
  }
  const T v = static_cast<T>(value);
  for (int64_t i = 0; i < C; ++i) out[i * sc] = v;
}

// The gradient of a row with non-finite statistics (all -inf, +inf or NaN z), literally by the
// formula: g (exp((z_i - r) - lse) (S + 2 zl (r + lse)) - b w_i - (a - b) share_i) dz_i/dx_i.
template <typename T, bool kCap>
void degenerate_grad_row(const RowArgs& a, const RowTargets& t, const T* row, T* out, double g,
                         double ref, double lse, double total_mass, const CapOf<T, kCap>& cap) {
  using A = typename AccOf<T>::type;
  const A* w = static_cast<const A*>(a.weight);
  const double scale = total_mass + 2.0 * a.z_loss * (ref + lse);
  for (int64_t i = 0; i < a.num_classes; ++i) {
    A slope;
    const double z = static_cast<double>(cap.apply(to_acc(row[i * a.stride_c]), &slope));
    double gi = std::exp((z - ref) - lse) * scale;
    if (a.other_mass != 0.0) {
      gi -= a.other_mass * (w != nullptr ? static_cast<double>(w[i]) : 1.0);
    }
    if (i == t.y1) gi -= a.target_extra * t.share1;
    if (i == t.y2) gi -= a.target_extra * t.share2;
    if constexpr (kCap) gi *= static_cast<double>(slope);
    out[i * a.grad_stride_c] = static_cast<T>(static_cast<A>(gi * g));
  }
}

// grad_block over a whole row in any layout (strided rows through the kBlock scratch buf).
template <typename T, bool kWeighted, bool kCap>
inline void grad_row_blocks(const RowArgs& a, const T* row, T* out,
                            const GradLanes<typename AccOf<T>::type, kWeighted, kCap>& lanes,
                            typename AccOf<T>::type* buf) {
  using A = typename AccOf<T>::type;
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const int64_t sc = a.stride_c;
  const int64_t gsc = a.grad_stride_c;
  for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
    const int64_t len = std::min(kBlock, C - i0);
    const A* wb = kWeighted ? w + i0 : nullptr;
    if (sc == 1 && gsc == 1 && a.stream_grad) {
      grad_block<T, kWeighted, true, kCap>(row + i0, out + i0, len, lanes, wb);
    } else if (sc == 1 && gsc == 1) {
      grad_block<T, kWeighted, false, kCap>(row + i0, out + i0, len, lanes, wb);
    } else {
      for (int64_t j = 0; j < len; ++j) buf[j] = to_acc(row[(i0 + j) * sc]);
      grad_block<A, kWeighted, false, kCap>(buf, buf, len, lanes, wb);
      for (int64_t j = 0; j < len; ++j) out[(i0 + j) * gsc] = static_cast<T>(buf[j]);
    }
  }
  // Order the streamed row before the plain stores of the target elements.
  if (sc == 1 && gsc == 1 && a.stream_grad) stream_fence();
}

// Writes the gradient of one row for the upstream value g: zeros for an ignored row, NaN for an
// invalid target, else g dz/dx (softmax (S + 2 zl (r + lse)) - b w - (a - b) [lam w_y1 [i == y1] +
// (1 - lam) w_y2 [i == y2]]) with softmax = exp((z - r) - lse), r and lse decoded from forward's
// saved value (choose_shift). out may alias row (r and the target logits are read before anything
// is written). buf: kBlock scratch for strided rows.
template <typename T, bool kWeighted, bool kCap>
inline void write_grad_row(const RowArgs& a, const RowInfo& info, const T* row, T* out, double g,
                           double saved, double total_w, const CapOf<T, kCap>& cap,
                           typename AccOf<T>::type* buf) {
  using A = typename AccOf<T>::type;
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const int64_t sc = a.stride_c;
  const int64_t gsc = a.grad_stride_c;
  if (info.ignored) {
    fill_row(out, C, gsc, 0.0);
    return;
  }
  if (info.invalid) {
    fill_row(out, C, gsc, std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const RowTargets targets = row_targets(info, w);
  const double total_mass = a.other_mass * total_w + a.target_extra * targets.weight();
  // Read r and the target logits before the row is overwritten (grad may alias logits).
  const bool from_max = std::isfinite(saved) && saved < 0.0;
  const A ref = from_max ? row_max_value(row, C, sc, cap) : row_reference(row, C, cap);
  const double ref_d = static_cast<double>(ref);
  const double lse = from_max ? -1.0 - saved : saved;
  if (!std::isfinite(lse)) {
    degenerate_grad_row<T, kCap>(a, targets, row, out, g, ref_d, lse, total_mass, cap);
    return;
  }

  double scale = total_mass;
  if (a.z_loss != 0.0) scale += 2.0 * a.z_loss * (ref_d + lse);
  const double coef = g * scale;
  const double bw = g * a.other_mass;
  const TargetFixes fixes = target_fixes(targets, [&](int64_t i, double share) {
    A slope;
    const double z = static_cast<double>(cap.apply(to_acc(row[i * sc]), &slope));
    const double w_i = w != nullptr ? static_cast<double>(w[i]) : 1.0;
    double value = coef * std::exp((z - ref_d) - lse) - bw * w_i - g * a.target_extra * share;
    if constexpr (kCap) value *= static_cast<double>(slope);
    return value;
  });
  const GradLanes<A, kWeighted, kCap> lanes{ref, static_cast<A>(lse), static_cast<A>(coef),
                                             static_cast<A>(bw), cap};
  grad_row_blocks<T, kWeighted, kCap>(a, row, out, lanes, buf);
  fixes.store<T, A>(out, gsc);
}

template <typename T>
inline double total_weight(const RowArgs& a) {
  using A = typename AccOf<T>::type;
  return a.weight_total != nullptr ? static_cast<double>(*static_cast<const A*>(a.weight_total))
                                   : static_cast<double>(a.num_classes);
}

template <typename T, bool kWeighted, bool kCap>
void backward_rows_impl(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const A* grad_loss = static_cast<const A*>(a.grad_loss);
  const A* lse_in = static_cast<const A*>(a.lse_in);
  // With a guess, the forward pass already wrote every row for upstream == *guess.
  const A* guess = static_cast<const A*>(a.grad_guess);
  const double total_w = total_weight<T>(a);
  const CapOf<T, kCap> cap(a.softcap);
  alignas(64) A buf[kBlock];

  for (int64_t r = row_begin; r < row_end; ++r) {
    const A g = grad_loss[r * a.grad_loss_stride];
    if (guess != nullptr && g == *guess) continue;  // touch neither the logits nor the gradient
    const RowInfo info = row_info<A>(a, r, true);
    write_grad_row<T, kWeighted, kCap>(a, info, logits + info.in_offset, grad + info.out_offset,
                                       static_cast<double>(g),
                                       static_cast<double>(lse_in[r * a.lse_stride]), total_w,
                                       cap, buf);
  }
}

template <typename T, bool kCap>
void backward_rows_capped(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.weight != nullptr && a.other_mass != 0.0) {
    backward_rows_impl<T, true, kCap>(a, row_begin, row_end);
  } else {
    backward_rows_impl<T, false, kCap>(a, row_begin, row_end);
  }
}

template <typename T>
void backward_rows(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.softcap > 0.0) {
    backward_rows_capped<T, true>(a, row_begin, row_end);
  } else {
    backward_rows_capped<T, false>(a, row_begin, row_end);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// One row's online statistics: max and log(sum exp(z - max)) (LaneStats::finish), the (weighted)
// sum of z - ref and, with kStats, the first maximum's index (valid when the statistics are finite).
struct RowStats {
  double row_max;
  double log_sum;
  double sumx;
  int64_t argmax;
};

// RowStats of one row by the single online pass (any layout).
template <typename T, int kSum, bool kCap, bool kStats>
inline RowStats online_row_stats(const T* row, int64_t C, int64_t sc,
                                 const typename AccOf<T>::type* w, typename AccOf<T>::type ref,
                                 const CapOf<T, kCap>& cap, typename AccOf<T>::type* buf) {
  using A = typename AccOf<T>::type;
  constexpr int64_t kChunk = Io<T>::kChunk;
  LaneStats<A> st;
  ArgmaxLanes<A> am;
  st.ref = ref;
  for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
    const int64_t len = std::min(kBlock, C - i0);
    const A* wb = w != nullptr ? w + i0 : nullptr;
    if (sc == 1) {
      consume<T, kSum, kCap, kStats>(row + i0, len, wb, i0 / kChunk, cap, st, am);
    } else {
      // Gathered raw, so that z is computed by the vector code as for contiguous rows.
      for (int64_t j = 0; j < len; ++j) buf[j] = to_acc(row[(i0 + j) * sc]);
      consume<A, kSum, kCap, kStats>(buf, len, wb, i0 / kChunk, cap, st, am);
    }
  }
  RowStats out;
  st.finish(out.row_max, out.log_sum);
  out.sumx = st.sumx;
  out.argmax = kStats ? am.resolve(-std::numeric_limits<A>::infinity(), 0) : 0;
  return out;
}

// loss = S lse - b sumx - (a - b) [lam w_y1 (z_y1 - r) + (1 - lam) w_y2 (z_y2 - r)]
//        + zl (r + lse)^2, S = b W + (a - b) (lam w_y1 + (1 - lam) w_y2), with lse and sumx
// relative to r (0 ignored, NaN invalid). Without mixed targets lam = 1.
template <typename T, bool kCap>
inline double row_loss(const RowArgs& a, const RowInfo& info, const T* row, double ref, double lse,
                       double sumx, double total_w, const CapOf<T, kCap>& cap) {
  using A = typename AccOf<T>::type;
  if (info.ignored) return 0.0;
  if (info.invalid) return std::numeric_limits<double>::quiet_NaN();
  const RowTargets t = row_targets(info, static_cast<const A*>(a.weight));
  const double total_mass = a.other_mass * total_w + a.target_extra * t.weight();
  auto z_at = [&](int64_t i) {
    return static_cast<double>(cap.apply(to_acc(row[i * a.stride_c])));
  };
  double loss = total_mass * lse;
  // The torch backend skips these terms when their coefficient is 0 (0 * -inf would be NaN).
  if (a.other_mass != 0.0) loss -= a.other_mass * sumx;
  if (a.target_extra != 0.0) {
    if (t.in_loss1) loss -= a.target_extra * t.share1 * (z_at(t.y1) - ref);
    if (t.in_loss2) loss -= a.target_extra * t.share2 * (z_at(t.y2) - ref);
  }
  if (a.z_loss != 0.0) loss += a.z_loss * (ref + lse) * (ref + lse);
  return loss;
}

// The statistics of row r: lse = r + lse_r, and the first maximum of z (lanes_argmax, from the
// vector pass, where the row's statistics are finite; else a scan, which also finds the first
// NaN). A row whose maximum is +inf (and has no NaN) gets lse +inf, as torch.logsumexp; its sums
// give NaN.
template <typename T, bool kCap>
inline void store_stats(const RowArgs& a, int64_t r, const T* row, const Shift& shift,
                        const CapOf<T, kCap>& cap, int64_t lanes_argmax) {
  using A = typename AccOf<T>::type;
  double lse = shift.ref + shift.lse;
  int64_t argmax = lanes_argmax;
  if (!std::isfinite(shift.lse)) {
    A best;
    argmax = first_argmax_scan<T, kCap>(row, a.num_classes, a.stride_c, cap, best);
    if (best == std::numeric_limits<A>::infinity()) lse = std::numeric_limits<double>::infinity();
  }
  static_cast<A*>(a.stats_lse)[r * a.stats_lse_stride] = static_cast<A>(lse);
  a.stats_argmax[r * a.stats_argmax_stride] = argmax;
}

// Writes row r's forward outputs: its loss, the saved lse and (kStats) its statistics.
template <typename T, bool kCap, bool kStats>
inline void store_row_outputs(const RowArgs& a, int64_t r, const RowInfo& info, const T* row,
                              const Shift& shift, double sumx, double total_w,
                              const CapOf<T, kCap>& cap, int64_t lanes_argmax) {
  using A = typename AccOf<T>::type;
  static_cast<A*>(a.loss)[r] =
      static_cast<A>(row_loss<T, kCap>(a, info, row, shift.ref, shift.lse, sumx, total_w, cap));
  static_cast<A*>(a.lse_out)[r] = static_cast<A>(shift.saved);
  if constexpr (kStats) store_stats<T, kCap>(a, r, row, shift, cap, lanes_argmax);
}

template <typename T, int kSum, bool kCap, bool kStats>
void forward_rows_impl(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(a.logits);
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const int64_t sc = a.stride_c;
  const double total_w = total_weight<T>(a);
  const CapOf<T, kCap> cap(a.softcap);
  // Training step (a.grad set) in a layout the pipelined path below does not take: each row's
  // gradient for the upstream value *guess right after the row's statistics.
  T* grad = static_cast<T*>(a.grad);
  const double guess =
      grad != nullptr ? static_cast<double>(*static_cast<const A*>(a.grad_guess)) : 0.0;
  alignas(64) A buf[kBlock];

  for (int64_t r = row_begin; r < row_end; ++r) {
    const RowInfo info = row_info<A>(a, r, grad != nullptr);
    const T* row = logits + info.in_offset;
    const A ref = row_reference(row, C, cap);
    RowStats st = online_row_stats<T, kSum, kCap, kStats>(row, C, sc, w, ref, cap, buf);
    const Shift shift = choose_shift(first_logit(row, C, cap), st.row_max, st.log_sum);
    if (kSum != 0 && shift.from_max) st.sumx = shifted_sum(row, C, sc, w, shift.ref, cap);
    store_row_outputs<T, kCap, kStats>(a, r, info, row, shift, st.sumx, total_w, cap, st.argmax);
    if (grad != nullptr) {
      // kSum == 2 exactly when the gradient has a weighted smoothing term (weight and b != 0).
      write_grad_row<T, kSum == 2, kCap>(a, info, row, grad + info.out_offset, guess,
                                         static_cast<double>(static_cast<A>(shift.saved)),
                                         total_w, cap, buf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward with gradient, pipelined, one exp per element.
//
// The kernels are compute-bound on the CPU (mostly exp), so writing the gradient in the forward
// pays off only if it also drops the second exp per element and overlaps the gradient's stores
// with computation. For contiguous rows whose exp values fit a per-thread buffer, each row r goes
//   pass 1: read the row (prefetched into L2 during the previous row) for its max and logit sum
//           (with softcap, z and dz/dx are computed here once and buffered for pass 2);
//   pass 2: e_i = exp(z_i - max) into a buffer, summed; in the same loop, chunk by chunk, the
//           gradient of row r - 1 is written from its buffer, g * (e_i * (S + 2 z lse) / sum
//           - b w_i) [* dz_i/dx_i], and row r + 1 is prefetched into L2;
// so that reads, writes and exps proceed together. The last row's gradient is written alone.
// Rows with non-finite statistics (NaN, +inf, all -inf) take the online path instead.

constexpr int64_t kExpBufferMaxBytes = int64_t{512} << 10;

// Elements between the scratch rows of exp_buffers (a multiple of 64 bytes).
inline int64_t exp_buffer_stride(int64_t n) { return (n + 63) / 64 * 64; }

// `count` per-thread, 64-byte aligned scratch rows of n accumulation values, exp_buffer_stride(n)
// elements apart (the storage is kept for later calls).
template <typename A>
A* exp_buffers(int64_t n, int64_t count) {
  thread_local std::vector<A> storage;
  const int64_t needed = count * exp_buffer_stride(n) + 64;
  if (static_cast<int64_t>(storage.size()) < needed) storage.resize(needed);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<A*>((addr + 63) & ~uintptr_t{63});
}

// What pass 1 finds: the row maximum of z, the (weighted) sum of z - ref and (kStats) the first
// maximum's index (valid when the row's statistics turn out finite).
template <typename A>
struct PassOne {
  A row_max;
  double sumx;
  int64_t argmax;
};

// Pass 1's scalar part: the row's last n < kChunk elements (only the last block has them).
template <typename A>
struct PassOneTail {
  A max = std::numeric_limits<A>::lowest();  // NaN included
  A best = -std::numeric_limits<A>::infinity();  // the first maximum (NaN excluded), for argmax
  int64_t best_index = 0;

  // The n elements at p, element `start` of the row, their (weighted) z - ref added to `sum` one
  // by one (z and dz/dx of each go to z_out and slope_out with kCap).
  template <typename T, int kSum, bool kCap, bool kStats>
  inline void scan(const T* p, int64_t n, int64_t start, const A* w, A ref,
                   const CapOf<T, kCap>& cap, A* z_out, A* slope_out, double& sum) {
    constexpr int64_t kChunk = Io<T>::kChunk;
    alignas(64) A z[kChunk];
    alignas(64) A dz[kChunk];
    load_tail<T, kCap>(p, n, cap, z, dz);
    if constexpr (kCap) {
      std::copy(z, z + n, z_out + start);
      std::copy(dz, dz + n, slope_out + start);
    }
    for (int64_t j = 0; j < n; ++j) {
      const A x = z[j];
      if (!(x <= max)) max = x;
      if (kStats && x > best) {
        best = x;
        best_index = start + j;
      }
      if constexpr (kSum == 1) sum += static_cast<double>(x - ref);
      if constexpr (kSum == 2) sum += static_cast<double>(x - ref) * static_cast<double>(w[start + j]);
    }
  }
};

// Pass 1 (NaN lanes may be ignored here; they make the pass-2 sum NaN). The maximum starts at the
// lowest finite value: an all -inf row sums to 0. With kCap, z and dz/dx of every element go to
// z_out and slope_out.
template <typename T, int kSum, bool kCap, bool kStats>
inline PassOne<typename AccOf<T>::type> row_max_and_sum(
    const T* p, int64_t C, const typename AccOf<T>::type* w, typename AccOf<T>::type ref,
    const CapOf<T, kCap>& cap, typename AccOf<T>::type* z_out, typename AccOf<T>::type* slope_out) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  const V refv(ref);
  V m0(std::numeric_limits<A>::lowest()), m1(std::numeric_limits<A>::lowest());
  ArgmaxLanes<A> am;
  PassOneTail<A> tail;
  double total = 0.0;
  for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
    const int64_t len = std::min(kBlock, C - i0);
    const T* q = p + i0;
    V vs0(A(0)), vs1(A(0));
    int64_t i = 0;
    for (; i + kChunk <= len; i += kChunk) {
      V a, b;
      Io<T>::load(q + i, a, b);
      if constexpr (kCap) {
        V sa, sb;
        a = cap.apply(a, sa);
        b = cap.apply(b, sb);
        Io<A>::store(z_out + i0 + i, a, b);
        Io<A>::store(slope_out + i0 + i, sa, sb);
      }
      if constexpr (kStats) am.add(a, b, (i0 + i) / kChunk);
      m0 = at::vec::clamp_min(m0, a);
      m1 = at::vec::clamp_min(m1, b);
      if constexpr (kSum == 1) {
        vs0 = vs0 + (a - refv);
        vs1 = vs1 + (b - refv);
      } else if constexpr (kSum == 2) {
        vs0 = at::vec::fmadd(a - refv, V::loadu(w + i0 + i), vs0);
        vs1 = at::vec::fmadd(b - refv, V::loadu(w + i0 + i + kV), vs1);
      }
    }
    if constexpr (kSum != 0) total += hsum<A>(vs0 + vs1);
    if (i < len) {
      tail.template scan<T, kSum, kCap, kStats>(q + i, len - i, i0 + i, w, ref, cap, z_out,
                                                slope_out, total);
    }
  }
  const A vmax = hmax_nan<A>(at::vec::clamp_min(m0, m1));
  PassOne<A> out;
  out.row_max = std::isnan(tail.max) || !(vmax >= tail.max) ? tail.max : vmax;
  out.sumx = total;
  out.argmax = kStats ? am.resolve(tail.best, tail.best_index) : 0;
  return out;
}

// The gradient of a row waiting to be written from its exp buffer.
template <typename T>
struct PendingRow {
  using A = typename AccOf<T>::type;
  const A* e = nullptr;      // nullptr: nothing pending
  const A* slope = nullptr;  // dz/dx of each element (softcap only)
  T* out = nullptr;
  A coef = A(0);  // g * (S + 2 z lse) / sum
  A bw = A(0);    // g * b
  TargetFixes fixes;
};

// The chunk at element i of the pending row's gradient: g (e coef - b w) [* dz/dx].
template <typename T, bool kWeighted, bool kStream, bool kCap>
inline void write_pending_chunk(const PendingRow<T>& pending, int64_t i,
                                const Vectorized<typename AccOf<T>::type>& coefv,
                                const Vectorized<typename AccOf<T>::type>& bwv,
                                const typename AccOf<T>::type* w) {
  using V = Vectorized<typename AccOf<T>::type>;
  constexpr int64_t kV = V::size();
  const V ea = V::loadu(pending.e + i);
  const V eb = V::loadu(pending.e + i + kV);
  V ga, gb;
  if constexpr (kWeighted) {
    ga = at::vec::fmsub(ea, coefv, bwv * V::loadu(w + i));
    gb = at::vec::fmsub(eb, coefv, bwv * V::loadu(w + i + kV));
  } else {
    ga = at::vec::fmsub(ea, coefv, bwv);
    gb = at::vec::fmsub(eb, coefv, bwv);
  }
  if constexpr (kCap) {
    ga = ga * V::loadu(pending.slope + i);
    gb = gb * V::loadu(pending.slope + i + kV);
  }
  if constexpr (kStream) {
    stream_chunk<T>(pending.out + i, ga, gb);
  } else {
    Io<T>::store(pending.out + i, ga, gb);
  }
}

// Pass 2 of one row (e = exp(row - row_max), returns sum(e); row may be nullptr for none) fused
// with the gradient write of `pending` (if any) and the L2 prefetch of `next` (if not nullptr).
// With kCap, row is pass 1's buffer of z (e may be that same buffer: each chunk is read before it
// is written) and the pending gradient gets its dz/dx factor. out of the pending row gets
// non-temporal stores when kStream (once aligned).
template <typename TIn, typename T, bool kWeighted, bool kStream, bool kCap>
double exp_row_and_write_pending(const TIn* row, typename AccOf<T>::type row_max,
                                 typename AccOf<T>::type* e, const PendingRow<T>& pending,
                                 const T* next, int64_t C, const typename AccOf<T>::type* w) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  constexpr int64_t kFlushChunks = kBlock / kChunk;  // two-level sums, as in the online pass
  static_assert(Io<TIn>::kChunk == kChunk, "pass 2 reads and writes chunks of one size");
  const bool do_exp = row != nullptr;
  const bool do_grad = pending.e != nullptr;
  const V mv(row_max), coefv(pending.coef), bwv(pending.bw);
  double total = 0.0;
  auto scalar = [&](int64_t i) {
    if (do_exp) {
      const A ei = static_cast<A>(std::exp(to_acc(row[i]) - row_max));
      e[i] = ei;
      total += static_cast<double>(ei);
    }
    if (do_grad) {
      const A wi = kWeighted ? w[i] : A(1);
      A gi = pending.e[i] * pending.coef - pending.bw * wi;
      if constexpr (kCap) gi *= pending.slope[i];
      pending.out[i] = static_cast<T>(gi);
    }
  };
  int64_t i = 0;
  if (kStream && do_grad) {  // (a constant condition in the non-streaming instances)
    // Peel elements until the output is aligned for the streaming stores.
    const auto misalign =
        static_cast<int64_t>(reinterpret_cast<uintptr_t>(pending.out) % kStreamAlign);
    const int64_t head =
        misalign == 0 || misalign % static_cast<int64_t>(sizeof(T)) != 0
            ? (misalign == 0 ? 0 : C)
            : std::min(C, (kStreamAlign - misalign) / static_cast<int64_t>(sizeof(T)));
    for (; i < head; ++i) scalar(i);
  }
  V s0(A(0)), s1(A(0));
  int64_t chunks = 0;
  for (; i + kChunk <= C; i += kChunk) {
    if (next != nullptr) prefetch_chunk_l2<T>(next + i);
    if (do_exp) {
      V a, b;
      Io<TIn>::load(row + i, a, b);
      const V ea = vexp(a - mv);
      const V eb = vexp(b - mv);
      ea.store(e + i);
      eb.store(e + i + kV);
      s0 = s0 + ea;
      s1 = s1 + eb;
      if (++chunks == kFlushChunks) {
        total += hsum<A>(s0 + s1);
        s0 = V(A(0));
        s1 = V(A(0));
        chunks = 0;
      }
    }
    if (do_grad) write_pending_chunk<T, kWeighted, kStream, kCap>(pending, i, coefv, bwv, w);
  }
  if (do_exp) total += hsum<A>(s0 + s1);
  for (; i < C; ++i) scalar(i);
  if (do_grad) {
    if (kStream) stream_fence();  // order the streamed row before the plain stores below
    pending.fixes.template store<T, A>(pending.out, 1);
  }
  return total;
}

// The pending gradient of a valid row from its buffers (e = exp(z - max) summing to exp_sum;
// slope = dz/dx or nullptr): g dz/dx (e_i / exp_sum (S + 2 zl (r + lse)) - b w_i - (a - b)
// share_i) with the target shares of row_targets.
template <typename T, bool kCap>
inline PendingRow<T> pending_row(const RowArgs& a, const RowInfo& info, const Shift& shift,
                                 double g, double exp_sum, double total_w,
                                 const typename AccOf<T>::type* e,
                                 const typename AccOf<T>::type* slope, T* out) {
  using A = typename AccOf<T>::type;
  const A* w = static_cast<const A*>(a.weight);
  const RowTargets t = row_targets(info, w);
  double scale = a.other_mass * total_w + a.target_extra * t.weight();
  if (a.z_loss != 0.0) scale += 2.0 * a.z_loss * (shift.ref + shift.lse);
  const double coef = g * scale / exp_sum;  // softmax_i = e_i / exp_sum
  const double bw = g * a.other_mass;
  PendingRow<T> pending;
  pending.e = e;
  pending.slope = slope;
  pending.out = out;
  pending.coef = static_cast<A>(coef);
  pending.bw = static_cast<A>(bw);
  pending.fixes = target_fixes(t, [&](int64_t i, double share) {
    const double w_i = w != nullptr ? static_cast<double>(w[i]) : 1.0;
    double value = coef * static_cast<double>(e[i]) - bw * w_i - g * a.target_extra * share;
    if constexpr (kCap) value *= static_cast<double>(slope[i]);
    return value;
  });
  return pending;
}

// One row of the forward with gradient by the online pass and write_grad_row (the pipelined
// path's rows with non-finite statistics).
template <typename T, int kSum, bool kCap, bool kStats>
inline void forward_grad_row_online(const RowArgs& a, int64_t r, const RowInfo& info, const T* row,
                                    T* out, typename AccOf<T>::type ref, double g, double total_w,
                                    const CapOf<T, kCap>& cap, typename AccOf<T>::type* buf) {
  using A = typename AccOf<T>::type;
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const RowStats st = online_row_stats<T, kSum, kCap, kStats>(row, C, 1, w, ref, cap, buf);
  const Shift shift = choose_shift(first_logit(row, C, cap), st.row_max, st.log_sum);
  store_row_outputs<T, kCap, kStats>(a, r, info, row, shift, st.sumx, total_w, cap, st.argmax);
  // kSum == 2 exactly when the gradient has a weighted smoothing term (weight and b != 0).
  write_grad_row<T, kSum == 2, kCap>(a, info, row, out, g,
                                     static_cast<double>(static_cast<A>(shift.saved)), total_w,
                                     cap, buf);
}

template <typename T, int kSum, bool kCap, bool kStats>
void forward_grad_rows_pipelined(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  // Pass 2 reads the logits, or with softcap pass 1's buffer of z.
  using TIn = std::conditional_t<kCap, A, T>;
  // kSum == 2 exactly when the gradient has a weighted smoothing term (weight and b != 0).
  constexpr bool kWeighted = kSum == 2;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const double total_w = total_weight<T>(a);
  const double g = static_cast<double>(*static_cast<const A*>(a.grad_guess));
  const CapOf<T, kCap> cap(a.softcap);
  // Two rows of exps (z before pass 2 with softcap), then two rows of dz/dx (softcap only).
  A* const buffers = exp_buffers<A>(C, kCap ? 4 : 2);
  const int64_t buffer_stride = exp_buffer_stride(C);
  int which = 0;  // the buffers that the next row goes to
  PendingRow<T> pending;
  alignas(64) A buf[kBlock];

  auto pass2 = [&](const TIn* row, A row_max, A* e, const T* next) -> double {
    const double sum =
        a.stream_grad
            ? exp_row_and_write_pending<TIn, T, kWeighted, true, kCap>(row, row_max, e, pending,
                                                                       next, C, w)
            : exp_row_and_write_pending<TIn, T, kWeighted, false, kCap>(row, row_max, e, pending,
                                                                        next, C, w);
    pending = PendingRow<T>();
    return sum;
  };

  for (int64_t r = row_begin; r < row_end; ++r) {
    const RowInfo info = row_info<A>(a, r, true);
    const T* row = logits + info.in_offset;
    T* out = grad + info.out_offset;
    const T* next = r + 1 < row_end ? logits + row_info<A>(a, r + 1, false).in_offset : nullptr;
    const A ref = row_reference(row, C, cap);
    A* e = buffers + which * buffer_stride;
    A* slope = kCap ? buffers + (2 + which) * buffer_stride : nullptr;
    const PassOne<A> p1 = row_max_and_sum<T, kSum, kCap, kStats>(row, C, w, ref, cap, e, slope);
    const TIn* source;
    if constexpr (kCap) {
      source = e;
    } else {
      source = row;
    }
    double exp_sum = 0.0;
    if (std::isfinite(p1.row_max)) exp_sum = pass2(source, p1.row_max, e, next);
    // NaN logits give a NaN sum, an all -inf row a zero sum: the online path handles those.
    if (!(std::isfinite(exp_sum) && exp_sum > 0.0)) {
      // (The pending row keeps its buffer until it is written; writing it now keeps row order.)
      if (pending.e != nullptr) pass2(nullptr, A(0), nullptr, nullptr);
      forward_grad_row_online<T, kSum, kCap, kStats>(a, r, info, row, out, ref, g, total_w, cap,
                                                     buf);
      continue;
    }
    const Shift shift =
        choose_shift(first_logit(row, C, cap), static_cast<double>(p1.row_max), std::log(exp_sum));
    double sumx = p1.sumx;
    if (kSum != 0 && shift.from_max) sumx = shifted_sum(row, C, 1, w, shift.ref, cap);
    store_row_outputs<T, kCap, kStats>(a, r, info, row, shift, sumx, total_w, cap, p1.argmax);
    if (info.ignored || info.invalid) {
      fill_row(out, C, 1, info.ignored ? 0.0 : std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    pending = pending_row<T, kCap>(a, info, shift, g, exp_sum, total_w, e, slope, out);
    which ^= 1;
  }
  if (pending.e != nullptr) pass2(nullptr, A(0), nullptr, nullptr);
}

template <typename T, bool kCap, bool kStats>
void forward_rows_with(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  const bool pipelined = a.grad != nullptr && a.stride_c == 1 && a.grad_stride_c == 1 &&
                         a.num_classes * static_cast<int64_t>(sizeof(typename AccOf<T>::type)) <=
                             kExpBufferMaxBytes;
  if (a.other_mass == 0.0) {
    pipelined ? forward_grad_rows_pipelined<T, 0, kCap, kStats>(a, row_begin, row_end)
              : forward_rows_impl<T, 0, kCap, kStats>(a, row_begin, row_end);
  } else if (a.weight == nullptr) {
    pipelined ? forward_grad_rows_pipelined<T, 1, kCap, kStats>(a, row_begin, row_end)
              : forward_rows_impl<T, 1, kCap, kStats>(a, row_begin, row_end);
  } else {
    pipelined ? forward_grad_rows_pipelined<T, 2, kCap, kStats>(a, row_begin, row_end)
              : forward_rows_impl<T, 2, kCap, kStats>(a, row_begin, row_end);
  }
}

// Softcap and statistics are template switches (their element loops differ); mixed targets are
// per-row scalars and need none.
template <typename T>
void forward_rows(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  const bool stats = a.stats_lse != nullptr;
  if (a.softcap > 0.0) {
    stats ? forward_rows_with<T, true, true>(a, row_begin, row_end)
          : forward_rows_with<T, true, false>(a, row_begin, row_end);
  } else {
    stats ? forward_rows_with<T, false, true>(a, row_begin, row_end)
          : forward_rows_with<T, false, false>(a, row_begin, row_end);
  }
}

void forward_entry(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case LogitsType::kFloat32:
      return forward_rows<float>(a, row_begin, row_end);
    case LogitsType::kFloat64:
      return forward_rows<double>(a, row_begin, row_end);
    case LogitsType::kFloat16:
      return forward_rows<c10::Half>(a, row_begin, row_end);
    case LogitsType::kBFloat16:
      return forward_rows<c10::BFloat16>(a, row_begin, row_end);
  }
}

void backward_entry(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.dtype) {
    case LogitsType::kFloat32:
      return backward_rows<float>(a, row_begin, row_end);
    case LogitsType::kFloat64:
      return backward_rows<double>(a, row_begin, row_end);
    case LogitsType::kFloat16:
      return backward_rows<c10::Half>(a, row_begin, row_end);
    case LogitsType::kBFloat16:
      return backward_rows<c10::BFloat16>(a, row_begin, row_end);
  }
}

}  // namespace

CpuKernels kernels() { return CpuKernels{LSR_CPU_NAME, &forward_entry, &backward_entry}; }

}  // namespace LSR_CPU_NS
}  // namespace lsr_fused
