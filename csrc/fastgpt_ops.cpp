// The one place torch meets the kernels: op schemas (namespace `fastgpt`), argument
// checks, output allocation, and the CPU / CUDA implementations that call the raw-pointer
// kernels in csrc/cpu and csrc/cuda. The Python layer (fastgpt/layernorm.py) adds fake
// implementations, autograd and backend choice on top of these ops.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

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

namespace fastgpt {
namespace {

using at::Tensor;
using c10::optional;

// Checks a (M, N) operand that shares x's dtype and device and whose rows are contiguous.
void check_rows(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "fastgpt: ",
              name, " must have shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastgpt: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastgpt: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fastgpt: ", name,
              " must be contiguous in its last dimension (got strides ", t.strides(), ")");
}

// Checks a (N,) parameter (weight, bias) or an (M,) statistic of the given dtype.
void check_vector(const Tensor& t, const char* name, int64_t n, at::ScalarType dtype,
                  const Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fastgpt: ", name, " must have shape [", n,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastgpt: ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastgpt: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "fastgpt: ", name, " must be contiguous");
}

at::ScalarType stats_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

const void* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// Forward operands after checks, with outputs allocated; shared by the CPU and CUDA impls.
struct NormFwd {
  Tensor y, h, mean, rstd;
};

NormFwd prepare_fwd(const Tensor& x, const optional<Tensor>& weight,
                    const optional<Tensor>& bias, const optional<Tensor>& residual, double eps,
                    bool rms) {
  TORCH_CHECK(x.dim() == 2, "fastgpt: x must be 2-D (rows, hidden), got ", x.sizes());
  // A row of no elements has no mean or variance (torch makes its rstd NaN); the Python API
  // rejects it too, rather than return statistics that mean nothing.
  TORCH_CHECK(x.size(1) >= 1, "fastgpt: x must have a hidden size >= 1, got ", x.sizes());
  check_rows(x, "x", x);
  TORCH_CHECK(eps > 0, "fastgpt: eps must be > 0, got ", eps);
  TORCH_CHECK(!(rms && bias.has_value()), "fastgpt: rms_norm takes no bias");
  const int64_t M = x.size(0), N = x.size(1);
  if (weight) check_vector(*weight, "weight", N, x.scalar_type(), x);
  if (bias) check_vector(*bias, "bias", N, x.scalar_type(), x);
  if (residual) check_rows(*residual, "residual", x);
  const auto stats = x.options().dtype(stats_type(x));
  NormFwd out;
  out.y = at::empty({M, N}, x.options());
  // The op's outputs may not alias its inputs, so "no h" is an empty tensor, not x.
  out.h = residual ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  out.mean = rms ? at::empty({0}, stats) : at::empty({M}, stats);
  out.rstd = at::empty({M}, stats);
  return out;
}

struct NormBwd {
  Tensor dx, dweight, dbias;
};

NormBwd prepare_bwd(const Tensor& dy, const optional<Tensor>& dh, const Tensor& src,
                    const optional<Tensor>& weight, const optional<Tensor>& mean,
                    const Tensor& rstd, bool rms, bool need_dweight, bool need_dbias) {
  TORCH_CHECK(src.dim() == 2, "fastgpt: src must be 2-D (rows, hidden), got ", src.sizes());
  TORCH_CHECK(src.size(1) >= 1, "fastgpt: src must have a hidden size >= 1, got ", src.sizes());
  check_rows(src, "src", src);
  check_rows(dy, "dy", src);
  TORCH_CHECK(dy.is_contiguous(), "fastgpt: dy must be contiguous");
  if (dh) {
    check_rows(*dh, "dh", src);
    TORCH_CHECK(dh->is_contiguous(), "fastgpt: dh must be contiguous");
  }
  const int64_t M = src.size(0), N = src.size(1);
  if (weight) check_vector(*weight, "weight", N, src.scalar_type(), src);
  check_vector(rstd, "rstd", M, stats_type(src), src);
  if (!rms) {
    TORCH_CHECK(mean.has_value(), "fastgpt: layer norm backward needs mean");
    check_vector(*mean, "mean", M, stats_type(src), src);
  }
  TORCH_CHECK(!(rms && need_dbias), "fastgpt: rms_norm has no bias gradient");
  const auto stats = src.options().dtype(stats_type(src));
  NormBwd out;
  out.dx = at::empty({M, N}, src.options());
  out.dweight = need_dweight ? at::empty({N}, stats) : at::empty({0}, stats);
  out.dbias = need_dbias ? at::empty({N}, stats) : at::empty({0}, stats);
  if (M == 0) {
    // Sums over zero rows are zero, and the kernels are not launched for empty inputs.
    out.dweight.zero_();
    out.dbias.zero_();
  }
  return out;
}

void* data_if(const Tensor& t, bool wanted) { return wanted ? t.data_ptr() : nullptr; }

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

cpu::NormDType cpu_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cpu::NormDType::kFloat32;
    case at::kDouble: return cpu::NormDType::kFloat64;
    case at::kBFloat16: return cpu::NormDType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastgpt: the native CPU kernels support float32, float64 and bfloat16;"
                         " x has dtype ", x.scalar_type());
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cpu(const Tensor& x,
                                                        const optional<Tensor>& weight,
                                                        const optional<Tensor>& bias,
                                                        const optional<Tensor>& residual,
                                                        double eps, bool rms) {
  const auto dtype = cpu_dtype(x);
  NormFwd o = prepare_fwd(x, weight, bias, residual, eps, rms);
  advise_huge_pages(o.y);
  advise_huge_pages(o.h);
  if (x.size(0) > 0) {
    cpu::norm_fwd(dtype, rms, x.data_ptr(), row_stride(x), ptr_or_null(residual),
                  residual ? row_stride(*residual) : 0, ptr_or_null(weight), ptr_or_null(bias),
                  o.y.data_ptr(), data_if(o.h, residual.has_value()), data_if(o.mean, !rms),
                  o.rstd.data_ptr(), x.size(0), x.size(1), eps);
  }
  return {o.y, o.h, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cpu(const Tensor& dy, const optional<Tensor>& dh,
                                                const Tensor& src,
                                                const optional<Tensor>& weight,
                                                const optional<Tensor>& mean,
                                                const Tensor& rstd, bool rms,
                                                bool need_dweight, bool need_dbias) {
  const auto dtype = cpu_dtype(src);
  NormBwd o = prepare_bwd(dy, dh, src, weight, mean, rstd, rms, need_dweight, need_dbias);
  advise_huge_pages(o.dx);
  if (src.size(0) > 0) {
    cpu::norm_bwd(dtype, rms, dy.data_ptr(), ptr_or_null(dh), src.data_ptr(), row_stride(src),
                  ptr_or_null(weight), rms ? nullptr : mean->data_ptr(), rstd.data_ptr(),
                  o.dx.data_ptr(), data_if(o.dweight, need_dweight),
                  data_if(o.dbias, need_dbias), src.size(0), src.size(1));
  }
  return {o.dx, o.dweight, o.dbias};
}

// --------------------------------------------------------------------------------- CUDA

#ifdef FASTGPT_WITH_CUDA
cuda::NormDType cuda_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::NormDType::kFloat32;
    case at::kHalf: return cuda::NormDType::kFloat16;
    case at::kBFloat16: return cuda::NormDType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastgpt: the native CUDA kernels support float32, float16 and "
                         "bfloat16; x has dtype ", x.scalar_type());
  }
}

void check_hidden_cuda(int64_t n) {
  TORCH_CHECK(n <= cuda::kNormMaxHidden, "fastgpt: the native CUDA kernels support hidden "
              "size up to ", cuda::kNormMaxHidden, ", got ", n);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd_cuda(const Tensor& x,
                                                         const optional<Tensor>& weight,
                                                         const optional<Tensor>& bias,
                                                         const optional<Tensor>& residual,
                                                         double eps, bool rms) {
  const auto dtype = cuda_dtype(x);
  check_hidden_cuda(x.size(-1));
  const c10::cuda::CUDAGuard guard(x.device());
  NormFwd o = prepare_fwd(x, weight, bias, residual, eps, rms);
  if (x.size(0) > 0) {
    C10_CUDA_CHECK(cuda::norm_fwd(
        dtype, rms, x.data_ptr(), row_stride(x), ptr_or_null(residual),
        residual ? row_stride(*residual) : 0, ptr_or_null(weight), ptr_or_null(bias),
        o.y.data_ptr(), data_if(o.h, residual.has_value()),
        static_cast<float*>(data_if(o.mean, !rms)), o.rstd.data_ptr<float>(), x.size(0),
        x.size(1), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream(x.get_device())));
  }
  return {o.y, o.h, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_bwd_cuda(const Tensor& dy, const optional<Tensor>& dh,
                                                 const Tensor& src,
                                                 const optional<Tensor>& weight,
                                                 const optional<Tensor>& mean,
                                                 const Tensor& rstd, bool rms,
                                                 bool need_dweight, bool need_dbias) {
  const auto dtype = cuda_dtype(src);
  check_hidden_cuda(src.size(-1));
  const c10::cuda::CUDAGuard guard(src.device());
  NormBwd o = prepare_bwd(dy, dh, src, weight, mean, rstd, rms, need_dweight, need_dbias);
  const int64_t M = src.size(0), N = src.size(1);
  if (M > 0) {
    const size_t ws_bytes = cuda::norm_bwd_workspace_bytes(M, N, need_dweight, need_dbias,
                                                           src.get_device());
    // Through the caching allocator: the partial sums are rewritten before they are read.
    Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)},
                                 src.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda::norm_bwd(
        dtype, rms, dy.data_ptr(), ptr_or_null(dh), src.data_ptr(), row_stride(src),
        ptr_or_null(weight), rms ? nullptr : mean->data_ptr<float>(), rstd.data_ptr<float>(),
        o.dx.data_ptr(), static_cast<float*>(data_if(o.dweight, need_dweight)),
        static_cast<float*>(data_if(o.dbias, need_dbias)),
        ws_bytes ? workspace.data_ptr() : nullptr, M, N,
        c10::cuda::getCurrentCUDAStream(src.get_device())));
  }
  return {o.dx, o.dweight, o.dbias};
}
#endif  // FASTGPT_WITH_CUDA

}  // namespace

TORCH_LIBRARY(fastgpt, m) {
  // x: (M, N), rows contiguous. Returns (y, h, mean, rstd); h is empty without a residual,
  // mean is empty when rms. Statistics are float64 for float64 x, float32 otherwise.
  m.def("norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, "
        "bool rms) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (dx, dweight, dbias); dweight/dbias are in the statistics dtype, empty when not
  // requested. dx is also the residual's gradient.
  m.def("norm_bwd(Tensor dy, Tensor? dh, Tensor src, Tensor? weight, Tensor? mean, "
        "Tensor rstd, bool rms, bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("norm_fwd", &norm_fwd_cpu);
  m.impl("norm_bwd", &norm_bwd_cpu);
}

// Shapes and dtypes only: prepare_* allocates on x's device, which for meta tensors is all the
// fake-tensor tracing of torch.compile / opcheck needs.
TORCH_LIBRARY_IMPL(fastgpt, Meta, m) {
  m.impl("norm_fwd", [](const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& residual,
                        double eps, bool rms) {
    NormFwd o = prepare_fwd(x, weight, bias, residual, eps, rms);
    return std::make_tuple(o.y, o.h, o.mean, o.rstd);
  });
  m.impl("norm_bwd", [](const Tensor& dy, const optional<Tensor>& dh, const Tensor& src,
                        const optional<Tensor>& weight, const optional<Tensor>& mean,
                        const Tensor& rstd, bool rms, bool need_dweight, bool need_dbias) {
    NormBwd o = prepare_bwd(dy, dh, src, weight, mean, rstd, rms, need_dweight, need_dbias);
    return std::make_tuple(o.dx, o.dweight, o.dbias);
  });
}

#ifdef FASTGPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd_cuda);
  m.impl("norm_bwd", &norm_bwd_cuda);
}
#endif

}  // namespace fastgpt

// `import fastgpt._C` loads this library, which runs the registrations above. The module
// itself only says whether the CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "fastgpt native kernels (C++ CPU, CUDA)", -1,
                                          nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FASTGPT_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
