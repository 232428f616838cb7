"""Linear layers and matmul with fused epilogues.

From the public function to a kernel, in one read:

* :func:`linear` computes ``activation(x @ weight.T + bias) + residual``. It checks its inputs,
  applies torch.autocast's cast for ``F.linear``, flattens x to rows ``(M, K)`` and asks
  :data:`LINEAR` which backend serves the input.
* ``"native"`` calls the C++ op ``torch.ops.fastgpt.linear`` (csrc/fastgpt_ops.cpp): on CPU the
  product is ATen's GEMM and the epilogue one fused pass (csrc/cpu/linear.cpp); on CUDA the
  tensor-core GEMM of csrc/cuda/linear.cu applies it in registers. ``"triton"`` calls the custom
  op ``torch.ops.fastgpt_triton.linear`` around ``fastgpt.kernels.linear.gemm``. Both share one
  schema, fake implementation and autograd formula (registered here).
* ``"torch"`` is eager PyTorch: ``F.linear``, the activation, the add.

Gated activations ("swiglu": silu(g) * u, "geglu": gelu(g) * u, erf gelu) take a weight of
``2 * out`` rows: the gate projection's rows first, then the up projection's
(``torch.cat([gate_proj.weight, up_proj.weight])`` for a Llama MLP), and a bias likewise.

The backward saves the pre-activation ``x @ weight.T + bias`` (as eager PyTorch's activation
saves its input) instead of recomputing it: one GEMM less per backward for the same memory. The
activation's derivative and the bias gradient come out of one pass over the output gradient
(csrc/cpu/linear.cpp, kernels/linear.py), then two GEMMs give dx and dweight.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backends

Tensor = torch.Tensor

ACTIVATIONS = (None, "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu")
GATED = ("swiglu", "geglu")

# The automatic choice. CPU: native (the product is ATen's either way; the epilogue is fused).
# CUDA: triton, then native; by design, not measured yet (no GPU results so far).
LINEAR = backends.Op("linear", {"cpu": ("native",), "cuda": ("triton", "native")})
# matmul has no epilogue to fuse: on CPU torch.matmul is the same ATen GEMM native would call,
# so only the CUDA kernels are offered (by design, not measured yet).
MATMUL = backends.Op("matmul", {"cpu": (), "cuda": ("triton", "native")})

# Devices where torch has an autocast kernel for F.linear / torch.matmul (the lower-precision
# policy: floating inputs cast to the autocast dtype). Read once: a dispatcher query.
_AUTOCASTS = {(op, dev): torch._C._dispatch_has_kernel_for_dispatch_key(
    f"aten::{op}", f"Autocast{dev.upper()}") for op in ("linear", "matmul") for dev in ("cpu", "cuda")}

_EAGER_ACTIVATIONS = {
    None: lambda z: z,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _autocast(op: str, device_type: str, *tensors: Optional[Tensor]):
    """The tensors as torch's `op` sees them under torch.autocast on this device."""
    if not (_AUTOCASTS.get((op, device_type), False) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def _dtypes(names: str):
    return tuple(getattr(torch, n) for n in names.split(",") if n)


_native_dtypes: dict = {}


def _native_linear_dtypes(device: torch.device):
    dtypes = _native_dtypes.get(device.type)
    if dtypes is None:
        mod = backends.native_module()
        names = mod.LINEAR_DTYPES_CUDA if device.type == "cuda" else mod.LINEAR_DTYPES_CPU
        dtypes = _native_dtypes[device.type] = _dtypes(names)
    return dtypes


def _dtype_reason(name: str, arg: str, t: Tensor, dtypes) -> Optional[str]:
    if t.dtype in dtypes:
        return None
    served = ", ".join(str(d).replace("torch.", "") for d in dtypes) or "nothing"
    return f"{arg} has dtype {t.dtype}; the {name} kernels on {t.device.type} serve {served}"


# ------------------------------------------------------------------------------- linear


_OP = "fastgpt.linear"


def _check_linear(x, weight, bias, activation, residual) -> None:
    op = _OP
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: x and weight must be tensors")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., in_features), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x's last dim is {x.shape[-1]} but weight has {weight.shape[1]} "
                         f"columns (in_features); they must match")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got dtype {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got dtype {t.dtype}")
    rows = weight.shape[0]
    if activation in GATED and rows % 2:
        raise ValueError(f"{op}: activation {activation!r} needs weight with an even number of rows "
                         f"([gate; up], 2 * out_features), got {rows}")
    out = rows // 2 if activation in GATED else rows
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"{op}: bias must have shape ({rows},) (weight's rows), got "
                         f"{tuple(bias.shape)}")
    if residual is not None:
        want = tuple(x.shape[:-1]) + (out,)
        if tuple(residual.shape) != want:
            raise ValueError(f"{op}: residual must have the output's shape {want}, got "
                             f"{tuple(residual.shape)}")


def _eager_linear(x, weight, bias, activation, residual):
    z = F.linear(x, weight, bias)
    if activation in GATED:
        gate, up = z.chunk(2, dim=-1)
        y = (F.silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    else:
        y = _EAGER_ACTIVATIONS[activation](z)
    return y if residual is None else y + residual


def _linear_kernel_reason(name, dtypes, x, weight, bias, activation, residual):
    if x.shape[0] == 0 or x.shape[1] == 0 or weight.shape[0] == 0:
        return (f"an empty product (x {tuple(x.shape)}, weight {tuple(weight.shape)}); "
                f"the {name} kernels need M, N, K >= 1")
    return _dtype_reason(name, "x", x, dtypes)


def _native_linear_supports(x, weight, bias, activation, residual, save_pre):
    return _linear_kernel_reason("native", _native_linear_dtypes(x.device), x, weight, bias,
                                 activation, residual)


def _triton_linear_supports(x, weight, bias, activation, residual, save_pre):
    return _linear_kernel_reason("triton", backends.kernel_module("linear").DTYPES, x, weight,
                                 bias, activation, residual)


@LINEAR.implement("native", supports=_native_linear_supports)
def _(x, weight, bias, activation, residual, save_pre):
    return torch.ops.fastgpt.linear.default(x, weight, bias, residual, activation or "none",
                                            save_pre)[0]


@LINEAR.implement("triton", supports=_triton_linear_supports)
def _(x, weight, bias, activation, residual, save_pre):
    return torch.ops.fastgpt_triton.linear.default(x, weight, bias, residual,
                                                   activation or "none", save_pre)[0]


@LINEAR.implement("torch")
def _(x, weight, bias, activation, residual, save_pre):
    return _eager_linear(x, weight, bias, activation, residual)


def _rows(t: Tensor) -> Tensor:
    """(..., K) as (M, K): a view whenever the strides allow."""
    return t.reshape(-1, t.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: Optional[str] = None, residual: Optional[Tensor] = None, *,
           backend: Optional[str] = None) -> Tensor:
    """``activation(x @ weight.T + bias) + residual``, with the epilogue fused into the GEMM.

    Args:
        x: ``(..., in_features)`` (1-D too, as ``F.linear``); float32, float16, bfloat16 or
            float64 (native CPU); any strides.
        weight: ``(out_features, in_features)`` (nn.Linear's layout); for "swiglu" / "geglu"
            ``(2 * out_features, in_features)``, gate rows first, then up rows. A weight of
            another floating dtype than x (fp32 master weights beside bf16 activations) is
            cast to x's dtype (its gradient comes back in its own dtype).
        bias: None or ``(weight.shape[0],)``; x's dtype or float32 (kept in float32).
        activation: None, "gelu" (erf), "gelu_tanh", "relu", "silu", "swiglu", "geglu".
        residual: None or the output's shape ``(..., out_features)``, added last.
        backend: "torch", "triton", "native" or None (the :func:`fastgpt.use_backend` default,
            else the first backend that serves the input).

    Returns:
        ``(..., out_features)`` in x's dtype (under torch.autocast: the dtype ``F.linear`` gives
        there; a residual of another dtype is added as eager PyTorch adds it, with type
        promotion). Gradients flow to x, weight, bias and residual.
    """
    _check_linear(x, weight, bias, activation, residual)
    x, weight, bias = _autocast("linear", x.device.type, x, weight, bias)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.to(x.dtype)
    if bias is not None and bias.dtype == torch.float32 and x.dtype == torch.float64:
        bias = bias.to(x.dtype)
    late_residual = residual is not None and residual.dtype != x.dtype
    fused_residual = None if late_residual else residual
    lead = x.shape[:-1]
    out = weight.shape[0] // 2 if activation in GATED else weight.shape[0]
    x2 = _rows(x)
    r2 = None if fused_residual is None else _rows(fused_residual)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, fused_residual))
    save_pre = needs_grad and activation is not None
    args = (x2, weight, bias, activation, r2, save_pre)
    y = LINEAR.choose(backend, x.device, *args)(*args).reshape(*lead, out)
    return y + residual if late_residual else y


# ------------------------------------------------------------------------------- matmul


def _matmul_kernel_shapes(a: Tensor, b: Tensor):
    """(a, b) as the kernels' 2-D or batched 3-D operands, plus the output shape; None where
    torch.matmul's semantics need more (vectors, broadcast batch dims)."""
    if a.dim() < 2 or b.dim() < 2:
        return None
    if b.dim() == 2:  # (..., M, K) @ (K, N): the leading dims fold into M
        return _rows(a), b, (*a.shape[:-1], b.shape[-1])
    if a.shape[:-2] != b.shape[:-2]:
        return None
    return (a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]),
            (*a.shape[:-1], b.shape[-1]))


def _matmul_reason(name, dtypes, a, b) -> Optional[str]:
    reason = _dtype_reason(name, "a", a, dtypes)
    if reason:
        return reason
    if _matmul_kernel_shapes(a, b) is None:
        return (f"shapes {tuple(a.shape)} @ {tuple(b.shape)}: the {name} kernels serve 2-D and "
                f"batched operands with equal batch dims (vectors and broadcasting run on torch)")
    if a.numel() == 0 or b.numel() == 0:
        return f"an empty operand ({tuple(a.shape)} @ {tuple(b.shape)})"
    return None


def _native_matmul_supports(a, b):
    if a.device.type != "cuda":
        return ("the native matmul kernels run on CUDA (on CPU torch.matmul is the ATen GEMM "
                "they would call)")
    return _matmul_reason("native", _native_linear_dtypes(a.device), a, b)


def _triton_matmul_supports(a, b):
    return _matmul_reason("triton", backends.kernel_module("linear").DTYPES, a, b)


def _run_matmul(op, a, b):
    a_, b_, shape = _matmul_kernel_shapes(a, b)
    return op(a_, b_).reshape(shape)


@MATMUL.implement("native", supports=_native_matmul_supports)
def _(a, b):
    return _run_matmul(torch.ops.fastgpt.matmul.default, a, b)


@MATMUL.implement("triton", supports=_triton_matmul_supports)
def _(a, b):
    return _run_matmul(torch.ops.fastgpt_triton.matmul.default, a, b)


@MATMUL.implement("torch")
def _(a, b):
    return torch.matmul(a, b)


def matmul(a: Tensor, b: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``torch.matmul(a, b)``: the same semantics (vectors, batches, broadcast batch dims).

    The kernels serve 2-D ``(M, K) @ (K, N)``, ``(..., M, K) @ (K, N)`` and batched operands with
    equal batch dims; the automatic choice gives everything else to torch.matmul. float16 and
    bfloat16 (Triton also float32, through tf32 only when
    ``torch.backends.cuda.matmul.allow_tf32`` allows it). Under torch.autocast as torch.matmul.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastgpt.matmul: {name} must be a tensor, got {type(t).__name__}")
    a, b = _autocast("matmul", a.device.type, a, b)
    if a.dtype != b.dtype:
        raise TypeError(f"fastgpt.matmul: b has dtype {b.dtype} but a has dtype {a.dtype}")
    if a.device != b.device:
        raise ValueError(f"fastgpt.matmul: b is on {b.device} but a is on {a.device}")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("fastgpt.matmul: both arguments need at least 1 dim")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.dim() == 1 else b.shape[-2]
    if k_a != k_b:
        raise ValueError(f"fastgpt.matmul: a {tuple(a.shape)} and b {tuple(b.shape)}: inner dims "
                         f"{k_a} and {k_b} differ")
    return MATMUL.choose(backend, a.device, a, b)(a, b)


# ----------------------------------------------------- the Triton ops (fastgpt_triton namespace)


@torch.library.custom_op("fastgpt_triton::linear", mutates_args=())
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
      activation: str, save_pre: bool) -> tuple[Tensor, Tensor]:
    kernels = backends.kernel_module("linear")
    if activation not in kernels.ACTIVATIONS:
        raise ValueError(f"fastgpt_triton::linear: unknown activation '{activation}' "
                         f"({', '.join(kernels.ACTIVATIONS)})")
    y, pre = kernels.gemm(x, weight.t(), activation, bias=None if bias is None else bias.contiguous(),
                          residual=residual if residual is None or residual.stride(-1) == 1
                          else residual.contiguous(),
                          save_pre=save_pre and activation != "none")
    return y, (pre if pre is not None else x.new_empty(0))


@torch.library.custom_op("fastgpt_triton::linear_backward", mutates_args=())
def _(grad_y: Tensor, x: Tensor, weight: Tensor, pre: Tensor, activation: str, need_dx: bool,
      need_dweight: bool, need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    kernels = backends.kernel_module("linear")
    dy = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    dz, dbias = kernels.act_backward(dy, pre if activation != "none" else None, activation,
                                     need_dbias)
    empty = x.new_empty(0)
    dx = kernels.gemm(dz, weight)[0] if need_dx else empty
    dweight = kernels.gemm(dz.t(), x)[0] if need_dweight else empty
    return dx, dweight, dbias if need_dbias else empty


@torch.library.custom_op("fastgpt_triton::matmul", mutates_args=())
def _(a: Tensor, b: Tensor) -> Tensor:
    return backends.kernel_module("linear").gemm(a, b)[0]


# ------------------------------------------------------ fakes and autograd, both namespaces


def _register(ns: str) -> None:
    """Fake implementations and autograd for the linear and matmul ops of namespace `ns`
    ("fastgpt": the C++ ops; "fastgpt_triton": the Triton ops above)."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::linear")
    def _(x, weight, bias, residual, activation, save_pre):
        rows = weight.shape[0]
        out = rows // 2 if activation in GATED else rows
        keep = save_pre and activation != "none"
        return (x.new_empty((x.shape[0], out)),
                x.new_empty((x.shape[0], rows)) if keep else x.new_empty(0))

    @torch.library.register_fake(f"{ns}::linear_backward")
    def _(grad_y, x, weight, pre, activation, need_dx, need_dweight, need_dbias):
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
                x.new_empty(weight.shape) if need_dweight else x.new_empty(0),
                x.new_empty((weight.shape[0],), dtype=stats) if need_dbias else x.new_empty(0))

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, activation, _save_pre = inputs
        _, pre = output
        ctx.activation = activation
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, pre)

    def backward(ctx, grad_y, _grad_pre):
        x, weight, pre = ctx.saved_tensors
        need_dx, need_dweight, need_dbias, need_res = ctx.needs_input_grad[:4]
        dx, dweight, dbias = ops.linear_backward(grad_y, x, weight, pre, ctx.activation, need_dx,
                                                 need_dweight, need_dbias)
        return (dx if need_dx else None, dweight if need_dweight else None,
                dbias.to(ctx.bias_dtype) if need_dbias else None,
                grad_y if need_res else None, None, None)

    torch.library.register_autograd(f"{ns}::linear", backward, setup_context=setup_context)

    @torch.library.register_fake(f"{ns}::matmul")
    def _(a, b):
        return a.new_empty((*a.shape[:-1], b.shape[-1]))

    def matmul_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def matmul_backward(ctx, grad):
        a, b = ctx.saved_tensors
        da = ops.matmul(grad, b.mT) if ctx.needs_input_grad[0] else None
        db = ops.matmul(a.mT, grad) if ctx.needs_input_grad[1] else None
        return da, db

    torch.library.register_autograd(f"{ns}::matmul", matmul_backward, setup_context=matmul_setup)


_register("fastgpt_triton")
backends.on_native_load(lambda: _register("fastgpt"))
