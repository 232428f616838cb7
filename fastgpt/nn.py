"""Drop-in modules.

The norms have the constructor arguments and state_dict keys of torch.nn's and subclass them,
so checkpoints load unchanged and ``isinstance(m, torch.nn.LayerNorm)`` still holds; only
``forward`` differs: it runs fastgpt's op and also accepts a ``residual`` for the fused pre-norm
add. :class:`Linear` is ``torch.nn.Linear`` with a fused activation and residual.
:class:`CausalSelfAttention` is nanoGPT's module of that name (same parameters and
state_dict keys) on fastgpt's attention, with grouped kv heads and a KV cache for decoding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .attention import attention_with_kvcache, scaled_dot_product_attention
from .layernorm import NormOutput, layer_norm, rms_norm
from .linear import GATED, linear


def _flatten_last(t: torch.Tensor, k: int) -> torch.Tensor:
    """Merge the last k dims: normalising over k dims equals normalising over their product."""
    return t if k == 1 else t.reshape(*t.shape[: t.dim() - k], -1)


class _FusedNorm:
    """The forward shared by both modules (mixin; the torch.nn parent holds the state)."""

    backend: Optional[str] = None

    def _run(self, fn, x, residual, eps, **params) -> NormOutput:
        shape = tuple(self.normalized_shape)
        k = len(shape)
        if tuple(x.shape[x.dim() - k:]) != shape:
            raise ValueError(f"{type(self).__name__}: input's last dims {tuple(x.shape)} do not "
                             f"match normalized_shape {shape}")
        params = {name: (p.reshape(-1) if p is not None else None) for name, p in params.items()}
        out = fn(_flatten_last(x, k),
                 residual=_flatten_last(residual, k) if residual is not None else None,
                 eps=eps, backend=self.backend, **params)
        if residual is None:
            return out.view(x.shape)
        y, h = out
        return y.view(x.shape), h.view(x.shape)


class LayerNorm(_FusedNorm, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on fastgpt's fused kernel.

    ``forward(x, residual=None)``: x is ``(..., *normalized_shape)``. With a residual of x's
    shape it returns ``(norm(x + residual), x + residual)`` from one pass.
    ``backend`` (attribute, default None) pins a backend for this module.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> NormOutput:
        return self._run(layer_norm, x, residual, weight=self.weight, bias=self.bias,
                         eps=self.eps)


class RMSNorm(_FusedNorm, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on fastgpt's fused kernel.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in torch. ``forward(x, residual=None)``
    as for :class:`LayerNorm`.
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> NormOutput:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return self._run(rms_norm, x, residual, weight=self.weight, eps=eps)


class KVCache:
    """Per-layer decoding state of :class:`CausalSelfAttention`: ``k``/``v`` of shape
    ``(B, Hk, max_len, head_dim)`` and ``seqlens`` ``(B,)`` int32, the tokens held per row
    (rows may hold different counts; set ``seqlens`` to start rows at other positions)."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of rows ``start:stop`` as views: writes through it (k, v, and advancing
        ``seqlens`` in place) land in this cache. For prompts of different lengths, each
        prefilled on its own rows."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        view.seqlens = self.seqlens[start:stop]
        return view


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` with the activation (and an optional residual) fused into the GEMM.

    ``forward(x, residual=None)`` is ``activation(x @ weight.T + bias) + residual``; see
    :func:`fastgpt.linear` for the activations. Parameters and state_dict keys are
    ``torch.nn.Linear``'s; with a gated activation ("swiglu", "geglu") ``weight`` has
    ``2 * out_features`` rows (and ``bias`` 2 * out_features entries): the gate projection's
    rows first, then the up projection's. ``backend`` (attribute, default None) pins a backend.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        rows = 2 * out_features if activation in GATED else out_features
        super().__init__(in_features, rows, bias, device, dtype)
        # torch.nn.Linear's init, reading out_features as the weight's rows; restore the
        # module's real output width.
        self.out_features = out_features
        self.activation = activation
        self.backend = backend
        linear(torch.empty(0, in_features, device=self.weight.device, dtype=self.weight.dtype),
               self.weight, self.bias, activation, backend="torch")  # checks the activation

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.activation, residual, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"


class CausalSelfAttention(torch.nn.Module):
    """nanoGPT's causal self-attention on :func:`fastgpt.scaled_dot_product_attention`.

    ``c_attn`` projects x ``(B, T, n_embd)`` to q, k, v in one GEMM and ``c_proj`` projects
    the heads back; with ``n_kv_head == n_head`` (the default) the parameters and state_dict
    keys are nanoGPT's, so its checkpoints load unchanged. ``n_kv_head`` < n_head (dividing
    it) gives grouped-query attention: c_attn then has ``n_embd + 2 * n_kv_head * head_dim``
    outputs, q's first. ``dropout`` applies to the attention weights (in training; served by
    the torch backend) and to the output, as in nanoGPT.

    ``forward(x, cache=None)``: without a cache, causal attention over x's T tokens. With a
    :class:`KVCache` (from :meth:`new_cache`), x holds each row's next T tokens: their k and v
    are written into the cache at each row's position, the queries attend over everything the
    row holds, and ``cache.seqlens`` advances by T (in place). ``backend`` (constructor
    argument) pins a backend for the attention and both projections (:class:`Linear`).
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_head: Optional[int] = None,
                 bias: bool = True, dropout: float = 0.0, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head:
            raise ValueError(f"CausalSelfAttention: n_embd={n_embd} must be a multiple of "
                             f"n_head={n_head}")
        if n_kv_head < 1 or n_head % n_kv_head:
            raise ValueError(f"CausalSelfAttention: n_kv_head={n_kv_head} must divide "
                             f"n_head={n_head}")
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.c_attn = Linear(n_embd, n_embd + 2 * n_kv_head * self.head_dim, bias=bias,
                             backend=backend, **factory)
        self.c_proj = Linear(n_embd, n_embd, bias=bias, backend=backend, **factory)
        self.resid_dropout = torch.nn.Dropout(dropout)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens, in the dtype k and v will
        have: torch.autocast's where it is on for the weights' device, else the weights'."""
        w = self.c_attn.weight
        dtype = w.dtype
        if torch.is_autocast_enabled(w.device.type):
            dtype = torch.get_autocast_dtype(w.device.type)
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim, dtype=dtype,
                       device=w.device)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv, kv], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is None:
            y = scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True,
                enable_gqa=self.n_kv_head != self.n_head, backend=self.backend)
        else:
            y = attention_with_kvcache(q, cache.k, cache.v, cache.seqlens, k, v,
                                       backend=self.backend)
            cache.seqlens += T
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


__all__ = ["CausalSelfAttention", "KVCache", "LayerNorm", "Linear", "RMSNorm"]
