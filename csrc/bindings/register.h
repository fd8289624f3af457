// Each family's torch-facing functions, added to the module by csrc/module.cpp (which needs no torch
// header for that: only pybind11's).
#pragma once

#include <pybind11/pybind11.h>

namespace lors_kernels {
namespace bindings {

void register_static(pybind11::module_& m);
void register_adaptive(pybind11::module_& m);
void register_hrca(pybind11::module_& m);

}  // namespace bindings
}  // namespace lors_kernels
