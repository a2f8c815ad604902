// The Python module of stage1._C: plain pybind11 (no torch header, no torch types, no torch_python link). Importing
// it loads the library, whose TORCH_LIBRARY blocks (ops.cpp, cuda/*.cu) register torch.ops.stage1.*; the functions
// here are what Python asks of the build itself: the CPU kernel set in use (and forcing one, for tests and
// benchmarks) and how the module was built. Compiled as its own CMake object library so that torch's include
// directories (which carry a pybind11 copy of their own) never reach it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "isa.h"
#include "stage1_build_info.h"

namespace py = pybind11;

namespace {

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = text.find(sep, start);
    const std::string part = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!part.empty()) parts.push_back(part);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return parts;
}

std::string cpu_isa() { return stage1::isa_name(stage1::active_isa()); }

// _set_cpu_isa("scalar" | "avx2" | "best") -> the previous one.
std::string set_cpu_isa(const std::string& name) {
  stage1::Isa isa;
  if (!stage1::isa_from_name(name.c_str(), &isa)) {
    throw py::value_error("unknown CPU kernel set " + name + ": use scalar, avx2 or best");
  }
  if (!stage1::cpu_has(isa)) throw std::runtime_error("this CPU cannot run the " + name + " kernels");
  return stage1::isa_name(stage1::exchange_active_isa(isa));
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = STAGE1_BUILD_COMPILER;
  info["build_type"] = STAGE1_BUILD_TYPE;
  info["cxx_flags"] = STAGE1_BUILD_CXX_FLAGS;
  py::dict isas;  // compiled kernel sets -> the flags their *_<isa>.cpp files got (beyond cxx_flags)
  for (const std::string& isa : split(STAGE1_BUILD_CPU_ISAS, ';')) {
    isas[py::str(isa)] = isa == "avx2" ? STAGE1_BUILD_AVX2_FLAGS : "";
  }
  info["cpu_isas"] = isas;
  info["torch"] = STAGE1_BUILD_TORCH_VERSION;
  info["pybind11"] = STAGE1_BUILD_PYBIND11_VERSION;
  info["python"] = std::to_string(PY_MAJOR_VERSION) + "." + std::to_string(PY_MINOR_VERSION);
  info["cuda"] = static_cast<bool>(STAGE1_BUILD_CUDA);
  if (STAGE1_BUILD_CUDA) {
    info["cuda_version"] = STAGE1_BUILD_CUDA_VERSION;
    info["cuda_architectures"] = split(STAGE1_BUILD_CUDA_ARCHITECTURES, ';');
  } else {
    info["cuda_version"] = py::none();
    info["cuda_architectures"] = py::list();
  }
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "stage1 native ops (torch.ops.stage1.*); import torch first";
  m.def("cpu_isa", &cpu_isa, "The CPU kernel set the ops run: avx2 or scalar.");
  m.def("_set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Force a CPU kernel set (scalar, avx2, best); returns the previous.");
  m.def("build_info", &build_info,
        "How this module was built: compiler, build type and C++ flags, the CPU kernel sets compiled (each with "
        "its extra flags), the torch, pybind11 and Python it was built against, and CUDA (built or not, version, "
        "architectures).");
}
