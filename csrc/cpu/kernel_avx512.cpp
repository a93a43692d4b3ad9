// AVX-512 (F/BW/VL/DQ) + FMA + F16C CPU kernels (see isa_prelude.h for how the target is selected).
#include "isa_prelude.h"

#if LSR_ISA_VARIANTS
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define LSR_CPU_NS cpu_avx512
#define LSR_CPU_NAME "avx512"
#include "kernel_impl.h"
#else
#include "../lsr_args.h"
namespace lsr_fused::cpu_avx512 {
CpuKernels kernels() { return CpuKernels{nullptr, nullptr, nullptr}; }
}  // namespace lsr_fused::cpu_avx512
#endif
