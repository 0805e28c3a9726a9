// Run-time settings of the CPU backend. The op layer reads them from the
// environment once, when the extension loads (read_cpu_settings in
// csrc/ops.cpp), so the kernels never read the environment themselves.
#pragma once

#include <cstdint>

namespace fastcells {
namespace cpu {

struct Settings {
  // Huge-page advice for large buffers (memory_cpu.h); FASTCELLS_HUGE_PAGES=0
  // turns it off.
  bool huge_pages = true;
  // How long a thread waits at the team's step barrier spinning before it
  // sleeps (team_barrier.h); FASTCELLS_BARRIER_SPIN_US, where 0 makes every
  // wait sleep (the tests use it to run the futex path).
  int64_t barrier_spin_us = 50;
};

inline Settings& settings() {
  static Settings s;
  return s;
}

}  // namespace cpu
}  // namespace fastcells
