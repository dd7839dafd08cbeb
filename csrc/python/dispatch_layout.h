// ncclep._C.dispatch_layout: DeepEP's get_dispatch_layout as one call (dispatch_layout.cc).
#pragma once

#include <pybind11/pybind11.h>

namespace ncclep::python {

void bindDispatchLayout(pybind11::module_& m);

}  // namespace ncclep::python
