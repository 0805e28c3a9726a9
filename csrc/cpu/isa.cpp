// Selection of the CPU ISA path (see isa.h). Compiled for the baseline ISA:
// it runs before anything is known about the host.
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include <unistd.h>

namespace fastcells {
namespace cpu {

namespace generic {
const IsaKernels& kernels();
}
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 {
const IsaKernels& kernels();
}
namespace avx512 {
const IsaKernels& kernels();
}
namespace avx512_layout {
const IsaKernels& kernels();
}
namespace avx512_bf16 {
const IsaKernels& kernels();
}
#endif

namespace {

constexpr const char* kSwitch = "FASTCELLS_CPU_ISA";

struct Path {
  const IsaKernels& (*kernels)();
  bool (*host_has)();
};

#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  // __builtin_cpu_supports also checks that the OS saves the zmm state.
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif
bool always() { return true; }

// Narrowest first; automatic selection takes the last one the host runs,
// skipping avx512_layout (a testing path).
const std::vector<Path>& paths() {
  static const std::vector<Path> p = {
      {&generic::kernels, &always},
#if defined(__x86_64__) || defined(_M_X64)
      {&avx2::kernels, &has_avx2},
      {&avx512_layout::kernels, &has_avx2},
      {&avx512::kernels, &has_avx512},
      {&avx512_bf16::kernels, &has_avx512_bf16},
#endif
  };
  return p;
}

std::string joined(const std::vector<std::string>& names) {
  std::ostringstream o;
  for (size_t i = 0; i < names.size(); ++i) o << (i ? ", " : "") << names[i];
  return o.str();
}

const IsaKernels& best_path();

// The path called `name` ("auto": the host's best); raises if it is unknown
// or the host lacks it. `source` names who asked, for the message.
const IsaKernels& find_path(const std::string& name, const char* source) {
  if (name == "auto") return best_path();
  for (const Path& p : paths()) {
    if (name != p.kernels().name) continue;
    TORCH_CHECK(p.host_has(), "fastcells: ", source, " asks for the CPU ISA path '", name,
                "', which this host cannot run (host features: ", host_features(),
                "; paths it runs: ", joined(supported_isas()), ")");
    return p.kernels();
  }
  TORCH_CHECK(false, "fastcells: ", source, " must name one of the CPU ISA paths ",
              joined(built_isas()), " (or 'auto'), got '", name, "'");
}

const IsaKernels& best_path() {
  const IsaKernels* best = &generic::kernels();
  for (const Path& p : paths())
    if (p.kernels().id != kIsaAvx512Layout && p.host_has()) best = &p.kernels();
  return *best;
}

std::atomic<const IsaKernels*> g_active{nullptr};

const IsaKernels& select_from_env() {
  const char* v = std::getenv(kSwitch);  // unset or empty: automatic
  return find_path(v && *v ? v : "auto", "the environment variable FASTCELLS_CPU_ISA");
}

}  // namespace

const IsaKernels& active_isa() {
  const IsaKernels* k = g_active.load(std::memory_order_acquire);
  if (k != nullptr) return *k;
  static std::mutex m;
  const std::lock_guard<std::mutex> lock(m);
  k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = &select_from_env();  // raises (and stays unselected) on a bad switch
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

void set_active_isa(const std::string& name) {
  g_active.store(&find_path(name, "fastcells.set_cpu_isa()"), std::memory_order_release);
}

const IsaKernels& isa_by_name(const std::string& name) {
  return find_path(name, "the benchmark");
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Path& p : paths())
    if (p.host_has()) out.emplace_back(p.kernels().name);
  return out;
}

std::vector<std::string> built_isas() {
  std::vector<std::string> out;
  for (const Path& p : paths()) out.emplace_back(p.kernels().name);
  return out;
}

int64_t row_split_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 > 0 ? l2 / 2 : int64_t(256) * 1024;
  }();
  return bytes;
}

std::string host_features() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  std::vector<std::string> f;
#define FASTCELLS_FEATURE(x) \
  if (__builtin_cpu_supports(x)) f.emplace_back(x);
  FASTCELLS_FEATURE("sse4.2")
  FASTCELLS_FEATURE("avx")
  FASTCELLS_FEATURE("avx2")
  FASTCELLS_FEATURE("fma")
  FASTCELLS_FEATURE("f16c")
  FASTCELLS_FEATURE("avx512f")
  FASTCELLS_FEATURE("avx512bw")
  FASTCELLS_FEATURE("avx512dq")
  FASTCELLS_FEATURE("avx512vl")
  FASTCELLS_FEATURE("avx512vnni")
  FASTCELLS_FEATURE("avx512bf16")
  FASTCELLS_FEATURE("amx-tile")
  FASTCELLS_FEATURE("amx-bf16")
#undef FASTCELLS_FEATURE
  std::ostringstream o;
  for (size_t i = 0; i < f.size(); ++i) o << (i ? " " : "") << f[i];
  return f.empty() ? std::string("x86-64 baseline") : o.str();
#else
  return "not x86 (portable path only)";
#endif
}

}  // namespace cpu
}  // namespace fastcells
