"""LayerNorm and RMSNorm, each optionally fused with the residual add of a pre-norm block.

From the public function to a kernel, in one read:

* :func:`layer_norm` / :func:`rms_norm` check the inputs, ask the op (:data:`LAYER_NORM`,
  :data:`RMS_NORM`, a :class:`fastgpt.backends.Op`) which backend serves them, and call it.
* ``"native"`` calls the C++ ops ``torch.ops.fastgpt.layer_norm`` / ``rms_norm``
  (csrc/fastgpt_ops.cpp, kernels in csrc/cpu/layernorm.cpp and csrc/cuda/layernorm.cu);
  ``"triton"`` calls the custom ops ``torch.ops.fastgpt_triton.layer_norm`` / ``rms_norm``
  defined here around ``fastgpt.kernels.layernorm.norm_fwd/norm_bwd``. Both namespaces have the
  same schemas, fakes and autocast rule (registered here) and the same autograd formula (in C++
  for the native ops, here for the Triton ones), so the two backends differ only below the op.
  ``"torch"`` is eager ``F.layer_norm`` / ``F.rms_norm``.

RMSNorm is LayerNorm without centring and without bias; every kernel shares one implementation
with an ``rms`` switch.

Mixed precision: weight and bias may have any floating dtype (fp32 parameters beside bf16/fp16
activations is the usual case). y and h have x's dtype, statistics are float32 (float64 for
float64 x), and gradients of weight and bias come back in their own dtypes.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import backends

Tensor = torch.Tensor

# The automatic choice. CPU: native. Measured on the 2-core CI machine at 8192x4096
# (bench/results/*-cpu-20261122-012450, -024041): 2.2x to 32x eager PyTorch, forward and
# backward, fp32 and bf16; with a warm heap (*-012806, -024341) 1.00x to 10x. CUDA: native,
# then triton, by design, not measured yet (no GPU results so far).
_PREFERENCE = {"cpu": ("native",), "cuda": ("native", "triton")}
LAYER_NORM = backends.Op("layer_norm", _PREFERENCE)
RMS_NORM = backends.Op("rms_norm", _PREFERENCE)

NormOutput = Union[Tensor, Tuple[Tensor, Tensor]]


# ------------------------------------------------------------------------- input checks


def _check_inputs(op: str, x, weight, bias, residual, eps) -> None:
    """Raise a ValueError/TypeError naming the argument for anything the ops reject."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastgpt.{op}: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"fastgpt.{op}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"fastgpt.{op}: x must have a hidden (last) dimension of size >= 1, "
                         f"got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastgpt.{op}: {name} must be a tensor or None, got {type(t).__name__}")
        if t.shape != (n,):
            raise ValueError(f"fastgpt.{op}: {name} must have shape ({n},) to match x's hidden "
                             f"size, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"fastgpt.{op}: {name} must be floating point, got dtype {t.dtype}")
        _check_device(op, name, t, x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"fastgpt.{op}: residual must be a tensor or None, "
                            f"got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"fastgpt.{op}: residual must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:  # h = x + residual is returned in x's dtype
            raise TypeError(f"fastgpt.{op}: residual has dtype {residual.dtype} but x has dtype "
                            f"{x.dtype}; cast them to one dtype")
        _check_device(op, "residual", residual, x)
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"fastgpt.{op}: eps must be a float, got {type(eps).__name__}")
    if not eps > 0 or eps == float("inf"):
        raise ValueError(f"fastgpt.{op}: eps must be a finite number > 0, got {eps}")


def _check_device(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"fastgpt.{op}: {name} is on {t.device} but x is on {x.device}")


# ------------------------------------------------------------------ what each kernel serves

# Parsed from the extension on first use: {device type: (dtypes, max hidden size or None)}.
_native_limits: dict = {}


def _native_supports(x: Tensor, *_params) -> Optional[str]:
    device = x.device.type
    limits = _native_limits.get(device)
    if limits is None:
        mod = backends.native_module()
        cuda = device == "cuda"
        names = mod.NORM_DTYPES_CUDA if cuda else mod.NORM_DTYPES_CPU
        dtypes = tuple(getattr(torch, n) for n in names.split(",") if n)
        limits = (dtypes, mod.NORM_MAX_HIDDEN_CUDA if cuda else None)
        _native_limits[device] = limits
    return _kernel_limits("native", x, *limits)


def _triton_supports(x: Tensor, *_params) -> Optional[str]:
    kernels = backends.kernel_module("layernorm")
    return _kernel_limits("triton", x, kernels.DTYPES, kernels.MAX_HIDDEN)


def _kernel_limits(name: str, x: Tensor, dtypes, max_hidden: Optional[int]) -> Optional[str]:
    if x.dtype not in dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in dtypes) or "nothing"
        return f"x has dtype {x.dtype}; the {name} kernels on {x.device.type} support {supported}"
    if max_hidden is not None and x.shape[-1] > max_hidden:
        return (f"x has hidden size {x.shape[-1]}, over the {name} kernels' limit of {max_hidden} "
                f"on {x.device.type} (use backend='torch')")
    return None


# ----------------------------------------------------------------- the kernel backends


def _output(y: Tensor, h: Tensor, residual: Optional[Tensor]) -> NormOutput:
    return y if residual is None else (y, h)


@LAYER_NORM.implement("native", supports=_native_supports)
def _(x, weight, bias, residual, eps):
    y, h, _, _ = torch.ops.fastgpt.layer_norm.default(x, weight, bias, residual, eps)
    return _output(y, h, residual)


@RMS_NORM.implement("native", supports=_native_supports)
def _(x, weight, residual, eps):
    y, h, _ = torch.ops.fastgpt.rms_norm.default(x, weight, residual, eps)
    return _output(y, h, residual)


@LAYER_NORM.implement("triton", supports=_triton_supports)
def _(x, weight, bias, residual, eps):
    y, h, _, _ = torch.ops.fastgpt_triton.layer_norm(x, weight, bias, residual, eps)
    return _output(y, h, residual)


@RMS_NORM.implement("triton", supports=_triton_supports)
def _(x, weight, residual, eps):
    y, h, _ = torch.ops.fastgpt_triton.rms_norm(x, weight, residual, eps)
    return _output(y, h, residual)


# -------------------------------------------------------------------- the torch backend


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eager_params(x: Tensor, *params: Optional[Tensor]):
    """Parameters for torch's own norm. F.layer_norm mixes dtypes only as 16-bit x with float32
    parameters (and raises otherwise); any other parameter dtype is converted to the statistics
    dtype, exactly for every mix that matters (bf16 or fp16 weights beside fp32 x)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        ok = (x.dtype, torch.float32)
    else:
        ok = (x.dtype,)
    stats = _stats_dtype(x.dtype)
    return tuple(p if p is None or p.dtype in ok else p.to(stats) for p in params)


@LAYER_NORM.implement("torch")
def _(x, weight, bias, residual, eps):
    h = x + residual if residual is not None else x
    y = F.layer_norm(h, (x.shape[-1],), *_eager_params(h, weight, bias), eps)
    return _output(y, h, residual)


@RMS_NORM.implement("torch")
def _(x, weight, residual, eps):
    h = x + residual if residual is not None else x
    y = F.rms_norm(h, (x.shape[-1],), *_eager_params(h, weight), eps)
    return _output(y, h, residual)


# ------------------------------------------------- the Triton ops (fastgpt_triton namespace)


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with unit column stride: a view whenever the strides allow."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _contiguous(p: Optional[Tensor]) -> Optional[Tensor]:
    """A parameter as the kernels read it: N contiguous elements (its own dtype; strided or
    expanded parameters are copied, N elements, cheap next to the activations)."""
    return None if p is None else p.contiguous()


def _fake_fwd(x: Tensor, residual: Optional[Tensor], rms: bool):
    stats = _stats_dtype(x.dtype)
    lead = x.shape[:-1]
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0,) if rms else lead, dtype=stats)
    return y, h, mean, x.new_empty(lead, dtype=stats)


def _fake_bwd(src: Tensor, need_dweight: bool, need_dbias: bool):
    stats = _stats_dtype(src.dtype)
    n = src.shape[-1]
    grad = lambda need: src.new_empty((n if need else 0,), dtype=stats)  # noqa: E731
    return src.new_empty(src.shape), grad(need_dweight), grad(need_dbias)


def _triton_fwd(x, weight, bias, residual, eps, rms):
    if x.numel() == 0:
        return _fake_fwd(x, residual, rms)  # nothing to compute; no launch
    y, h, mean, rstd = backends.kernel_module("layernorm").norm_fwd(
        _rows(x), _contiguous(weight), _contiguous(bias),
        None if residual is None else _rows(residual), eps, rms)
    lead = x.shape[:-1]
    return (y.view(x.shape), x.new_empty((0,)) if h is None else h.view(x.shape),
            rstd.new_empty((0,)) if mean is None else mean.view(lead), rstd.view(lead))


def _triton_bwd(dy, dh, src, weight, mean, rstd, rms, need_dweight, need_dbias):
    if src.numel() == 0:
        dx, dw, db = _fake_bwd(src, need_dweight, need_dbias)
        return dx, dw.zero_(), db.zero_()  # sums over zero rows
    n = src.shape[-1]
    dx, dw, db = backends.kernel_module("layernorm").norm_bwd(
        dy.reshape(-1, n).contiguous(), None if dh is None else dh.reshape(-1, n).contiguous(),
        _rows(src), _contiguous(weight), None if rms else mean.reshape(-1), rstd.reshape(-1),
        rms, need_dweight, need_dbias)
    return (dx.view(src.shape), rstd.new_empty((0,)) if dw is None else dw,
            rstd.new_empty((0,)) if db is None else db)


@torch.library.custom_op("fastgpt_triton::layer_norm", mutates_args=())
def _(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
      eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _triton_fwd(x, weight, bias, residual, eps, rms=False)


@torch.library.custom_op("fastgpt_triton::rms_norm", mutates_args=())
def _(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor],
      eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    y, h, _, rstd = _triton_fwd(x, weight, None, residual, eps, rms=True)
    return y, h, rstd


@torch.library.custom_op("fastgpt_triton::layer_norm_backward", mutates_args=())
def _(dy: Tensor, dh: Optional[Tensor], src: Tensor, weight: Optional[Tensor], mean: Tensor,
      rstd: Tensor, need_dweight: bool, need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _triton_bwd(dy, dh, src, weight, mean, rstd, False, need_dweight, need_dbias)


@torch.library.custom_op("fastgpt_triton::rms_norm_backward", mutates_args=())
def _(dy: Tensor, dh: Optional[Tensor], src: Tensor, weight: Optional[Tensor], rstd: Tensor,
      need_dweight: bool) -> Tuple[Tensor, Tensor]:
    dx, dw, _ = _triton_bwd(dy, dh, src, weight, None, rstd, True, need_dweight, False)
    return dx, dw


# -------------------------------------------- autograd and autocast, on both namespaces


def _grads_in(ctx, dy, dh, src):
    """dy (zeros if y was unused) and dh (None without a residual, or if h was unused)."""
    if dy is None:
        dy = torch.zeros_like(src)
    return dy, dh if ctx.has_residual else None


def _param_grad(grad: Tensor, needed: bool, dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """A weight/bias gradient in the parameter's own dtype (the kernels sum in float32)."""
    return grad.to(dtype) if needed else None


def _register(ns: str, autograd: bool) -> None:
    """Fake implementations and autocast for the norm ops of namespace `ns` ("fastgpt" is the
    C++ library, "fastgpt_triton" the Triton ops above), and autograd if asked: the C++ ops
    register theirs in C++ (csrc/fastgpt_ops.cpp, the same formula), because this Python
    wrapper costs more than a decode-sized norm."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::layer_norm")
    def _(x, weight, bias, residual, eps):
        return _fake_fwd(x, residual, rms=False)

    @torch.library.register_fake(f"{ns}::rms_norm")
    def _(x, weight, residual, eps):
        y, h, _, rstd = _fake_fwd(x, residual, rms=True)
        return y, h, rstd

    @torch.library.register_fake(f"{ns}::layer_norm_backward")
    def _(dy, dh, src, weight, mean, rstd, need_dweight, need_dbias):
        return _fake_bwd(src, need_dweight, need_dbias)

    @torch.library.register_fake(f"{ns}::rms_norm_backward")
    def _(dy, dh, src, weight, rstd, need_dweight):
        return _fake_bwd(src, need_dweight, False)[:2]

    def layer_norm_setup(ctx, inputs, output):
        x, weight, bias, residual, _eps = inputs
        _y, h, mean, rstd = output
        ctx.has_residual = residual is not None
        ctx.param_dtypes = (None if weight is None else weight.dtype,
                            None if bias is None else bias.dtype)
        # The one tensor the backward needs is what was normalised: h with a residual, else x.
        ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)
        ctx.set_materialize_grads(False)  # unused outputs (h, often) arrive as None

    def layer_norm_grad(ctx, dy, dh, _dmean, _drstd):
        src, weight, mean, rstd = ctx.saved_tensors
        dy, dh = _grads_in(ctx, dy, dh, src)
        need_dw = weight is not None and ctx.needs_input_grad[1]
        need_db = ctx.param_dtypes[1] is not None and ctx.needs_input_grad[2]
        dx, dw, db = ops.layer_norm_backward(dy, dh, src, weight, mean, rstd, need_dw, need_db)
        return (dx, _param_grad(dw, need_dw, ctx.param_dtypes[0]),
                _param_grad(db, need_db, ctx.param_dtypes[1]),
                dx if ctx.has_residual else None, None)

    def rms_norm_setup(ctx, inputs, output):
        x, weight, residual, _eps = inputs
        _y, h, rstd = output
        ctx.has_residual = residual is not None
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)
        ctx.set_materialize_grads(False)

    def rms_norm_grad(ctx, dy, dh, _drstd):
        src, weight, rstd = ctx.saved_tensors
        dy, dh = _grads_in(ctx, dy, dh, src)
        need_dw = weight is not None and ctx.needs_input_grad[1]
        dx, dw = ops.rms_norm_backward(dy, dh, src, weight, rstd, need_dw)
        return (dx, _param_grad(dw, need_dw, ctx.weight_dtype),
                dx if ctx.has_residual else None, None)

    if autograd:
        torch.library.register_autograd(f"{ns}::layer_norm", layer_norm_grad,
                                        setup_context=layer_norm_setup)
        torch.library.register_autograd(f"{ns}::rms_norm", rms_norm_grad,
                                        setup_context=rms_norm_setup)

    # Under torch.autocast each op gives what torch's own op gives on that device: where torch
    # registers an autocast kernel for aten::layer_norm / aten::rms_norm (CUDA: layer_norm always,
    # rms_norm from torch 2.12 on; CPU: neither), it is the float32 policy, so ours casts its
    # inputs to float32 too (y and h come out float32). Elsewhere autocast passes the op through
    # unchanged, as it does torch's.
    for op, aten in (("layer_norm", "aten::layer_norm"), ("rms_norm", "aten::rms_norm")):
        for device in ("cpu", "cuda"):
            if torch._C._dispatch_has_kernel_for_dispatch_key(aten, f"Autocast{device.upper()}"):
                torch.library.register_autocast(f"{ns}::{op}", device, torch.float32)


_register("fastgpt_triton", autograd=True)
backends.on_native_load(lambda: _register("fastgpt", autograd=False))


# ----------------------------------------------------------------------------- public API


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, residual: Optional[Tensor] = None, *,
               backend: Optional[str] = None) -> NormOutput:
    """LayerNorm over the last dimension, optionally fused with a residual add.

    Args:
        x: ``(..., N)`` float32, float16, bfloat16 or float64; any strides.
        weight, bias: ``(N,)`` or None (ones / zeros), on x's device; any floating dtype
            (e.g. float32 master weights beside bfloat16 x) and any strides.
        eps: added to the variance, > 0.
        residual: None, or a tensor of x's shape, dtype and device.
        backend: ``"torch"``, ``"triton"``, ``"native"`` or None (the default set by
            :func:`fastgpt.use_backend`, else the first backend that serves the input).

    Returns:
        Without ``residual``: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` in x's shape
        and dtype (statistics in float32, float64 for float64 x; var is biased).
        With ``residual``: ``(y, h)`` where ``h = x + residual`` (rounded to x's dtype) and
        ``y = layer_norm(h)``, computed in one pass; h is the residual stream for the next block.
        Under ``torch.autocast`` on CUDA the op runs in float32 (as ``F.layer_norm`` does there),
        so y and h are float32.

    Gradients flow to x, weight, bias and residual (weight and bias gradients in their own
    dtypes). Errors name the argument: mixed devices, wrong shapes, non-float tensors, a
    residual of another dtype, eps <= 0, an input a named backend cannot serve (dtype, hidden
    size: Triton and native CUDA take up to 65536).
    """
    _check_inputs("layer_norm", x, weight, bias, residual, eps)
    run = LAYER_NORM.choose(backend, x.device, x, weight, bias, residual)
    return run(x, weight, bias, residual, float(eps))


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             residual: Optional[Tensor] = None, *, backend: Optional[str] = None) -> NormOutput:
    """RMSNorm over the last dimension, optionally fused with a residual add.

    Args:
        x: ``(..., N)`` float32, float16, bfloat16 or float64; any strides.
        weight: ``(N,)`` or None (ones), on x's device; any floating dtype and strides.
        eps: added to the mean square, > 0.
        residual: None, or a tensor of x's shape, dtype and device.
        backend: as for :func:`layer_norm`.

    Returns:
        Without ``residual``: ``y = x / sqrt(mean(x**2) + eps) * weight`` in x's dtype
        (statistics in float32, float64 for float64 x). With ``residual``: ``(y, h)``,
        ``h = x + residual`` rounded to x's dtype, ``y = rms_norm(h)``, computed in one pass.
        Under ``torch.autocast`` it gives the dtype ``F.rms_norm`` gives on that device.
    """
    _check_inputs("rms_norm", x, weight, None, residual, eps)
    run = RMS_NORM.choose(backend, x.device, x, weight, residual)
    return run(x, weight, residual, float(eps))
