"""Fused attention: a drop-in ``scaled_dot_product_attention``.

From the public function to a kernel, in one read:

* :func:`scaled_dot_product_attention` takes torch's arguments, checks them, applies the
  autocast cast torch's SDPA would apply, and asks :data:`ATTENTION` (a
  :class:`fastgpt.backends.Op`) which backend serves the input.
* A kernel backend sees one layout: ``q (B, Hq, L, E)``, ``k (B, Hk, S, E)``,
  ``v (B, Hk, S, Ev)`` with ``Hq % Hk == 0`` (query head ``h`` reads kv head
  ``h // (Hq // Hk)``: GQA and MQA without repeating K/V), any strides. :func:`_as_heads`
  maps torch's shapes onto it. ``"native"`` calls the C++ op ``torch.ops.fastgpt.attention``
  (csrc/fastgpt_ops.cpp; kernels in csrc/cpu/attention.cpp); ``"triton"`` calls the custom op
  ``torch.ops.fastgpt_triton.attention`` defined here around
  ``fastgpt.kernels.attention.attention_fwd/attention_bwd``. Both namespaces share one schema,
  fake implementation and autograd formula (registered here), so they differ only below the op.
* ``"torch"`` is torch's own ``F.scaled_dot_product_attention``: it serves every input torch
  accepts (masks, dropout, broadcast batch dimensions), and the automatic choice falls back to
  it wherever no kernel serves an input.

Causal masking follows torch's ``is_causal``: top-left aligned, query ``i`` sees keys
``j <= i`` (``torch.ones(L, S).tril()``); with ``L > S`` rows ``i >= S`` see every key.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import backends

Tensor = torch.Tensor

# The automatic choice. CPU: native (bench/results/attention-cpu-*: 1.1x torch's SDPA forward,
# 1.2x backward). CUDA: triton, then native; by design, not measured yet (no GPU results so
# far): on Hopper Triton's tl.dot compiles to wgmma, where the CUDA kernels use sm_80's
# mma.sync (FlashAttention-2's instruction, which FlashAttention-3 outruns with wgmma).
ATTENTION = backends.Op("scaled_dot_product_attention",
                        {"cpu": ("native",), "cuda": ("triton", "native")})

# torch's SDPA as imported, so that code which monkey-patches F.scaled_dot_product_attention
# with fastgpt's still reaches torch's for the fallback (and not fastgpt's again).
_torch_sdpa = F.scaled_dot_product_attention

# Devices where torch's SDPA has an autocast kernel (the lower-precision policy: floating
# inputs other than float64 are cast to the autocast dtype). Read once: a dispatcher query.
_AUTOCASTS = {dev: torch._C._dispatch_has_kernel_for_dispatch_key(
    "aten::scaled_dot_product_attention", f"Autocast{dev.upper()}") for dev in ("cpu", "cuda")}


# ------------------------------------------------------------------------- input checks


_OP = "fastgpt.scaled_dot_product_attention"


def _check_types(query, key, value, attn_mask) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a tensor, got {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{_OP}: attn_mask must be a tensor or None, "
                        f"got {type(attn_mask).__name__}")


def _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa) -> None:
    """Errors naming the argument for what every backend (torch's SDPA included) rejects, in
    words clearer than the ones torch raises from deep inside its math. Called on the inputs
    as autocast leaves them (torch's SDPA accepts mixed dtypes that autocast unifies)."""
    op = _OP
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dims (..., L or S, E), "
                             f"got shape {tuple(t.shape)}")
    if not query.is_floating_point():
        raise TypeError(f"{op}: query must be floating point, got dtype {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but query has dtype {query.dtype}; "
                            f"query, key and value must have one dtype")
        if t.device != query.device:
            raise ValueError(f"{op}: {name} is on {t.device} but query is on {query.device}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"{op}: key's last dim (E) is {key.shape[-1]} but query's is "
                         f"{query.shape[-1]}; they must match")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{op}: key has {key.shape[-2]} positions (dim -2) but value has "
                         f"{value.shape[-2]}; they must match")
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv or hk == 0 or hq % hk:
            raise ValueError(f"{op}: with enable_gqa, key and value must have one number of heads "
                             f"(dim -3) that divides query's: query {hq}, key {hk}, value {hv}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"{op}: attn_mask must be bool (True = attend) or have query's dtype "
                            f"{query.dtype} (added to the scores), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on "
                             f"{query.device}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")


def _autocast(device_type: str, *tensors: Optional[Tensor]):
    """The tensors as torch's SDPA sees them under torch.autocast on this device: floating
    tensors other than float64 cast to the autocast dtype (a bool mask is left alone)."""
    if not (_AUTOCASTS.get(device_type, False) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


# ------------------------------------------------------------- the kernels' layout


def _heads(t: Tensor) -> int:
    return t.shape[-3] if t.dim() >= 3 else 1


def _layout_reason(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> Optional[str]:
    """None if q, k, v map onto the kernels' (B, H, T, D) layout without broadcasting a batch
    dimension, else why not. Head counts may be equal, Hq a multiple of Hk with enable_gqa
    (GQA), or Hk = 1 (torch broadcasts one kv head to every query head, which is MQA)."""
    if not q.dim() == k.dim() == v.dim():
        return (f"query, key and value have {q.dim()}, {k.dim()} and {v.dim()} dims; the kernels "
                f"take one number of dims (torch broadcasts the others)")
    if not q.shape[:-3] == k.shape[:-3] == v.shape[:-3]:
        return (f"batch dims query {tuple(q.shape[:-3])}, key {tuple(k.shape[:-3])}, value "
                f"{tuple(v.shape[:-3])} differ; the kernels do not broadcast batch dims")
    hq, hk = _heads(q), _heads(k)
    if hk != _heads(v):
        return f"key has {hk} heads and value {_heads(v)}; the kernels take one kv head count"
    if hk != hq and hk != 1 and not (enable_gqa and hq % hk == 0):
        return (f"query has {hq} heads and key {hk}; the kernels take equal counts, one kv head, "
                f"or a divisor with enable_gqa (torch broadcasts the others)")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return "an empty sequence (L or S is 0)"
    return None


def _as_heads(t: Tensor) -> Tensor:
    """(..., H, T, D) or (T, D) as (B, H, T, D): a view whenever the strides allow."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t if t.dim() == 4 else t.reshape(-1, *t.shape[-3:])


def _kernel_reason(name: str, q, k, v, attn_mask, dropout_p, enable_gqa, dtypes,
                   max_head_dim: Optional[int]) -> Optional[str]:
    if attn_mask is not None:
        return f"attn_mask is given; the {name} kernels take is_causal only (use backend='torch')"
    if dropout_p > 0.0:
        return (f"dropout_p={dropout_p}; the {name} kernels have no dropout "
                f"(use backend='torch')")
    if q.dtype not in dtypes:
        served = ", ".join(str(d).replace("torch.", "") for d in dtypes) or "nothing"
        return f"query has dtype {q.dtype}; the {name} kernels on {q.device.type} serve {served}"
    for arg, d in (("query/key", q.shape[-1]), ("value", v.shape[-1])):
        if max_head_dim is not None and d > max_head_dim:
            return (f"{arg} head dim {d} is over the {name} kernels' limit of {max_head_dim} "
                    f"(use backend='torch')")
    layout = _layout_reason(q, k, v, enable_gqa)
    return None if layout is None else f"{layout} (use backend='torch')"


_native_limits: dict = {}


def _native_kernel_limits(device: torch.device):
    """(dtypes, max head dim or None) of the native attention kernels on this device type, as
    the extension reports them."""
    limits = _native_limits.get(device.type)
    if limits is None:
        mod = backends.native_module()
        cuda = device.type == "cuda"
        names = mod.ATTENTION_DTYPES_CUDA if cuda else mod.ATTENTION_DTYPES_CPU
        dtypes = tuple(getattr(torch, n) for n in names.split(",") if n)
        limits = (dtypes, mod.ATTENTION_MAX_HEAD_DIM_CUDA if cuda else None)
        _native_limits[device.type] = limits
    return limits


def _native_supports(q, k, v, attn_mask, dropout_p, is_causal, scale,
                     enable_gqa) -> Optional[str]:
    return _kernel_reason("native", q, k, v, attn_mask, dropout_p, enable_gqa,
                          *_native_kernel_limits(q.device))


def _triton_supports(q, k, v, attn_mask, dropout_p, is_causal, scale,
                     enable_gqa) -> Optional[str]:
    kernels = backends.kernel_module("attention")
    return _kernel_reason("triton", q, k, v, attn_mask, dropout_p, enable_gqa, kernels.DTYPES,
                          kernels.MAX_HEAD_DIM)


def _run_kernel(op, q, k, v, is_causal, scale):
    """Call a kernel op on torch's shapes: out has query's leading dims, L and value's Ev."""
    out, _lse = op(_as_heads(q), _as_heads(k), _as_heads(v), is_causal, scale)
    return out.view(*q.shape[:-1], v.shape[-1])


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


@ATTENTION.implement("native", supports=_native_supports)
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return _run_kernel(torch.ops.fastgpt.attention.default, q, k, v, is_causal, _scale(q, scale))


@ATTENTION.implement("triton", supports=_triton_supports)
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return _run_kernel(torch.ops.fastgpt_triton.attention.default, q, k, v, is_causal,
                       _scale(q, scale))


@ATTENTION.implement("torch")
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return _torch_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa)


# ------------------------------------------------ the Triton ops (fastgpt_triton namespace)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_fwd(q: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    b, h, length, _ = q.shape
    return (q.new_empty((b, h, length, v.shape[-1])),
            q.new_empty((b, h, length), dtype=_lse_dtype(q)))


def _fake_bwd(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _unit_last(t: Tensor) -> Tensor:
    """t with unit stride in its last dim, which the launchers require (any other strides,
    0 included, are read as they are): a copy only when that stride is not 1 (for example the
    all-zero strides of the gradient of a sum)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@torch.library.custom_op("fastgpt_triton::attention", mutates_args=())
def _(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> Tuple[Tensor, Tensor]:
    return backends.kernel_module("attention").attention_fwd(
        _unit_last(q), _unit_last(k), _unit_last(v), is_causal, scale)


@torch.library.custom_op("fastgpt_triton::attention_with_kvcache", mutates_args=())
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lens: Tensor, scale: float) -> Tensor:
    return backends.kernel_module("attention").attention_with_kvcache(
        _unit_last(q), _unit_last(k_cache), _unit_last(v_cache), kv_lens.contiguous(), scale)


@torch.library.custom_op("fastgpt_triton::attention_backward", mutates_args=())
def _(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
      is_causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return backends.kernel_module("attention").attention_bwd(
        _unit_last(grad_out), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out),
        lse.contiguous(), is_causal, scale)


# ------------------------------------------------------ fakes and autograd, both namespaces


def _register(ns: str) -> None:
    """Fake implementations and autograd for the attention ops of namespace `ns` ("fastgpt":
    the C++ ops; "fastgpt_triton": the Triton ops above). Attention costs far more than the
    ~10 us a Python autograd wrapper adds, so the formula lives here once for both."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::attention")
    def _(q, k, v, is_causal, scale):
        return _fake_fwd(q, v)

    @torch.library.register_fake(f"{ns}::attention_backward")
    def _(grad_out, q, k, v, out, lse, is_causal, scale):
        return _fake_bwd(q, k, v)

    @torch.library.register_fake(f"{ns}::attention_with_kvcache")
    def _(q, k_cache, v_cache, kv_lens, scale):
        return _fake_fwd(q, v_cache)[0]

    def setup_context(ctx, inputs, output):
        q, k, v, is_causal, scale = inputs
        out, lse = output
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.attention_backward(grad_out, q, k, v, out, lse, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_autograd(f"{ns}::attention", backward, setup_context=setup_context)


_register("fastgpt_triton")
backends.on_native_load(lambda: _register("fastgpt"))


# ----------------------------------------------------------------------------- public API


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *,
                                 backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, with fused kernels where they serve.

    Same arguments, semantics and result as torch's (it can replace it in model code).

    Args:
        query: ``(N, ..., Hq, L, E)``; float32, float16, bfloat16 or float64; any strides.
        key: ``(N, ..., Hk, S, E)``, query's dtype and device.
        value: ``(N, ..., Hk, S, Ev)``; Ev may differ from E.
        attn_mask: None, or broadcastable to ``(N, ..., L, S)``: bool (True = attend) or query's
            dtype (added to the scores). Served by the torch backend.
        dropout_p: dropout on the attention weights (applied whenever > 0, as in torch). Served by
            the torch backend.
        is_causal: query ``i`` attends keys ``j <= i`` (top-left aligned, as torch).
        scale: the scores' factor; None is ``1 / sqrt(E)``.
        enable_gqa: key/value heads (dim -3) may divide query's; each kv head serves
            ``Hq // Hk`` consecutive query heads.
        backend: ``"torch"``, ``"triton"``, ``"native"`` or None (the default set by
            :func:`fastgpt.use_backend`, else the first backend that serves the input, falling
            back to torch's SDPA).

    Returns:
        ``(N, ..., Hq, L, Ev)`` in query's dtype (under ``torch.autocast``, the dtype torch's
        SDPA gives there). Gradients flow to query, key and value.

    The kernels (Triton: float32/16/bf16, head dims up to 256; native CPU: float32, bfloat16,
    float64, any head dim) never build the L x S matrix: memory grows with L + S. A named
    backend that cannot serve an input (mask, dropout, broadcast batch dims, dtype, head dim)
    raises BackendError naming the argument.
    """
    _check_types(query, key, value, attn_mask)
    query, key, value, attn_mask = _autocast(query.device.type, query, key, value, attn_mask)
    _check_inputs(query, key, value, attn_mask, dropout_p, enable_gqa)
    args = (query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale,
            bool(enable_gqa))
    return ATTENTION.choose(backend, query.device, *args)(*args)


# ------------------------------------------------------------------------------ decoding

# Decoding over a KV cache. Every backend sees the caches after the new tokens are written
# (attention_with_kvcache does that once, for all of them) and the key count of each row:
# (q, k_cache, v_cache, kv_lens, scale). CPU: native; CUDA: triton, then native; by design, not
# measured yet (both are split-KV kernels; no GPU results so far).
ATTENTION_WITH_KVCACHE = backends.Op("attention_with_kvcache",
                                     {"cpu": ("native",), "cuda": ("triton", "native")})


def _check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    op = "fastgpt.attention_with_kvcache"
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
             ("cache_seqlens", cache_seqlens))
    for name, t in named + (("k_new", k_new), ("v_new", v_new)):
        if t is None and name in ("k_new", "v_new"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
        if name != "cache_seqlens" and t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if name != "cache_seqlens" and t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"{op}: q must be floating point, got dtype {q.dtype}")
    b, hq, _, d = q.shape
    _, hk, t_max, _ = k_cache.shape
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[0] != b or k_cache.shape[-1] != d:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} must be (B, Hk, Tmax, D) and (B, Hk, Tmax, Dv) "
                         f"with q's B={b} and D={d}")
    if hk == 0 or hq % hk:
        raise ValueError(f"{op}: the caches' {hk} kv heads must divide q's {hq} heads")
    if (cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != b
            or cache_seqlens.dtype != torch.int32):
        raise TypeError(f"{op}: cache_seqlens must be int32 of shape ({b},), got "
                        f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: give k_new and v_new together, or neither")
    new = 0
    if k_new is not None:
        new = k_new.shape[2]
        if (k_new.shape[:2] != (b, hk) or k_new.shape[-1] != d
                or v_new.shape != (b, hk, new, v_cache.shape[-1])):
            raise ValueError(f"{op}: k_new {tuple(k_new.shape)} / v_new {tuple(v_new.shape)} must "
                             f"be (B, Hk, Tnew, D) / (B, Hk, Tnew, Dv) like the caches")
    # One host read of the lengths: a length past the cache would write out of bounds. Not
    # inside torch.compile: a compiled decoding step must not read device values on the host
    # (a graph break and a device sync per step); there the scatter's own index check and the
    # kernels' (CPU: checked, CUDA and Triton: clamped on the device) stand in for it.
    if b == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi + new > t_max:
        raise ValueError(f"{op}: cache_seqlens must lie in [0, Tmax - Tnew] = [0, {t_max - new}] "
                         f"(Tmax={t_max}, Tnew={new}); got values in [{lo}, {hi}]")


def _kvcache_reason(name: str, q, k_cache, v_cache, dtypes, max_head_dim) -> Optional[str]:
    if q.dtype not in dtypes:
        served = ", ".join(str(d).replace("torch.", "") for d in dtypes) or "nothing"
        return f"q has dtype {q.dtype}; the {name} kernels on {q.device.type} serve {served}"
    for arg, d in (("q/k_cache", q.shape[-1]), ("v_cache", v_cache.shape[-1])):
        if max_head_dim is not None and d > max_head_dim:
            return f"{arg} head dim {d} is over the {name} kernels' limit of {max_head_dim}"
    if q.shape[2] == 0 or q.shape[1] == 0 or q.shape[0] == 0:
        return "q is empty (B, Hq or Tq is 0)"
    return None


def _native_kvcache_supports(q, k_cache, v_cache, kv_lens, scale) -> Optional[str]:
    return _kvcache_reason("native", q, k_cache, v_cache, *_native_kernel_limits(q.device))


def _triton_kvcache_supports(q, k_cache, v_cache, kv_lens, scale) -> Optional[str]:
    kernels = backends.kernel_module("attention")
    return _kvcache_reason("triton", q, k_cache, v_cache, kernels.DTYPES, kernels.MAX_HEAD_DIM)


@ATTENTION_WITH_KVCACHE.implement("native", supports=_native_kvcache_supports)
def _(q, k_cache, v_cache, kv_lens, scale):
    return torch.ops.fastgpt.attention_with_kvcache.default(q, k_cache, v_cache, kv_lens, scale)


@ATTENTION_WITH_KVCACHE.implement("triton", supports=_triton_kvcache_supports)
def _(q, k_cache, v_cache, kv_lens, scale):
    return torch.ops.fastgpt_triton.attention_with_kvcache.default(q, k_cache, v_cache, kv_lens,
                                                                   scale)


@ATTENTION_WITH_KVCACHE.implement("torch")
def _(q, k_cache, v_cache, kv_lens, scale):
    tq, t_max = q.shape[2], k_cache.shape[2]
    lengths = kv_lens.long()
    # Bottom-right causal over each row's valid prefix: query i sees keys j < len and
    # j <= len - tq + i.
    keys = torch.arange(t_max, device=q.device)
    last = lengths[:, None] - tq + torch.arange(tq, device=q.device)  # (B, Tq)
    visible = (keys[None, None, :] <= last[:, :, None]) & (keys < lengths[:, None, None])
    out = _torch_sdpa(q, k_cache, v_cache, attn_mask=visible[:, None], scale=scale,
                      enable_gqa=k_cache.shape[1] != q.shape[1])
    # torch's SDPA gives NaN (math backend) for a row whose mask hides every key; the kernels
    # give zeros, as documented.
    return out.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)


def _write_cache(k_cache, v_cache, cache_seqlens, k_new, v_new) -> Tensor:
    """Writes k_new / v_new into the caches in place at each row's position; returns the key
    count of each row afterwards (int32, (B,))."""
    if k_new is None:
        return cache_seqlens
    new = k_new.shape[2]
    pos = (cache_seqlens.long()[:, None] + torch.arange(new, device=k_cache.device))
    pos = pos[:, None, :, None]  # (B, 1, Tnew, 1)
    k_cache.scatter_(2, pos.expand(-1, k_cache.shape[1], -1, k_cache.shape[-1]), k_new)
    v_cache.scatter_(2, pos.expand(-1, v_cache.shape[1], -1, v_cache.shape[-1]), v_new)
    return cache_seqlens + new


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                           k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None, *,
                           scale: Optional[float] = None,
                           backend: Optional[str] = None) -> Tensor:
    """Attention of new queries over a KV cache, for decoding (no autograd).

    Args:
        q: ``(B, Hq, Tq, D)``, the queries of the newest Tq tokens of each row.
        k_cache, v_cache: ``(B, Hk, Tmax, D)`` and ``(B, Hk, Tmax, Dv)``, q's dtype and device;
            Hk divides Hq (GQA/MQA: kv head ``h // (Hq // Hk)`` serves query head h).
        cache_seqlens: ``(B,)`` int32, the tokens already in each row's cache (rows may differ).
        k_new, v_new: None, or ``(B, Hk, Tnew, D)`` / ``(B, Hk, Tnew, Dv)``: written **in place**
            into the caches at positions ``cache_seqlens[b] ... cache_seqlens[b] + Tnew - 1``
            before attending. cache_seqlens itself is not changed (add Tnew for the next step).
        scale: the scores' factor; None is ``1 / sqrt(D)``.
        backend: as for :func:`scaled_dot_product_attention`: "native" (C++ on CPU, split-KV
            CUDA kernels), "triton" (split-KV), "torch" (a masked SDPA) or None.

    Returns:
        ``(B, Hq, Tq, Dv)`` in q's dtype. Row b attends over its first ``n = cache_seqlens[b] +
        Tnew`` cache positions, causally and bottom-right aligned: query i sees keys
        ``j <= n - Tq + i`` (the last query sees all n; a query with no visible key gives zeros).

    Raises ValueError naming the argument for lengths past Tmax, shape, dtype or device mismatch.
    """
    _check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    with torch.no_grad():
        args = (q, k_cache, v_cache, cache_seqlens, _scale(q, scale))
        impl = ATTENTION_WITH_KVCACHE.choose(backend, q.device, *args)  # before any write
        kv_lens = _write_cache(k_cache, v_cache, cache_seqlens, k_new, v_new)
        return impl(q, k_cache, v_cache, kv_lens, _scale(q, scale))
