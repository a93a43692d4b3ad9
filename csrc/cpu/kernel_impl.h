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

// The row's first logit where finite, else 0: the reference the forward sums are taken against
// (and r itself in the common case, see choose_shift).
template <typename T>
inline typename AccOf<T>::type row_reference(const T* row, int64_t C) {
  using A = typename AccOf<T>::type;
  if (C == 0) return A(0);
  const A first = to_acc(row[0]);
  return std::isfinite(first) ? first : A(0);
}

// The first logit in double (-inf for a row without classes).
template <typename T>
inline double first_logit(const T* row, int64_t C) {
  return C > 0 ? static_cast<double>(to_acc(row[0])) : -std::numeric_limits<double>::infinity();
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

// The row max (NaN-free rows), for a row whose reference is its max.
template <typename T>
inline typename AccOf<T>::type row_max_value(const T* row, int64_t C, int64_t sc) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  V m0(std::numeric_limits<A>::lowest()), m1(std::numeric_limits<A>::lowest());
  int64_t i = 0;
  if (sc == 1) {
    for (; i + kChunk <= C; i += kChunk) {
      V a, b;
      Io<T>::load(row + i, a, b);
      m0 = at::vec::clamp_min(m0, a);
      m1 = at::vec::clamp_min(m1, b);
    }
  }
  A m = hmax_nan<A>(at::vec::clamp_min(m0, m1));
  for (; i < C; ++i) m = std::max(m, to_acc(row[i * sc]));
  return m;
}

// sum_c w_c (x_c - ref) in double (w nullptr: unweighted), for a row whose reference is its max
// (the fused sums were taken against its first logit).
template <typename T>
inline double shifted_sum(const T* row, int64_t C, int64_t sc, const typename AccOf<T>::type* w,
                          double ref) {
  double total = 0.0;
  for (int64_t i = 0; i < C; ++i) {
    const double d = static_cast<double>(to_acc(row[i * sc])) - ref;
    total += w != nullptr ? d * static_cast<double>(w[i]) : d;
  }
  return total;
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

// Consumes len contiguous elements of type T (len is a multiple of the chunk except for the last
// piece of a row). kSum: 0 = no logit sum (other_mass == 0), 1 = plain sum, 2 = weighted sum.
template <typename T, int kSum>
inline void consume(const T* p, int64_t len, const typename AccOf<T>::type* w,
                    LaneStats<typename AccOf<T>::type>& st) {
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
    st.add_chunk(a, b);
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
    // Tail: pad a chunk with -inf (neutral for max and exp); sum the tail separately.
    alignas(64) A tmp[kChunk];
    for (int64_t j = 0; j < kChunk; ++j) tmp[j] = -std::numeric_limits<A>::infinity();
    for (int64_t j = i; j < len; ++j) {
      const A x = to_acc(p[j]);
      tmp[j - i] = x;
      if constexpr (kSum == 1) bsum += static_cast<double>(x - st.ref);
      if constexpr (kSum == 2) bsum += static_cast<double>(x - st.ref) * static_cast<double>(w[j]);
    }
    st.add_chunk(V::loadu(tmp), V::loadu(tmp + kV));
  }
  if constexpr (kSum != 0) st.sumx += bsum;
  st.flush();
}

struct RowInfo {
  int64_t in_offset;
  int64_t out_offset;
  int64_t target;
  bool ignored;
  bool invalid;
};

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
  return info;
}

// grad = coef * exp((x - ref) - lse) - bw * w  over len contiguous elements (in and out may alias
// unless kStream, which writes with non-temporal stores once out is aligned).
template <typename T, bool kWeighted, bool kStream>
inline void grad_block(const T* in, T* out, int64_t len, typename AccOf<T>::type ref,
                       typename AccOf<T>::type lse, typename AccOf<T>::type coef,
                       typename AccOf<T>::type bw, const typename AccOf<T>::type* w) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  auto scalar = [&](int64_t i) {
    const A e = static_cast<A>(std::exp((to_acc(in[i]) - ref) - lse));
    const A wi = kWeighted ? w[i] : A(1);
    out[i] = static_cast<T>(e * coef - bw * wi);
  };
  int64_t i = 0;
  if constexpr (kStream) {
    // Peel elements until out is aligned for the streaming stores (T's size divides the alignment).
    const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kStreamAlign);
    const int64_t head = misalign == 0 || misalign % static_cast<int64_t>(sizeof(T)) != 0
                             ? (misalign == 0 ? 0 : len)
                             : std::min(len, (kStreamAlign - misalign) / static_cast<int64_t>(sizeof(T)));
    for (; i < head; ++i) scalar(i);
  }
  const V refv(ref), lsev(lse), coefv(coef), bwv(bw);
  for (; i + kChunk <= len; i += kChunk) {
    V a, b;
    prefetch_chunk<T>(in + i);
    Io<T>::load(in + i, a, b);
    V ga, gb;
    if constexpr (kWeighted) {
      ga = at::vec::fmsub(vexp((a - refv) - lsev), coefv, bwv * V::loadu(w + i));
      gb = at::vec::fmsub(vexp((b - refv) - lsev), coefv, bwv * V::loadu(w + i + kV));
    } else {
      ga = at::vec::fmsub(vexp((a - refv) - lsev), coefv, bwv);
      gb = at::vec::fmsub(vexp((b - refv) - lsev), coefv, bwv);
    }
    if constexpr (kStream) {
      stream_chunk<T>(out + i, ga, gb);
    } else {
      Io<T>::store(out + i, ga, gb);
    }
  }
  for (; i < len; ++i) scalar(i);
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

// Writes the gradient of one row for the upstream value g: zeros for an ignored row, NaN for an
// invalid target, else g * (softmax * (S + 2 z (r + lse)) - b * w - (a - b) * w_y * [i == y]) with
// softmax = exp((x - r) - lse), r and lse decoded from forward's saved value (choose_shift). out
// may alias row (r and x_y are read before anything is written). buf: kBlock scratch for strided
// rows.
template <typename T, bool kWeighted>
inline void write_grad_row(const RowArgs& a, const RowInfo& info, const T* row, T* out, double g,
                           double saved, double total_w, typename AccOf<T>::type* buf) {
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
  const int64_t y = info.target;
  const double w_y = w != nullptr ? static_cast<double>(w[y]) : 1.0;
  const double total_mass = a.other_mass * total_w + a.target_extra * w_y;
  // Read r and x_y before the row is overwritten (grad may alias logits).
  const bool from_max = std::isfinite(saved) && saved < 0.0;
  const A ref = from_max ? row_max_value(row, C, sc) : row_reference(row, C);
  const double ref_d = static_cast<double>(ref);
  const double lse = from_max ? -1.0 - saved : saved;
  const double x_y = static_cast<double>(to_acc(row[y * sc]));

  if (!std::isfinite(lse)) {
    // Degenerate row (all -inf, +inf or NaN logits): follow the reference formula literally.
    const double scale = total_mass + 2.0 * a.z_loss * (ref_d + lse);
    for (int64_t i = 0; i < C; ++i) {
      const double x = static_cast<double>(to_acc(row[i * sc]));
      double gi = std::exp((x - ref_d) - lse) * scale;
      if (a.other_mass != 0.0) {
        gi -= a.other_mass * (w != nullptr ? static_cast<double>(w[i]) : 1.0);
      }
      if (i == y) gi -= a.target_extra * w_y;
      out[i * gsc] = static_cast<T>(static_cast<A>(gi * g));
    }
    return;
  }

  double scale = total_mass;
  if (a.z_loss != 0.0) scale += 2.0 * a.z_loss * (ref_d + lse);
  const double coef = g * scale;
  const double bw = g * a.other_mass;
  const double grad_y = coef * std::exp((x_y - ref_d) - lse) - bw * w_y - g * a.target_extra * w_y;
  const A lse_a = static_cast<A>(lse), coef_a = static_cast<A>(coef), bw_a = static_cast<A>(bw);

  if (sc == 1 && gsc == 1 && a.stream_grad) {
    for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
      const int64_t len = std::min(kBlock, C - i0);
      grad_block<T, kWeighted, true>(row + i0, out + i0, len, ref, lse_a, coef_a, bw_a,
                                     kWeighted ? w + i0 : nullptr);
    }
    stream_fence();  // order the streamed row before the plain store of the target element
  } else if (sc == 1 && gsc == 1) {
    for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
      const int64_t len = std::min(kBlock, C - i0);
      grad_block<T, kWeighted, false>(row + i0, out + i0, len, ref, lse_a, coef_a, bw_a,
                                      kWeighted ? w + i0 : nullptr);
    }
  } else {
    for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
      const int64_t len = std::min(kBlock, C - i0);
      for (int64_t j = 0; j < len; ++j) buf[j] = to_acc(row[(i0 + j) * sc]);
      grad_block<A, kWeighted, false>(buf, buf, len, ref, lse_a, coef_a, bw_a,
                                      kWeighted ? w + i0 : nullptr);
      for (int64_t j = 0; j < len; ++j) out[(i0 + j) * gsc] = static_cast<T>(buf[j]);
    }
  }
  out[y * gsc] = static_cast<T>(static_cast<A>(grad_y));
}

template <typename T>
inline double total_weight(const RowArgs& a) {
  using A = typename AccOf<T>::type;
  return a.weight_total != nullptr ? static_cast<double>(*static_cast<const A*>(a.weight_total))
                                   : static_cast<double>(a.num_classes);
}

template <typename T, bool kWeighted>
void backward_rows_impl(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const A* grad_loss = static_cast<const A*>(a.grad_loss);
  const A* lse_in = static_cast<const A*>(a.lse_in);
  // With a guess, the forward pass already wrote every row for upstream == *guess.
  const A* guess = static_cast<const A*>(a.grad_guess);
  const double total_w = total_weight<T>(a);
  alignas(64) A buf[kBlock];

  for (int64_t r = row_begin; r < row_end; ++r) {
    const A g = grad_loss[r * a.grad_loss_stride];
    if (guess != nullptr && g == *guess) continue;  // touch neither the logits nor the gradient
    const RowInfo info = row_info(a, r, true);
    write_grad_row<T, kWeighted>(a, info, logits + info.in_offset, grad + info.out_offset,
                                 static_cast<double>(g),
                                 static_cast<double>(lse_in[r * a.lse_stride]), total_w, buf);
  }
}

template <typename T>
void backward_rows(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  if (a.weight != nullptr && a.other_mass != 0.0) {
    backward_rows_impl<T, true>(a, row_begin, row_end);
  } else {
    backward_rows_impl<T, false>(a, row_begin, row_end);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// The max, log(sum exp(x - max)) and (weighted) sum of x - ref of one row by the single online
// pass (any layout).
template <typename T, int kSum>
inline void online_row_stats(const T* row, int64_t C, int64_t sc, const typename AccOf<T>::type* w,
                             typename AccOf<T>::type ref, typename AccOf<T>::type* buf,
                             double& row_max, double& log_sum, double& sumx) {
  using A = typename AccOf<T>::type;
  LaneStats<A> st;
  st.ref = ref;
  if (sc == 1) {
    for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
      const int64_t len = std::min(kBlock, C - i0);
      consume<T, kSum>(row + i0, len, w != nullptr ? w + i0 : nullptr, st);
    }
  } else {
    for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
      const int64_t len = std::min(kBlock, C - i0);
      for (int64_t j = 0; j < len; ++j) buf[j] = to_acc(row[(i0 + j) * sc]);
      consume<A, kSum>(buf, len, w != nullptr ? w + i0 : nullptr, st);
    }
  }
  st.finish(row_max, log_sum);
  sumx = st.sumx;
}

// loss = S * lse - b * sumx - (a - b) * w_y * (x_y - r) + z * (r + lse)^2 with lse and sumx
// relative to r (0 ignored, NaN invalid).
template <typename T>
inline double row_loss(const RowArgs& a, const RowInfo& info, const T* row, double ref, double lse,
                       double sumx, double total_w) {
  using A = typename AccOf<T>::type;
  if (info.ignored) return 0.0;
  if (info.invalid) return std::numeric_limits<double>::quiet_NaN();
  const A* w = static_cast<const A*>(a.weight);
  const int64_t y = info.target;
  const double w_y = w != nullptr ? static_cast<double>(w[y]) : 1.0;
  const double total_mass = a.other_mass * total_w + a.target_extra * w_y;
  double loss = total_mass * lse;
  // The torch backend skips these terms when their coefficient is 0 (0 * -inf would be NaN).
  if (a.other_mass != 0.0) loss -= a.other_mass * sumx;
  if (a.target_extra != 0.0) {
    loss -= a.target_extra * w_y * (static_cast<double>(to_acc(row[y * a.stride_c])) - ref);
  }
  if (a.z_loss != 0.0) loss += a.z_loss * (ref + lse) * (ref + lse);
  return loss;
}

template <typename T, int kSum>
void forward_rows_impl(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  const T* logits = static_cast<const T*>(a.logits);
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  const int64_t sc = a.stride_c;
  A* loss_out = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse_out);
  const double total_w = total_weight<T>(a);
  // Training step (a.grad set) in a layout the pipelined path below does not take: each row's
  // gradient for the upstream value *guess right after the row's statistics.
  T* grad = static_cast<T*>(a.grad);
  const double guess =
      grad != nullptr ? static_cast<double>(*static_cast<const A*>(a.grad_guess)) : 0.0;
  alignas(64) A buf[kBlock];

  for (int64_t r = row_begin; r < row_end; ++r) {
    const RowInfo info = row_info(a, r, grad != nullptr);
    const T* row = logits + info.in_offset;
    const A ref = row_reference(row, C);
    double row_max, log_sum, sumx;
    online_row_stats<T, kSum>(row, C, sc, w, ref, buf, row_max, log_sum, sumx);
    const Shift shift = choose_shift(first_logit(row, C), row_max, log_sum);
    if (kSum != 0 && shift.from_max) sumx = shifted_sum(row, C, sc, w, shift.ref);
    loss_out[r] = static_cast<A>(row_loss<T>(a, info, row, shift.ref, shift.lse, sumx, total_w));
    lse_out[r] = static_cast<A>(shift.saved);
    if (grad != nullptr) {
      // kSum == 2 exactly when the gradient has a weighted smoothing term (weight and b != 0).
      write_grad_row<T, kSum == 2>(a, info, row, grad + info.out_offset, guess,
                                   static_cast<double>(static_cast<A>(shift.saved)), total_w, buf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward with gradient, pipelined, one exp per element.
//
// The kernels are compute-bound on the CPU (mostly exp), so writing the gradient in the forward
// pays off only if it also drops the second exp per element and overlaps the gradient's stores
// with computation. For contiguous rows whose exp values fit a per-thread buffer, each row r goes
//   pass 1: read the row (prefetched into L2 during the previous row) for its max and logit sum;
//   pass 2: e_i = exp(x_i - max) into a buffer, summed; in the same loop, chunk by chunk, the
//           gradient of row r - 1 is written from its buffer, g * (e_i * (S + 2 z lse) / sum
//           - b w_i), and row r + 1 is prefetched into L2;
// so that reads, writes and exps proceed together. The last row's gradient is written alone.
// Rows with non-finite statistics (NaN, +inf, all -inf) take the online path instead.

constexpr int64_t kExpBufferMaxBytes = int64_t{512} << 10;

// Elements between the two scratch rows of exp_buffers (a multiple of 64 bytes).
inline int64_t exp_buffer_stride(int64_t n) { return (n + 63) / 64 * 64; }

// Two per-thread, 64-byte aligned scratch rows of n accumulation values, exp_buffer_stride(n)
// elements apart (the storage is kept for later calls).
template <typename A>
A* exp_buffers(int64_t n) {
  thread_local std::vector<A> storage;
  const int64_t needed = 2 * exp_buffer_stride(n) + 64;
  if (static_cast<int64_t>(storage.size()) < needed) storage.resize(needed);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<A*>((addr + 63) & ~uintptr_t{63});
}

// Pass 1: the row maximum (NaN lanes may be ignored here; they make the pass-2 sum NaN) and the
// (weighted) sum of x - ref. The maximum starts at the lowest finite value: an all -inf row sums
// to 0.
template <typename T, int kSum>
inline void row_max_and_sum(const T* p, int64_t C, const typename AccOf<T>::type* w,
                            typename AccOf<T>::type ref, typename AccOf<T>::type& row_max,
                            double& sumx) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  const V refv(ref);
  V m0(std::numeric_limits<A>::lowest()), m1(std::numeric_limits<A>::lowest());
  A tail_max = std::numeric_limits<A>::lowest();
  double total = 0.0;
  for (int64_t i0 = 0; i0 < C; i0 += kBlock) {
    const int64_t len = std::min(kBlock, C - i0);
    const T* q = p + i0;
    V vs0(A(0)), vs1(A(0));
    int64_t i = 0;
    for (; i + kChunk <= len; i += kChunk) {
      V a, b;
      Io<T>::load(q + i, a, b);
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
    for (; i < len; ++i) {
      const A x = to_acc(q[i]);
      if (!(x <= tail_max)) tail_max = x;  // NaN included
      if constexpr (kSum == 1) total += static_cast<double>(x - ref);
      if constexpr (kSum == 2) total += static_cast<double>(x - ref) * static_cast<double>(w[i0 + i]);
    }
  }
  const A vmax = hmax_nan<A>(at::vec::clamp_min(m0, m1));
  row_max = std::isnan(tail_max) || !(vmax >= tail_max) ? tail_max : vmax;
  sumx = total;
}

// The gradient of a row waiting to be written from its exp buffer.
template <typename T>
struct PendingRow {
  using A = typename AccOf<T>::type;
  const A* e = nullptr;  // nullptr: nothing pending
  T* out = nullptr;
  int64_t y = 0;
  A coef = A(0);  // g * (S + 2 z lse) / sum
  A bw = A(0);    // g * b
  A grad_y = A(0);
};

// Pass 2 of one row (e = exp(row - row_max), returns sum(e); row may be nullptr for none) fused
// with the gradient write of `pending` (if any) and the L2 prefetch of `next` (if not nullptr).
// out of the pending row gets non-temporal stores when kStream (once aligned).
template <typename T, bool kWeighted, bool kStream>
double exp_row_and_write_pending(const T* row, typename AccOf<T>::type row_max,
                                 typename AccOf<T>::type* e, const PendingRow<T>& pending,
                                 const T* next, int64_t C, const typename AccOf<T>::type* w) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t kChunk = Io<T>::kChunk;
  constexpr int64_t kV = V::size();
  constexpr int64_t kFlushChunks = kBlock / kChunk;  // two-level sums, as in the online pass
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
      pending.out[i] = static_cast<T>(pending.e[i] * pending.coef - pending.bw * wi);
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
      Io<T>::load(row + i, a, b);
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
    if (do_grad) {
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
      if constexpr (kStream) {
        stream_chunk<T>(pending.out + i, ga, gb);
      } else {
        Io<T>::store(pending.out + i, ga, gb);
      }
    }
  }
  if (do_exp) total += hsum<A>(s0 + s1);
  for (; i < C; ++i) scalar(i);
  if (do_grad) {
    if (kStream) stream_fence();  // order the streamed row before the plain store below
    pending.out[pending.y] = static_cast<T>(pending.grad_y);
  }
  return total;
}

template <typename T, int kSum>
void forward_grad_rows_pipelined(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  using A = typename AccOf<T>::type;
  // kSum == 2 exactly when the gradient has a weighted smoothing term (weight and b != 0).
  constexpr bool kWeighted = kSum == 2;
  const T* logits = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const A* w = static_cast<const A*>(a.weight);
  const int64_t C = a.num_classes;
  A* loss_out = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse_out);
  const double total_w = total_weight<T>(a);
  const double g = static_cast<double>(*static_cast<const A*>(a.grad_guess));
  A* const buffers = exp_buffers<A>(C);
  const int64_t buffer_stride = exp_buffer_stride(C);
  int which = 0;  // the buffer that the next row's exps go to
  PendingRow<T> pending;
  alignas(64) A buf[kBlock];

  auto pass2 = [&](const T* row, A row_max, A* e, const T* next) -> double {
    const double sum =
        a.stream_grad
            ? exp_row_and_write_pending<T, kWeighted, true>(row, row_max, e, pending, next, C, w)
            : exp_row_and_write_pending<T, kWeighted, false>(row, row_max, e, pending, next, C, w);
    pending = PendingRow<T>();
    return sum;
  };

  for (int64_t r = row_begin; r < row_end; ++r) {
    const RowInfo info = row_info(a, r, true);
    const T* row = logits + info.in_offset;
    T* out = grad + info.out_offset;
    const T* next = r + 1 < row_end ? logits + row_info(a, r + 1, false).in_offset : nullptr;
    const A ref = row_reference(row, C);
    A row_max;
    double sumx;
    row_max_and_sum<T, kSum>(row, C, w, ref, row_max, sumx);
    double exp_sum = 0.0;
    A* e = buffers + which * buffer_stride;
    if (std::isfinite(row_max)) exp_sum = pass2(row, row_max, e, next);
    // NaN logits give a NaN sum, an all -inf row a zero sum: the online path handles those.
    if (!(std::isfinite(exp_sum) && exp_sum > 0.0)) {
      // (The pending row keeps its buffer until it is written; writing it now keeps row order.)
      if (pending.e != nullptr) pass2(nullptr, A(0), nullptr, nullptr);
      double max_d, log_sum;
      online_row_stats<T, kSum>(row, C, 1, w, ref, buf, max_d, log_sum, sumx);
      const Shift shift = choose_shift(first_logit(row, C), max_d, log_sum);
      loss_out[r] = static_cast<A>(row_loss<T>(a, info, row, shift.ref, shift.lse, sumx, total_w));
      lse_out[r] = static_cast<A>(shift.saved);
      write_grad_row<T, kWeighted>(a, info, row, out, g,
                                   static_cast<double>(static_cast<A>(shift.saved)), total_w, buf);
      continue;
    }
    const Shift shift =
        choose_shift(first_logit(row, C), static_cast<double>(row_max), std::log(exp_sum));
    if (kSum != 0 && shift.from_max) sumx = shifted_sum(row, C, 1, w, shift.ref);
    loss_out[r] = static_cast<A>(row_loss<T>(a, info, row, shift.ref, shift.lse, sumx, total_w));
    lse_out[r] = static_cast<A>(shift.saved);
    if (info.ignored || info.invalid) {
      fill_row(out, C, 1, info.ignored ? 0.0 : std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    const int64_t y = info.target;
    const double w_y = w != nullptr ? static_cast<double>(w[y]) : 1.0;
    double scale = a.other_mass * total_w + a.target_extra * w_y;
    if (a.z_loss != 0.0) scale += 2.0 * a.z_loss * (shift.ref + shift.lse);
    const double coef = g * scale / exp_sum;  // softmax_i = e_i / exp_sum
    const double bw = g * a.other_mass;
    pending.e = e;
    pending.out = out;
    pending.y = y;
    pending.coef = static_cast<A>(coef);
    pending.bw = static_cast<A>(bw);
    pending.grad_y = static_cast<A>(coef * static_cast<double>(e[y]) - bw * w_y -
                                    g * a.target_extra * w_y);
    which ^= 1;
  }
  if (pending.e != nullptr) pass2(nullptr, A(0), nullptr, nullptr);
}

template <typename T>
void forward_rows(const RowArgs& a, int64_t row_begin, int64_t row_end) {
  const bool pipelined = a.grad != nullptr && a.stride_c == 1 && a.grad_stride_c == 1 &&
                         a.num_classes * static_cast<int64_t>(sizeof(typename AccOf<T>::type)) <=
                             kExpBufferMaxBytes;
  if (a.other_mass == 0.0) {
    pipelined ? forward_grad_rows_pipelined<T, 0>(a, row_begin, row_end)
              : forward_rows_impl<T, 0>(a, row_begin, row_end);
  } else if (a.weight == nullptr) {
    pipelined ? forward_grad_rows_pipelined<T, 1>(a, row_begin, row_end)
              : forward_rows_impl<T, 1>(a, row_begin, row_end);
  } else {
    pipelined ? forward_grad_rows_pipelined<T, 2>(a, row_begin, row_end)
              : forward_rows_impl<T, 2>(a, row_begin, row_end);
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
