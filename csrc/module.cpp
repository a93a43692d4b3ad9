// Python module entry point so that `import lsr_fused._C` loads the library (and with it the
// lsr_fused_C::* op registrations). The module itself is empty: everything goes through torch.ops.
#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

#define LSR_CONCAT_IMPL(a, b) a##b
#define LSR_CONCAT(a, b) LSR_CONCAT_IMPL(a, b)
#define LSR_STRINGIFY_IMPL(a) #a
#define LSR_STRINGIFY(a) LSR_STRINGIFY_IMPL(a)

static struct PyModuleDef lsr_fused_module = {
    PyModuleDef_HEAD_INIT,
    LSR_STRINGIFY(TORCH_EXTENSION_NAME),
    "Compiled kernels of lsr_fused; the ops are registered as torch.ops.lsr_fused_C.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC LSR_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&lsr_fused_module);
}
