// Shared by the ISA-specific kernel translation units (kernel_avx2.cpp, kernel_avx512.cpp).
//
// torch's extension build compiles every source with the same flags, so instead of per-file -m
// flags these files switch the target with `#pragma GCC target` before any include and define the
// feature macros that at::vec / sleef.h test (GCC's pragma does not define them). at::vec puts its
// code in an inline namespace named after CPU_CAPABILITY, and the kernels live in an anonymous
// namespace, so nothing compiled here is shared with the baseline translation units except inline
// helpers from common headers, of which the linker keeps the baseline copy (kernel_default.cpp is
// linked first). The ops glue only calls into these kernels after checking the CPU at runtime.
//
// Only GCC on x86-64 builds the variants; other compilers/architectures get a stub that reports
// "not compiled" and the baseline kernels are used.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__INTEL_COMPILER) && !defined(LSR_FUSED_NO_ISA_VARIANTS)
#define LSR_ISA_VARIANTS 1
// GCC warns that vector arguments change the ABI (irrelevant inside one TU) and, in GCC 12, about
// the deliberately undefined vectors of avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define LSR_ISA_VARIANTS 0
#endif
