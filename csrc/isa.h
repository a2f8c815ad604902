// The CPU kernel set (ISA) the ops run, picked at run time. Shared by the op registrations (ops.cpp, which includes
// torch) and the Python module (python/module.cpp, which does not): only plain types cross between them, so the two
// need not agree on the standard library's ABI flags (torch's _GLIBCXX_USE_CXX11_ABI reaches ops.cpp only).
#pragma once

namespace stage1 {

enum class Isa : int { kScalar = 0, kAvx2 = 1 };

// Whether this CPU can run the kernel set (scalar: always; avx2: AVX2 and FMA, x86 builds only).
bool cpu_has(Isa isa);
const char* isa_name(Isa isa);
// The best kernel set this CPU runs: what the ops use until _set_cpu_isa says otherwise.
Isa best_isa();
// The kernel set the ops run now.
Isa active_isa();
// Makes `isa` the active one; returns the previous. The caller checks cpu_has first.
Isa exchange_active_isa(Isa isa);
// "scalar" | "avx2" | "best" -> the kernel set; false for another name.
bool isa_from_name(const char* name, Isa* out);

}  // namespace stage1
