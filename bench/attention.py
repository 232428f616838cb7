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

from .harness import Contender, Problem, Workload, standard_contenders

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
        for shape in shapes or ():
            if len(shape) != 4 or min(shape) < 1:
                raise ValueError(f"{self.name} takes shapes BxHxTxD with all >= 1, got "
                                 f"{'x'.join(map(str, shape))}")
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


CASES = (AttentionCase(),)
