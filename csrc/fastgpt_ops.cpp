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
#include "cpu/layernorm.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef FASTGPT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/layernorm.h"
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
cpu::AttentionShape attention_shape(const Tensor& q, const Tensor& k, const Tensor& v,
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
  cpu::AttentionShape sh;
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

cpu::RowStrides row_strides(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Forward operands after checks, with the outputs allocated: out (B, Hq, L, Ev) in q's dtype,
// lse (B, Hq, L) in the statistics dtype, both contiguous.
struct AttnFwd {
  cpu::AttentionShape sh;
  cpu::AttentionMask mask;
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
  const cpu::AttentionShape& sh = b.f.sh;
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

// One implementation per device, as for the norms: a CUDA kernel adds a struct like this one
// (with its own dtype table and checks) and one register_attention_impls<> line.
struct CpuAttention {
  static constexpr auto fwd = &attention_fwd_cpu;
  static constexpr auto bwd = &attention_bwd_cpu;
};

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
void register_attention_impls(torch::Library& m) {
  m.impl("attention", &attention<Device>);
  m.impl("attention_backward", &attention_backward<Device>);
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
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  register_impls<Cpu>(m);
  register_attention_impls<CpuAttention>(m);
}

// The backward ops get no autograd of their own (no double backward).
TORCH_LIBRARY_IMPL(fastgpt, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
}

#ifdef FASTGPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) { register_impls<Cuda>(m); }
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
#else
  const long with_cuda = 0;
  const std::string cuda_norm_dtypes;
#endif
  const std::string cpu_norm_dtypes = fastgpt::dtype_names(fastgpt::cpu::kNormDTypes);
  const std::string cpu_attention_dtypes = fastgpt::dtype_names(fastgpt::cpu::kAttentionDTypes);
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHS", FASTGPT_CUDA_ARCHS) != 0 ||
      PyModule_AddIntConstant(module, "NORM_MAX_HIDDEN_CUDA", long(fastgpt::kNormMaxHidden)) != 0 ||
      PyModule_AddStringConstant(module, "NORM_DTYPES_CPU", cpu_norm_dtypes.c_str()) != 0 ||
      PyModule_AddStringConstant(module, "NORM_DTYPES_CUDA", cuda_norm_dtypes.c_str()) != 0 ||
      PyModule_AddStringConstant(module, "ATTENTION_DTYPES_CPU",
                                 cpu_attention_dtypes.c_str()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
