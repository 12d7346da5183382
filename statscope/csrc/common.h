// Helpers shared by statscope.nn's C++ kernels: shapes, per-channel loops, plain-op forward.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace statscope_native {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Shape {
  int64_t n, c, s, groups;
  int64_t pixels() const { return n * s; }  // M
};

inline Shape shape_of(const Tensor& x, int64_t groups) {
  int64_t s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s *= x.size(d);
  return {x.size(0), x.size(1), s, groups};
}

inline std::vector<int64_t> channel_view(const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  return shape;
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Σ over j < s of f(base + j, key), in four independent partial sums: one contiguous run (a
// channel's pixels in one example), so the sum's dependency chain does not bound its speed.
template <typename F>
double run_sum(int64_t base, int64_t s, int64_t key, F f) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= s; j += 4) {
    for (int u = 0; u < 4; ++u) part[u] += f(base + j + u, key);
  }
  for (; j < s; ++j) part[0] += f(base + j, key);
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// Per channel Σ over (n, s) of f(n·C·S + c·S + s, c), accumulated into out[c]. On (N, C) the
// inner loop runs over channels (no reduction in it, so the compiler vectorizes it); on feature
// maps over the pixels of one channel (run_sum).
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
    for (int64_t c = 0; c < sh.c; ++c) acc[c] += run_sum((n * sh.c + c) * sh.s, sh.s, c, f);
  }
}

// The running statistics a kernel updates: a buffer (or none) per mean set and per std set,
// the update's weight (momentum or 1/count), Bessel's factor per std set.
struct RunningUpdate {
  std::vector<std::optional<Tensor>> means, vars;
  double factor;
  std::vector<double> inverse_fraction;
};

// buffer ← buffer + factor·(value·scale - buffer), element by element, outside autograd.
template <typename T>
void lerp_buffer(const Tensor& buffer, const double* value, double scale, double factor) {
  T* p = buffer.mutable_data_ptr<T>();
  for (int64_t i = 0; i < buffer.numel(); ++i) {
    const double b = static_cast<double>(p[i]);
    p[i] = static_cast<T>(b + factor * (value[i] * scale - b));
  }
}

// Every buffer of `up` from the set statistics (each repeated per channel): mean(k), var(k).
template <typename T, typename Mean, typename Var>
void update_running(const RunningUpdate& up, Mean mean, Var var) {
  for (size_t k = 0; k < up.means.size(); ++k) {
    if (up.means[k]) lerp_buffer<T>(*up.means[k], mean(k), 1.0, up.factor);
  }
  for (size_t k = 0; k < up.vars.size(); ++k) {
    if (up.vars[k]) lerp_buffer<T>(*up.vars[k], var(k), up.inverse_fraction[k], up.factor);
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

// The set average of a per-cell statistic t (N, C) in plain differentiable ops, as
// statscope.nn.moments.set_average: over the examples for "batch" and "extended", over the
// channels of a group for "group" and "extended" (all of them for "layer").
inline Tensor set_average(Tensor t, const std::string& set, int64_t groups) {
  if (set == "batch" || set == "extended") t = t.mean(0, true);
  const bool grouped = set == "group" || set == "extended";
  if (set == "layer" || (grouped && groups == 1)) return t.mean(1, true);
  if (grouped && groups < t.size(1)) {
    const int64_t rows = t.size(0), channels = t.size(1);
    return t.reshape({rows, groups, channels / groups})
        .mean(2, true)
        .expand({rows, groups, channels / groups})
        .reshape({rows, channels});
  }
  return t;
}

// A norm given by its sets, in plain differentiable ops (what double backward differentiates):
// statscope.nn.algebra.plain_forward in training mode. Shares are softmaxes of the mixture
// weights (undefined for a single set).
inline Tensor plain_forward(const Tensor& x, const Tensor& weight, const Tensor& bias,
                            const Tensor& mean_weight, const Tensor& var_weight,
                            const std::vector<std::string>& mean_sets,
                            const std::vector<std::string>& std_sets, int64_t mean_groups,
                            int64_t std_groups, bool subtracted, double eps) {
  const int64_t n = x.size(0), c = x.size(1);
  const Tensor cells = x.reshape({n, c, -1});
  const Tensor mu = cells.mean(2);
  const Tensor sigma = (cells - mu.unsqueeze(2)).square().mean(2);
  const Tensor p = mean_weight.defined() ? at::softmax(mean_weight, 0) : Tensor();
  const Tensor q = var_weight.defined() ? at::softmax(var_weight, 0) : Tensor();
  Tensor m;
  for (size_t k = 0; k < mean_sets.size(); ++k) {
    Tensor term = set_average(mu, mean_sets[k], mean_groups);
    if (p.defined()) term = term * p[static_cast<int64_t>(k)];
    m = m.defined() ? m + term : term;
  }
  Tensor v;
  for (size_t k = 0; k < std_sets.size(); ++k) {
    const Tensor centre = subtracted ? m : set_average(mu, std_sets[k], std_groups);
    const Tensor dev = mu - centre;
    Tensor term = set_average(sigma + dev * dev, std_sets[k], std_groups);
    if (q.defined()) term = term * q[static_cast<int64_t>(k)];
    v = v.defined() ? v + term : term;
  }
  Tensor scale = (v + eps).rsqrt().expand({n, c});
  if (weight.defined()) scale = scale * weight;
  Tensor y = (cells - m.expand({n, c}).unsqueeze(2)) * scale.unsqueeze(2);
  if (bias.defined()) y = y + bias.view({1, c, 1});
  return y.reshape(x.sizes());
}

// Gradients of `inputs` (x, weight, bias, mean_weight, var_weight; undefined where absent) by
// differentiating plain_forward with create_graph: the backward of a backward. `needs` says
// which are wanted; the result has `outputs` entries, the gradients first.
inline variable_list recomputed(const variable_list& inputs, const std::vector<bool>& needs,
                                const Tensor& g, size_t outputs,
                                const std::vector<std::string>& mean_sets,
                                const std::vector<std::string>& std_sets, int64_t mean_groups,
                                int64_t std_groups, bool subtracted, double eps) {
  variable_list leaves, targets;
  for (const Tensor& t : inputs) {
    leaves.push_back(!t.defined() || t.requires_grad() ? t : t.detach().requires_grad_());
  }
  for (size_t i = 0; i < leaves.size(); ++i) {
    if (needs[i]) targets.push_back(leaves[i]);
  }
  variable_list out(outputs);
  if (targets.empty()) return out;
  const Tensor y = plain_forward(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4],
                                 mean_sets, std_sets, mean_groups, std_groups, subtracted, eps);
  auto found = torch::autograd::grad({y}, targets, {g}, true, true, true);
  size_t k = 0;
  for (size_t i = 0; i < needs.size(); ++i) {
    if (needs[i]) out[i] = found[k++];
  }
  return out;
}

// Which of `tensors` need a gradient: needs_input_grad counts the tensors given to apply(),
// not its arguments, and skips the absent ones.
inline std::vector<bool> input_needs(AutogradContext* ctx, const variable_list& tensors) {
  std::vector<bool> needs;
  size_t edge = 0;
  for (const Tensor& t : tensors) needs.push_back(t.defined() && ctx->needs_input_grad(edge++));
  return needs;
}

}  // namespace statscope_native
