// The AVX2 + FMA path: 8-lane float vectors, a 6 x 2-vector register block
// in the 16 ymm registers. See isa.h.
#if defined(__x86_64__) || defined(_M_X64)
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FASTCELLS_CPU_ISA avx2
#define FASTCELLS_ISA_NAME "avx2"
#define FASTCELLS_ISA_ID 1
#define FASTCELLS_VEC_BYTES 32
#define FASTCELLS_MR 6
#define FASTCELLS_AVX2_MASKS 1
#include "recurrent_cpu_impl.h"
#pragma GCC pop_options
#endif
