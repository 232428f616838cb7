"""LayerNorm and RMSNorm, each optionally fused with the residual add of a pre-norm block.

Layers, top to bottom:

* :func:`layer_norm`, :func:`rms_norm`: the public functions. They check the inputs, and run
  eager PyTorch when the backend is ``"torch"``; otherwise they call the custom op.
* ``torch.ops.fastgpt.layer_norm`` / ``rms_norm`` (and their ``*_backward``): ``torch.library``
  custom ops with fake implementations and registered autograd. The op chooses the backend
  for its input when it runs (not while torch.compile traces), so compiled code stays one
  graph and the automatic choice sees the real input.
* The kernels: ``fastgpt.kernels.layernorm.norm_fwd/norm_bwd`` (Triton),
  ``torch.ops.fastgpt.norm_fwd/norm_bwd`` (C++ ``fastgpt._C``: csrc/cpu, csrc/cuda), and
  :func:`_torch_norm_fwd` / :func:`_torch_norm_bwd` (the same contract in torch ops, used when
  the automatic choice finds no kernel for an input).

RMSNorm is LayerNorm without centring and without bias; all three kernels share one
implementation with an ``rms`` switch.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import backends

Tensor = torch.Tensor

#: Largest hidden size the Triton and native CUDA kernels accept (the native CPU kernels
#: and the torch backend have no limit).
MAX_HIDDEN = 65536

_KERNEL_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    ("native", "cpu"): (torch.float32, torch.float64, torch.bfloat16),
    ("native", "cuda"): (torch.float32, torch.float16, torch.bfloat16),
}


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
        _check_like(op, name, t, x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"fastgpt.{op}: residual must be a tensor or None, "
                            f"got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"fastgpt.{op}: residual must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        _check_like(op, "residual", residual, x)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"fastgpt.{op}: eps must be a float, got {type(eps).__name__}")
    if not eps > 0 or eps == float("inf"):
        raise ValueError(f"fastgpt.{op}: eps must be a finite number > 0, got {eps}")


def _check_like(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"fastgpt.{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}; "
                        f"cast them to one dtype")
    if t.device != x.device:
        raise ValueError(f"fastgpt.{op}: {name} is on {t.device} but x is on {x.device}")


def _why_not(name: str, x: Tensor) -> Optional[str]:
    """None if kernel backend `name` can serve input x, else the reason (naming x)."""
    if name == "torch":
        return None
    key = name if name == "triton" else (name, x.device.type)
    dtypes = _KERNEL_DTYPES.get(key, ())
    if x.dtype not in dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in dtypes) or "nothing"
        return (f"x has dtype {x.dtype}; the {name} kernels on {x.device.type} support "
                f"{supported}")
    n = x.shape[-1]
    if n > MAX_HIDDEN and (name == "triton" or x.device.type == "cuda"):
        return (f"x has hidden size {n}, over the {name} kernels' limit of {MAX_HIDDEN} "
                f"(use backend='torch')")
    return None


def _resolve(op: str, x: Tensor, requested: Optional[str]) -> str:
    return backends.choose(op, x.device, requested, lambda name: _why_not(name, x))


# ------------------------------------------------------------- the torch implementation


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_norm_fwd(x, weight, bias, residual, eps: float, rms: bool):
    """Same contract as the kernels' norm_fwd, in torch ops (rows of a 2-D x)."""
    h = x + residual if residual is not None else None
    src = (h if h is not None else x).to(_stats_dtype(x.dtype))
    mean = None if rms else src.mean(-1)
    centred = src if rms else src - mean[:, None]
    rstd = torch.rsqrt(centred.square().mean(-1) + eps)
    y = centred * rstd[:, None]
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), h, mean, rstd


def _torch_norm_bwd(dy, dh, src, weight, mean, rstd, rms: bool, need_dweight: bool,
                    need_dbias: bool):
    """Same contract as the kernels' norm_bwd, in torch ops."""
    stats = rstd.dtype
    dyf = dy.to(stats)
    xhat = (src.to(stats) if rms else src.to(stats) - mean[:, None]) * rstd[:, None]
    g = dyf * weight.to(stats) if weight is not None else dyf
    proj = (g * xhat).mean(-1, keepdim=True)
    dx = g - xhat * proj if rms else g - g.mean(-1, keepdim=True) - xhat * proj
    dx = dx * rstd[:, None]
    if dh is not None:
        dx = dx + dh.to(stats)
    dweight = (dyf * xhat).sum(0) if need_dweight else None
    dbias = dyf.sum(0) if need_dbias else None
    return dx.to(src.dtype), dweight, dbias


# --------------------------------------------------------------------- running a backend


def _rows(t: Tensor) -> Tensor:
    """(..., N) -> (M, N) with contiguous rows; a view whenever the strides allow."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t  # already rows; a reshape costs about a microsecond of Python per tensor
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _dense_rows(t: Tensor) -> Tensor:
    """(..., N) -> contiguous (M, N): the layout the kernels take for gradients."""
    if t.dim() == 2 and t.is_contiguous():
        return t
    return t.reshape(-1, t.shape[-1]).contiguous()


def _flat(t: Tensor) -> Tensor:
    """Per-row statistics, (...) -> (M,)."""
    return t if t.dim() == 1 else t.reshape(-1)


def _empty(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return x.new_empty((0,), dtype=dtype if dtype is not None else x.dtype)


def _norm_forward(op, x, weight, bias, residual, eps, requested, rms):
    """Run the forward on the chosen backend. Returns (y, h, mean, rstd) shaped like x / x[..., 0];
    h is empty without a residual, mean is empty for rms."""
    name = _resolve(op, x, requested)
    if x.numel() == 0:
        return _fake_forward(x, residual, rms)  # nothing to compute; no kernel launch
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    if name == "native":
        y, h, mean, rstd = torch.ops.fastgpt.norm_fwd(x2, weight, bias, r2, eps, rms)
    else:
        impl = backends.triton_module().norm_fwd if name == "triton" else _torch_norm_fwd
        y, h, mean, rstd = impl(x2, weight, bias, r2, eps, rms)
        h = h if h is not None else _empty(x)
        mean = mean if mean is not None else _empty(x, rstd.dtype)
    if x.dim() == 2:
        return y, h, mean, rstd  # already x's shape; skip four views, ~2 us of Python each
    shape = tuple(x.shape)  # views take a tuple faster than a torch.Size
    lead = shape[:-1]
    y = y.view(shape)
    h = h.view(shape) if residual is not None else h
    mean = mean if rms else mean.view(lead)
    return y, h, mean, rstd.view(lead)


def _norm_backward(op, dy, dh, src, weight, mean, rstd, need_dweight, need_dbias, requested,
                   rms):
    """Run the backward on the backend the forward chose (the choice depends only on the
    input's device, dtype and hidden size, which src shares). Returns (dx, dweight, dbias),
    dweight/dbias in weight's dtype, empty when not requested."""
    name = _resolve(op, src, requested)
    if src.numel() == 0:
        dx, dw, db = _fake_backward(src, weight, need_dweight, need_dbias)
        return dx, dw.zero_(), db.zero_()  # sums over zero rows
    dy2 = _dense_rows(dy)
    dh2 = _dense_rows(dh) if dh is not None else None
    src2 = _rows(src)
    mean2 = None if rms else _flat(mean)
    rstd2 = _flat(rstd)
    if name == "native":
        dx, dw, db = torch.ops.fastgpt.norm_bwd(dy2, dh2, src2, weight, mean2, rstd2, rms,
                                                need_dweight, need_dbias)
    else:
        impl = backends.triton_module().norm_bwd if name == "triton" else _torch_norm_bwd
        dx, dw, db = impl(dy2, dh2, src2, weight, mean2, rstd2, rms, need_dweight, need_dbias)
    wdtype = weight.dtype if weight is not None else src.dtype
    dw = dw.to(wdtype) if need_dweight else _empty(src)
    db = db.to(wdtype) if need_dbias else _empty(src)
    return (dx if src.dim() == 2 else dx.view(tuple(src.shape))), dw, db


def _fake_forward(x, residual, rms):
    stats = _stats_dtype(x.dtype)
    lead = x.shape[:-1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(y) if residual is not None else _empty(x)
    mean = _empty(x, stats) if rms else x.new_empty(lead, dtype=stats)
    return y, h, mean, x.new_empty(lead, dtype=stats)


def _fake_backward(src, weight, need_dweight, need_dbias):
    wdtype = weight.dtype if weight is not None else src.dtype
    n = src.shape[-1]
    grad = lambda need: src.new_empty((n,), dtype=wdtype) if need else _empty(src)  # noqa: E731
    return torch.empty_like(src, memory_format=torch.contiguous_format), grad(need_dweight), grad(
        need_dbias)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgpt::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], eps: float,
                   backend: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd); h empty without residual (outputs may not alias inputs)."""
    return _norm_forward("layer_norm", x, weight, bias, residual, eps, backend, rms=False)


@torch.library.custom_op("fastgpt::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: Tensor, dh: Optional[Tensor], src: Tensor,
                            weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                            need_dweight: bool, need_dbias: bool,
                            backend: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    return _norm_backward("layer_norm", dy, dh, src, weight, mean, rstd, need_dweight,
                          need_dbias, backend, rms=False)


@torch.library.custom_op("fastgpt::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                 backend: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, h, rstd); h empty without residual."""
    y, h, _, rstd = _norm_forward("rms_norm", x, weight, None, residual, eps, backend, rms=True)
    return y, h, rstd


@torch.library.custom_op("fastgpt::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Tensor, dh: Optional[Tensor], src: Tensor,
                          weight: Optional[Tensor], rstd: Tensor, need_dweight: bool,
                          backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    dx, dw, _ = _norm_backward("rms_norm", dy, dh, src, weight, None, rstd, need_dweight,
                               False, backend, rms=True)
    return dx, dw


@_layer_norm_op.register_fake
def _(x, weight, bias, residual, eps, backend):
    _resolve("layer_norm", x, backend)  # a named backend that cannot serve x fails at trace time
    return _fake_forward(x, residual, rms=False)


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, backend):
    _resolve("rms_norm", x, backend)
    y, h, _, rstd = _fake_forward(x, residual, rms=True)
    return y, h, rstd


@_layer_norm_backward_op.register_fake
def _(dy, dh, src, weight, mean, rstd, need_dweight, need_dbias, backend):
    return _fake_backward(src, weight, need_dweight, need_dbias)


@_rms_norm_backward_op.register_fake
def _(dy, dh, src, weight, rstd, need_dweight, backend):
    return _fake_backward(src, weight, need_dweight, False)[:2]


def _setup_context(ctx, x, weight, bias, residual, backend, output):
    y, h, *stats = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.backend = backend
    # Normalising saved the one tensor backward needs: h with a residual, else x itself.
    ctx.save_for_backward(h if ctx.has_residual else x, weight, *stats)
    # Unused outputs (h when the residual stream is not read) arrive as None, not zeros.
    ctx.set_materialize_grads(False)


def _grads_in(ctx, dy, dh, src):
    """dy (zeros if y was unused) and dh (None if there is no residual or h was unused)."""
    if dy is None:
        dy = torch.zeros_like(src)
    return dy, dh if ctx.has_residual else None


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, _eps, backend = inputs
    _setup_context(ctx, x, weight, bias, residual, backend, output)


def _layer_norm_grad(ctx, dy, dh, _dmean, _drstd):
    src, weight, mean, rstd = ctx.saved_tensors
    dy, dh = _grads_in(ctx, dy, dh, src)
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.fastgpt.layer_norm_backward(dy, dh, src, weight, mean, rstd, need_dw,
                                                       need_db, ctx.backend)
    dres = dx if ctx.has_residual else None
    return dx, dw if need_dw else None, db if need_db else None, dres, None, None


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, _eps, backend = inputs
    _setup_context(ctx, x, weight, None, residual, backend, output)


def _rms_norm_grad(ctx, dy, dh, _drstd):
    src, weight, rstd = ctx.saved_tensors
    dy, dh = _grads_in(ctx, dy, dh, src)
    need_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.fastgpt.rms_norm_backward(dy, dh, src, weight, rstd, need_dw, ctx.backend)
    dres = dx if ctx.has_residual else None
    return dx, dw if need_dw else None, dres, None, None


_layer_norm_op.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)
_rms_norm_op.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# ----------------------------------------------------------------------------- public API

NormOutput = Union[Tensor, Tuple[Tensor, Tensor]]


def _requested(backend: Optional[str]) -> Optional[str]:
    name = backend if backend is not None else backends.default_backend()
    if name is not None and name not in backends.BACKENDS:
        raise backends.BackendError(f"backend must be None or one of {backends.BACKENDS}, "
                                    f"got {name!r}")
    return name


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, residual: Optional[Tensor] = None, *,
               backend: Optional[str] = None) -> NormOutput:
    """LayerNorm over the last dimension, optionally fused with a residual add.

    Args:
        x: ``(..., N)`` float32, float16, bfloat16 or float64; any strides.
        weight, bias: ``(N,)``, x's dtype and device, or None (ones / zeros).
        eps: added to the variance, > 0.
        residual: None, or a tensor of x's shape, dtype and device.
        backend: ``"torch"``, ``"triton"``, ``"native"`` or None (the default set by
            :func:`fastgpt.use_backend`, else the fastest backend that supports the input).

    Returns:
        Without ``residual``: ``y = (x - mean) / sqrt(var + eps) * weight + bias``, x's shape
        and dtype (statistics in float32, float64 for float64 x; var is biased).
        With ``residual``: ``(y, h)`` where ``h = x + residual`` (rounded to x's dtype) and
        ``y = layer_norm(h)``, computed in one pass; h is the residual stream for the next block.

    Gradients flow to x, weight, bias and residual. Errors name the argument: mixed dtypes or
    devices, wrong shapes, integer x, eps <= 0, a hidden size over a named backend's limit
    (Triton and native CUDA: 65536).
    """
    _check_inputs("layer_norm", x, weight, bias, residual, eps)
    name = _requested(backend)
    if name == "torch":
        h = x + residual if residual is not None else x
        y = F.layer_norm(h, (x.shape[-1],), weight, bias, eps)
        return y if residual is None else (y, h)
    y, h, _, _ = torch.ops.fastgpt.layer_norm(x, weight, bias, residual, float(eps), name)
    return y if residual is None else (y, h)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             residual: Optional[Tensor] = None, *, backend: Optional[str] = None) -> NormOutput:
    """RMSNorm over the last dimension, optionally fused with a residual add.

    Args:
        x: ``(..., N)`` float32, float16, bfloat16 or float64; any strides.
        weight: ``(N,)``, x's dtype and device, or None (ones).
        eps: added to the mean square, > 0.
        residual: None, or a tensor of x's shape, dtype and device.
        backend: as for :func:`layer_norm`.

    Returns:
        Without ``residual``: ``y = x / sqrt(mean(x**2) + eps) * weight`` (statistics in
        float32, float64 for float64 x). With ``residual``: ``(y, h)``, ``h = x + residual``
        rounded to x's dtype, ``y = rms_norm(h)``, computed in one pass.
    """
    _check_inputs("rms_norm", x, weight, None, residual, eps)
    name = _requested(backend)
    if name == "torch":
        h = x + residual if residual is not None else x
        y = F.rms_norm(h, (x.shape[-1],), weight, eps)
        return y if residual is None else (y, h)
    y, h, _ = torch.ops.fastgpt.rms_norm(x, weight, residual, float(eps), name)
    return y if residual is None else (y, h)
