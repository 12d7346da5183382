// HN, HN_G, EN and EN_G in training mode on the CPU: one fused pass each way, one autograd node.
//
// The algebra of statscope/nn/channel.py's _ExtendedStdNorm (read its docstring for the
// derivation) written as loops over a contiguous (N, C, S) input, so a call costs about what
// torch's own BatchNorm costs: on the paper's FC net at batch size 4 a norm's time is its
// number of calls, and a chain of ATen ops on (C,) tensors, from Python or from C++, spends
// more in dispatch and allocation than in arithmetic. Sums run in double. With K channels per
// group, M = N·S pixels per channel, a = γ r per channel (r per group), the mean m and the
// centre c of the variance (the group mean, or the channel mean for HN), E = Σ g·(x - m):
//
//   forward:  y = (x - m)·a + β
//   backward: dx = g·a + (x - m)·s + o,   s = -r³ Σ_group γE / (K M)
//             o = -a Σg / M + (μ - c)·s (HN), -Σ_group a Σg / (K M) (EN)
//
// When the backward itself is differentiated (create_graph) it rebuilds the forward in plain
// differentiable ATen ops and differentiates those, so double backward sees every path.

#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Shape {
  int64_t n, c, s, groups;
  int64_t k() const { return c / groups; }
  int64_t pixels() const { return n * s; }  // M
};

Shape shape_of(const Tensor& x, int64_t groups) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return {x.size(0), x.size(1), s, groups};
}

std::vector<int64_t> channel_view(const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  return shape;
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Per channel Σ over (n, s) of f(n·C·S + c·S + s, c), accumulated into out[c]. On (N, C) the
// inner loop runs over channels (no reduction in it, so the compiler vectorizes it); on feature
// maps over the pixels of one channel, in four independent partial sums.
template <typename F>
void channel_sums(const Shape& sh, std::vector<double>& out, F f) {
  std::fill(out.begin(), out.end(), 0.0);
  double* acc = out.data();
  if (sh.s == 1) {
    for (int64_t n = 0; n < sh.n; ++n) {
      const int64_t base = n * sh.c;
      for (int64_t c = 0; c < sh.c; ++c) acc[c] += f(base + c, c);
    }
    return;
  }
  for (int64_t n = 0; n < sh.n; ++n) {
    for (int64_t c = 0; c < sh.c; ++c) {
      const int64_t base = (n * sh.c + c) * sh.s;
      double part[4] = {0.0, 0.0, 0.0, 0.0};
      int64_t s = 0;
      for (; s + 4 <= sh.s; s += 4) {
        for (int j = 0; j < 4; ++j) part[j] += f(base + s + j, c);
      }
      for (; s < sh.s; ++s) part[0] += f(base + s, c);
      acc[c] += (part[0] + part[1]) + (part[2] + part[3]);
    }
  }
}

// y[i] = h(i, c) over every element, channel by channel.
template <typename H>
void per_element(const Shape& sh, H h) {
  if (sh.s == 1) {
    for (int64_t n = 0; n < sh.n; ++n) {
      const int64_t base = n * sh.c;
      for (int64_t c = 0; c < sh.c; ++c) h(base + c, c);
    }
    return;
  }
  for (int64_t n = 0; n < sh.n; ++n) {
    for (int64_t c = 0; c < sh.c; ++c) {
      const int64_t base = (n * sh.c + c) * sh.s;
      for (int64_t s = 0; s < sh.s; ++s) h(base + s, c);
    }
  }
}

// The saved statistics, in double: a, centre (C each), r (G), and the (C,) offset terms.
struct Saved {
  std::vector<double> a, centre, mu, r, group_mean;
};

template <typename T>
void forward_kernel(const Tensor& x, const Tensor& weight, const Tensor& bias, const Shape& sh,
                    bool extended_mean, bool subtracted, double eps, Tensor& y, Saved& st,
                    const Tensor& running_mean, const Tensor& running_var, double factor) {
  const T* px = x.const_data_ptr<T>();
  const T* pw = data_or_null<T>(weight);
  const T* pb = data_or_null<T>(bias);
  T* py = y.mutable_data_ptr<T>();
  const int64_t C = sh.c, G = sh.groups, K = sh.k();
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
  st.a.assign(C, 0.0);
  st.centre.assign(C, 0.0);
  st.r.assign(G, 0.0);
  st.group_mean.assign(G, 0.0);
  std::vector<double> group_var(G, 0.0);
  for (int64_t g = 0; g < G; ++g) {
    double gm = 0.0;
    for (int64_t c = g * K; c < (g + 1) * K; ++c) gm += mu[c];
    gm /= K;
    double gv = 0.0;
    for (int64_t c = g * K; c < (g + 1) * K; ++c) {
      const double dev = subtracted ? 0.0 : mu[c] - gm;
      gv += var[c] + dev * dev;
    }
    gv /= K;
    st.group_mean[g] = gm;
    group_var[g] = gv;
    st.r[g] = 1.0 / std::sqrt(gv + eps);
    for (int64_t c = g * K; c < (g + 1) * K; ++c) {
      st.a[c] = (pw ? static_cast<double>(pw[c]) : 1.0) * st.r[g];
      st.centre[c] = extended_mean ? gm : mu[c];
    }
  }
  std::vector<double> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = (pb ? static_cast<double>(pb[c]) : 0.0);
  const double *pa = st.a.data(), *pm = st.centre.data(), *pshift = shift.data();
  per_element(sh, [&](int64_t i, int64_t c) {
    py[i] = static_cast<T>((static_cast<double>(px[i]) - pm[c]) * pa[c] + pshift[c]);
  });
  if (running_var.defined()) {
    // Bessel's factor of the variance around the centre the layer subtracts
    const double cells = subtracted ? M : M * K;
    const double bessel = 1.0 / (1.0 - 1.0 / cells);
    T* rv = running_var.mutable_data_ptr<T>();
    T* rm = running_mean.mutable_data_ptr<T>();
    auto lerp = [factor](T& buffer, double value) {
      const double b = static_cast<double>(buffer);
      buffer = static_cast<T>(b + factor * (value - b));
    };
    for (int64_t c = 0; c < C; ++c) {
      lerp(rv[c], group_var[c / K] * bessel);
      lerp(rm[c], extended_mean ? st.group_mean[c / K] : mu[c]);
    }
  }
  st.mu = std::move(mu);
}

template <typename T>
void backward_kernel(const Tensor& x, const Tensor& grad, const Tensor& weight, const Shape& sh,
                     bool extended_mean, bool subtracted, const Tensor& stats, Tensor& grad_x,
                     Tensor& grad_weight, Tensor& grad_bias) {
  const T* px = x.const_data_ptr<T>();
  const T* pg = grad.const_data_ptr<T>();
  const T* pw = data_or_null<T>(weight);
  const int64_t C = sh.c, G = sh.groups, K = sh.k();
  const double M = static_cast<double>(sh.pixels());
  const double* ps = stats.const_data_ptr<double>();
  const double *a = ps, *centre = ps + C, *mu = ps + 2 * C, *r = ps + 3 * C,
               *group_mean = ps + 3 * C + G;
  std::vector<double> sum_g(C), e(C);
  channel_sums(sh, sum_g, [&](int64_t i, int64_t) { return static_cast<double>(pg[i]); });
  channel_sums(sh, e, [&](int64_t i, int64_t c) {
    return static_cast<double>(pg[i]) * (static_cast<double>(px[i]) - centre[c]);
  });
  if (grad_bias.defined()) {
    T* p = grad_bias.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(sum_g[c]);
  }
  if (grad_weight.defined()) {
    T* p = grad_weight.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(e[c] * r[c / K]);
  }
  if (!grad_x.defined()) return;
  std::vector<double> slope(C), offset(C);
  for (int64_t g = 0; g < G; ++g) {
    double ge = 0.0, t = 0.0;
    for (int64_t c = g * K; c < (g + 1) * K; ++c) {
      ge += e[c] * (pw ? static_cast<double>(pw[c]) : 1.0);
      t += a[c] * sum_g[c];
    }
    const double s = -ge * r[g] * r[g] * r[g] / (K * M);
    for (int64_t c = g * K; c < (g + 1) * K; ++c) {
      slope[c] = s;
      if (extended_mean) {
        offset[c] = -t / (K * M);
      } else {
        offset[c] = -a[c] * sum_g[c] / M + (subtracted ? 0.0 : (mu[c] - group_mean[g]) * s);
      }
    }
  }
  T* pdx = grad_x.mutable_data_ptr<T>();
  const double *psl = slope.data(), *po = offset.data();
  per_element(sh, [&](int64_t i, int64_t c) {
    pdx[i] = static_cast<T>(static_cast<double>(pg[i]) * a[c] +
                            (static_cast<double>(px[i]) - centre[c]) * psl[c] + po[c]);
  });
}

// The layer in plain differentiable ops: what double backward differentiates.
Tensor plain_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t groups,
                     bool extended_mean, bool subtracted, double eps) {
  const int64_t n = x.size(0), c = x.size(1);
  Tensor v = x.reshape({n, groups, c / groups, -1});
  Tensor mu = v.mean({0, 3}, true);
  Tensor group_mean = v.mean({0, 2, 3}, true);
  Tensor centre = extended_mean ? group_mean : mu;
  Tensor dev = v - (subtracted ? mu : group_mean);
  Tensor var = (dev * dev).mean({0, 2, 3}, true);
  Tensor y = ((v - centre) * (var + eps).rsqrt()).reshape(x.sizes());
  auto view = channel_view(x);
  if (weight.defined()) y = y * weight.view(view);
  if (bias.defined()) y = y + bias.view(view);
  return y;
}

constexpr size_t kInputs = 10;  // the arguments of ExtendedStd::forward after ctx

class ExtendedStd : public torch::autograd::Function<ExtendedStd> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x,
                        const std::optional<Tensor>& weight_opt,
                        const std::optional<Tensor>& bias_opt, int64_t groups,
                        bool extended_mean, bool subtracted, double eps,
                        const std::optional<Tensor>& running_mean_opt,
                        const std::optional<Tensor>& running_var_opt, double factor) {
    // undefined tensors pass through apply() only as empty optionals
    const Tensor weight = weight_opt.value_or(Tensor()), bias = bias_opt.value_or(Tensor());
    const Tensor running_var = running_var_opt.value_or(Tensor());
    const Shape sh = shape_of(x, groups);
    Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    Saved st;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hn_forward", [&] {
      forward_kernel<scalar_t>(x, weight, bias, sh, extended_mean, subtracted, eps, y, st,
                               running_mean_opt.value_or(Tensor()), running_var, factor);
    });
    const int64_t C = sh.c, G = sh.groups;
    Tensor stats = at::empty({3 * C + 2 * G}, x.options().dtype(at::kDouble));
    double* p = stats.mutable_data_ptr<double>();
    std::copy(st.a.begin(), st.a.end(), p);
    std::copy(st.centre.begin(), st.centre.end(), p + C);
    std::copy(st.mu.begin(), st.mu.end(), p + 2 * C);
    std::copy(st.r.begin(), st.r.end(), p + 3 * C);
    std::copy(st.group_mean.begin(), st.group_mean.end(), p + 3 * C + G);
    ctx->save_for_backward({x, weight, bias});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["extended_mean"] = extended_mean;
    ctx->saved_data["subtracted"] = subtracted;
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor x = saved[0], weight = saved[1], bias = saved[2];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool extended_mean = ctx->saved_data["extended_mean"].toBool();
    const bool subtracted = ctx->saved_data["subtracted"].toBool();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_weight = ctx->needs_input_grad(1) && weight.defined();
    const bool need_bias = ctx->needs_input_grad(2) && bias.defined();
    variable_list out(kInputs);
    if (torch::autograd::GradMode::is_enabled()) {
      return recomputed(x, weight, bias, grads[0], groups, extended_mean, subtracted,
                        ctx->saved_data["eps"].toDouble(), need_x, need_weight, need_bias);
    }
    const Tensor g = grads[0].contiguous();
    Tensor grad_x = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : Tensor();
    Tensor grad_weight = need_weight ? at::empty_like(weight) : Tensor();
    Tensor grad_bias = need_bias ? at::empty_like(bias) : Tensor();
    const Tensor stats = ctx->saved_data["stats"].toTensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "hn_backward", [&] {
      backward_kernel<scalar_t>(x, g, weight, shape_of(x, groups), extended_mean, subtracted,
                                stats, grad_x, grad_weight, grad_bias);
    });
    out[0] = grad_x;
    out[1] = grad_weight;
    out[2] = grad_bias;
    return out;
  }

 private:
  static variable_list recomputed(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  const Tensor& g, int64_t groups, bool extended_mean,
                                  bool subtracted, double eps, bool need_x, bool need_weight,
                                  bool need_bias) {
    auto leaf = [](const Tensor& t) {
      return !t.defined() || t.requires_grad() ? t : t.detach().requires_grad_();
    };
    const Tensor lx = leaf(x), lw = leaf(weight), lb = leaf(bias);
    const Tensor y = plain_forward(lx, lw, lb, groups, extended_mean, subtracted, eps);
    variable_list targets;
    if (need_x) targets.push_back(lx);
    if (need_weight) targets.push_back(lw);
    if (need_bias) targets.push_back(lb);
    variable_list out(kInputs);
    if (targets.empty()) return out;
    auto found = torch::autograd::grad({y}, targets, {g}, true, true, true);
    size_t k = 0;
    if (need_x) out[0] = found[k++];
    if (need_weight) out[1] = found[k++];
    if (need_bias) out[2] = found[k++];
    return out;
  }
};

// Training-mode HN/HN_G/EN/EN_G of a contiguous CPU x (N, C, *S); parameters and running
// buffers of x's dtype, running statistics updated with weight `factor` when given.
Tensor extended_std_norm(const Tensor& x, const std::optional<Tensor>& weight,
                         const std::optional<Tensor>& bias, int64_t groups, bool extended_mean,
                         bool subtracted, double eps, const std::optional<Tensor>& running_mean,
                         const std::optional<Tensor>& running_var, double factor) {
  TORCH_CHECK(x.is_cpu() && x.is_contiguous() && x.dim() >= 2 && x.size(1) % groups == 0,
              "extended_std_norm: a contiguous CPU (N, C, *S) input with C divisible by groups");
  return ExtendedStd::apply(x, weight, bias, groups, extended_mean, subtracted, eps,
                            running_mean, running_var, factor);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("extended_std_norm", &extended_std_norm,
        "HN/HN_G/EN/EN_G in training mode on the CPU, one autograd node (statscope.nn.native)");
}
