// The Python module of statscope's C++ kernels (built by statscope/native.py).

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("channel_norm", &statscope_native::channel_norm,
        "A per-channel norm in training mode on the CPU, one autograd node");
  m.def("cell_norm", &statscope_native::cell_norm,
        "A norm with per-example sets in training mode on the CPU, one autograd node");
  m.def("shifted_sums", &statscope_native::shifted_sums,
        "Per-channel shifted power sums of a CPU tensor in one read (the probes' generic path)");
  m.def("make_bn_probe", &statscope_native::make_bn_probe,
        "The BatchNorm fast path's probe as one C call, bound to a recorder and a capture");
  m.def("make_bn_forward", &statscope_native::make_bn_forward,
        "The BatchNorm fast path's training forward and probe as one C call");
  m.def("batchnorm_train", &statscope_native::batchnorm_train,
        "_BatchNorm.forward in training mode with its statistics (None: not this module)");
}
