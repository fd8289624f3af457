// lors_kernels._C: the module, its built backends, and each family's functions (csrc/bindings/*.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/register.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lors_kernels native kernels (C++ CPU; CUDA when built with it)";
  m.def(
      "built_backends",
      [] {
#ifdef LORS_WITH_CUDA
        return std::vector<std::string>{"cpu", "cuda"};
#else
        return std::vector<std::string>{"cpu"};
#endif
      },
      "Backends compiled into this module: 'cpu', plus 'cuda' if built.");
  lors_kernels::bindings::register_static(m);
  lors_kernels::bindings::register_adaptive(m);
  lors_kernels::bindings::register_hrca(m);
}
