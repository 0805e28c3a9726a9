// The avx512 path's kernel source, vector width (64 bytes) and register
// block (12 rows) compiled for AVX2 instructions: each 16-lane vector runs as
// two ymm halves. Never chosen automatically; it lets the test suite run the
// AVX-512 path's tiling, tails and panel layout on hosts without AVX-512.
// See isa.h.
#if defined(__x86_64__) || defined(_M_X64)
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define FASTCELLS_CPU_ISA avx512_layout
#define FASTCELLS_ISA_NAME "avx512_layout"
#define FASTCELLS_ISA_ID 3
#define FASTCELLS_VEC_BYTES 64
#define FASTCELLS_MR 12
#include "recurrent_cpu_impl.h"
#pragma GCC pop_options
#endif
