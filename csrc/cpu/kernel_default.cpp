// Baseline CPU kernels: at::vec's portable implementation, compiled with the default flags.
//
// Keep this file before the ISA variants in every source list: the linker keeps the first copy of
// each inline function from the shared headers, and this copy runs on every CPU.
#define LSR_CPU_NS cpu_default
#define LSR_CPU_NAME "default"
#include "kernel_impl.h"
