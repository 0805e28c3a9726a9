// Everything an ISA wrapper (csrc/cpu/isa_*.cpp) includes before it switches
// the compiler to its ISA. Library headers are compiled for the baseline ISA
// in every wrapper, so the inline functions they define (and the linker
// merges across wrappers) never contain instructions a host may lack; only
// the kernels that follow the wrapper's `#pragma GCC target` do, and those
// live in the path's own namespace.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../kernels/cells.h"
#include "../kernels/params.h"
#include "isa.h"
#include "memory_cpu.h"
#include "pack_cpu.h"
#include "team_barrier.h"
