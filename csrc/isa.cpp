// The CPU kernel set the ops run (isa.h). Baseline ISA: compiled without any *_<isa>.cpp flags.
#include "isa.h"

#include <atomic>
#include <cstring>

namespace stage1 {
namespace {

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(best_isa())};
  return isa;
}

}  // namespace

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    default: return false;
  }
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

Isa best_isa() { return cpu_has(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar; }

Isa active_isa() { return static_cast<Isa>(active().load()); }

Isa exchange_active_isa(Isa isa) { return static_cast<Isa>(active().exchange(static_cast<int>(isa))); }

bool isa_from_name(const char* name, Isa* out) {
  if (std::strcmp(name, "best") == 0) {
    *out = best_isa();
  } else if (std::strcmp(name, "scalar") == 0) {
    *out = Isa::kScalar;
  } else if (std::strcmp(name, "avx2") == 0) {
    *out = Isa::kAvx2;
  } else {
    return false;
  }
  return true;
}

}  // namespace stage1
