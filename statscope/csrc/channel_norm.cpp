// Per-channel norms in training mode on the CPU: one fused pass each way, one autograd node.
//
// HN, HN_G, EN, EN_G and the mixtures of per-channel std sets such as (BN, BN+EN): every norm
// whose mean is one set that pools over the batch ("batch" or "extended") and whose std is one
// such set or a softmax-weighted mix of them. The algebra of statscope/nn/channel.py (read its
// docstrings for the derivation) written as loops over a contiguous (N, C, S) input, so a call
// costs about what torch's own BatchNorm costs: on the paper's FC net at batch size 4 a norm's
// time is its number of calls, and a chain of ATen ops on (C,) tensors, from Python or from
// C++, spends more in dispatch and allocation than in arithmetic. Sums run in double.
//
// With M = N·S pixels per channel, the channel moments μ, σ², the mean m (μ or the group mean),
// per std set k the variance V_k around its centre (m, or its own mean) pooled over the channel
// or its group, v = Σ p_k V_k (p = softmax of the mixture weights), r = (v + eps)^-½, a = γ r:
//
//   forward:  y = (x - m)·a + β
//   backward: E = Σ g·(x - m), dv = -γ E r³ / 2, dm = -a Σg, then through each set to the channel
//             moments (dμ, dσ²) and the shares, and dx = g·a + (x - μ)·2dσ²/M + dμ/M
//
// When the backward itself is differentiated (create_graph) it rebuilds the forward in plain
// differentiable ATen ops and differentiates those, so double backward sees every path.

#include "common.h"
#include "kernels.h"

namespace statscope_native {
namespace {

// What the layer is: the mean set, the std sets, the centre of their deviations.
struct Plan {
  int64_t groups;
  bool extended_mean;
  std::vector<bool> std_extended;
  bool subtracted;  // deviations around the mean subtracted, not each set's own mean
  double eps;
};

// Layout of the double "stats" tensor saved for backward: per channel mu, m, r, then per std
// set its variance (repeated over a group's channels), then the P shares.
struct Stats {
  int64_t c, p;
  double* base;
  double* mu() const { return base; }
  double* m() const { return base + c; }
  double* r() const { return base + 2 * c; }
  double* var(int64_t k) const { return base + (3 + k) * c; }
  double* shares() const { return base + (3 + p) * c; }
  static int64_t size(int64_t c, int64_t p) { return (3 + p) * c + p; }
};

// The group average of v over each group's K channels, written back to every channel.
void group_average(std::vector<double>& v, int64_t groups) {
  const int64_t k = static_cast<int64_t>(v.size()) / groups;
  for (int64_t g = 0; g < groups; ++g) {
    double total = 0.0;
    for (int64_t c = g * k; c < (g + 1) * k; ++c) total += v[c];
    for (int64_t c = g * k; c < (g + 1) * k; ++c) v[c] = total / k;
  }
}

template <typename T>
void forward_kernel(const Tensor& x, const Tensor& weight, const Tensor& bias, const Shape& sh,
                    const Plan& plan, const Stats& st, Tensor& y) {
  const T* px = x.const_data_ptr<T>();
  const T* pw = data_or_null<T>(weight);
  const T* pb = data_or_null<T>(bias);
  T* py = y.mutable_data_ptr<T>();
  const int64_t C = sh.c;
  const double M = static_cast<double>(sh.pixels());
  std::vector<double> mu(C), var(C);
  channel_sums(sh, mu, [&](int64_t i, int64_t) { return static_cast<double>(px[i]); });
  for (auto& v : mu) v /= M;
  const double* pmu = mu.data();
  channel_sums(sh, var, [&](int64_t i, int64_t c) {
    const double d = static_cast<double>(px[i]) - pmu[c];
    return d * d;
  });
  for (auto& v : var) v /= M;
  std::vector<double> group_mean(mu);
  group_average(group_mean, sh.groups);
  const std::vector<double>& m = plan.extended_mean ? group_mean : mu;
  std::vector<double> mix(C, 0.0), cells(C);
  for (size_t k = 0; k < plan.std_extended.size(); ++k) {
    const bool ext = plan.std_extended[k];
    const std::vector<double>& centre = plan.subtracted ? m : (ext ? group_mean : mu);
    for (int64_t c = 0; c < C; ++c) {
      const double dev = mu[c] - centre[c];
      cells[c] = var[c] + dev * dev;
    }
    if (ext) group_average(cells, sh.groups);
    const double share = st.shares()[k];
    std::copy(cells.begin(), cells.end(), st.var(k));
    for (int64_t c = 0; c < C; ++c) mix[c] += share * cells[c];
  }
  std::vector<double> a(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    st.mu()[c] = mu[c];
    st.m()[c] = m[c];
    st.r()[c] = 1.0 / std::sqrt(mix[c] + plan.eps);
    a[c] = (pw ? static_cast<double>(pw[c]) : 1.0) * st.r()[c];
    shift[c] = pb ? static_cast<double>(pb[c]) : 0.0;
  }
  const double *pa = a.data(), *pm = m.data(), *ps = shift.data();
  per_element(sh, [&](int64_t i, int64_t c) {
    py[i] = static_cast<T>((static_cast<double>(px[i]) - pm[c]) * pa[c] + ps[c]);
  });
}

template <typename T>
void backward_kernel(const Tensor& x, const Tensor& grad, const Tensor& weight, const Shape& sh,
                     const Plan& plan, const Stats& st, Tensor& grad_x, Tensor& grad_weight,
                     Tensor& grad_bias, Tensor& grad_var_weight) {
  const T* px = x.const_data_ptr<T>();
  const T* pg = grad.const_data_ptr<T>();
  const T* pw = data_or_null<T>(weight);
  const int64_t C = sh.c;
  const double M = static_cast<double>(sh.pixels());
  const double *mu = st.mu(), *m = st.m(), *r = st.r(), *shares = st.shares();
  std::vector<double> sum_g(C), sum_gx(C);
  channel_sums(sh, sum_g, [&](int64_t i, int64_t) { return static_cast<double>(pg[i]); });
  channel_sums(sh, sum_gx, [&](int64_t i, int64_t c) {
    return static_cast<double>(pg[i]) * (static_cast<double>(px[i]) - mu[c]);
  });
  std::vector<double> e(C), a(C), grad_v(C), grad_m(C), grad_mu(C, 0.0), grad_var(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const double gamma = pw ? static_cast<double>(pw[c]) : 1.0;
    e[c] = sum_gx[c] + (mu[c] - m[c]) * sum_g[c];  // Σ g·(x - m)
    a[c] = gamma * r[c];
    grad_v[c] = -0.5 * e[c] * gamma * r[c] * r[c] * r[c];
    grad_m[c] = -a[c] * sum_g[c];
  }
  if (grad_bias.defined()) {
    T* p = grad_bias.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(sum_g[c]);
  }
  if (grad_weight.defined()) {
    T* p = grad_weight.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(e[c] * r[c]);
  }
  const int64_t P = static_cast<int64_t>(plan.std_extended.size());
  std::vector<double> group_mean(mu, mu + C), grad_share(P, 0.0), part(C);
  group_average(group_mean, sh.groups);
  for (int64_t k = 0; k < P; ++k) {
    const bool ext = plan.std_extended[k];
    const double* var_k = st.var(k);
    for (int64_t c = 0; c < C; ++c) {
      grad_share[k] += grad_v[c] * var_k[c];
      part[c] = grad_v[c] * shares[k];
    }
    if (ext) group_average(part, sh.groups);
    // the centre of the deviations: when it is μ itself, (μ - centre)² takes back nothing
    const bool own_channel = plan.subtracted ? !plan.extended_mean : !ext;
    const double* centre = plan.subtracted ? m : (ext ? group_mean.data() : mu);
    for (int64_t c = 0; c < C; ++c) {
      grad_var[c] += part[c];
      if (!own_channel) {
        // a centre equal to the group mean takes back nothing through itself: the
        // deviations from it sum to zero over the group
        const double term = 2.0 * part[c] * (mu[c] - centre[c]);
        grad_mu[c] += term;
        if (plan.subtracted) grad_m[c] -= term;
      }
    }
  }
  if (plan.extended_mean) group_average(grad_m, sh.groups);
  for (int64_t c = 0; c < C; ++c) grad_mu[c] += grad_m[c];
  if (grad_var_weight.defined()) {
    double dot = 0.0;
    for (int64_t k = 0; k < P; ++k) dot += shares[k] * grad_share[k];
    T* p = grad_var_weight.mutable_data_ptr<T>();
    for (int64_t k = 0; k < P; ++k) p[k] = static_cast<T>(shares[k] * (grad_share[k] - dot));
  }
  if (!grad_x.defined()) return;
  std::vector<double> slope(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    slope[c] = 2.0 * grad_var[c] / M;
    offset[c] = grad_mu[c] / M;
  }
  T* pdx = grad_x.mutable_data_ptr<T>();
  const double *pa = a.data(), *psl = slope.data(), *po = offset.data();
  per_element(sh, [&](int64_t i, int64_t c) {
    pdx[i] = static_cast<T>(static_cast<double>(pg[i]) * pa[c] +
                            (static_cast<double>(px[i]) - mu[c]) * psl[c] + po[c]);
  });
}

constexpr size_t kInputs = 6;  // the arguments of ChannelNorm::forward after ctx

class ChannelNorm : public torch::autograd::Function<ChannelNorm> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x,
                        const std::optional<Tensor>& weight_opt,
                        const std::optional<Tensor>& bias_opt,
                        const std::optional<Tensor>& var_weight_opt, const Plan& plan,
                        const RunningUpdate& update) {
    // undefined tensors pass through apply() only as empty optionals
    const Tensor weight = weight_opt.value_or(Tensor()), bias = bias_opt.value_or(Tensor());
    const Tensor var_weight = var_weight_opt.value_or(Tensor());
    const Shape sh = shape_of(x, plan.groups);
    const int64_t P = static_cast<int64_t>(plan.std_extended.size());
    Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor stats = at::empty({Stats::size(sh.c, P)}, x.options().dtype(at::kDouble));
    const Stats st{sh.c, P, stats.mutable_data_ptr<double>()};
    if (var_weight.defined()) {
      const Tensor shares = at::softmax(var_weight.to(at::kDouble), 0);
      std::copy_n(shares.const_data_ptr<double>(), P, st.shares());
    } else {
      std::fill_n(st.shares(), P, 1.0 / P);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_forward", [&] {
      forward_kernel<scalar_t>(x, weight, bias, sh, plan, st, y);
      update_running<scalar_t>(update, [&](size_t) { return st.m(); },
                               [&](size_t k) { return st.var(static_cast<int64_t>(k)); });
    });
    ctx->save_for_backward({x, weight, bias, var_weight});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["groups"] = plan.groups;
    ctx->saved_data["extended_mean"] = plan.extended_mean;
    ctx->saved_data["subtracted"] = plan.subtracted;
    ctx->saved_data["eps"] = plan.eps;
    c10::List<bool> extended;
    for (bool ext : plan.std_extended) extended.push_back(ext);
    ctx->saved_data["std_extended"] = extended;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor x = saved[0], weight = saved[1], bias = saved[2], var_weight = saved[3];
    Plan plan{ctx->saved_data["groups"].toInt(), ctx->saved_data["extended_mean"].toBool(), {},
              ctx->saved_data["subtracted"].toBool(), ctx->saved_data["eps"].toDouble()};
    for (bool ext : ctx->saved_data["std_extended"].toBoolList()) plan.std_extended.push_back(ext);
    const std::vector<bool> needs = input_needs(ctx, {x, weight, bias, Tensor(), var_weight});
    const bool need_x = needs[0], need_weight = needs[1], need_bias = needs[2],
               need_var_weight = needs[4];
    if (torch::autograd::GradMode::is_enabled()) {
      // the general sets' plain ops: "batch" or "extended" on each side, one group count
      std::vector<std::string> std_sets;
      for (bool ext : plan.std_extended) std_sets.push_back(ext ? "extended" : "batch");
      variable_list out = recomputed({x, weight, bias, Tensor(), var_weight}, needs, grads[0],
                                     kInputs + 1, {plan.extended_mean ? "extended" : "batch"},
                                     std_sets, plan.groups, plan.groups, plan.subtracted,
                                     plan.eps);
      out.erase(out.begin() + 3);  // no mean_weight argument here
      return out;
    }
    const Tensor g = grads[0].contiguous();
    Tensor grad_x = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : Tensor();
    Tensor grad_weight = need_weight ? at::empty_like(weight) : Tensor();
    Tensor grad_bias = need_bias ? at::empty_like(bias) : Tensor();
    Tensor grad_var_weight = need_var_weight ? at::empty_like(var_weight) : Tensor();
    Tensor stats = ctx->saved_data["stats"].toTensor();
    const Stats st{x.size(1), static_cast<int64_t>(plan.std_extended.size()),
                   stats.mutable_data_ptr<double>()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_backward", [&] {
      backward_kernel<scalar_t>(x, g, weight, shape_of(x, plan.groups), plan, st, grad_x,
                                grad_weight, grad_bias, grad_var_weight);
    });
    return {grad_x, grad_weight, grad_bias, grad_var_weight, Tensor(), Tensor()};
  }

};

}  // namespace

// Training-mode output of a per-channel norm on a contiguous CPU x (N, C, *S); parameters and
// running buffers of x's dtype. `std_extended` says per std set whether it is "extended";
// `var_buffers` and `inverse_fraction` are per std set; no update when `mean_buffer` is None.
Tensor channel_norm(const Tensor& x, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, const std::optional<Tensor>& var_weight,
                    int64_t groups, bool extended_mean, std::vector<bool> std_extended,
                    bool subtracted, double eps, std::optional<Tensor> mean_buffer,
                    std::vector<std::optional<Tensor>> var_buffers, double factor,
                    std::vector<double> inverse_fraction) {
  TORCH_CHECK(x.is_cpu() && x.is_contiguous() && x.dim() >= 2 && x.size(1) % groups == 0,
              "channel_norm: a contiguous CPU (N, C, *S) input with C divisible by groups");
  TORCH_CHECK(!std_extended.empty() && var_buffers.size() == std_extended.size() &&
                  inverse_fraction.size() == std_extended.size(),
              "channel_norm: one var buffer and one Bessel factor per std set");
  const Plan plan{groups, extended_mean, std::move(std_extended), subtracted, eps};
  const RunningUpdate update{{std::move(mean_buffer)}, std::move(var_buffers), factor,
                             std::move(inverse_fraction)};
  return ChannelNorm::apply(x, weight, bias, var_weight, plan, update);
}

}  // namespace statscope_native

