// qatdist's fake-quant ops: what aten::fused_moving_avg_obs_fake_quant computes on the CPU
// (moving-average min/max observer, ATen's own ChooseQuantizationParams, fake quantization and
// its straight-through gradient), bit for bit, with vectorized loops and one C++ call per
// forward and per backward. Built on first use by qatdist/quant/kernels/native_ops.py; the docstring of
// qatdist/quant/kernels/fast_fake_quant.py says why. Their fake (meta) implementations, for
// torch.compile and torch.export, are in qatdist/quant/kernels/fake_impls.py.
//
// Per-channel weights are processed a row (an output channel) at a time, on torch's thread
// pool: observe the row, choose its qparams, fake-quantize it, while the row is in cache. The
// conv-BN QAT weight scaling (weight * gamma / sigma, qatdist/quant/kernels/weight_scaling.py) is taken
// inside the same pass, and optionally the division of the conv output by that factor too.
//
// Compiled with -ffp-contract=off: a fused multiply-add would round the moving average and the
// products differently from ATen's build. Reductions are written on explicit 8-float vectors,
// so they vectorize without reassociating anything and give the same bits on any x86-64 CPU.

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/quantized/cpu/QuantUtils.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kGrain = 32768;  // elements per task, as at::internal::GRAIN_SIZE
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t rows_per_task(int64_t cols) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)); }

// Eight floats in one register (AVX2's width; AVX-512 machines run it on half a register).
typedef float float8 __attribute__((vector_size(32)));
typedef int32_t int8x32 __attribute__((vector_size(32)));

inline float8 load8(const float* x) {
  float8 v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

inline float8 splat8(float x) { return float8{x, x, x, x, x, x, x, x}; }

// The fake quantization of one value, ATen's
// (clamp(zero_point + nearbyint(x * (1 / scale)), qmin, qmax) - zero_point) * scale.
// A NaN q (an infinite x times a zero inverse scale) goes to qmin, where ATen's conversion to
// an integer before the clamp sends it.
inline float fake_quant_value(float x, float inv_scale, float scale, float zp, float qmin,
                              float qmax) {
  float q = std::nearbyint(x * inv_scale) + zp;
  q = !(q >= qmin) ? qmin : q;
  q = q > qmax ? qmax : q;
  return (q - zp) * scale;
}

// Whether `x` rounds inside [qmin, qmax]: where the straight-through gradient passes.
inline bool in_range(float x, float inv_scale, float zp, float qmin, float qmax) {
  const float q = std::nearbyint(x * inv_scale) + zp;
  return q >= qmin && q <= qmax;
}

// Min and max of x[i] * factor over [0, n) (exact in any order; factor 1 leaves x as is). NaN
// propagates, as in aten::aminmax.
void min_max(const float* x, int64_t n, float factor, float& lo, float& hi) {
  float8 vlo = splat8(kInf), vhi = splat8(-kInf);
  const float8 vfactor = splat8(factor);
  int8x32 nan = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float8 v = load8(x + i) * vfactor;
    vlo = v < vlo ? v : vlo;
    vhi = v > vhi ? v : vhi;
    nan |= v != v;
  }
  lo = kInf;
  hi = -kInf;
  bool any_nan = false;
  for (int j = 0; j < 8; ++j) {
    lo = vlo[j] < lo ? vlo[j] : lo;
    hi = vhi[j] > hi ? vhi[j] : hi;
    any_nan |= nan[j] != 0;
  }
  for (; i < n; ++i) {
    const float v = x[i] * factor;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    any_nan |= v != v;
  }
  if (any_nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
}

// Sum of a[i] * b[i] over [0, n), in a fixed order (8 lanes, then the tail).
float dot(const float* a, const float* b, int64_t n) {
  float8 lanes = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) lanes += load8(a + i) * load8(b + i);
  float sum = 0.0f;
  for (int j = 0; j < 8; ++j) sum += lanes[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// aten::fused_moving_avg_obs_fake_quant's observer update: the first observation (running value
// still +-inf) is taken as is, later ones averaged in float.
inline void moving_average(float& running, float current, float constant) {
  running = std::isinf(running) ? current : running + constant * (current - running);
}

struct QParams {
  float scale, zero_point;  // the zero point is an integer; float is how the kernels use it
};

// ATen's ChooseQuantizationParams of a running range (what the ATen op calls, through fbgemm's
// copy of it).
QParams choose_qparams(float lo, float hi, int64_t qmin, int64_t qmax, bool symmetric) {
  TORCH_CHECK(!(lo == kInf && hi == -kInf),  // where a per-tensor observer starts; data that
                                             // sends both there does not exist
              "FastFusedFakeQuantize: fake quantization is enabled but the observer has never "
              "seen data (enable the observer for at least one forward first)");
  // A NaN seen by the observer (a diverging step) makes the range NaN. fbgemm's copy, which the
  // ATen op calls, has no checks and returns scale NaN with the zero point x86 converts NaN to
  // (INT32_MIN); ATen's header copy would throw instead. The output is then NaN everywhere and
  // the gradient zero, as with the ATen op, and the training guard sees a non-finite loss.
  if (std::isnan(lo) || std::isnan(hi))
    return {std::numeric_limits<float>::quiet_NaN(),
            static_cast<float>(std::numeric_limits<int32_t>::min())};
  const auto params = quant_utils::ChooseQuantizationParams(
      lo, hi, static_cast<int32_t>(qmin), static_cast<int32_t>(qmax),
      /*preserve_sparsity=*/symmetric, /*force_scale_power_of_two=*/false);
  return {static_cast<float>(params.scale), static_cast<float>(params.zero_point)};
}

// A fake-quant module's buffers, as the ATen op takes them.
struct Buffers {
  Tensor running_min, running_max, scale, zero_point;

  // Per-channel buffers start empty and are sized at the first observation, as the ATen op
  // sizes them (it leaves scale and zero point uninitialised until fake quant runs; here 1, 0).
  void size_for(int64_t channels) {
    TORCH_CHECK(running_min.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
                    zero_point.scalar_type() == at::kInt,
                "FastFusedFakeQuantize: unexpected buffer dtypes");
    if (running_min.numel() == channels) return;
    running_min.resize_({channels}).fill_(kInf);
    running_max.resize_({channels}).fill_(-kInf);
    scale.resize_({channels}).fill_(1.0);
    zero_point.resize_({channels}).fill_(0);
  }

  // The buffers of an observer that has seen data (or is about to): one value per channel.
  void check(int64_t channels) const {
    TORCH_CHECK(running_min.numel() == channels && running_max.numel() == channels,
                "FastFusedFakeQuantize: fake quantization is enabled but the observer has never "
                "seen data (enable the observer for at least one forward first)");
    TORCH_CHECK(scale.numel() == channels && zero_point.numel() == channels,
                "FastFusedFakeQuantize: ", scale.numel(), " scales and ", zero_point.numel(),
                " zero points for ", channels, " channels");
  }

  // Store channel `i`'s qparams in the module and in `saved` (scales, then zero points: what
  // the backward reads, since the module's buffers change at the next forward).
  void store(int64_t i, QParams q, float* saved, int64_t channels) {
    scale.data_ptr<float>()[i] = q.scale;
    zero_point.data_ptr<int32_t>()[i] = static_cast<int32_t>(q.zero_point);
    saved[i] = q.scale;
    saved[channels + i] = q.zero_point;
  }
};

void check_input(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "qatdist fake quant: expected a float32 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
}

// The moving-average observer update of a whole tensor, its min/max split across threads.
void observe_tensor(const float* x, int64_t n, float& running_min, float& running_max,
                    float constant) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
  const int64_t chunk = (n + chunks - 1) / chunks;
  std::vector<float> lows(chunks), highs(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t start = std::min(n, k * chunk), stop = std::min(n, start + chunk);
      min_max(x + start, stop - start, 1.0f, lows[k], highs[k]);
    }
  });
  float lo, hi, unused;
  min_max(lows.data(), chunks, 1.0f, lo, unused);
  min_max(highs.data(), chunks, 1.0f, unused, hi);
  moving_average(running_min, lo, constant);
  moving_average(running_max, hi, constant);
}

// The moving-average observer update of each row of `w * factor` (factor null: of `w`).
inline void observe_row(const float* row, int64_t cols, float factor, float& running_min,
                        float& running_max, float constant) {
  float lo, hi;
  min_max(row, cols, factor, lo, hi);
  moving_average(running_min, lo, constant);
  moving_average(running_max, hi, constant);
}

// Per tensor: observe the whole tensor, then fake-quantize it, both split across threads.
void per_tensor_forward(const float* x, float* out, int64_t n, Buffers& buffers, float constant,
                        bool observe, int64_t qmin, int64_t qmax, bool symmetric, float* saved) {
  float* running_min = buffers.running_min.data_ptr<float>();
  float* running_max = buffers.running_max.data_ptr<float>();
  if (observe) observe_tensor(x, n, *running_min, *running_max, constant);
  const QParams q = choose_qparams(*running_min, *running_max, qmin, qmax, symmetric);
  buffers.store(0, q, saved, 1);
  const float inv = 1.0f / q.scale, lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = fake_quant_value(x[i], inv, q.scale, q.zero_point, lo, hi);
    }
  });
}

// Per channel, a row at a time: observe `w[r] * factor[r]`, choose the row's qparams and
// fake-quantize it, optionally dividing the result by factor[r] again (`divide_back`).
// `factor` null: the rows as they are. Fake quant off (`quantize` false): the product as it is.
void per_channel_forward(const float* w, const float* factor, float* out, int64_t rows,
                         int64_t cols, Buffers& buffers, float constant, bool observe,
                         bool quantize, int64_t qmin, int64_t qmax, bool symmetric,
                         bool divide_back, float* saved) {
  float* running_min = buffers.running_min.data_ptr<float>();
  float* running_max = buffers.running_max.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float f = factor ? factor[r] : 1.0f;
      const float* wr = w + r * cols;
      if (observe) observe_row(wr, cols, f, running_min[r], running_max[r], constant);
      float* outr = out + r * cols;
      if (!quantize) {
        for (int64_t c = 0; c < cols; ++c) outr[c] = divide_back ? wr[c] * f / f : wr[c] * f;
        continue;
      }
      const QParams q = choose_qparams(running_min[r], running_max[r], qmin, qmax, symmetric);
      buffers.store(r, q, saved, rows);
      const float inv = 1.0f / q.scale;
      if (divide_back) {
        for (int64_t c = 0; c < cols; ++c) {
          outr[c] = fake_quant_value(wr[c] * f, inv, q.scale, q.zero_point, lo, hi) / f;
        }
      } else {
        for (int64_t c = 0; c < cols; ++c) {
          outr[c] = fake_quant_value(wr[c] * f, inv, q.scale, q.zero_point, lo, hi);
        }
      }
    }
  });
}

// Straight-through gradient of a plain fake quant: `grad` where the input rounded inside the
// range, 0 elsewhere (rows == 1: per tensor).
void fake_quant_backward(const float* x, const float* grad, float* grad_x, int64_t rows,
                         int64_t cols, const float* saved, int64_t qmin, int64_t qmax) {
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  auto row_range = [&](int64_t r, int64_t c0, int64_t c1) {
    const float inv = 1.0f / saved[r], zp = saved[rows + r];
    const float *xr = x + r * cols, *gr = grad + r * cols;
    float* out = grad_x + r * cols;
    for (int64_t c = c0; c < c1; ++c) {
      const float g = gr[c];  // loaded unconditionally: a masked load is slow on AMD CPUs
      out[c] = in_range(xr[c], inv, zp, lo, hi) ? g : 0.0f;
    }
  };
  if (rows == 1) {
    at::parallel_for(0, cols, kGrain, [&](int64_t b, int64_t e) { row_range(0, b, e); });
  } else {
    at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) row_range(r, 0, cols);
    });
  }
}

// Gradients of `out = fake_quant(w * f) [/ f]` per row, for `w` and `f` (fake quant off,
// `quantized` false: m = 1 and fake_quant the identity):
//   without divide_back: dw = m * g * f,  df = sum(m * g * w);
//   with divide_back:    dw = m * g,      df = sum(g * (m * w - fake_quant(w * f) / f)) / f,
// where m is the straight-through mask. In exact arithmetic these are autograd's gradients of
// the unfused graph; the sums run in this kernel's order.
void scaled_backward(const float* w, const float* factor, const float* grad, float* grad_w,
                     float* grad_factor, int64_t rows, int64_t cols, const float* saved,
                     int64_t qmin, int64_t qmax, bool divide_back, bool quantized) {
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> contribution(cols);  // what each element adds to df, per unit of grad
    for (int64_t r = begin; r < end; ++r) {
      const float f = factor[r], scale = saved[r], inv = 1.0f / scale, zp = saved[rows + r];
      const float *wr = w + r * cols, *gr = grad + r * cols;
      float* gwr = grad_w + r * cols;
      const float dw_factor = divide_back ? 1.0f : f;
      for (int64_t c = 0; c < cols; ++c) {
        const float g = gr[c], p = wr[c] * f;  // the same product as the forward's
        const bool m = !quantized || in_range(p, inv, zp, lo, hi);
        gwr[c] = (m ? g : 0.0f) * dw_factor;
        const float masked_w = m ? wr[c] : 0.0f;
        const float q = quantized ? fake_quant_value(p, inv, scale, zp, lo, hi) : p;
        contribution[c] = divide_back ? masked_w - q / f : masked_w;
      }
      const float sum = dot(gr, contribution.data(), cols);
      grad_factor[r] = divide_back ? sum / f : sum;
    }
  });
}

// The observer update alone (fake quant off).
void observe_only(const Tensor& input, Tensor running_min, Tensor running_max, Tensor scale,
                  Tensor zero_point, double averaging_constant, bool per_channel) {
  check_input(input);
  const Tensor x = input.detach().contiguous();
  const int64_t rows = per_channel ? x.size(0) : 1, cols = rows ? x.numel() / rows : 0;
  Buffers buffers{running_min, running_max, scale, zero_point};
  buffers.size_for(rows);
  const float constant = static_cast<float>(averaging_constant);
  float* run_min = buffers.running_min.data_ptr<float>();
  float* run_max = buffers.running_max.data_ptr<float>();
  const float* data = x.data_ptr<float>();
  if (!per_channel) {
    observe_tensor(data, cols, *run_min, *run_max, constant);
    return;
  }
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      observe_row(data + r * cols, cols, 1.0f, run_min[r], run_max[r], constant);
    }
  });
}

// ---- CPU kernels. Each forward returns its output and the qparams it used (scales, then zero
// points: what the backward reads, since the module's buffers change at the next forward).

// A module's `observer_enabled` / `fake_quant_enabled` buffer, read as the ATen op reads it.
bool flag(const Tensor& enabled) { return enabled.item().toLong() != 0; }

// `saved` holds, after the scales and zero points, whether fake quant ran (1) or not (0).
Tensor saved_qparams(int64_t rows, bool quantize, const at::TensorOptions& options) {
  Tensor saved = at::zeros({2 * rows + 1}, options);
  saved.data_ptr<float>()[2 * rows] = quantize ? 1.0f : 0.0f;
  return saved;
}

std::tuple<Tensor, Tensor> fake_quantize_forward(const Tensor& input, const Tensor& observer_on,
                                                 const Tensor& fake_quant_on, Tensor running_min,
                                                 Tensor running_max, Tensor scale,
                                                 Tensor zero_point, double averaging_constant,
                                                 int64_t qmin, int64_t qmax, bool per_channel,
                                                 bool symmetric) {
  check_input(input);
  const bool observe = flag(observer_on), quantize = flag(fake_quant_on);
  const Tensor x = input.contiguous();
  const int64_t rows = per_channel ? x.size(0) : 1, cols = rows ? x.numel() / rows : 0;
  Tensor saved = saved_qparams(rows, quantize, x.options());
  if (!quantize) {  // as the ATen op: observe, and a copy of the input
    if (observe) {
      observe_only(x, running_min, running_max, scale, zero_point, averaging_constant,
                   per_channel);
    }
    return {x.clone(), saved};
  }
  Buffers buffers{running_min, running_max, scale, zero_point};
  if (observe) buffers.size_for(rows);
  buffers.check(rows);
  Tensor out = at::empty(x.sizes(), x.options());
  const float constant = static_cast<float>(averaging_constant);
  if (per_channel) {
    per_channel_forward(x.data_ptr<float>(), nullptr, out.data_ptr<float>(), rows, cols,
                        buffers, constant, observe, true, qmin, qmax, symmetric, false,
                        saved.data_ptr<float>());
  } else {
    per_tensor_forward(x.data_ptr<float>(), out.data_ptr<float>(), cols, buffers, constant,
                       observe, qmin, qmax, symmetric, saved.data_ptr<float>());
  }
  return {out, saved};
}

Tensor fake_quantize_backward(const Tensor& input, const Tensor& grad_output, const Tensor& saved,
                              int64_t qmin, int64_t qmax) {
  const Tensor x = input.contiguous(), grad = grad_output.contiguous();
  const int64_t rows = (saved.numel() - 1) / 2;
  if (saved.data_ptr<float>()[2 * rows] == 0.0f) return grad.clone();  // fake quant was off
  Tensor grad_x = at::empty(grad.sizes(), grad.options());
  const int64_t cols = rows ? grad.numel() / rows : 0;
  fake_quant_backward(x.data_ptr<float>(), grad.data_ptr<float>(), grad_x.data_ptr<float>(), rows,
                      cols, saved.data_ptr<float>(), qmin, qmax);
  return grad_x;
}

// Fake quantization of `weight * factor` per output channel (the conv-BN QAT weight scaling
// taken inside the kernels), optionally divided by `factor` again.
std::tuple<Tensor, Tensor> scaled_fake_quantize_forward(
    const Tensor& weight, const Tensor& factor, const Tensor& observer_on,
    const Tensor& fake_quant_on, Tensor running_min, Tensor running_max, Tensor scale,
    Tensor zero_point, double averaging_constant, int64_t qmin, int64_t qmax, bool symmetric,
    bool divide_back) {
  check_input(weight);
  check_input(factor);
  const bool observe = flag(observer_on), quantize = flag(fake_quant_on);
  const Tensor w = weight.contiguous(), f = factor.contiguous();
  const int64_t rows = w.size(0), cols = rows ? w.numel() / rows : 0;
  TORCH_CHECK(f.numel() == rows, "qatdist scaled fake quant: ", f.numel(), " scale factors for ",
              rows, " channels");
  Buffers buffers{running_min, running_max, scale, zero_point};
  if (observe) buffers.size_for(rows);
  if (quantize) buffers.check(rows);
  Tensor out = at::empty(w.sizes(), w.options());
  Tensor saved = saved_qparams(rows, quantize, w.options());
  per_channel_forward(w.data_ptr<float>(), f.data_ptr<float>(), out.data_ptr<float>(), rows,
                      cols, buffers, static_cast<float>(averaging_constant), observe, quantize,
                      qmin, qmax, symmetric, divide_back, saved.data_ptr<float>());
  return {out, saved};
}

std::tuple<Tensor, Tensor> scaled_fake_quantize_backward(const Tensor& weight,
                                                         const Tensor& factor,
                                                         const Tensor& grad_output,
                                                         const Tensor& saved, int64_t qmin,
                                                         int64_t qmax, bool divide_back) {
  const Tensor w = weight.contiguous(), f = factor.contiguous(), grad = grad_output.contiguous();
  Tensor grad_w = at::empty(w.sizes(), w.options());
  Tensor grad_f = at::empty(f.sizes(), f.options());
  const int64_t rows = w.size(0), cols = rows ? w.numel() / rows : 0;
  scaled_backward(w.data_ptr<float>(), f.data_ptr<float>(), grad.data_ptr<float>(),
                  grad_w.data_ptr<float>(), grad_f.data_ptr<float>(), rows, cols,
                  saved.data_ptr<float>(), qmin, qmax, divide_back,
                  saved.data_ptr<float>()[2 * rows] != 0.0f);
  return {grad_w, grad_f};
}

// The public ops below autograd (inference mode): the forward's output alone.
Tensor fake_quantize_cpu(const Tensor& x, const Tensor& observer_on, const Tensor& fake_quant_on,
                         Tensor running_min, Tensor running_max, Tensor scale, Tensor zero_point,
                         double averaging_constant, int64_t quant_min, int64_t quant_max,
                         bool per_channel, bool symmetric) {
  return std::get<0>(fake_quantize_forward(x, observer_on, fake_quant_on, running_min,
                                           running_max, scale, zero_point, averaging_constant,
                                           quant_min, quant_max, per_channel, symmetric));
}

Tensor scaled_fake_quantize_cpu(const Tensor& weight, const Tensor& factor,
                                const Tensor& observer_on, const Tensor& fake_quant_on,
                                Tensor running_min, Tensor running_max, Tensor scale,
                                Tensor zero_point, double averaging_constant, int64_t quant_min,
                                int64_t quant_max, bool symmetric, bool divide_back) {
  return std::get<0>(scaled_fake_quantize_forward(
      weight, factor, observer_on, fake_quant_on, running_min, running_max, scale, zero_point,
      averaging_constant, quant_min, quant_max, symmetric, divide_back));
}

// ---- Autograd. The forward and backward call the kernels through the dispatcher (below
// autograd), not directly: under torch.compile / torch.export the tensors are fake and the
// dispatcher sends them to the fake implementations (qatdist/quant/kernels/fake_impls.py).

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct FakeQuantize : public torch::autograd::Function<FakeQuantize> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& observer_on,
                        const Tensor& fake_quant_on, Tensor running_min, Tensor running_max,
                        Tensor scale, Tensor zero_point, double averaging_constant, int64_t qmin,
                        int64_t qmax, bool per_channel, bool symmetric) {
    static const auto op = op_handle<decltype(fake_quantize_forward)>(
        "qatdist::fake_quantize_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = op.call(input, observer_on, fake_quant_on, running_min, running_max, scale,
                                zero_point, averaging_constant, qmin, qmax, per_channel,
                                symmetric);
    ctx->save_for_backward({input, saved});
    ctx->saved_data["qrange"] = std::vector<int64_t>{qmin, qmax};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<decltype(fake_quantize_backward)>(
        "qatdist::fake_quantize_backward");
    const auto saved = ctx->get_saved_variables();
    const auto qrange = ctx->saved_data["qrange"].toIntVector();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    variable_list out(12);
    out[0] = op.call(saved[0], grads[0], saved[1], qrange[0], qrange[1]);
    return out;
  }
};

struct ScaledFakeQuantize : public torch::autograd::Function<ScaledFakeQuantize> {
  static Tensor forward(AutogradContext* ctx, const Tensor& weight, const Tensor& factor,
                        const Tensor& observer_on, const Tensor& fake_quant_on,
                        Tensor running_min, Tensor running_max, Tensor scale, Tensor zero_point,
                        double averaging_constant, int64_t qmin, int64_t qmax, bool symmetric,
                        bool divide_back) {
    static const auto op = op_handle<decltype(scaled_fake_quantize_forward)>(
        "qatdist::scaled_fake_quantize_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = op.call(weight, factor, observer_on, fake_quant_on, running_min,
                                running_max, scale, zero_point, averaging_constant, qmin, qmax,
                                symmetric, divide_back);
    ctx->save_for_backward({weight, factor, saved});
    ctx->saved_data["qrange"] = std::vector<int64_t>{qmin, qmax, divide_back};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<decltype(scaled_fake_quantize_backward)>(
        "qatdist::scaled_fake_quantize_backward");
    const auto saved = ctx->get_saved_variables();
    const auto qrange = ctx->saved_data["qrange"].toIntVector();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_w, grad_f] =
        op.call(saved[0], saved[1], grads[0], saved[2], qrange[0], qrange[1], qrange[2] != 0);
    variable_list out(13);
    out[0] = grad_w;
    out[1] = grad_f;
    return out;
  }
};

Tensor fake_quantize(const Tensor& x, const Tensor& observer_on, const Tensor& fake_quant_on,
                     Tensor running_min, Tensor running_max, Tensor scale, Tensor zero_point,
                     double averaging_constant, int64_t quant_min, int64_t quant_max,
                     bool per_channel, bool symmetric) {
  return FakeQuantize::apply(x, observer_on, fake_quant_on, running_min, running_max, scale,
                             zero_point, averaging_constant, quant_min, quant_max, per_channel,
                             symmetric);
}

Tensor scaled_fake_quantize(const Tensor& weight, const Tensor& factor, const Tensor& observer_on,
                            const Tensor& fake_quant_on, Tensor running_min, Tensor running_max,
                            Tensor scale, Tensor zero_point, double averaging_constant,
                            int64_t quant_min, int64_t quant_max, bool symmetric,
                            bool divide_back) {
  return ScaledFakeQuantize::apply(weight, factor, observer_on, fake_quant_on, running_min,
                                   running_max, scale, zero_point, averaging_constant, quant_min,
                                   quant_max, symmetric, divide_back);
}

}  // namespace

// Schemas only; the kernels are registered per dispatch key below, so that the ops have no
// CompositeImplicitAutograd kernel and fake implementations can be registered for them.
TORCH_LIBRARY(qatdist, m) {
  // The module's flags are tensors, as the ATen op takes them: a traced graph reads them at run
  // time rather than baking in the values they had when it was traced.
  const std::string args =
      "Tensor observer_enabled, Tensor fake_quant_enabled, Tensor(a!) running_min, "
      "Tensor(b!) running_max, Tensor(c!) scale, Tensor(d!) zero_point, "
      "float averaging_constant, int quant_min, int quant_max, ";
  const std::string plain = "Tensor x, " + args + "bool per_channel, bool symmetric)";
  const std::string scaled =
      "Tensor weight, Tensor factor, " + args + "bool symmetric, bool divide_back)";
  m.def(("fake_quantize(" + plain + " -> Tensor").c_str());
  m.def(("fake_quantize_forward(" + plain + " -> (Tensor, Tensor)").c_str());
  m.def(
      "fake_quantize_backward(Tensor x, Tensor grad, Tensor qparams, int quant_min, "
      "int quant_max) -> Tensor");
  m.def(("scaled_fake_quantize(" + scaled + " -> Tensor").c_str());
  m.def(("scaled_fake_quantize_forward(" + scaled + " -> (Tensor, Tensor)").c_str());
  m.def(
      "scaled_fake_quantize_backward(Tensor weight, Tensor factor, Tensor grad, Tensor qparams, "
      "int quant_min, int quant_max, bool divide_back) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qatdist, CPU, m) {
  m.impl("fake_quantize", &fake_quantize_cpu);
  m.impl("fake_quantize_forward", &fake_quantize_forward);
  m.impl("fake_quantize_backward", &fake_quantize_backward);
  m.impl("scaled_fake_quantize", &scaled_fake_quantize_cpu);
  m.impl("scaled_fake_quantize_forward", &scaled_fake_quantize_forward);
  m.impl("scaled_fake_quantize_backward", &scaled_fake_quantize_backward);
}

TORCH_LIBRARY_IMPL(qatdist, Autograd, m) {
  m.impl("fake_quantize", &fake_quantize);
  m.impl("scaled_fake_quantize", &scaled_fake_quantize);
}
