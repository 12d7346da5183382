// Norms with per-example statistics (SN, (BN, BN+IN+LN), pairs with IN/LN/GN sets) in training
// mode on the CPU: one fused pass each way, one autograd node.
//
// The algebra of statscope/nn/cells.py (read its docstring for the derivation) as loops over a
// contiguous (N, C, S) input: the cell moments μ, σ² of each example and channel, every set
// statistic an average of them over the cells of the set, the mixtures, y = (x - m)·a + β with
// m and a = γ (v + eps)^-½ per cell. Backward: Σ g and D = Σ g·(x - μ) per cell, then the
// closed form through the set averages (each self-adjoint: the gradient reaching the cells is
// the set average of the gradient) and dx = g·a + (x - μ)·2dσ²/S + dμ/S. Sums run in double.

#include "common.h"
#include "kernels.h"

namespace statscope_native {
namespace {

enum class Kind { instance, layer, group, batch, extended };

Kind kind_of(const std::string& name) {
  if (name == "instance") return Kind::instance;
  if (name == "layer") return Kind::layer;
  if (name == "group") return Kind::group;
  if (name == "batch") return Kind::batch;
  TORCH_CHECK(name == "extended", "cell_norm: unknown pixel set ", name);
  return Kind::extended;
}

struct Sets {
  std::vector<std::string> mean_names, std_names;
  std::vector<Kind> mean, std;
  int64_t mean_groups, std_groups;
  bool subtracted;
  double eps;
};

// out = the average of in (N, C) over the cells of each set, repeated over those cells.
void average(const double* in, double* out, int64_t n, int64_t c, Kind kind, int64_t groups) {
  const bool over_rows = kind == Kind::batch || kind == Kind::extended;
  const bool grouped = kind == Kind::group || kind == Kind::extended;
  const int64_t width = kind == Kind::layer ? c : grouped ? c / groups : 1;
  const int64_t rows = over_rows ? n : 1;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    for (int64_t c0 = 0; c0 < c; c0 += width) {
      double total = 0.0;
      for (int64_t r = r0; r < r0 + rows; ++r) {
        for (int64_t j = c0; j < c0 + width; ++j) total += in[r * c + j];
      }
      const double mean = total / static_cast<double>(rows * width);
      for (int64_t r = r0; r < r0 + rows; ++r) {
        for (int64_t j = c0; j < c0 + width; ++j) out[r * c + j] = mean;
      }
    }
  }
}

// Layout of the double "stats" tensor saved for backward, each block N·C cells: mu, m, r, then
// per mean set its statistic, per std set its statistic and its deviations, then the shares of
// the mean sets and of the std sets, then per std set 1 if it has deviations.
struct Stats {
  int64_t cells, pm, pv;
  double* base;
  double* mu() const { return base; }
  double* m() const { return base + cells; }
  double* r() const { return base + 2 * cells; }
  double* mean(int64_t k) const { return base + (3 + k) * cells; }
  double* var(int64_t k) const { return base + (3 + pm + k) * cells; }
  double* dev(int64_t k) const { return base + (3 + pm + pv + k) * cells; }
  double* p() const { return base + (3 + pm + 2 * pv) * cells; }
  double* q() const { return p() + pm; }
  double* has_dev() const { return q() + pv; }
  static int64_t size(int64_t cells, int64_t pm, int64_t pv) {
    return (3 + pm + 2 * pv) * cells + pm + 2 * pv;
  }
};

void softmax(const Tensor& weight, double* out, int64_t count) {
  if (!weight.defined()) {
    std::fill_n(out, count, 1.0 / static_cast<double>(count));
    return;
  }
  const Tensor shares = at::softmax(weight.to(at::kDouble), 0);
  std::copy_n(shares.const_data_ptr<double>(), count, out);
}

// Per cell: Σ over its S contiguous pixels of f(i, cell).
template <typename F>
void cell_sums(int64_t cells, int64_t s, double* out, F f) {
  for (int64_t i = 0; i < cells; ++i) out[i] = run_sum(i * s, s, i, f);
}

template <typename T>
void forward_kernel(const Tensor& x, const Tensor& weight, const Tensor& bias, const Sets& sets,
                    const Stats& st, const RunningUpdate& up, Tensor& y) {
  const int64_t n = x.size(0), c = x.size(1), cells = n * c, s = x.numel() / cells;
  const T* px = x.const_data_ptr<T>();
  const T* pw = data_or_null<T>(weight);
  const T* pb = data_or_null<T>(bias);
  double *mu = st.mu(), *m = st.m();
  std::vector<double> sigma(cells), scratch(cells);
  cell_sums(cells, s, mu, [&](int64_t i, int64_t) { return static_cast<double>(px[i]); });
  for (int64_t i = 0; i < cells; ++i) mu[i] /= s;
  cell_sums(cells, s, sigma.data(), [&](int64_t i, int64_t cell) {
    const double d = static_cast<double>(px[i]) - mu[cell];
    return d * d;
  });
  for (auto& v : sigma) v /= s;
  std::fill_n(m, cells, 0.0);
  for (int64_t k = 0; k < st.pm; ++k) {
    average(mu, st.mean(k), n, c, sets.mean[k], sets.mean_groups);
    for (int64_t i = 0; i < cells; ++i) m[i] += st.p()[k] * st.mean(k)[i];
  }
  const bool mean_is_cell = sets.mean.size() == 1 && sets.mean[0] == Kind::instance;
  std::vector<double> v(cells, 0.0);
  for (int64_t k = 0; k < st.pv; ++k) {
    const Kind kind = sets.std[k];
    double* var = st.var(k);
    double* dev = st.dev(k);
    if (kind == Kind::instance && (!sets.subtracted || mean_is_cell)) {
      std::copy(sigma.begin(), sigma.end(), var);  // the cells' own variance
      std::fill_n(dev, cells, 0.0);
      st.has_dev()[k] = 0.0;
    } else {
      if (sets.subtracted) {
        std::copy_n(m, cells, scratch.data());
      } else {
        average(mu, scratch.data(), n, c, kind, sets.std_groups);
      }
      for (int64_t i = 0; i < cells; ++i) {
        dev[i] = mu[i] - scratch[i];
        scratch[i] = sigma[i] + dev[i] * dev[i];
      }
      average(scratch.data(), var, n, c, kind, sets.std_groups);
      st.has_dev()[k] = 1.0;
    }
    for (int64_t i = 0; i < cells; ++i) v[i] += st.q()[k] * var[i];
  }
  std::vector<double> scale(cells), shift(cells);
  for (int64_t i = 0; i < cells; ++i) {
    const int64_t ch = i % c;
    st.r()[i] = 1.0 / std::sqrt(v[i] + sets.eps);
    scale[i] = (pw ? static_cast<double>(pw[ch]) : 1.0) * st.r()[i];
    shift[i] = (pb ? static_cast<double>(pb[ch]) : 0.0) - m[i] * scale[i];
  }
  T* py = y.mutable_data_ptr<T>();
  for (int64_t i = 0; i < cells; ++i) {
    const double a = scale[i], b = shift[i];
    for (int64_t j = i * s; j < (i + 1) * s; ++j) {
      py[j] = static_cast<T>(static_cast<double>(px[j]) * a + b);
    }
  }
  // running statistics from the first example's row: a batch set's value is the same in all
  update_running<T>(up, [&](size_t k) { return st.mean(static_cast<int64_t>(k)); },
                    [&](size_t k) { return st.var(static_cast<int64_t>(k)); });
}

// Gradient of the mixture weights through the softmax, given Σ grad·stat_k per set.
void softmax_backward(const double* shares, const std::vector<double>& dots, const Tensor& out) {
  double total = 0.0;
  for (size_t k = 0; k < dots.size(); ++k) total += shares[k] * dots[k];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "shares", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (size_t k = 0; k < dots.size(); ++k) {
      p[k] = static_cast<scalar_t>(shares[k] * (dots[k] - total));
    }
  });
}

template <typename T>
void backward_kernel(const Tensor& x, const Tensor& grad, const Tensor& weight, const Sets& sets,
                     const Stats& st, Tensor& grad_x, Tensor& grad_weight, Tensor& grad_bias,
                     Tensor& grad_mean_weight, Tensor& grad_var_weight) {
  const int64_t n = x.size(0), c = x.size(1), cells = n * c, s = x.numel() / cells;
  const T* px = x.const_data_ptr<T>();
  const T* pg = grad.const_data_ptr<T>();
  const T* pw = data_or_null<T>(weight);
  const double *mu = st.mu(), *m = st.m(), *r = st.r();
  std::vector<double> sum_g(cells), d(cells);
  cell_sums(cells, s, sum_g.data(), [&](int64_t i, int64_t) { return static_cast<double>(pg[i]); });
  cell_sums(cells, s, d.data(), [&](int64_t i, int64_t cell) {
    return static_cast<double>(pg[i]) * (static_cast<double>(px[i]) - mu[cell]);
  });
  std::vector<double> scale(cells), grad_scale(cells), grad_mean(cells), grad_v(cells);
  std::vector<double> grad_w(c, 0.0), grad_b(c, 0.0);
  for (int64_t i = 0; i < cells; ++i) {
    const int64_t ch = i % c;
    const double gamma = pw ? static_cast<double>(pw[ch]) : 1.0;
    scale[i] = gamma * r[i];
    grad_scale[i] = d[i] + (mu[i] - m[i]) * sum_g[i];  // Σ g·(x - m)
    grad_mean[i] = -scale[i] * sum_g[i];
    grad_v[i] = -0.5 * grad_scale[i] * gamma * r[i] * r[i] * r[i];
    grad_w[ch] += grad_scale[i] * r[i];
    grad_b[ch] += sum_g[i];
  }
  if (grad_weight.defined()) {
    T* p = grad_weight.mutable_data_ptr<T>();
    for (int64_t j = 0; j < c; ++j) p[j] = static_cast<T>(grad_w[j]);
  }
  if (grad_bias.defined()) {
    T* p = grad_bias.mutable_data_ptr<T>();
    for (int64_t j = 0; j < c; ++j) p[j] = static_cast<T>(grad_b[j]);
  }
  std::vector<double> grad_mu(cells, 0.0), grad_sigma(cells, 0.0), tmp(cells), h(cells);
  std::vector<double> dots_v(st.pv, 0.0), dots_m(st.pm, 0.0);
  for (int64_t k = 0; k < st.pv; ++k) {
    const double q = st.q()[k];
    for (int64_t i = 0; i < cells; ++i) {
      dots_v[k] += grad_v[i] * st.var(k)[i];
      tmp[i] = grad_v[i] * q;
    }
    average(tmp.data(), h.data(), n, c, sets.std[k], sets.std_groups);
    const bool has_dev = st.has_dev()[k] != 0.0;
    for (int64_t i = 0; i < cells; ++i) {
      grad_sigma[i] += h[i];
      if (has_dev) {
        // with "own" the centre is the set's mean, which takes back nothing: h is constant
        // over the set and the deviations sum to zero there
        const double term = 2.0 * h[i] * st.dev(k)[i];
        grad_mu[i] += term;
        if (sets.subtracted) grad_mean[i] -= term;
      }
    }
  }
  for (int64_t k = 0; k < st.pm; ++k) {
    const double p = st.p()[k];
    for (int64_t i = 0; i < cells; ++i) {
      dots_m[k] += grad_mean[i] * st.mean(k)[i];
      tmp[i] = grad_mean[i] * p;
    }
    average(tmp.data(), h.data(), n, c, sets.mean[k], sets.mean_groups);
    for (int64_t i = 0; i < cells; ++i) grad_mu[i] += h[i];
  }
  if (grad_mean_weight.defined()) softmax_backward(st.p(), dots_m, grad_mean_weight);
  if (grad_var_weight.defined()) softmax_backward(st.q(), dots_v, grad_var_weight);
  if (!grad_x.defined()) return;
  T* pdx = grad_x.mutable_data_ptr<T>();
  for (int64_t i = 0; i < cells; ++i) {
    const double a = scale[i], slope = 2.0 * grad_sigma[i] / s, offset = grad_mu[i] / s;
    const double centre = mu[i];
    for (int64_t j = i * s; j < (i + 1) * s; ++j) {
      pdx[j] = static_cast<T>(static_cast<double>(pg[j]) * a +
                              (static_cast<double>(px[j]) - centre) * slope + offset);
    }
  }
}

constexpr size_t kInputs = 7;  // the arguments of CellNorm::forward after ctx

class CellNorm : public torch::autograd::Function<CellNorm> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x,
                        const std::optional<Tensor>& weight_opt,
                        const std::optional<Tensor>& bias_opt,
                        const std::optional<Tensor>& mean_weight_opt,
                        const std::optional<Tensor>& var_weight_opt, const Sets& sets,
                        const RunningUpdate& update) {
    // undefined tensors pass through apply() only as empty optionals
    const Tensor weight = weight_opt.value_or(Tensor()), bias = bias_opt.value_or(Tensor());
    const Tensor mean_weight = mean_weight_opt.value_or(Tensor());
    const Tensor var_weight = var_weight_opt.value_or(Tensor());
    const int64_t cells = x.size(0) * x.size(1);
    const int64_t pm = static_cast<int64_t>(sets.mean.size());
    const int64_t pv = static_cast<int64_t>(sets.std.size());
    Tensor stats = at::empty({Stats::size(cells, pm, pv)}, x.options().dtype(at::kDouble));
    const Stats st{cells, pm, pv, stats.mutable_data_ptr<double>()};
    softmax(mean_weight, st.p(), pm);
    softmax(var_weight, st.q(), pv);
    Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cell_forward", [&] {
      forward_kernel<scalar_t>(x, weight, bias, sets, st, update, y);
    });
    ctx->save_for_backward({x, weight, bias, mean_weight, var_weight});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["mean_sets"] = c10::List<std::string>(sets.mean_names);
    ctx->saved_data["std_sets"] = c10::List<std::string>(sets.std_names);
    ctx->saved_data["mean_groups"] = sets.mean_groups;
    ctx->saved_data["std_groups"] = sets.std_groups;
    ctx->saved_data["subtracted"] = sets.subtracted;
    ctx->saved_data["eps"] = sets.eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor x = saved[0], weight = saved[1], bias = saved[2], mean_weight = saved[3],
                 var_weight = saved[4];
    Sets sets;
    for (const c10::IValue& name : ctx->saved_data["mean_sets"].toListRef()) {
      sets.mean_names.push_back(name.toStringRef());
      sets.mean.push_back(kind_of(name.toStringRef()));
    }
    for (const c10::IValue& name : ctx->saved_data["std_sets"].toListRef()) {
      sets.std_names.push_back(name.toStringRef());
      sets.std.push_back(kind_of(name.toStringRef()));
    }
    sets.mean_groups = ctx->saved_data["mean_groups"].toInt();
    sets.std_groups = ctx->saved_data["std_groups"].toInt();
    sets.subtracted = ctx->saved_data["subtracted"].toBool();
    sets.eps = ctx->saved_data["eps"].toDouble();
    const std::vector<bool> needs =
        input_needs(ctx, {x, weight, bias, mean_weight, var_weight});
    if (torch::autograd::GradMode::is_enabled()) {
      return recomputed({x, weight, bias, mean_weight, var_weight}, needs, grads[0], kInputs,
                        sets.mean_names, sets.std_names, sets.mean_groups, sets.std_groups,
                        sets.subtracted, sets.eps);
    }
    const Tensor g = grads[0].contiguous();
    auto like = [](bool need, const Tensor& t, bool contiguous) {
      if (!need) return Tensor();
      return contiguous ? at::empty_like(t, at::MemoryFormat::Contiguous) : at::empty_like(t);
    };
    Tensor grad_x = like(needs[0], x, true), grad_weight = like(needs[1], weight, false),
           grad_bias = like(needs[2], bias, false), grad_mean_weight = like(needs[3], mean_weight, false),
           grad_var_weight = like(needs[4], var_weight, false);
    Tensor stats = ctx->saved_data["stats"].toTensor();
    const Stats st{x.size(0) * x.size(1), static_cast<int64_t>(sets.mean.size()),
                   static_cast<int64_t>(sets.std.size()), stats.mutable_data_ptr<double>()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cell_backward", [&] {
      backward_kernel<scalar_t>(x, g, weight, sets, st, grad_x, grad_weight, grad_bias,
                                grad_mean_weight, grad_var_weight);
    });
    return {grad_x, grad_weight, grad_bias, grad_mean_weight, grad_var_weight, Tensor(),
            Tensor()};
  }
};

}  // namespace

// Training-mode output of a norm with per-example sets on a contiguous CPU x (N, C, *S), S
// non-empty; parameters and running buffers of x's dtype. Per mean set and per std set: its
// name and its running buffer (None for per-example sets, or no update); Bessel's factor per
// std set.
Tensor cell_norm(const Tensor& x, const std::optional<Tensor>& weight,
                 const std::optional<Tensor>& bias, const std::optional<Tensor>& mean_weight,
                 const std::optional<Tensor>& var_weight, std::vector<std::string> mean_sets,
                 std::vector<std::string> std_sets, int64_t mean_groups, int64_t std_groups,
                 bool subtracted, double eps, std::vector<std::optional<Tensor>> mean_buffers,
                 std::vector<std::optional<Tensor>> var_buffers, double factor,
                 std::vector<double> inverse_fraction) {
  TORCH_CHECK(x.is_cpu() && x.is_contiguous() && x.dim() >= 3,
              "cell_norm: a contiguous CPU (N, C, *S) input with S non-empty");
  TORCH_CHECK(!mean_sets.empty() && !std_sets.empty() &&
                  mean_buffers.size() == mean_sets.size() &&
                  var_buffers.size() == std_sets.size() &&
                  inverse_fraction.size() == std_sets.size(),
              "cell_norm: one buffer per set and one Bessel factor per std set");
  Sets sets{mean_sets, std_sets, {}, {}, mean_groups, std_groups, subtracted, eps};
  for (const auto& name : mean_sets) sets.mean.push_back(kind_of(name));
  for (const auto& name : std_sets) sets.std.push_back(kind_of(name));
  const RunningUpdate update{std::move(mean_buffers), std::move(var_buffers), factor,
                             std::move(inverse_fraction)};
  return CellNorm::apply(x, weight, bias, mean_weight, var_weight, sets, update);
}

}  // namespace statscope_native
