// qatdist's fake-quant ops: what aten::fused_moving_avg_obs_fake_quant computes on the CPU
// (moving-average min/max observer, ATen's ChooseQuantizationParams, fake quantization and its
// straight-through gradient), bit for bit, with vectorized loops and one C++ call per forward
// and per backward. Built on first use by qatdist/quant/native_ops.py; see the docstring of
// qatdist/quant/fast_fake_quant.py for why.
//
// Compiled with -ffp-contract=off: a fused multiply-add would round the moving average
// differently from ATen's build. Inner loops are written so the compiler vectorizes them
// without reassociating anything (the per-row sums use explicit lanes), so every result is
// the same on any x86-64 CPU.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/quantized/cpu/QuantUtils.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kGrain = 32768;  // elements per task, at::internal::GRAIN_SIZE

// The fake quantization of one value: ATen's
// (clamp(zero_point + nearbyint(x * (1 / scale)), qmin, qmax) - zero_point) * scale.
inline float fake_quant_value(float x, float inv_scale, float scale, float zp, float qmin,
                              float qmax) {
  float q = std::nearbyint(x * inv_scale) + zp;
  q = q < qmin ? qmin : q;
  q = q > qmax ? qmax : q;
  return (q - zp) * scale;
}

// Whether `x` rounds inside [qmin, qmax]: where the straight-through gradient passes.
inline bool in_range(float x, float inv_scale, float zp, float qmin, float qmax) {
  const float q = std::nearbyint(x * inv_scale) + zp;
  return q >= qmin && q <= qmax;
}

void fake_quant_rows(const float* x, float* out, int64_t rows, int64_t cols, const float* scale,
                     const int32_t* zero_point, int64_t qmin, int64_t qmax) {
  // Per tensor: one row of all elements, split across threads; per channel: whole rows.
  const bool one_row = rows == 1;
  const int64_t tasks = one_row ? cols : rows;
  const int64_t grain = one_row ? kGrain : std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t row_begin = one_row ? 0 : begin, row_end = one_row ? 1 : end;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const float s = scale[r], inv = 1.0f / s, zp = static_cast<float>(zero_point[r]);
      const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
      const int64_t c0 = one_row ? begin : 0, c1 = one_row ? end : cols;
      const float* xr = x + r * cols;
      float* outr = out + r * cols;
      for (int64_t c = c0; c < c1; ++c) {
        outr[c] = fake_quant_value(xr[c], inv, s, zp, lo, hi);
      }
    }
  });
}

void fake_quant_grad_rows(const float* x, const float* grad, float* grad_x, int64_t rows,
                          int64_t cols, const float* scale, const int32_t* zero_point,
                          int64_t qmin, int64_t qmax) {
  const bool one_row = rows == 1;
  const int64_t tasks = one_row ? cols : rows;
  const int64_t grain = one_row ? kGrain : std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t row_begin = one_row ? 0 : begin, row_end = one_row ? 1 : end;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const float inv = 1.0f / scale[r], zp = static_cast<float>(zero_point[r]);
      const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
      const int64_t c0 = one_row ? begin : 0, c1 = one_row ? end : cols;
      const float* xr = x + r * cols;
      const float* gr = grad + r * cols;
      float* out = grad_x + r * cols;
      for (int64_t c = c0; c < c1; ++c) {
        const float g = gr[c];  // loaded unconditionally: a masked load is slow on AMD CPUs
        out[c] = in_range(xr[c], inv, zp, lo, hi) ? g : 0.0f;
      }
    }
  });
}

// Eight floats in one register (AVX2's width; AVX-512 machines run it on half a register):
// the reductions below are written on this type so that they vectorize on every x86-64 CPU
// with the same, fixed order of operations.
typedef float float8 __attribute__((vector_size(32)));
typedef int32_t int8x32 __attribute__((vector_size(32)));

inline float8 load8(const float* x) {
  float8 v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

// Min and max of x[0, n) (exact in any order). NaN propagates, as in aten::aminmax.
inline void min_max(const float* x, int64_t n, float& lo, float& hi) {
  const float inf = std::numeric_limits<float>::infinity();
  float8 vlo = {inf, inf, inf, inf, inf, inf, inf, inf};
  float8 vhi = -vlo;
  int8x32 nan = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float8 v = load8(x + i);
    vlo = v < vlo ? v : vlo;
    vhi = v > vhi ? v : vhi;
    nan |= v != v;
  }
  lo = inf;
  hi = -inf;
  bool any_nan = false;
  for (int j = 0; j < 8; ++j) {
    lo = vlo[j] < lo ? vlo[j] : lo;
    hi = vhi[j] > hi ? vhi[j] : hi;
    any_nan |= nan[j] != 0;
  }
  for (; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
    any_nan |= x[i] != x[i];
  }
  if (any_nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
}

// Per-row (rows x cols) or whole-tensor (rows == 1) min and max, on torch's thread pool.
void row_min_max(const float* x, int64_t rows, int64_t cols, float* lo, float* hi) {
  if (rows > 1) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) min_max(x + r * cols, cols, lo[r], hi[r]);
                     });
    return;
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), cols / kGrain));
  const int64_t chunk = (cols + chunks - 1) / chunks;
  std::vector<float> chunk_lo(chunks), chunk_hi(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t start = k * chunk, stop = std::min(cols, start + chunk);
      min_max(x + start, std::max<int64_t>(0, stop - start), chunk_lo[k], chunk_hi[k]);
    }
  });
  min_max(chunk_lo.data(), chunks, lo[0], hi[0]);  // NaN in a chunk propagates here too
  float ignored_lo, max_of_maxes;
  min_max(chunk_hi.data(), chunks, ignored_lo, max_of_maxes);
  hi[0] = max_of_maxes;
}

// aten::fused_moving_avg_obs_fake_quant's observer update: the first observation (running
// value still +-inf) is taken as is, later ones averaged in float. Per-channel buffers start
// empty and are sized at the first observation, as the ATen op sizes them (which leaves scale
// and zero point uninitialised until fake quant runs; here 1 and 0).
void observe(const Tensor& rows, Tensor& running_min, Tensor& running_max, Tensor& scale,
             Tensor& zero_point, float constant, bool per_channel) {
  const int64_t channels = per_channel ? rows.size(0) : 1;
  if (running_min.numel() != channels) {
    running_min.resize_({channels}).fill_(std::numeric_limits<float>::infinity());
    running_max.resize_({channels}).fill_(-std::numeric_limits<float>::infinity());
    scale.resize_({channels}).fill_(1.0);
    zero_point.resize_({channels}).fill_(0);
  }
  std::vector<float> cur_min(channels), cur_max(channels);
  row_min_max(rows.data_ptr<float>(), per_channel ? rows.size(0) : 1,
              per_channel ? rows.size(1) : rows.numel(), cur_min.data(), cur_max.data());
  float* run_min = running_min.data_ptr<float>();
  float* run_max = running_max.data_ptr<float>();
  for (int64_t i = 0; i < channels; ++i) {
    run_min[i] = std::isinf(run_min[i]) ? cur_min[i]
                                        : run_min[i] + constant * (cur_min[i] - run_min[i]);
    run_max[i] = std::isinf(run_max[i]) ? cur_max[i]
                                        : run_max[i] + constant * (cur_max[i] - run_max[i]);
  }
}

// ATen's ChooseQuantizationParams for every channel of the running range: fresh tensors (the
// backward keeps them) copied into the module's scale / zero point buffers.
std::pair<Tensor, Tensor> choose_qparams(const Tensor& running_min, const Tensor& running_max,
                                         Tensor& scale_buffer, Tensor& zero_point_buffer,
                                         int64_t qmin, int64_t qmax, bool symmetric) {
  const int64_t channels = running_min.numel();
  const float* lo = running_min.data_ptr<float>();
  const float* hi = running_max.data_ptr<float>();
  // An observer that never saw data holds +inf (per tensor) or nothing (per channel).
  TORCH_CHECK(channels > 0 && !(std::isinf(lo[0]) && lo[0] > 0),
              "FastFusedFakeQuantize: fake quantization is enabled but the observer has never "
              "seen data (enable the observer for at least one forward first)");
  Tensor scale = at::empty({channels}, running_min.options());
  Tensor zero_point = at::empty({channels}, running_min.options().dtype(at::kInt));
  float* s = scale.data_ptr<float>();
  int32_t* zp = zero_point.data_ptr<int32_t>();
  for (int64_t i = 0; i < channels; ++i) {
    const auto params = quant_utils::ChooseQuantizationParams(
        lo[i], hi[i], static_cast<int32_t>(qmin), static_cast<int32_t>(qmax),
        /*preserve_sparsity=*/symmetric, /*force_scale_power_of_two=*/false);
    s[i] = static_cast<float>(params.scale);
    zp[i] = params.zero_point;
  }
  if (scale_buffer.numel() != channels) scale_buffer.resize_({channels});
  if (zero_point_buffer.numel() != channels) zero_point_buffer.resize_({channels});
  scale_buffer.copy_(scale);
  zero_point_buffer.copy_(zero_point);
  return {scale, zero_point};
}

Tensor as_rows(const Tensor& x, bool per_channel) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "qatdist fake quant: expected a float32 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  Tensor contiguous = x.contiguous();
  return per_channel ? contiguous.reshape({x.size(0), -1}) : contiguous.reshape({1, -1});
}

struct FakeQuantize : public torch::autograd::Function<FakeQuantize> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, Tensor running_min,
                        Tensor running_max, Tensor scale_buffer, Tensor zero_point_buffer,
                        double averaging_constant, int64_t qmin, int64_t qmax, bool per_channel,
                        bool symmetric, bool observe_on) {
    Tensor rows = as_rows(x, per_channel);
    if (observe_on) {
      observe(rows, running_min, running_max, scale_buffer, zero_point_buffer,
              static_cast<float>(averaging_constant), per_channel);
    }
    auto [scale, zero_point] = choose_qparams(running_min, running_max, scale_buffer,
                                              zero_point_buffer, qmin, qmax, symmetric);
    Tensor out = at::empty(x.sizes(), x.options());
    fake_quant_rows(rows.data_ptr<float>(), out.data_ptr<float>(), rows.size(0), rows.size(1),
                    scale.data_ptr<float>(), zero_point.data_ptr<int32_t>(), qmin, qmax);
    ctx->save_for_backward({rows, scale, zero_point});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& rows = saved[0];
    Tensor grad = grads[0].contiguous();
    Tensor grad_x = at::empty(grad.sizes(), grad.options());
    fake_quant_grad_rows(rows.data_ptr<float>(), grad.data_ptr<float>(),
                         grad_x.data_ptr<float>(), rows.size(0), rows.size(1),
                         saved[1].data_ptr<float>(), saved[2].data_ptr<int32_t>(),
                         ctx->saved_data["qmin"].toInt(), ctx->saved_data["qmax"].toInt());
    variable_list out(11);
    out[0] = grad_x;
    return out;
  }
};

// Fake quantization of `weight * row_scale[:, None, ...]` per output channel: the conv-BN QAT
// weight scaling taken inside the kernels (qatdist/quant/weight_scaling.py).
struct ScaledFakeQuantize : public torch::autograd::Function<ScaledFakeQuantize> {
  static Tensor forward(AutogradContext* ctx, const Tensor& weight, const Tensor& row_scale,
                        Tensor running_min, Tensor running_max, Tensor scale_buffer,
                        Tensor zero_point_buffer, double averaging_constant, int64_t qmin,
                        int64_t qmax, bool symmetric, bool observe_on) {
    Tensor rows = as_rows(weight, true);
    Tensor factors = as_rows(row_scale, false);
    const int64_t channels = rows.size(0), cols = rows.size(1);
    TORCH_CHECK(factors.numel() == channels, "qatdist scaled fake quant: ", factors.numel(),
                " scale factors for ", channels, " channels");
    Tensor out = at::empty(weight.sizes(), weight.options());
    float* product = out.data_ptr<float>();
    const float* w = rows.data_ptr<float>();
    const float* f = factors.data_ptr<float>();
    at::parallel_for(0, channels, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         for (int64_t c = 0; c < cols; ++c) {
                           product[r * cols + c] = w[r * cols + c] * f[r];
                         }
                       }
                     });
    Tensor product_rows = out.view({channels, cols});
    if (observe_on) {
      observe(product_rows, running_min, running_max, scale_buffer, zero_point_buffer,
              static_cast<float>(averaging_constant), true);
    }
    auto [scale, zero_point] = choose_qparams(running_min, running_max, scale_buffer,
                                              zero_point_buffer, qmin, qmax, symmetric);
    fake_quant_rows(product, product, channels, cols, scale.data_ptr<float>(),
                    zero_point.data_ptr<int32_t>(), qmin, qmax);
    ctx->save_for_backward({rows, factors, scale, zero_point});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["factor_sizes"] = row_scale.sizes().vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &rows = saved[0], &factors = saved[1];
    const int64_t channels = rows.size(0), cols = rows.size(1);
    const float lo = static_cast<float>(ctx->saved_data["qmin"].toInt());
    const float hi = static_cast<float>(ctx->saved_data["qmax"].toInt());
    Tensor grad = grads[0].contiguous();
    Tensor grad_weight = at::empty(grad.sizes(), grad.options());
    Tensor grad_factors = at::empty({channels}, factors.options());
    const float *w = rows.data_ptr<float>(), *f = factors.data_ptr<float>();
    const float *g = grad.data_ptr<float>(), *scale = saved[2].data_ptr<float>();
    const int32_t* zero_point = saved[3].data_ptr<int32_t>();
    float *gw = grad_weight.data_ptr<float>(), *gf = grad_factors.data_ptr<float>();
    at::parallel_for(0, channels, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float inv = 1.0f / scale[r], zp = static_cast<float>(zero_point[r]), fr = f[r];
        const float *wr = w + r * cols, *gr = g + r * cols;
        float* gwr = gw + r * cols;
        // Two passes over the row while it is in cache, each a loop the compiler vectorizes:
        // the straight-through gradient of the product, then its products with the factor
        // (the weight's gradient) and with the weight (summed: the factor's gradient).
        for (int64_t c = 0; c < cols; ++c) {
          const float g = gr[c];  // loaded unconditionally, as in fake_quant_grad_rows
          gwr[c] = in_range(wr[c] * fr, inv, zp, lo, hi) ? g : 0.0f;
        }
        float8 lanes = {};
        const float8 factor = {fr, fr, fr, fr, fr, fr, fr, fr};
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) {
          const float8 masked = load8(gwr + c);
          lanes += masked * load8(wr + c);
          const float8 product = masked * factor;
          std::memcpy(gwr + c, &product, sizeof(product));
        }
        float sum = 0.0f;
        for (int j = 0; j < 8; ++j) sum += lanes[j];
        for (; c < cols; ++c) {
          sum += gwr[c] * wr[c];
          gwr[c] *= fr;
        }
        gf[r] = sum;
      }
    });
    variable_list out(11);
    out[0] = grad_weight;
    out[1] = grad_factors.view(ctx->saved_data["factor_sizes"].toIntVector());
    return out;
  }
};

Tensor fake_quantize(const Tensor& x, Tensor running_min, Tensor running_max, Tensor scale,
                     Tensor zero_point, double averaging_constant, int64_t quant_min,
                     int64_t quant_max, bool per_channel, bool symmetric, bool observe_on) {
  return FakeQuantize::apply(x, running_min, running_max, scale, zero_point, averaging_constant,
                             quant_min, quant_max, per_channel, symmetric, observe_on);
}

Tensor scaled_fake_quantize(const Tensor& weight, const Tensor& row_scale, Tensor running_min,
                            Tensor running_max, Tensor scale, Tensor zero_point,
                            double averaging_constant, int64_t quant_min, int64_t quant_max,
                            bool symmetric, bool observe_on) {
  return ScaledFakeQuantize::apply(weight, row_scale, running_min, running_max, scale,
                                   zero_point, averaging_constant, quant_min, quant_max,
                                   symmetric, observe_on);
}

void observe_only(const Tensor& x, Tensor running_min, Tensor running_max, Tensor scale,
                  Tensor zero_point, double averaging_constant, bool per_channel) {
  at::NoGradGuard no_grad;
  observe(as_rows(x.detach(), per_channel), running_min, running_max, scale, zero_point,
          static_cast<float>(averaging_constant), per_channel);
}

}  // namespace

TORCH_LIBRARY(qatdist, m) {
  m.def(
      "fake_quantize(Tensor x, Tensor(a!) running_min, Tensor(b!) running_max, "
      "Tensor(c!) scale, Tensor(d!) zero_point, float averaging_constant, int quant_min, "
      "int quant_max, bool per_channel, bool symmetric, bool observe) -> Tensor",
      &fake_quantize);
  m.def(
      "scaled_fake_quantize(Tensor weight, Tensor row_scale, Tensor(a!) running_min, "
      "Tensor(b!) running_max, Tensor(c!) scale, Tensor(d!) zero_point, "
      "float averaging_constant, int quant_min, int quant_max, bool symmetric, bool observe) "
      "-> Tensor",
      &scaled_fake_quantize);
  m.def(
      "observe(Tensor x, Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) scale, "
      "Tensor(d!) zero_point, float averaging_constant, bool per_channel) -> ()",
      &observe_only);
}
