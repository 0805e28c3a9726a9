// The per-step barrier of the CPU time loop's thread team.
//
// A team that splits hidden units meets once or twice per step, every few
// microseconds. The first thread to arrive spins for a short, bounded time
// (kSpinMicros, longer than the imbalance of a normal step), then sleeps on a
// futex until the last one arrives. OpenMP's own barrier spins far longer
// before it sleeps (libgomp: about 300k iterations); on a core shared with
// another busy process that spinning holds the core the late thread needs,
// and every step then costs a scheduler time slice. The last thread to
// arrive only makes a system call when someone sleeps.
//
// A barrier that often has to sleep means the team does not have its cores
// (another process runs on them); TeamBackoff then runs the next calls on one
// thread, which needs no barrier, and tries the team again later.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "settings.h"

namespace fastcells {
namespace cpu {

class StepBarrier {
 public:
  // The spin budget of a wait before it sleeps (settings.h).
  static int64_t spin_micros() { return settings().barrier_spin_us; }

  // Called by one thread while no thread waits (before the team's work).
  void reset(int n) {
    n_ = n;
    arrived_.store(0, std::memory_order_relaxed);
  }

  // Team size, waits that were not the last arrival, and the time the waits
  // that outlasted the spin took in all; read after the team has finished.
  int size() const { return n_; }
  int64_t waits() const { return waits_.load(std::memory_order_relaxed); }
  int64_t slept_ns() const { return slept_ns_.load(std::memory_order_relaxed); }

  void wait() {
    const uint32_t g = gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      arrived_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all();
      return;
    }
    waits_.fetch_add(1, std::memory_order_relaxed);
    const auto start = std::chrono::steady_clock::now();
    if (spin_until_changed(g, start)) return;
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (gen_.load(std::memory_order_seq_cst) == g) sleep_while(g);
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    const auto waited = std::chrono::steady_clock::now() - start;
    slept_ns_.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count(),
                        std::memory_order_relaxed);
  }

 private:
  bool spin_until_changed(uint32_t g, std::chrono::steady_clock::time_point start) const {
    const auto budget = std::chrono::microseconds(spin_micros());
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (gen_.load(std::memory_order_acquire) != g) return true;
        relax();
      }
      if (std::chrono::steady_clock::now() - start > budget) return false;
    }
  }

  static void relax() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

#if defined(__linux__)
  int* word() { return reinterpret_cast<int*>(&gen_); }
  void sleep_while(uint32_t g) {
    syscall(SYS_futex, word(), FUTEX_WAIT_PRIVATE, static_cast<int>(g), nullptr, nullptr, 0);
  }
  void wake_all() { syscall(SYS_futex, word(), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0); }
#else
  void sleep_while(uint32_t) { std::this_thread::yield(); }
  void wake_all() {}
#endif

  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(int), "futex word");
  int n_ = 1;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> waits_{0}, slept_ns_{0};
};

// Whether the next call may start a thread team. After a team call that did
// not have its cores (another process ran on them), the next 1, 2, 4, ... 64
// calls (doubling while it happens again) run on one thread; a team call that
// had them resets the back-off. A team call lacked its cores when
// - its threads spent more than a quarter of their time asleep at the
//   barrier (long steps, large H, may sleep now and then without that: only
//   the share of the call's time counts), or
// - it took at least as long as the last call of the same kind and size (its
//   `key`) that the back-off ran on one thread. Splits with rare barrier
//   sleeps show it only this way: with a busy core, a team of LSTM
//   112,4,16,256 alternated 5 ms calls that slept with 1.5 ms ones that did
//   not but were no faster than one thread's 1.3 ms.
// Results do not depend on the thread count, so this only moves time. Shared
// by every ISA path and thread of the process.
class TeamBackoff {
 public:
  static constexpr int kMaxSoloCalls = 64;

  bool allow_team() {
    int left = solo_left_.load(std::memory_order_relaxed);
    while (left > 0) {
      if (solo_left_.compare_exchange_weak(left, left - 1, std::memory_order_relaxed))
        return false;
    }
    return true;
  }

  // A call the back-off ran on one thread: `key` (nonzero) names its kind
  // and size, `call_ns` is its wall time.
  void report_solo(int64_t key, int64_t call_ns) {
    solo_key_.store(key, std::memory_order_relaxed);
    solo_ns_.store(call_ns, std::memory_order_relaxed);
  }

  // A team call: its barrier, wall time and key (0: none).
  void report(const StepBarrier& b, int64_t call_ns, int64_t key) {
    const bool compared = key != 0 && key == solo_key_.load(std::memory_order_relaxed);
    const bool slow = compared && call_ns >= solo_ns_.load(std::memory_order_relaxed);
    const bool waited = b.waits() > 0 && b.size() >= 2;
    const bool slept = waited && 4 * b.slept_ns() > call_ns * (b.size() - 1);
    if (slow || slept) {
      const int p = penalty_.load(std::memory_order_relaxed);
      const int next = p == 0 ? 1 : (p >= kMaxSoloCalls ? kMaxSoloCalls : 2 * p);
      penalty_.store(next, std::memory_order_relaxed);
      solo_left_.store(next, std::memory_order_relaxed);
    } else if (key != 0 && (compared || waited)) {
      // (only a time loop clears it: a whole-sequence product between two
      // loops says little about the loops' team)
      penalty_.store(0, std::memory_order_relaxed);
    }
  }

 private:
  std::atomic<int> solo_left_{0}, penalty_{0};
  std::atomic<int64_t> solo_key_{0}, solo_ns_{0};
};

inline TeamBackoff& team_backoff() {
  static TeamBackoff b;
  return b;
}

}  // namespace cpu
}  // namespace fastcells
