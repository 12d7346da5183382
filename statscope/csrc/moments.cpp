// The probes' generic path on the CPU: per-channel shifted power sums of a tensor in one read.
//
// statscope.probes.reduce.step_entry reduces a probed tensor to, per channel, the sums of
// u = (x - x0)/s, u², (u³, u⁴) over its M elements (x0 the median of the channel's first few
// elements, a shift so that large offsets lose nothing; s = max(|x0|, 1), a scale so that
// squares do not overflow). With torch's ops that is a median, a float copy of the tensor and
// four more passes over it, a dozen calls; here it is one call and one read of x in its own dtype
// (bfloat16 and float16 included, no float copy), sums in double.
//
// Two layouts: rows (M, C) with the channels contiguous (channels_last feature maps, (N, L, C)
// sequences, (N, C) features), and (N, C, S) with each channel's pixels contiguous (NCHW maps).

#include "common.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace statscope_native {
namespace {

// Adds u, u², u³, u⁴ (as many as `order` asks) to acc[k·C + c].
template <int Order>
inline void accumulate(double* acc, int64_t channels, int64_t c, double u) {
  const double u2 = u * u;
  acc[c] += u;
  acc[channels + c] += u2;
  if constexpr (Order == 4) {
    acc[2 * channels + c] += u2 * u;
    acc[3 * channels + c] += u2 * u2;
  }
}

template <typename T, int Order>
void rows_kernel(const T* px, int64_t rows, int64_t channels, const double* x0,
                 const double* inv_s, double* out) {
  // rows split between threads, each with its own partial sums, added up in order
  const int64_t threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads * Order * channels), 0.0);
  at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
    double* acc = partial.data() + at::get_thread_num() * Order * channels;
    for (int64_t r = begin; r < end; ++r) {
      const T* row = px + r * channels;
      for (int64_t c = 0; c < channels; ++c) {
        accumulate<Order>(acc, channels, c, (static_cast<double>(row[c]) - x0[c]) * inv_s[c]);
      }
    }
  });
  std::fill_n(out, Order * channels, 0.0);
  for (int64_t t = 0; t < threads; ++t) {
    const double* acc = partial.data() + t * Order * channels;
    for (int64_t i = 0; i < Order * channels; ++i) out[i] += acc[i];
  }
}

template <typename T, int Order>
void planes_kernel(const T* px, int64_t n, int64_t channels, int64_t s, const double* x0,
                   const double* inv_s, double* out) {
  std::fill_n(out, Order * channels, 0.0);
  // channels split between threads: each owns its sums
  at::parallel_for(0, channels, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n * s)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double part[Order][4] = {};
      for (int64_t i = 0; i < n; ++i) {
        const T* plane = px + (i * channels + c) * s;
        int64_t j = 0;
        for (; j + 4 <= s; j += 4) {
          for (int k = 0; k < 4; ++k) {
            const double u = (static_cast<double>(plane[j + k]) - x0[c]) * inv_s[c];
            const double u2 = u * u;
            part[0][k] += u;
            part[1][k] += u2;
            if constexpr (Order == 4) {
              part[2][k] += u2 * u;
              part[3][k] += u2 * u2;
            }
          }
        }
        for (; j < s; ++j) {
          const double u = (static_cast<double>(plane[j]) - x0[c]) * inv_s[c];
          const double u2 = u * u;
          part[0][0] += u;
          part[1][0] += u2;
          if constexpr (Order == 4) {
            part[2][0] += u2 * u;
            part[3][0] += u2 * u2;
          }
        }
      }
      for (int k = 0; k < Order; ++k) {
        out[k * channels + c] = (part[k][0] + part[k][1]) + (part[k][2] + part[k][3]);
      }
    }
  });
}

// The shift of each channel: the (lower) median of its first few elements, as torch.median
// takes it, rounded to `acc` precision (float32 unless x is float64); the scale max(|x0|, 1).
template <typename T>
void shifts(const T* px, bool rows, int64_t n, int64_t channels, int64_t s, int64_t sample,
            bool float64, double* x0, double* scale) {
  std::vector<double> v;
  for (int64_t c = 0; c < channels; ++c) {
    v.clear();
    if (rows) {
      for (int64_t r = 0; r < std::min(sample, n); ++r) v.push_back(px[r * channels + c]);
    } else {
      for (int64_t j = 0; j < std::min(sample, s); ++j) v.push_back(px[c * s + j]);
    }
    std::sort(v.begin(), v.end());
    double median = v[(v.size() - 1) / 2];
    if (!float64) median = static_cast<double>(static_cast<float>(median));
    x0[c] = median;
    scale[c] = std::max(std::abs(median), 1.0);
  }
}

}  // namespace

// The probes' per-step entry of a CPU tensor x: per channel the shift x0, the scale s and the
// sums of u = (x - x0)/s and its powers up to `order` (2 or 4); x0 is the median of the
// channel's first `sample` elements. `rows`: x is (M, C) with the channels contiguous; else
// (N, C, S) with each channel's pixels contiguous. Returns (2 + order, C) float64.
Tensor shifted_sums(const Tensor& x, int64_t order, bool rows, int64_t sample) {
  TORCH_CHECK(x.is_cpu() && x.is_contiguous() && (order == 2 || order == 4) && sample > 0,
              "shifted_sums: a contiguous CPU tensor, order 2 or 4, a positive sample");
  TORCH_CHECK(rows ? x.dim() == 2 : x.dim() == 3, "shifted_sums: (M, C) rows or (N, C, S)");
  TORCH_CHECK(x.numel() > 0, "shifted_sums: an empty tensor");
  const int64_t channels = x.size(1);
  Tensor out = at::empty({2 + order, channels}, x.options().dtype(at::kDouble));
  double* po = out.mutable_data_ptr<double>();
  double *x0 = po, *scale = po + channels, *sums = po + 2 * channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "shifted_sums", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    shifts<scalar_t>(px, rows, x.size(0), channels, rows ? 1 : x.size(2), sample,
                     x.scalar_type() == at::kDouble, x0, scale);
    std::vector<double> inv(channels);
    for (int64_t c = 0; c < channels; ++c) inv[c] = 1.0 / scale[c];
    if (rows) {
      if (order == 2) {
        rows_kernel<scalar_t, 2>(px, x.size(0), channels, x0, inv.data(), sums);
      } else {
        rows_kernel<scalar_t, 4>(px, x.size(0), channels, x0, inv.data(), sums);
      }
    } else if (order == 2) {
      planes_kernel<scalar_t, 2>(px, x.size(0), channels, x.size(2), x0, inv.data(), sums);
    } else {
      planes_kernel<scalar_t, 4>(px, x.size(0), channels, x.size(2), x0, inv.data(), sums);
    }
  });
  return out;
}

}  // namespace statscope_native
