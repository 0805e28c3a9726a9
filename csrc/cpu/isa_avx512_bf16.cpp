// The AVX-512-BF16 path: the avx512 path's kernels (same source, vectors and
// register blocks, so float32 and float64 results are avx512's bit for bit)
// plus products on bfloat16 operands for bfloat16 inputs (FASTCELLS_BF16 in
// gemm_cpu.h). See isa.h.
#if defined(__x86_64__) || defined(_M_X64)
#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,prefer-vector-width=512")
#define FASTCELLS_CPU_ISA avx512_bf16
#define FASTCELLS_ISA_NAME "avx512_bf16"
#define FASTCELLS_ISA_ID 4
#define FASTCELLS_VEC_BYTES 64
#define FASTCELLS_MR 12
#define FASTCELLS_AVX512_MASKS 1
#define FASTCELLS_BF16 1
#include "recurrent_cpu_impl.h"
#pragma GCC pop_options
#endif
