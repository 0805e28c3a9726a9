// The portable CPU path: the baseline ISA of the build (SSE2 on x86-64, NEON
// on aarch64) with 16-byte vectors. See isa.h.
#include "isa_prelude.h"

#define FASTCELLS_CPU_ISA generic
#define FASTCELLS_ISA_NAME "generic"
#define FASTCELLS_ISA_ID 0
#define FASTCELLS_VEC_BYTES 16
#define FASTCELLS_MR 6
#include "recurrent_cpu_impl.h"
