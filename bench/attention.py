"""Benchmark case `attention`: fastgpt.scaled_dot_product_attention against eager attention (the
L x S softmax materialised), torch.compile of it, and torch's SDPA, by default and through each
of its backends that runs on the device.

Work, FlashAttention's convention: a forward is 4 * B * H * L * S * D FLOPs (two GEMMs), halved
when causal; a backward is 2.5x the forward (five GEMMs, the scores recomputed); forward +
backward 3.5x. % gemm is that rate over the device's torch.matmul rate at the same dtype. Bytes
are q, k, v read and out written once (and their gradients in the backward), the least any
implementation moves. Shapes are B x H x T x D with L = S = T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.testing import eager_attention

from .harness import Contender, Problem, Workload, check_shapes, standard_contenders

VARIANTS = ("fwd", "bwd", "fwd+bwd")

# Default plan per device: rows of (dtype, (B, H, T, D), causal).
# CPU: the attention issue's CPU target shape (fp32, B=4, H=12, T=1024, D=64, causal).
# GPU: bf16, D=128, causal, T = 4k..16k with B*H*T constant, the GPU target; eager's
# float64 reference (the check) still fits an H100's 80 GB at every row.
PLAN = {
    "cpu": [(torch.float32, (4, 12, 1024, 64), True)],
    "cuda": [
        (torch.bfloat16, (4, 16, 4096, 128), True),
        (torch.bfloat16, (2, 16, 8192, 128), True),
        (torch.bfloat16, (1, 8, 16384, 128), True),
        (torch.bfloat16, (4, 16, 4096, 128), False),
    ],
}
QUICK_SHAPES = [(1, 2, 128, 32)]  # --quick: the whole path in seconds


def attention_flops(b: int, h: int, length: int, keys: int, d: int, causal: bool,
                    variant: str = "fwd") -> int:
    """FlashAttention's FLOP count of one call (see the module docstring)."""
    fwd = 4 * b * h * length * keys * d // (2 if causal else 1)
    return {"fwd": fwd, "bwd": fwd * 5 // 2, "fwd+bwd": fwd * 7 // 2}[variant]


def _sdpa_backends(device: str) -> list[tuple[str, Any]]:
    """torch SDPA backends worth timing on `device` (each may still refuse an input: then its
    row is "skipped")."""
    from torch.nn.attention import SDPBackend

    names = ["MATH", "FLASH_ATTENTION"]
    if device == "cuda":
        names += ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]
    return [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


@dataclass(frozen=True)
class AttentionCase:
    name: str = "attention"
    baselines: tuple[str, ...] = ("torch.eager", "torch.sdpa")

    def problems(
        self, device: str, dtypes: Sequence[torch.dtype] | None, quick: bool,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[Problem]:
        check_shapes(self.name, shapes, (4,), "BxHxTxD with all >= 1")
        plan = PLAN[device]
        plan_dtypes = list(dict.fromkeys(d for d, _, _ in plan))
        if shapes or quick:  # the user's shapes (causal), or the smoke test
            rows = [(d, shape, True) for d in dtypes or plan_dtypes
                    for shape in shapes or QUICK_SHAPES]
        else:
            rows = [(d, shape, causal) for d in dtypes or plan_dtypes
                    for plan_dtype, shape, causal in plan
                    if plan_dtype == (d if d in plan_dtypes else plan_dtypes[0])]
        return [Problem(variant + ("-causal" if causal else ""), shape, dtype,
                        self.bytes(variant, shape, dtype),
                        attention_flops(shape[0], shape[1], shape[2], shape[2], shape[3], causal,
                                        variant),
                        gemm_dtype=dtype)
                for dtype, shape, causal in rows for variant in VARIANTS]

    @staticmethod
    def bytes(variant: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """q, k, v read and out written (fwd); out's gradient, q, k, v (and out, lse) read and
        their gradients written (bwd)."""
        b, h, t, d = shape
        act = b * h * t * d * dtype.itemsize
        lse = b * h * t * 4
        fwd = 4 * act + lse
        bwd = 5 * act + lse + 3 * act
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[variant]

    def workload(self, problem: Problem, device: str) -> Workload:
        b, h, t, d = problem.shape
        generator = torch.Generator(device=device).manual_seed(0)
        base = problem.variant.split("-")[0]
        requires_grad = base != "fwd"

        def randn(*shape: int, leaf: bool = True) -> torch.Tensor:
            x = torch.randn(shape, generator=generator, device=device, dtype=problem.dtype)
            return x.requires_grad_(requires_grad and leaf)

        q, k, v = randn(b, h, t, d), randn(b, h, t, d), randn(b, h, t, d)
        grads = (randn(b, h, t, d, leaf=False),) if requires_grad else None
        return Workload((q, k, v), grads, with_forward=base == "fwd+bwd")

    def contenders(self, problem: Problem, device: str, compile: bool) -> list[Contender]:
        causal = problem.variant.endswith("-causal")

        def eager(q, k, v):
            return eager_attention(q, k, v, is_causal=causal)

        def fastgpt_fn(backend: str) -> Callable[..., Any]:
            return lambda q, k, v: fastgpt.scaled_dot_product_attention(
                q, k, v, is_causal=causal, backend=backend)

        contenders = standard_contenders(eager, fastgpt_fn, device, compile)
        sdpa = [Contender("torch.sdpa", lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal))]
        for name, backend in _sdpa_backends(device):
            sdpa.append(Contender(f"torch.sdpa[{name}]", _pinned(backend, causal), optional=True))
        # After eager and torch.compile, before fastgpt's rows: torch's alternatives side by side.
        first_fastgpt = next((i for i, c in enumerate(contenders) if c.name.startswith("fastgpt.")),
                             len(contenders))
        return contenders[:first_fastgpt] + sdpa + contenders[first_fastgpt:]


def _pinned(backend: Any, causal: bool) -> Callable[..., Any]:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


# Decoding plan per device: rows of (dtype, (B, Hq, Hk, T, D)), one new query per row over a
# cache of T tokens. CPU: GPT-2's attention (12 heads of 64), the model issue's CPU decode.
# GPU: a Llama-style GQA layer (32 query heads, 8 kv heads of 128), caches 1k..32k, batch 1
# (where split-KV must fill the GPU) and 8.
DECODE_PLAN = {
    "cpu": [(torch.float32, (b, 12, 12, t, 64)) for b in (1, 8) for t in (1024, 8192)],
    "cuda": [(torch.bfloat16, (b, 32, 8, t, 128)) for b in (1, 8)
             for t in (1024, 4096, 16384, 32768)],
}
DECODE_QUICK = [(1, 2, 1, 256, 32)]


@dataclass(frozen=True)
class DecodeCase:
    """Benchmark case `decode`: fastgpt.attention_with_kvcache for one new token per batch row
    over a full cache of T tokens (B x Hq x Hk x T x D), against eager attention (K/V repeated
    to every query head, as eager GQA code does), torch.compile of it, and torch's SDPA
    (enable_gqa). Bytes are the K and V cache read once plus q and out; % copy is the share of
    the device's copy bandwidth that reading reaches, the bound of decoding."""

    name: str = "decode"
    baselines: tuple[str, ...] = ("torch.eager", "torch.sdpa")

    def problems(
        self, device: str, dtypes: Sequence[torch.dtype] | None, quick: bool,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[Problem]:
        check_shapes(self.name, shapes, (5,), "BxHqxHkxTxD with all >= 1 and Hk dividing Hq",
                     valid=lambda s: s[1] % s[2] == 0)
        plan = DECODE_PLAN[device]
        plan_dtypes = list(dict.fromkeys(d for d, _ in plan))
        rows = [(d, shape) for d in dtypes or plan_dtypes
                for shape in shapes or (DECODE_QUICK if quick else [s for _, s in plan])]
        return [Problem("decode", shape, dtype, self.bytes(shape, dtype),
                        4 * shape[0] * shape[1] * shape[3] * shape[4], tokens=shape[0])
                for dtype, shape in rows]

    @staticmethod
    def bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        b, hq, hk, t, d = shape
        return (2 * b * hk * t * d + 2 * b * hq * d) * dtype.itemsize

    def workload(self, problem: Problem, device: str) -> Workload:
        b, hq, hk, t, d = problem.shape
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device, dtype=problem.dtype)

        lengths = torch.full((b,), t, dtype=torch.int32, device=device)
        return Workload((randn(b, hq, 1, d), randn(b, hk, t, d), randn(b, hk, t, d), lengths))

    def contenders(self, problem: Problem, device: str, compile: bool) -> list[Contender]:
        group = problem.shape[1] // problem.shape[2]

        def eager(q, k_cache, v_cache, lengths):
            k = k_cache.repeat_interleave(group, dim=1)
            v = v_cache.repeat_interleave(group, dim=1)
            return eager_attention(q, k, v)

        def fastgpt_fn(backend: str) -> Callable[..., Any]:
            return lambda q, k_cache, v_cache, lengths: fastgpt.attention_with_kvcache(
                q, k_cache, v_cache, lengths, backend=backend)

        contenders = standard_contenders(eager, fastgpt_fn, device, compile)
        sdpa = Contender("torch.sdpa", lambda q, k, v, lengths: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=group > 1))
        first_fastgpt = next((i for i, c in enumerate(contenders) if c.name.startswith("fastgpt.")),
                             len(contenders))
        return contenders[:first_fastgpt] + [sdpa] + contenders[first_fastgpt:]


CASES = (AttentionCase(), DecodeCase())
