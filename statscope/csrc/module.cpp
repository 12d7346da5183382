// The Python module of statscope's C++ kernels (built by statscope/native.py).

#include "common.h"

namespace statscope_native {

Tensor channel_norm(const Tensor& x, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, const std::optional<Tensor>& var_weight,
                    int64_t groups, bool extended_mean, std::vector<bool> std_extended,
                    bool subtracted, double eps, std::optional<Tensor> mean_buffer,
                    std::vector<std::optional<Tensor>> var_buffers, double factor,
                    std::vector<double> inverse_fraction);

Tensor cell_norm(const Tensor& x, const std::optional<Tensor>& weight,
                 const std::optional<Tensor>& bias, const std::optional<Tensor>& mean_weight,
                 const std::optional<Tensor>& var_weight, std::vector<std::string> mean_sets,
                 std::vector<std::string> std_sets, int64_t mean_groups, int64_t std_groups,
                 bool subtracted, double eps, std::vector<std::optional<Tensor>> mean_buffers,
                 std::vector<std::optional<Tensor>> var_buffers, double factor,
                 std::vector<double> inverse_fraction);

Tensor shifted_sums(const Tensor& x, int64_t order, bool rows, int64_t sample);

}  // namespace statscope_native

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("channel_norm", &statscope_native::channel_norm,
        "A per-channel norm in training mode on the CPU, one autograd node");
  m.def("cell_norm", &statscope_native::cell_norm,
        "A norm with per-example sets in training mode on the CPU, one autograd node");
  m.def("shifted_sums", &statscope_native::shifted_sums,
        "Per-channel shifted power sums of a CPU tensor in one read (the probes' generic path)");
}
