// The one place torch meets the kernels: op schemas (namespace `fastgpt`), argument checks,
// parameter preparation, output allocation, and the CPU / CUDA implementations that call the
// raw-pointer kernels in csrc/cpu and csrc/cuda, and the norms' autograd. Python
// (fastgpt/layernorm.py, fastgpt/attention.py) registers fake (meta) implementations and
// autocast on these same ops, and attention's autograd, and calls them directly: there is no
// Python custom op around them.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/attention.h"
#include "cpu/linear.h"
#include "cpu/layernorm.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef FASTGPT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/attention.h"
#include "cuda/layernorm.h"
#include "cuda/linear.h"
#endif

// The CUDA architectures the kernels were compiled for (setup.py), reported to Python so that
// the "native" backend can refuse a device it has no code for.
#ifndef FASTGPT_CUDA_ARCHS
#define FASTGPT_CUDA_ARCHS ""
#endif

namespace fastgpt {
namespace {

using at::Tensor;
using c10::optional;

// ------------------------------------------------------------------------------ dtypes

bool to_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kFloat: *out = DType::kFloat32; return true;
    case at::kHalf: *out = DType::kFloat16; return true;
    case at::kBFloat16: *out = DType::kBFloat16; return true;
    case at::kDouble: *out = DType::kFloat64; return true;
    default: return false;
  }
}

const char* dtype_name(DType d) {  // torch's names, so Python can getattr(torch, name)
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "";
}

template <size_t K>
std::string dtype_names(const DType (&served)[K]) {
  std::string out;
  for (const DType d : served) out += (out.empty() ? "" : ",") + std::string(dtype_name(d));
  return out;
}

// x's element type, if the `family` kernels ("norm", "attention") of this device serve it;
// `arg` names x in the error.
template <size_t K>
DType served_dtype(const Tensor& x, const DType (&served)[K], const char* device,
                   const char* family = "norm", const char* arg = "x") {
  DType d;
  const bool ok = to_dtype(x.scalar_type(), &d);
  bool listed = false;
  for (const DType s : served) listed = listed || (ok && s == d);
  TORCH_CHECK(listed, "fastgpt: the native ", device, " ", family, " kernels support ",
              dtype_names(served), "; ", arg, " has dtype ", x.scalar_type());
  return d;
}

at::ScalarType stats_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ------------------------------------------------------------------------------ checks

// (..., N) -> (M, N) with unit column stride: a view whenever the strides allow (a column slice,
// a broadcast row dimension), else one contiguous copy.
Tensor rows(const Tensor& t) {
  const int64_t n = t.size(-1);
  Tensor r = t.dim() == 2 ? t : t.reshape({-1, n});
  return r.stride(1) == 1 || n == 1 ? r : r.contiguous();
}

int64_t row_stride(const Tensor& rows2d) {
  return rows2d.size(0) > 1 ? rows2d.stride(0) : rows2d.size(1);
}

void check_like_x(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastgpt: ", name, " must have shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastgpt: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastgpt: ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

void check_hidden(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "fastgpt: ", name,
              " must have a hidden (last) dimension of size >= 1, got shape ", x.sizes());
  // A row of no elements has no mean or variance; the Python API refuses it too, rather
  // than return statistics that mean nothing.
}

// A weight or bias: (N,), x's device, any floating dtype and any strides.
void check_param(const optional<Tensor>& p, const char* name, const Tensor& x) {
  if (!p) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), "fastgpt: ", name, " must have shape [",
              x.size(-1), "], got ", p->sizes());
  TORCH_CHECK(at::isFloatingType(p->scalar_type()), "fastgpt: ", name,
              " must be floating point, got ", p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), "fastgpt: ", name, " is on ", p->device(),
              " but x is on ", x.device());
}

// What the kernels read of a weight or bias: N contiguous elements of `dtype` (a no-op for a
// contiguous parameter already of that dtype; otherwise N elements are copied, which is cheap
// next to the M x N activation and lets every kernel assume one layout).
optional<Tensor> param_as(const optional<Tensor>& p, at::ScalarType dtype) {
  // The common case (a contiguous parameter already of that dtype) skips two dispatcher calls.
  if (!p || (p->scalar_type() == dtype && p->is_contiguous())) return p;
  return p->to(dtype).contiguous();
}

void check_stats(const Tensor& t, const char* name, const Tensor& src) {
  const int64_t m = src.numel() / src.size(-1);
  TORCH_CHECK(t.numel() == m && t.scalar_type() == stats_type(src) && t.device() == src.device(),
              "fastgpt: ", name, " must hold ", m, " ", stats_type(src), " values on ",
              src.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

const void* ptr_or_null(const optional<Tensor>& t) { return t ? t->data_ptr() : nullptr; }

void* data_if(const Tensor& t, bool wanted) { return wanted ? t.data_ptr() : nullptr; }

// ------------------------------------------------------------------- shared preparation

// Forward operands after checks, outputs allocated in x's shape (y, h) and x's leading shape
// (mean, rstd). The op's outputs may not alias its inputs, so "no h" / "no mean" are empty.
struct Fwd {
  Tensor x2, r2;  // (M, N) rows of x and residual
  Tensor y, h, mean, rstd;
};

Fwd prepare_fwd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                const optional<Tensor>& residual, double eps, bool rms) {
  check_hidden(x, "x");
  TORCH_CHECK(eps > 0, "fastgpt: eps must be > 0, got ", eps);
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  if (residual) check_like_x(*residual, "residual", x);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const auto stats = x.options().dtype(stats_type(x));
  Fwd f;
  f.x2 = rows(x);
  if (residual) f.r2 = rows(*residual);
  f.y = at::empty(x.sizes(), x.options());
  f.h = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  f.mean = rms ? at::empty({0}, stats) : at::empty(lead, stats);
  f.rstd = at::empty(lead, stats);
  return f;
}

struct Bwd {
  Tensor dy2, dh2, src2;  // (M, N); dy and dh contiguous
  Tensor dx, dweight, dbias;
};

Bwd prepare_bwd(const Tensor& dy, const optional<Tensor>& dh, const Tensor& src,
                const optional<Tensor>& weight, const optional<Tensor>& mean, const Tensor& rstd,
                bool need_dweight, bool need_dbias) {
  check_hidden(src, "src");
  check_like_x(dy, "dy", src);
  if (dh) check_like_x(*dh, "dh", src);
  check_param(weight, "weight", src);
  check_stats(rstd, "rstd", src);
  if (mean) check_stats(*mean, "mean", src);
  const int64_t n = src.size(-1);
  const auto stats = src.options().dtype(stats_type(src));
  Bwd b;
  b.src2 = rows(src);
  b.dy2 = dy.reshape({-1, n}).contiguous();
  if (dh) b.dh2 = dh->reshape({-1, n}).contiguous();
  b.dx = at::empty(src.sizes(), src.options());
  // In the statistics dtype; autograd casts them to the parameter's dtype.
  b.dweight = need_dweight ? at::empty({n}, stats) : at::empty({0}, stats);
  b.dbias = need_dbias ? at::empty({n}, stats) : at::empty({0}, stats);
  if (b.src2.size(0) == 0) {
    // Sums over zero rows are zero, and the kernels are not launched for empty inputs.
    b.dweight.zero_();
    b.dbias.zero_();
  }
  return b;
}

// ---------------------------------------------------------------------------------- CPU

// A fresh CPU output of more than a few MB comes from mmap, and the OS zero-fills it page by
// page on first touch. On the 2-core CI machine (AMD EPYC, THP in madvise mode) that costs
// 36 ms per fresh 128 MB tensor, three times the norm kernel itself; asking for transparent
// huge pages on the still-untouched range brings it to 9 ms. Advisory only: only whole 2 MiB
// pages inside the tensor are named, and where THP is off or unsupported nothing changes.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (t.nbytes() < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// The CPU kernels read weight and bias in the statistics type (float, double for double x).
void fwd_cpu(Fwd& f, const optional<Tensor>& weight, const optional<Tensor>& bias,
             const optional<Tensor>& residual, double eps, bool rms) {
  const DType dtype = served_dtype(f.x2, cpu::kNormDTypes, "CPU");
  const auto w = param_as(weight, stats_type(f.x2));
  const auto b = param_as(bias, stats_type(f.x2));
  advise_huge_pages(f.y);
  advise_huge_pages(f.h);
  if (f.x2.size(0) == 0) return;
  cpu::norm_fwd(dtype, rms, f.x2.data_ptr(), row_stride(f.x2), residual ? f.r2.data_ptr() : nullptr,
                residual ? row_stride(f.r2) : 0, ptr_or_null(w), ptr_or_null(b), f.y.data_ptr(),
                data_if(f.h, residual.has_value()), data_if(f.mean, !rms), f.rstd.data_ptr(),
                f.x2.size(0), f.x2.size(1), eps);
}

void bwd_cpu(Bwd& b, const optional<Tensor>& weight, const optional<Tensor>& mean,
             const Tensor& rstd, bool rms, bool need_dweight, bool need_dbias) {
  const DType dtype = served_dtype(b.src2, cpu::kNormDTypes, "CPU");
  const auto w = param_as(weight, stats_type(b.src2));
  advise_huge_pages(b.dx);
  if (b.src2.size(0) == 0) return;
  cpu::norm_bwd(dtype, rms, b.dy2.data_ptr(), b.dh2.defined() ? b.dh2.data_ptr() : nullptr,
                b.src2.data_ptr(), row_stride(b.src2), ptr_or_null(w),
                rms ? nullptr : mean->data_ptr(), rstd.data_ptr(), b.dx.data_ptr(),
                data_if(b.dweight, need_dweight), data_if(b.dbias, need_dbias), b.src2.size(0),
                b.src2.size(1));
}

// --------------------------------------------------------------------------------- CUDA

#ifdef FASTGPT_WITH_CUDA
// The CUDA kernels read weight and bias in x's dtype when both have it (no conversion, half
// the bytes of float for 16-bit x), else both in float32 (e.g. fp32 master weights).
at::ScalarType cuda_param_type(const Tensor& x, const optional<Tensor>& weight,
                               const optional<Tensor>& bias) {
  const bool same = (!weight || weight->scalar_type() == x.scalar_type()) &&
                    (!bias || bias->scalar_type() == x.scalar_type());
  return same ? x.scalar_type() : at::kFloat;
}

void check_hidden_cuda(const Tensor& x) {
  TORCH_CHECK(x.size(-1) <= kNormMaxHidden, "fastgpt: the native CUDA norm kernels support "
              "hidden sizes up to ", kNormMaxHidden, ", got ", x.size(-1));
}

void fwd_cuda(Fwd& f, const optional<Tensor>& weight, const optional<Tensor>& bias,
              const optional<Tensor>& residual, double eps, bool rms) {
  const DType dtype = served_dtype(f.x2, cuda::kNormDTypes, "CUDA");
  check_hidden_cuda(f.x2);
  const at::ScalarType ptype = cuda_param_type(f.x2, weight, bias);
  DType param_dtype;
  to_dtype(ptype, &param_dtype);
  const c10::cuda::CUDAGuard guard(f.x2.device());
  const auto w = param_as(weight, ptype);
  const auto b = param_as(bias, ptype);
  C10_CUDA_CHECK(cuda::norm_fwd(
      dtype, param_dtype, rms, f.x2.data_ptr(), row_stride(f.x2),
      residual ? f.r2.data_ptr() : nullptr, residual ? row_stride(f.r2) : 0, ptr_or_null(w),
      ptr_or_null(b), f.y.data_ptr(), data_if(f.h, residual.has_value()),
      static_cast<float*>(data_if(f.mean, !rms)), f.rstd.data_ptr<float>(), f.x2.size(0),
      f.x2.size(1), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream(f.x2.get_device())));
}

void bwd_cuda(Bwd& b, const optional<Tensor>& weight, const optional<Tensor>& mean,
              const Tensor& rstd, bool rms, bool need_dweight, bool need_dbias) {
  const DType dtype = served_dtype(b.src2, cuda::kNormDTypes, "CUDA");
  check_hidden_cuda(b.src2);
  const at::ScalarType ptype = cuda_param_type(b.src2, weight, c10::nullopt);
  DType param_dtype;
  to_dtype(ptype, &param_dtype);
  const c10::cuda::CUDAGuard guard(b.src2.device());
  const auto w = param_as(weight, ptype);
  const int64_t M = b.src2.size(0), N = b.src2.size(1);
  if (M == 0) return;
  const size_t ws_bytes =
      cuda::norm_bwd_workspace_bytes(M, N, need_dweight, need_dbias, b.src2.get_device());
  // Through the caching allocator: the partial sums are rewritten before they are read.
  Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, b.src2.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::norm_bwd(
      dtype, param_dtype, rms, b.dy2.data_ptr(), b.dh2.defined() ? b.dh2.data_ptr() : nullptr,
      b.src2.data_ptr(), row_stride(b.src2), ptr_or_null(w),
      rms ? nullptr : mean->data_ptr<float>(), rstd.data_ptr<float>(), b.dx.data_ptr(),
      static_cast<float*>(data_if(b.dweight, need_dweight)),
      static_cast<float*>(data_if(b.dbias, need_dbias)), ws_bytes ? workspace.data_ptr() : nullptr,
      M, N, c10::cuda::getCurrentCUDAStream(b.src2.get_device())));
}
#endif  // FASTGPT_WITH_CUDA

// ----------------------------------------------------------------------------- the ops

// One implementation per op and device: Device::fwd / Device::bwd run the kernels on the
// prepared operands. The fake (meta) implementations that torch.compile and opcheck trace with
// are registered from Python (fastgpt/layernorm.py), where symbolic shapes come for free.
struct Cpu {
  static constexpr auto fwd = &fwd_cpu;
  static constexpr auto bwd = &bwd_cpu;
};
#ifdef FASTGPT_WITH_CUDA
struct Cuda {
  static constexpr auto fwd = &fwd_cuda;
  static constexpr auto bwd = &bwd_cuda;
};
#endif

template <class Device>
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm(const Tensor& x,
                                                      const optional<Tensor>& weight,
                                                      const optional<Tensor>& bias,
                                                      const optional<Tensor>& residual,
                                                      double eps) {
  Fwd f = prepare_fwd(x, weight, bias, residual, eps, /*rms=*/false);
  Device::fwd(f, weight, bias, residual, eps, /*rms=*/false);
  return {f.y, f.h, f.mean, f.rstd};
}

template <class Device>
std::tuple<Tensor, Tensor, Tensor> rms_norm(const Tensor& x, const optional<Tensor>& weight,
                                            const optional<Tensor>& residual, double eps) {
  Fwd f = prepare_fwd(x, weight, c10::nullopt, residual, eps, /*rms=*/true);
  Device::fwd(f, weight, c10::nullopt, residual, eps, /*rms=*/true);
  return {f.y, f.h, f.rstd};
}

template <class Device>
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& dy, const optional<Tensor>& dh,
                                                       const Tensor& src,
                                                       const optional<Tensor>& weight,
                                                       const Tensor& mean, const Tensor& rstd,
                                                       bool need_dweight, bool need_dbias) {
  Bwd b = prepare_bwd(dy, dh, src, weight, mean, rstd, need_dweight, need_dbias);
  Device::bwd(b, weight, mean, rstd, /*rms=*/false, need_dweight, need_dbias);
  return {b.dx, b.dweight, b.dbias};
}

template <class Device>
std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& dy, const optional<Tensor>& dh,
                                             const Tensor& src, const optional<Tensor>& weight,
                                             const Tensor& rstd, bool need_dweight) {
  Bwd b = prepare_bwd(dy, dh, src, weight, c10::nullopt, rstd, need_dweight, false);
  Device::bwd(b, weight, c10::nullopt, rstd, /*rms=*/true, need_dweight, false);
  return {b.dx, b.dweight};
}

template <class Device>
void register_impls(torch::Library& m) {
  m.impl("layer_norm", &layer_norm<Device>);
  m.impl("rms_norm", &rms_norm<Device>);
  m.impl("layer_norm_backward", &layer_norm_backward<Device>);
  m.impl("rms_norm_backward", &rms_norm_backward<Device>);
}

// ----------------------------------------------------------------------------- autograd

// Autograd is registered here, in C++, rather than with torch.library.register_autograd from
// Python: the Python autograd wrapper cost about 10 us per call without grad and 100 us with
// (8 x 768 fp32, 2-core CI machine), against about 11 us for all of F.layer_norm. The formula
// is the one fastgpt/layernorm.py registers on the Triton ops; keep the two alike.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Fn>
auto find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Handles of the ops, looked up once: autograd calls them below the Autograd key.
const auto& layer_norm_op() {
  static const auto op = find_op<decltype(layer_norm<Cpu>)>("fastgpt::layer_norm");
  return op;
}
const auto& rms_norm_op() {
  static const auto op = find_op<decltype(rms_norm<Cpu>)>("fastgpt::rms_norm");
  return op;
}

optional<Tensor> maybe(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : c10::nullopt; }

// What backward needs to know of the forward's inputs, in one saved_data entry (each entry is
// a hashed std::string key: a handful of them cost microseconds on a decode-sized call).
enum SavedFlag : int64_t { kResidual = 1, kNeedDweight = 2, kNeedDbias = 4 };

void save_inputs(AutogradContext* ctx, const optional<Tensor>& weight,
                 const optional<Tensor>& bias, const optional<Tensor>& residual) {
  const int64_t flags = (residual ? kResidual : 0) |
                        (weight && weight->requires_grad() ? kNeedDweight : 0) |
                        (bias && bias->requires_grad() ? kNeedDbias : 0);
  // Parameter dtypes, for their gradients (the kernels sum in the statistics dtype).
  const auto dtype = [](const optional<Tensor>& p) {
    return int64_t(p ? p->scalar_type() : at::kFloat);
  };
  ctx->saved_data["inputs"] = std::vector<int64_t>{flags, dtype(weight), dtype(bias)};
  ctx->set_materialize_grads(false);  // unused outputs (h, often) arrive undefined
}

struct Saved {
  int64_t flags;
  at::ScalarType weight_dtype, bias_dtype;
  explicit Saved(AutogradContext* ctx) {
    const auto v = ctx->saved_data["inputs"].toIntVector();
    flags = v[0];
    weight_dtype = static_cast<at::ScalarType>(v[1]);
    bias_dtype = static_cast<at::ScalarType>(v[2]);
  }
  bool has(SavedFlag f) const { return flags & f; }
};

// A parameter's gradient in its own dtype, or undefined when not needed.
Tensor param_grad(const Tensor& grad, bool needed, at::ScalarType dtype) {
  return needed ? grad.to(dtype) : Tensor();
}

struct LayerNormFn : torch::autograd::Function<LayerNormFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const optional<Tensor>& weight, const optional<Tensor>& bias,
                               const optional<Tensor>& residual, double eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, h, mean, rstd] = layer_norm_op().call(x, weight, bias, residual, eps);
    save_inputs(ctx, weight, bias, residual);
    // What was normalised is all backward needs: h with a residual, else x.
    ctx->save_for_backward({residual ? h : x, weight.value_or(Tensor()), mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    return {y, h, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<decltype(layer_norm_backward<Cpu>)>("fastgpt::layer_norm_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Saved in(ctx);
    const bool res = in.has(kResidual), need_dw = in.has(kNeedDweight), need_db = in.has(kNeedDbias);
    const Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    auto [dx, dw, db] = op.call(dy, res ? maybe(grads[1]) : c10::nullopt, saved[0],
                                maybe(saved[1]), saved[2], saved[3], need_dw, need_db);
    return {dx, param_grad(dw, need_dw, in.weight_dtype), param_grad(db, need_db, in.bias_dtype),
            res ? dx : Tensor(), Tensor()};
  }
};

struct RmsNormFn : torch::autograd::Function<RmsNormFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const optional<Tensor>& weight, const optional<Tensor>& residual,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, h, rstd] = rms_norm_op().call(x, weight, residual, eps);
    save_inputs(ctx, weight, c10::nullopt, residual);
    ctx->save_for_backward({residual ? h : x, weight.value_or(Tensor()), rstd});
    ctx->mark_non_differentiable({rstd});
    return {y, h, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<decltype(rms_norm_backward<Cpu>)>("fastgpt::rms_norm_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Saved in(ctx);
    const bool res = in.has(kResidual), need_dw = in.has(kNeedDweight);
    const Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    auto [dx, dw] = op.call(dy, res ? maybe(grads[1]) : c10::nullopt, saved[0], maybe(saved[1]),
                            saved[2], need_dw);
    return {dx, param_grad(dw, need_dw, in.weight_dtype), res ? dx : Tensor(), Tensor()};
  }
};

// Whether autograd must record this call. When not (inference, decoding), the kernel runs
// straight away, without building a graph node.
bool records(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
             const optional<Tensor>& residual) {
  const auto req = [](const optional<Tensor>& t) { return t && t->requires_grad(); };
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || req(weight) || req(bias) || req(residual));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_autograd(const Tensor& x,
                                                               const optional<Tensor>& weight,
                                                               const optional<Tensor>& bias,
                                                               const optional<Tensor>& residual,
                                                               double eps) {
  if (!records(x, weight, bias, residual)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return layer_norm_op().call(x, weight, bias, residual, eps);
  }
  const variable_list out = LayerNormFn::apply(x, weight, bias, residual, eps);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_autograd(const Tensor& x,
                                                     const optional<Tensor>& weight,
                                                     const optional<Tensor>& residual,
                                                     double eps) {
  if (!records(x, weight, c10::nullopt, residual)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return rms_norm_op().call(x, weight, residual, eps);
  }
  const variable_list out = RmsNormFn::apply(x, weight, residual, eps);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------- attention
//
// q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev): one dtype and device, Hq a multiple of
// Hk (grouped-query attention), any strides for the batch, head and row dimensions (the kernels
// read rows in place; a last dimension that is not unit-stride is copied). Fake (meta)
// implementations and autograd are registered on these ops from Python (fastgpt/attention.py):
// attention is far costlier than the ~10 us of a Python autograd wrapper.

void check_heads_layout(const Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 4, "fastgpt: attention: ", name, " must be 4-D ", dims, ", got shape ",
              t.sizes());
}

// t has ref's dtype and device; `op` names the op in the error.
void check_same_kind(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                     const char* op = "attention") {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastgpt: ", op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "fastgpt: ", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device());
}

void check_size(const Tensor& t, const char* name, int64_t dim, int64_t want, const char* what) {
  TORCH_CHECK(t.size(dim) == want, "fastgpt: attention: ", name, " must have ", what, " ", want,
              " (dim ", dim, "), got shape ", t.sizes());
}

// The shape of an attention call, after checking q, k, v against each other.
AttentionShape attention_shape(const Tensor& q, const Tensor& k, const Tensor& v,
                                    double scale) {
  check_heads_layout(q, "q", "(B, Hq, L, E)");
  check_heads_layout(k, "k", "(B, Hk, S, E)");
  check_heads_layout(v, "v", "(B, Hk, S, Ev)");
  check_same_kind(k, "k", q, "q");
  check_same_kind(v, "v", q, "q");
  check_size(k, "k", 0, q.size(0), "batch size (q's)");
  check_size(v, "v", 0, q.size(0), "batch size (q's)");
  check_size(k, "k", 3, q.size(3), "head dim E (q's)");
  check_size(v, "v", 1, k.size(1), "kv heads (k's)");
  check_size(v, "v", 2, k.size(2), "key length S (k's)");
  TORCH_CHECK(q.size(3) >= 1, "fastgpt: attention: q and k must have a head dim E >= 1, got ",
              q.sizes());
  TORCH_CHECK(v.size(3) >= 1, "fastgpt: attention: v must have a head dim Ev >= 1, got ",
              v.sizes());
  const int64_t hq = q.size(1), hk = k.size(1);
  TORCH_CHECK(hk >= 1 || hq == 0, "fastgpt: attention: k and v have no heads but q has ", hq);
  TORCH_CHECK(hk == 0 || hq % hk == 0, "fastgpt: attention: q's head count ", hq,
              " must be a multiple of k and v's head count ", hk);
  TORCH_CHECK(std::isfinite(scale), "fastgpt: attention: scale must be finite, got ", scale);
  AttentionShape sh;
  sh.batch = q.size(0);
  sh.q_heads = hq;
  sh.kv_heads = hk;
  sh.q_len = q.size(2);
  sh.kv_len = k.size(2);
  sh.qk_dim = q.size(3);
  sh.v_dim = v.size(3);
  return sh;
}

// t with a unit-stride last dimension: t itself when it has one, else a contiguous copy.
Tensor unit_rows(const Tensor& t) {
  return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous();
}

RowStrides row_strides(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Forward operands after checks, with the outputs allocated: out (B, Hq, L, Ev) in q's dtype,
// lse (B, Hq, L) in the statistics dtype, both contiguous.
struct AttnFwd {
  AttentionShape sh;
  AttentionMask mask;
  double scale;
  Tensor q, k, v;
  Tensor out, lse;
};

AttnFwd prepare_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool is_causal,
                          double scale) {
  AttnFwd f;
  f.sh = attention_shape(q, k, v, scale);
  f.mask.causal = is_causal;
  f.scale = scale;
  f.q = unit_rows(q);
  f.k = unit_rows(k);
  f.v = unit_rows(v);
  f.out = at::empty({f.sh.batch, f.sh.q_heads, f.sh.q_len, f.sh.v_dim}, q.options());
  f.lse = at::empty({f.sh.batch, f.sh.q_heads, f.sh.q_len}, q.options().dtype(stats_type(q)));
  return f;
}

struct AttnBwd {
  AttnFwd f;  // q, k, v and shape; f.out and f.lse are the forward's out and lse
  Tensor dout;
  Tensor dq, dk, dv;
};

AttnBwd prepare_attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Tensor& out, const Tensor& lse,
                                   bool is_causal, double scale) {
  AttnBwd b;
  b.f.sh = attention_shape(q, k, v, scale);
  b.f.mask.causal = is_causal;
  b.f.scale = scale;
  const AttentionShape& sh = b.f.sh;
  const std::vector<int64_t> out_shape{sh.batch, sh.q_heads, sh.q_len, sh.v_dim};
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{dout, "grad_out"},
                                std::pair<const Tensor&, const char*>{out, "out"}}) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(out_shape), "fastgpt: attention_backward: ", name,
                " must have shape ", at::IntArrayRef(out_shape), ", got ", t.sizes());
    check_same_kind(t, name, q, "q", "attention_backward");
  }
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(out_shape).slice(0, 3) &&
                  lse.scalar_type() == stats_type(q) && lse.device() == q.device(),
              "fastgpt: attention_backward: lse must be a ", stats_type(q), " tensor of shape ",
              at::IntArrayRef(out_shape).slice(0, 3), " on ", q.device(), ", got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  b.f.q = unit_rows(q);
  b.f.k = unit_rows(k);
  b.f.v = unit_rows(v);
  b.f.out = unit_rows(out);
  b.f.lse = lse.contiguous();
  // Read in place like q (an expanded gradient, e.g. of out.sum(), is never materialised).
  b.dout = unit_rows(dout);
  b.dq = at::empty(q.sizes(), q.options());
  b.dk = at::empty(k.sizes(), k.options());
  b.dv = at::empty(v.sizes(), v.options());
  return b;
}

void attention_fwd_cpu(AttnFwd& f) {
  const DType dtype = served_dtype(f.q, cpu::kAttentionDTypes, "CPU", "attention", "q");
  advise_huge_pages(f.out);
  cpu::attention_fwd(dtype, f.sh, f.mask, f.scale, f.q.data_ptr(), row_strides(f.q),
                     f.k.data_ptr(), row_strides(f.k), f.v.data_ptr(), row_strides(f.v),
                     f.out.data_ptr(), f.lse.data_ptr());
}

void attention_bwd_cpu(AttnBwd& b) {
  const DType dtype = served_dtype(b.f.q, cpu::kAttentionDTypes, "CPU", "attention", "q");
  for (const Tensor* t : {&b.dq, &b.dk, &b.dv}) advise_huge_pages(*t);
  cpu::attention_bwd(dtype, b.f.sh, b.f.mask, b.f.scale, b.dout.data_ptr(), row_strides(b.dout),
                     b.f.q.data_ptr(), row_strides(b.f.q), b.f.k.data_ptr(), row_strides(b.f.k),
                     b.f.v.data_ptr(), row_strides(b.f.v), b.f.out.data_ptr(),
                     row_strides(b.f.out), b.f.lse.data_ptr(), b.dq.data_ptr(), b.dk.data_ptr(),
                     b.dv.data_ptr());
}

// Decoding operands after checks: q (B, Hq, Tq, E), the caches (B, Hk, Tmax, E / Ev) with the
// new tokens already written, kv_lens (B,) int32; out (B, Hq, Tq, Ev) allocated, contiguous.
struct AttnKv {
  AttentionShape sh;
  double scale;
  Tensor q, k, v, kv_lens;
  Tensor out;
};

AttnKv prepare_attention_with_kvcache(const Tensor& q, const Tensor& k_cache,
                                      const Tensor& v_cache, const Tensor& kv_lens, double scale) {
  AttnKv a;
  a.sh = attention_shape(q, k_cache, v_cache, scale);
  TORCH_CHECK(kv_lens.dim() == 1 && kv_lens.size(0) == a.sh.batch &&
                  kv_lens.scalar_type() == at::kInt && kv_lens.device() == q.device(),
              "fastgpt: attention_with_kvcache: kv_lens must be an int32 tensor of shape (",
              a.sh.batch, ",) on ", q.device(), ", got ", kv_lens.scalar_type(), " ",
              kv_lens.sizes(), " on ", kv_lens.device());
  a.scale = scale;
  a.q = unit_rows(q);
  a.k = unit_rows(k_cache);
  a.v = unit_rows(v_cache);
  a.kv_lens = kv_lens.contiguous();
  a.out = at::empty({a.sh.batch, a.sh.q_heads, a.sh.q_len, a.sh.v_dim}, q.options());
  return a;
}

void attention_with_kvcache_cpu(AttnKv& a) {
  const DType dtype = served_dtype(a.q, cpu::kAttentionDTypes, "CPU", "attention", "q");
  const int32_t* lens = a.kv_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < a.sh.batch; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= a.sh.kv_len, "fastgpt: attention_with_kvcache: "
                "kv_lens[", b, "] = ", lens[b], " is outside [0, Tmax = ", a.sh.kv_len, "]");
  }
  cpu::attention_with_kvcache(dtype, a.sh, a.scale, a.q.data_ptr(), row_strides(a.q),
                              a.k.data_ptr(), row_strides(a.k), a.v.data_ptr(), row_strides(a.v),
                              lens, a.out.data_ptr());
}

// One implementation per device, as for the norms: a struct naming the device's kernels (each
// with its own dtype table and checks) and one register_attention_impls<> line.
struct CpuAttention {
  static constexpr auto fwd = &attention_fwd_cpu;
  static constexpr auto bwd = &attention_bwd_cpu;
  static constexpr auto kvcache = &attention_with_kvcache_cpu;
};

#ifdef FASTGPT_WITH_CUDA
// The CUDA kernels read every row as whole 16-byte vectors (cuda/attention.h): an operand whose
// data pointer or strides break that, or whose head dim is not a multiple of 8, is copied into a
// contiguous tensor with the head dim zero-padded to one (zero q/k columns add nothing to the
// scores, zero v columns give output columns that are cut off again). Operands of one call are
// padded alike, so head dims stay consistent. Models' head dims (64, 80, 128) never copy.
int64_t cuda_head_dim(int64_t d) {
  return (d + cuda::kAttentionDimMultiple - 1) / cuda::kAttentionDimMultiple *
         cuda::kAttentionDimMultiple;
}

Tensor cuda_rows(const Tensor& t) {
  const int64_t d = t.size(3), padded = cuda_head_dim(d);
  bool aligned = padded == d && (t.stride(3) == 1 || d == 1) &&
                 reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) {
    aligned = aligned && (t.size(i) == 1 || t.stride(i) % cuda::kAttentionDimMultiple == 0);
  }
  if (aligned) return t;
  return at::constant_pad_nd(t, {0, padded - d}).contiguous();
}

// Strides as the CUDA kernels take them: a dimension of size 1 is never stepped over, so its
// stride (which may be anything, e.g. after unsqueeze) is passed as 0.
RowStrides cuda_strides(const Tensor& t) {
  return {t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 0 : t.stride(1),
          t.size(2) == 1 ? 0 : t.stride(2)};
}

// t's first `d` columns, contiguous (t itself when it has exactly d).
Tensor cut_head_dim(const Tensor& t, int64_t d) {
  return t.size(3) == d ? t : t.narrow(3, 0, d).contiguous();
}

AttentionShape padded_shape(AttentionShape sh) {
  sh.qk_dim = cuda_head_dim(sh.qk_dim);
  sh.v_dim = cuda_head_dim(sh.v_dim);
  return sh;
}

void check_cuda_head_dims(const AttentionShape& sh) {
  TORCH_CHECK(sh.qk_dim <= cuda::kAttentionMaxHeadDim && sh.v_dim <= cuda::kAttentionMaxHeadDim,
              "fastgpt: the native CUDA attention kernels support head dims up to ",
              cuda::kAttentionMaxHeadDim, "; got E = ", sh.qk_dim, ", Ev = ", sh.v_dim);
}

void attention_fwd_cuda(AttnFwd& f) {
  const DType dtype = served_dtype(f.q, cuda::kAttentionDTypes, "CUDA", "attention", "q");
  check_cuda_head_dims(f.sh);
  const c10::cuda::CUDAGuard guard(f.q.device());
  const Tensor q = cuda_rows(f.q), k = cuda_rows(f.k), v = cuda_rows(f.v);
  const AttentionShape sh = padded_shape(f.sh);
  Tensor out = sh.v_dim == f.sh.v_dim
                   ? f.out
                   : at::empty({sh.batch, sh.q_heads, sh.q_len, sh.v_dim}, f.q.options());
  C10_CUDA_CHECK(cuda::attention_fwd(
      dtype, sh, f.mask, static_cast<float>(f.scale), q.data_ptr(), cuda_strides(q),
      k.data_ptr(), cuda_strides(k), v.data_ptr(), cuda_strides(v), out.data_ptr(),
      f.lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(f.q.get_device())));
  f.out = cut_head_dim(out, f.sh.v_dim);
}

void attention_bwd_cuda(AttnBwd& b) {
  const DType dtype = served_dtype(b.f.q, cuda::kAttentionDTypes, "CUDA", "attention", "q");
  check_cuda_head_dims(b.f.sh);
  const c10::cuda::CUDAGuard guard(b.f.q.device());
  const Tensor q = cuda_rows(b.f.q), k = cuda_rows(b.f.k), v = cuda_rows(b.f.v);
  const Tensor out = cuda_rows(b.f.out), dout = cuda_rows(b.dout);
  const AttentionShape sh = padded_shape(b.f.sh);
  const bool padded = sh.qk_dim != b.f.sh.qk_dim || sh.v_dim != b.f.sh.v_dim;
  Tensor dq = padded ? at::empty(q.sizes(), q.options()) : b.dq;
  Tensor dk = padded ? at::empty(k.sizes(), k.options()) : b.dk;
  Tensor dv = padded ? at::empty(v.sizes(), v.options()) : b.dv;
  Tensor workspace = at::empty({static_cast<int64_t>(cuda::attention_bwd_workspace_bytes(sh))},
                               q.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::attention_bwd(
      dtype, sh, b.f.mask, static_cast<float>(b.f.scale), dout.data_ptr(), cuda_strides(dout),
      q.data_ptr(), cuda_strides(q), k.data_ptr(), cuda_strides(k), v.data_ptr(),
      cuda_strides(v), out.data_ptr(), cuda_strides(out), b.f.lse.data_ptr<float>(),
      dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), workspace.data_ptr(),
      c10::cuda::getCurrentCUDAStream(b.f.q.get_device())));
  b.dq = cut_head_dim(dq, b.f.sh.qk_dim);
  b.dk = cut_head_dim(dk, b.f.sh.qk_dim);
  b.dv = cut_head_dim(dv, b.f.sh.v_dim);
}

// kv_lens are not read on the host (that would synchronise every decoding step); the kernels
// clamp each length into [0, Tmax], so a bad length can give a wrong row, never a stray read.
// fastgpt.attention_with_kvcache checks them before it writes the caches.
void attention_with_kvcache_cuda(AttnKv& a) {
  const DType dtype = served_dtype(a.q, cuda::kAttentionDTypes, "CUDA", "attention", "q");
  check_cuda_head_dims(a.sh);
  const c10::cuda::CUDAGuard guard(a.q.device());
  const Tensor q = cuda_rows(a.q), k = cuda_rows(a.k), v = cuda_rows(a.v);
  const AttentionShape sh = padded_shape(a.sh);
  Tensor out = sh.v_dim == a.sh.v_dim
                   ? a.out
                   : at::empty({sh.batch, sh.q_heads, sh.q_len, sh.v_dim}, a.q.options());
  const int device = a.q.get_device();
  Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::attention_with_kvcache_workspace_bytes(sh, device))},
      q.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::attention_with_kvcache(
      dtype, sh, static_cast<float>(a.scale), q.data_ptr(), cuda_strides(q), k.data_ptr(),
      cuda_strides(k), v.data_ptr(), cuda_strides(v), a.kv_lens.data_ptr<int32_t>(),
      out.data_ptr(), workspace.data_ptr(), device, c10::cuda::getCurrentCUDAStream(device)));
  a.out = cut_head_dim(out, a.sh.v_dim);
}

struct CudaAttention {
  static constexpr auto fwd = &attention_fwd_cuda;
  static constexpr auto bwd = &attention_bwd_cuda;
  static constexpr auto kvcache = &attention_with_kvcache_cuda;
};
#endif  // FASTGPT_WITH_CUDA

template <class Device>
std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                     bool is_causal, double scale) {
  AttnFwd f = prepare_attention(q, k, v, is_causal, scale);
  Device::fwd(f);
  return {f.out, f.lse};
}

template <class Device>
std::tuple<Tensor, Tensor, Tensor> attention_backward(const Tensor& grad_out, const Tensor& q,
                                                      const Tensor& k, const Tensor& v,
                                                      const Tensor& out, const Tensor& lse,
                                                      bool is_causal, double scale) {
  AttnBwd b = prepare_attention_backward(grad_out, q, k, v, out, lse, is_causal, scale);
  Device::bwd(b);
  return {b.dq, b.dk, b.dv};
}

template <class Device>
Tensor attention_with_kvcache(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& kv_lens, double scale) {
  AttnKv a = prepare_attention_with_kvcache(q, k_cache, v_cache, kv_lens, scale);
  Device::kvcache(a);
  return a.out;
}

template <class Device>
void register_attention_impls(torch::Library& m) {
  m.impl("attention", &attention<Device>);
  m.impl("attention_backward", &attention_backward<Device>);
  m.impl("attention_with_kvcache", &attention_with_kvcache<Device>);
}

// ------------------------------------------------------------------------------- linear
//
// y = act(x @ weight^T + bias) + residual on 2-D x (M, K) (fastgpt/linear.py flattens leading
// dims), weight (Nz, K) in x's dtype, Nz = N or 2N for a gated activation ([gate; up] rows),
// bias (Nz,) in x's dtype or float32, residual (M, N) in x's dtype. pre, the pre-activation
// x @ weight^T + bias (M, Nz) the backward reads, is returned when save_pre (else empty).
// Fakes and autograd are registered from Python (fastgpt/linear.py): a GEMM outweighs the
// Python wrapper's ~10 us at all but decode sizes.

Activation parse_activation(const std::string& name) {
  static const std::pair<const char*, Activation> kinds[] = {
      {"none", Activation::kNone},   {"gelu", Activation::kGelu},
      {"gelu_tanh", Activation::kGeluTanh}, {"relu", Activation::kRelu},
      {"silu", Activation::kSilu},   {"swiglu", Activation::kSwiglu},
      {"geglu", Activation::kGeglu}};
  for (const auto& [n, a] : kinds) {
    if (name == n) return a;
  }
  TORCH_CHECK(false, "fastgpt: linear: unknown activation '", name,
              "' (none, gelu, gelu_tanh, relu, silu, swiglu, geglu)");
}

struct LinearFwd {
  Activation act;
  int64_t M, N, K;
  Tensor x, weight, residual;
  optional<Tensor> bias;
  Tensor y, pre;
};

LinearFwd prepare_linear(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                         const optional<Tensor>& residual, const std::string& activation) {
  LinearFwd f;
  f.act = parse_activation(activation);
  TORCH_CHECK(x.dim() == 2, "fastgpt: linear: x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "fastgpt: linear: weight must be "
              "(out, ", x.size(1), ") for x of shape ", x.sizes(), ", got ", weight.sizes());
  check_same_kind(weight, "weight", x, "x", "linear");
  const int64_t nz = weight.size(0);
  const bool gated = is_gated(f.act);
  TORCH_CHECK(!gated || nz % 2 == 0, "fastgpt: linear: a gated activation (", activation,
              ") needs an even number of weight rows ([gate; up]), got ", nz);
  f.M = x.size(0);
  f.N = gated ? nz / 2 : nz;
  f.K = x.size(1);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == nz, "fastgpt: linear: bias must have shape [",
                nz, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), "fastgpt: linear: bias is on ", bias->device(),
                " but x is on ", x.device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() || bias->scalar_type() == at::kFloat,
                "fastgpt: linear: bias must have x's dtype ", x.scalar_type(),
                " or float32, got ", bias->scalar_type());
    f.bias = bias->contiguous();
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({f.M, f.N}), "fastgpt: linear: residual must "
                "have shape [", f.M, ", ", f.N, "], got ", residual->sizes());
    check_same_kind(*residual, "residual", x, "x", "linear");
    f.residual = rows(*residual);
  }
  f.x = x;
  f.weight = weight;
  return f;
}

void linear_cpu(LinearFwd& f, bool save_pre) {
  const DType dtype = served_dtype(f.x, cpu::kLinearDTypes, "CPU", "linear", "x");
  // The product from ATen (oneDNN / MKL), then fastgpt's one-pass epilogue over its output.
  // 16-bit products are rounded on the way out of the GEMM, so their bias goes into it (addmm,
  // as F.linear does): z + b rounded once. Adding it after a rounded z moved pre-activations
  // near 0 across relu's kink and failed the 2x-eager rule (bf16 relu dx: 0.28 vs 0.02
  // allowed); float32 / float64 keep the bias in the fused pass.
  const bool bias_in_gemm = f.bias && (dtype == DType::kBFloat16 || dtype == DType::kFloat16);
  const Tensor bias_gemm = bias_in_gemm ? f.bias->to(f.x.scalar_type()) : Tensor();
  const void* bias = bias_in_gemm ? nullptr : ptr_or_null(f.bias);
  DType bias_dtype = dtype;
  if (f.bias) to_dtype(f.bias->scalar_type(), &bias_dtype);
  const bool gated = is_gated(f.act);
  const int64_t nz = f.weight.size(0);
  // Without a backward to feed (no save_pre), y overwrites z in place: one output buffer, as
  // F.linear alone would write. Gated y is half z's width, so it has its own.
  const bool keep_pre = save_pre && f.act != Activation::kNone;
  Tensor z = at::empty({f.M, nz}, f.x.options());
  f.y = keep_pre || gated ? at::empty({f.M, f.N}, f.x.options()) : z;
  // One GEMM call for all rows: ATen's GEMM packs the weight per call, and cutting the rows
  // into cache-sized blocks (170 rows of 3072) to epilogue each block while hot ran GPT-2's
  // c_fc at 0.54x eager instead of ~1.1x (4096 x 3072 x 768 fp32, 2 threads).
  if (bias_in_gemm) {
    at::addmm_out(z, bias_gemm, f.x, f.weight.t());
  } else if (dtype == DType::kFloat32 && f.M <= cpu::kSkinnyMaxRows && f.M > 0 &&
             f.x.stride(1) == 1 && f.weight.stride(1) == 1) {
    cpu::skinny_gemm(f.x.data_ptr<float>(), f.x.stride(0), f.weight.data_ptr<float>(),
                     f.weight.stride(0), z.data_ptr<float>(), f.M, nz, f.K);
  } else {
    at::mm_out(z, f.x, f.weight.t());
  }
  cpu::linear_epilogue(dtype, bias_dtype, f.act, z.data_ptr(), bias,
                       f.residual.defined() ? f.residual.data_ptr() : nullptr,
                       f.residual.defined() ? row_stride(f.residual) : 0, f.y.data_ptr(), f.M,
                       f.N);
  f.pre = keep_pre ? z : at::empty({0}, f.x.options());
}

struct LinearBwd {
  Activation act;
  int64_t M, N, K, nz;
  Tensor dy, x, weight, pre;
  Tensor dz, dx, dweight, dbias;
};

LinearBwd prepare_linear_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                  const Tensor& pre, const std::string& activation) {
  LinearBwd b;
  b.act = parse_activation(activation);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1),
              "fastgpt: linear_backward: x (M, K) and weight (out, K) expected, got ", x.sizes(),
              " and ", weight.sizes());
  check_same_kind(weight, "weight", x, "x", "linear_backward");
  check_same_kind(grad_y, "grad_y", x, "x", "linear_backward");
  b.nz = weight.size(0);
  b.M = x.size(0);
  b.N = is_gated(b.act) ? b.nz / 2 : b.nz;
  b.K = x.size(1);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef({b.M, b.N}), "fastgpt: linear_backward: grad_y "
              "must have shape [", b.M, ", ", b.N, "], got ", grad_y.sizes());
  if (b.act != Activation::kNone) {
    TORCH_CHECK(pre.sizes() == at::IntArrayRef({b.M, b.nz}), "fastgpt: linear_backward: pre "
                "must have shape [", b.M, ", ", b.nz, "] (saved by linear with save_pre), got ",
                pre.sizes());
    check_same_kind(pre, "pre", x, "x", "linear_backward");
    b.pre = pre.contiguous();
  }
  b.dy = rows(grad_y);
  b.x = x;
  b.weight = weight;
  return b;
}

// dx = dz @ weight and dweight = dz^T @ x, from dz (the epilogue's backward).
void linear_backward_gemms_cpu(LinearBwd& b, bool need_dx, bool need_dweight) {
  if (need_dx) b.dx = at::mm(b.dz, b.weight);
  if (need_dweight) b.dweight = at::mm(b.dz.t(), b.x);
}

void linear_backward_cpu(LinearBwd& b, bool need_dx, bool need_dweight, bool need_dbias) {
  const DType dtype = served_dtype(b.x, cpu::kLinearDTypes, "CPU", "linear", "x");
  const bool act = b.act != Activation::kNone;
  b.dz = act ? at::empty({b.M, b.nz}, b.x.options()) : b.dy;
  if (need_dbias) b.dbias = at::empty({b.nz}, b.x.options().dtype(stats_type(b.x)));
  if (act || need_dbias) {
    cpu::linear_act_bwd(dtype, b.act, b.dy.data_ptr(), row_stride(b.dy),
                        act ? b.pre.data_ptr() : nullptr, act ? b.dz.data_ptr() : nullptr,
                        data_if(b.dbias, need_dbias), b.M, b.N);
  }
  linear_backward_gemms_cpu(b, need_dx, need_dweight);
}

#ifdef FASTGPT_WITH_CUDA
// GEMM operands of the CUDA kernels (cuda/linear.h) are batches of matrices with one unit
// stride and the other a multiple of 8 elements (so rows or columns are whole 16-byte
// vectors), 16-byte aligned, batch strides multiples of 8; a gated B that is N-contiguous also
// needs N % 8 == 0. cuda_gemm_operands(a, b) returns a (batch, M, K) and b (batch, K, Nb) as
// they are when they meet that, else both rebuilt K-contiguous with K zero-padded to a multiple
// of 8 (zero columns of a against zero rows of b add nothing): one copy of each, only for the
// rare layout (a K of 17, a sliced row) that the vector loads cannot take.
cuda::MatrixRef cuda_matrix(const Tensor& t3) {
  cuda::MatrixRef m;
  m.data = t3.data_ptr();
  m.batch_stride = t3.size(0) == 1 ? 0 : t3.stride(0);
  m.row_stride = t3.size(1) == 1 ? 0 : t3.stride(1);
  m.col_stride = t3.size(2) == 1 ? 0 : t3.stride(2);
  return m;
}

bool cuda_gemm_layout_ok(const Tensor& t3) {
  if (reinterpret_cast<uintptr_t>(t3.data_ptr()) % 16 != 0) return false;
  const auto stride = [&](int d) { return t3.size(d) == 1 ? int64_t(0) : t3.stride(d); };
  const int64_t rs = stride(1), cs = stride(2);
  const bool rows_ok = (cs == 1 || t3.size(2) == 1) && rs % 8 == 0;
  const bool cols_ok = (rs == 1 || t3.size(1) == 1) && cs % 8 == 0;
  return (rows_ok || cols_ok) && stride(0) % 8 == 0;
}

std::pair<Tensor, Tensor> cuda_gemm_operands(const Tensor& a3, const Tensor& b3, bool gated) {
  const int64_t n = gated ? b3.size(2) / 2 : b3.size(2);
  const bool b_n_major = b3.size(2) > 1 && b3.stride(2) == 1 && b3.size(1) > 1 &&
                         b3.stride(1) != 1;
  if (cuda_gemm_layout_ok(a3) && cuda_gemm_layout_ok(b3) && !(gated && b_n_major && n % 8)) {
    return {a3, b3};
  }
  const int64_t k = a3.size(2), pad = (k + 7) / 8 * 8 - k;
  // a: (batch, M, Kp) row-major; b: (batch, Nb, Kp) row-major seen as (batch, Kp, Nb).
  Tensor a = at::constant_pad_nd(a3, {0, pad}).contiguous();
  Tensor b = at::constant_pad_nd(b3.transpose(1, 2), {0, pad}).contiguous().transpose(1, 2);
  return {a, b};
}

// c (M, N) = epilogue(a (M, K) @ b (K, Nb)) through cuda::gemm (Nb = 2N when gated).
void cuda_gemm(const Tensor& a, const Tensor& b, const cuda::Epilogue& ep, Tensor& c) {
  DType dtype;
  to_dtype(a.scalar_type(), &dtype);
  const auto [a3, b3] = cuda_gemm_operands(a.unsqueeze(0), b.unsqueeze(0), is_gated(ep.act));
  C10_CUDA_CHECK(cuda::gemm(dtype, 1, c.size(0), c.size(1), a3.size(2), cuda_matrix(a3),
                            cuda_matrix(b3), ep, c.data_ptr(),
                            c10::cuda::getCurrentCUDAStream(a.get_device())));
}

void linear_cuda(LinearFwd& f, bool save_pre) {
  served_dtype(f.x, cuda::kLinearDTypes, "CUDA", "linear", "x");
  const c10::cuda::CUDAGuard guard(f.x.device());
  cuda::Epilogue ep;
  ep.act = f.act;
  if (f.bias) {
    ep.bias = f.bias->data_ptr();
    ep.bias_fp32 = f.bias->scalar_type() == at::kFloat && f.x.scalar_type() != at::kFloat;
  }
  Tensor residual = f.residual;
  if (residual.defined()) {
    // Unit column stride, rows a multiple of 8 elements apart, 16-byte aligned: else a copy
    // with its rows padded to that.
    const bool ok = (residual.stride(1) == 1 || f.N == 1) &&
                    (f.M == 1 || residual.stride(0) % 8 == 0) &&
                    reinterpret_cast<uintptr_t>(residual.data_ptr()) % 16 == 0;
    if (!ok) {
      const int64_t pad = (f.N + 7) / 8 * 8 - f.N;
      residual = at::constant_pad_nd(residual, {0, pad}).narrow(1, 0, f.N);
    }
    ep.residual = residual.data_ptr();
    ep.residual_row_stride = residual.size(0) == 1 ? 0 : residual.stride(0);
  }
  const bool keep = save_pre && f.act != Activation::kNone;
  f.pre = keep ? at::empty({f.M, f.weight.size(0)}, f.x.options()) : at::empty({0}, f.x.options());
  if (keep) ep.pre = f.pre.data_ptr();
  f.y = at::empty({f.M, f.N}, f.x.options());
  cuda_gemm(f.x, f.weight.t(), ep, f.y);
}

void linear_backward_cuda(LinearBwd& b, bool need_dx, bool need_dweight, bool need_dbias) {
  DType dtype = served_dtype(b.x, cuda::kLinearDTypes, "CUDA", "linear", "x");
  const c10::cuda::CUDAGuard guard(b.x.device());
  const bool act = b.act != Activation::kNone;
  const Tensor dy = b.dy.is_contiguous() ? b.dy : b.dy.contiguous();
  b.dz = act ? at::empty({b.M, b.nz}, b.x.options()) : dy;
  if (need_dbias) b.dbias = at::empty({b.nz}, b.x.options().dtype(at::kFloat));
  if (act || need_dbias) {
    const int device = b.x.get_device();
    Tensor workspace = at::empty(
        {static_cast<int64_t>(cuda::linear_act_bwd_workspace_bytes(b.M, b.N, b.act, need_dbias,
                                                                    device))},
        b.x.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda::linear_act_bwd(
        dtype, b.act, dy.data_ptr(), act ? b.pre.data_ptr() : nullptr,
        act ? b.dz.data_ptr() : nullptr, static_cast<float*>(data_if(b.dbias, need_dbias)),
        workspace.numel() ? workspace.data_ptr() : nullptr, b.M, b.N,
        c10::cuda::getCurrentCUDAStream(device)));
  }
  const cuda::Epilogue plain;
  if (need_dx) {
    b.dx = at::empty({b.M, b.K}, b.x.options());
    cuda_gemm(b.dz, b.weight, plain, b.dx);
  }
  if (need_dweight) {
    b.dweight = at::empty({b.nz, b.K}, b.x.options());
    cuda_gemm(b.dz.t(), b.x, plain, b.dweight);
  }
}

// torch.matmul's 2-D and batched 3-D cases on the CUDA GEMM (fastgpt/linear.py maps the rest).
Tensor matmul_cuda(const Tensor& a, const Tensor& b) {
  TORCH_CHECK((a.dim() == 2 && b.dim() == 2) || (a.dim() == 3 && b.dim() == 3),
              "fastgpt: matmul: a and b must both be 2-D or both 3-D, got ", a.sizes(), " and ",
              b.sizes());
  check_same_kind(b, "b", a, "a", "matmul");
  const DType dtype = served_dtype(a, cuda::kLinearDTypes, "CUDA", "matmul", "a");
  const c10::cuda::CUDAGuard guard(a.device());
  const bool batched = a.dim() == 3;
  const Tensor a3 = batched ? a : a.unsqueeze(0), b3 = batched ? b : b.unsqueeze(0);
  TORCH_CHECK(a3.size(0) == b3.size(0) && a3.size(2) == b3.size(1), "fastgpt: matmul: shapes ",
              a.sizes(), " and ", b.sizes(), " cannot be multiplied");
  const int64_t batch = a3.size(0), M = a3.size(1), K = a3.size(2), N = b3.size(2);
  Tensor c = at::empty({batch, M, N}, a.options());
  if (c.numel() == 0) return batched ? c : c.squeeze(0);
  if (K == 0) return batched ? c.zero_() : c.zero_().squeeze(0);
  const auto [a_, b_] = cuda_gemm_operands(a3, b3, /*gated=*/false);
  const cuda::MatrixRef ma = cuda_matrix(a_), mb = cuda_matrix(b_);
  C10_CUDA_CHECK(cuda::gemm(dtype, batch, M, N, a_.size(2), ma, mb, cuda::Epilogue{}, c.data_ptr(),
                            c10::cuda::getCurrentCUDAStream(a.get_device())));
  return batched ? c : c.squeeze(0);
}
#endif  // FASTGPT_WITH_CUDA

struct CpuLinear {
  static constexpr auto fwd = &linear_cpu;
  static constexpr auto bwd = &linear_backward_cpu;
};
#ifdef FASTGPT_WITH_CUDA
struct CudaLinear {
  static constexpr auto fwd = &linear_cuda;
  static constexpr auto bwd = &linear_backward_cuda;
};
#endif

template <class Device>
std::tuple<Tensor, Tensor> linear(const Tensor& x, const Tensor& weight,
                                  const optional<Tensor>& bias, const optional<Tensor>& residual,
                                  c10::string_view activation, bool save_pre) {
  LinearFwd f = prepare_linear(x, weight, bias, residual, std::string(activation));
  Device::fwd(f, save_pre);
  return {f.y, f.pre};
}

template <class Device>
std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_y, const Tensor& x,
                                                   const Tensor& weight, const Tensor& pre,
                                                   c10::string_view activation, bool need_dx,
                                                   bool need_dweight, bool need_dbias) {
  LinearBwd b = prepare_linear_backward(grad_y, x, weight, pre, std::string(activation));
  Device::bwd(b, need_dx, need_dweight, need_dbias);
  const auto empty = x.new_empty({0});
  return {need_dx ? b.dx : empty, need_dweight ? b.dweight : empty,
          need_dbias ? b.dbias : empty};
}

template <class Device>
void register_linear_impls(torch::Library& m) {
  m.impl("linear", &linear<Device>);
  m.impl("linear_backward", &linear_backward<Device>);
}

}  // namespace

// x: (..., N), any strides (rows are read in place when the last dim is unit-stride); weight
// and bias: (N,), any floating dtype and strides; residual: x's shape and dtype.
// Returns y and h in x's shape and dtype (h empty without a residual), and per-row statistics
// in x's leading shape, float64 for float64 x, else float32 (rms_norm returns no mean).
// The backward ops return dx (also the residual's gradient) and dweight/dbias in the
// statistics dtype, empty when not requested.
TORCH_LIBRARY(fastgpt, m) {
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor? weight, Tensor? residual, float eps) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor dy, Tensor? dh, Tensor src, Tensor? weight, Tensor mean, "
        "Tensor rstd, bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor? dh, Tensor src, Tensor? weight, Tensor rstd, "
        "bool need_dweight) -> (Tensor, Tensor)");
  // q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), Hq a multiple of Hk; causal is torch's
  // top-left tril. out (B, Hq, L, Ev) in q's dtype; lse (B, Hq, L), the natural-log
  // log-sum-exp of the scaled scores, float64 for float64 inputs, else float32 (-inf for a
  // query that sees no key). The backward returns dq, dk, dv shaped like q, k, v.
  m.def("attention(Tensor q, Tensor k, Tensor v, bool is_causal, float scale) -> "
        "(Tensor out, Tensor lse)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, bool is_causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decoding, after the new tokens were written into the caches: q (B, Hq, Tq, E),
  // k_cache (B, Hk, Tmax, E), v_cache (B, Hk, Tmax, Ev), kv_lens (B,) int32 (row b's keys are
  // cache rows [0, kv_lens[b])), causal bottom-right aligned. out (B, Hq, Tq, Ev). No autograd.
  m.def("attention_with_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_lens, "
        "float scale) -> Tensor");
  // x (M, K), weight (Nz, K) with Nz = N (2N for swiglu/geglu: [gate; up] rows), bias (Nz,),
  // residual (M, N); activation one of none, gelu, gelu_tanh, relu, silu, swiglu, geglu.
  // y (M, N) = act(x @ weight^T + bias) + residual; pre (M, Nz) = x @ weight^T + bias when
  // save_pre and activation != none, else empty. The backward returns dx (M, K), dweight
  // (Nz, K) and dbias (Nz,) in float32 (float64 for float64 x); each empty when not needed.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, "
        "bool save_pre) -> (Tensor y, Tensor pre)");
  m.def("linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor pre, str activation, "
        "bool need_dx, bool need_dweight, bool need_dbias) -> (Tensor dx, Tensor dweight, "
        "Tensor dbias)");
  // a @ b for 2-D (M, K) @ (K, N) or batched 3-D (B, M, K) @ (B, K, N); CUDA only (on the CPU
  // torch.matmul is ATen's GEMM already).
  m.def("matmul(Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  register_impls<Cpu>(m);
  register_attention_impls<CpuAttention>(m);
  register_linear_impls<CpuLinear>(m);
}

// The backward ops get no autograd of their own (no double backward).
TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
}

#ifdef FASTGPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  register_impls<Cuda>(m);
  register_attention_impls<CudaAttention>(m);
  register_linear_impls<CudaLinear>(m);
  m.impl("matmul", &matmul_cuda);
}
#endif

}  // namespace fastgpt

// `import fastgpt._C` loads this library, which runs the registrations above. The module
// carries what Python must know of the build: whether CUDA kernels are in it and for which
// architectures, and what each device's norm and attention kernels serve.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "fastgpt native kernels (C++ CPU, CUDA)", -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FASTGPT_WITH_CUDA
  const long with_cuda = 1;
  const std::string cuda_norm_dtypes = fastgpt::dtype_names(fastgpt::cuda::kNormDTypes);
  const std::string cuda_attention_dtypes = fastgpt::dtype_names(fastgpt::cuda::kAttentionDTypes);
  const long cuda_attention_max_head_dim = long(fastgpt::cuda::kAttentionMaxHeadDim);
  const std::string cuda_linear_dtypes = fastgpt::dtype_names(fastgpt::cuda::kLinearDTypes);
#else
  const long with_cuda = 0;
  const std::string cuda_norm_dtypes, cuda_attention_dtypes, cuda_linear_dtypes;
  const long cuda_attention_max_head_dim = 0;
#endif
  const std::string cpu_norm_dtypes = fastgpt::dtype_names(fastgpt::cpu::kNormDTypes);
  const std::string cpu_attention_dtypes = fastgpt::dtype_names(fastgpt::cpu::kAttentionDTypes);
  const std::string cpu_linear_dtypes = fastgpt::dtype_names(fastgpt::cpu::kLinearDTypes);
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHS", FASTGPT_CUDA_ARCHS) != 0 ||
      PyModule_AddIntConstant(module, "NORM_MAX_HIDDEN_CUDA", long(fastgpt::kNormMaxHidden)) != 0 ||
      PyModule_AddStringConstant(module, "NORM_DTYPES_CPU", cpu_norm_dtypes.c_str()) != 0 ||
      PyModule_AddStringConstant(module, "NORM_DTYPES_CUDA", cuda_norm_dtypes.c_str()) != 0 ||
      PyModule_AddStringConstant(module, "ATTENTION_DTYPES_CPU",
                                 cpu_attention_dtypes.c_str()) != 0 ||
      PyModule_AddStringConstant(module, "ATTENTION_DTYPES_CUDA",
                                 cuda_attention_dtypes.c_str()) != 0 ||
      PyModule_AddIntConstant(module, "ATTENTION_MAX_HEAD_DIM_CUDA",
                              cuda_attention_max_head_dim) != 0 ||
      PyModule_AddStringConstant(module, "LINEAR_DTYPES_CPU", cpu_linear_dtypes.c_str()) != 0 ||
      PyModule_AddStringConstant(module, "LINEAR_DTYPES_CUDA", cuda_linear_dtypes.c_str()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
