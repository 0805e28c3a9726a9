// The AVX-512 path: 16-lane float vectors, a 12 x 2-vector register block
// (24 accumulators, two panel vectors and a broadcast in the 32 zmm
// registers), 512-bit vectors preferred in the gate loops too. See isa.h.
#if defined(__x86_64__) || defined(_M_X64)
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,prefer-vector-width=512")
#define FASTCELLS_CPU_ISA avx512
#define FASTCELLS_ISA_NAME "avx512"
#define FASTCELLS_ISA_ID 2
#define FASTCELLS_VEC_BYTES 64
#define FASTCELLS_MR 12
#define FASTCELLS_AVX512_MASKS 1
#include "recurrent_cpu_impl.h"
#pragma GCC pop_options
#endif
