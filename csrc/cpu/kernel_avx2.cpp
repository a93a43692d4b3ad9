// AVX2 + FMA + F16C CPU kernels (see isa_prelude.h for how the target is selected).
#include "isa_prelude.h"

#if LSR_ISA_VARIANTS
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define LSR_CPU_NS cpu_avx2
#define LSR_CPU_NAME "avx2"
#include "kernel_impl.h"
#else
#include "../lsr_args.h"
namespace lsr_fused::cpu_avx2 {
CpuKernels kernels() { return CpuKernels{nullptr, nullptr, nullptr}; }
}  // namespace lsr_fused::cpu_avx2
#endif
