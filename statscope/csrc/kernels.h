// The entry points of statscope's C++ kernels, declared once for module.cpp and their sources.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

namespace statscope_native {

using torch::Tensor;

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

py::object make_bn_probe(py::object recorder, py::object capture, py::object fallback);

py::object make_bn_forward(py::object recorder, py::object capture, py::object fallback,
                           py::tuple dims);

py::object batchnorm_train(py::object module, py::object input, py::tuple dims);

}  // namespace statscope_native
