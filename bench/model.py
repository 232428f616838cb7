"""Benchmark case `model`: fastgpt.model.GPT end to end, on each fastgpt backend, against the
same model on the "torch" backend (eager PyTorch: F.layer_norm, F.linear, SDPA), torch.compile
of that eager model, and transformers' GPT2LMHeadModel on the same weights (where transformers
is installed).

Variants, named ``<kind>-<preset>`` (the GPTConfig preset), shapes:
  * train, B x T:    one optimizer step: forward and loss, backward, clip_grad_norm_(1.0) and
    AdamW. Parameters are fp32; at bf16/fp16 the forward runs under torch.autocast (mixed
    precision, as one trains). tokens/s = B*T per step; FLOPs 3x the forward's.
  * prefill, B x T:  the forward pass without gradients, logits at every position
    (``model(idx)``); tokens/s = B*T per call. Weights in the problem's dtype.
  * decode, B x P x N:  greedy ``generate`` of N new tokens after a P-token prompt, its prefill
    included, with the KV cache; tokens/s = B*N per call. Weights in the problem's dtype.

Work: the GEMMs are 2 FLOPs per weight of the projections (qkv, attention output, MLP,
lm_head) per token, the attention FlashAttention's count (bench/attention.py); % gemm is
over the device's torch.matmul rate at the dtype. train and prefill are compute bound and state
FLOPs only (no GB/s). Decoding is memory bound: its bytes are the weights read once per pass
(the prompt's pass, then one per new token but the last) plus the K and V cache each pass reads
and writes, so % copy is the share of the device's copy bandwidth that decoding reaches, the
bandwidth bound.

Checks before timing: train, the first step's loss and gradient norm; prefill, the logits; both
by the accuracy rule against eager's model in float64. decode, the generated tokens: greedy
decoding near a tie may pick either token, so each generated token must be the float64 model's
most likely token at its position (the tokens before it as they were generated) to within
twice the logit error the rule allows (2 x eager's, measured on the same sequence), plus the
rule's floor. A token that is not near the top fails; a near-tie does not.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.model import GPT, GPTConfig
from fastgpt.testing import CHECK_TOLERANCE

from .attention import attention_flops
from .harness import Contender, Problem, Workload, check_shapes, fastgpt_backends

KINDS = ("train", "prefill", "decode")

# Default plans, rows of (dtype, kind, preset, shape). CPU, fp32: the model issue's CPU
# targets, the "small" preset's training step (and prefill) at 8 x 256, and GPT-2 124M greedy
# decoding at batch 1, 8 new tokens after a 1-token prompt. Sized to the CPU timer, which makes
# at least 11 calls per contender: measured here (2 shared cores), a call of 16 tokens at batch
# 1 and 8 took 1.2 and 2.6 s, the case 9.5 minutes with batch 8 and 16 tokens; each compiled
# decoding step costs ~20-40 s to compile. Batch 8 on the CPU: ``--shape 8x1x8``. GPU, bf16:
# GPT-2 124M at 8 x 1024, and decoding 255 new tokens after a 1-token prompt (the cache ends at
# 256 tokens) at batch 1 and 8.
PLAN = {
    "cpu": [
        (torch.float32, "train", "small", (8, 256)),
        (torch.float32, "prefill", "small", (8, 256)),
        (torch.float32, "decode", "gpt2", (1, 1, 8)),
    ],
    "cuda": [
        (torch.bfloat16, "train", "gpt2", (8, 1024)),
        (torch.bfloat16, "prefill", "gpt2", (8, 1024)),
        (torch.bfloat16, "decode", "gpt2", (1, 1, 255)),
        (torch.bfloat16, "decode", "gpt2", (8, 1, 255)),
    ],
}
QUICK = [("train", "tiny", (2, 32)), ("prefill", "tiny", (2, 32)),
         ("decode", "tiny", (1, 1, 4)), ("decode", "tiny", (2, 3, 4))]

# transformers' attention implementation for its contender (torch's SDPA, as fastgpt's eager).
HF_ATTENTION = "sdpa"
AMP_DTYPES = (torch.bfloat16, torch.float16)  # a training step at these runs under autocast
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.1, 1.0


def parse_variant(variant: str) -> tuple[str, str]:
    """("decode", "gpt2") from "decode-gpt2"."""
    kind, preset = variant.split("-", 1)
    return kind, preset


def _has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _gemm_weights(config: GPTConfig) -> int:
    """Weights of the projections a token goes through (embedding lookups are not GEMMs)."""
    c, h = config.n_embd, config.hidden
    return config.n_layer * (3 * c * c + c * c + 2 * c * h) + config.vocab_size * c


def _weight_bytes(config: GPTConfig, dtype: torch.dtype) -> int:
    """Bytes of the weights one pass reads: every parameter but the position embeddings (a
    pass reads only its positions' rows)."""
    with torch.device("meta"):
        model = GPT(config)
    return (model.num_parameters() - model.transformer.wpe.weight.numel()) * dtype.itemsize


def model_problem(kind: str, preset: str, shape: tuple[int, ...], dtype: torch.dtype) -> Problem:
    """The Problem of one row: its work (see the module docstring) and tokens per call."""
    config = GPTConfig.from_preset(preset)
    layers, heads, head_dim = config.n_layer, config.n_head, config.n_embd // config.n_head
    gemm = 2 * _gemm_weights(config)  # forward FLOPs per token
    variant = f"{kind}-{preset}"
    if kind in ("train", "prefill"):
        b, t = shape
        if kind == "train":
            flops = 3 * gemm * b * t + layers * attention_flops(b, heads, t, t, head_dim, True,
                                                                "fwd+bwd")
        else:
            flops = gemm * b * t + layers * attention_flops(b, heads, t, t, head_dim, True)
        return Problem(variant, shape, dtype, 0, flops, gemm_dtype=dtype, tokens=b * t)
    b, p, n = shape
    # Pass 0 is the prompt's (P tokens; it writes their K and V), pass i > 0 one token over
    # P + i cached ones; the N-th token needs no pass after it.
    cached = n * p + n * (n - 1) // 2  # tokens of K and V read or written, summed over passes
    cache_bytes = b * layers * 2 * cached * config.n_embd * dtype.itemsize
    flops = gemm * b * (p + n - 1) + layers * (
        attention_flops(b, heads, p, p, head_dim, True)
        + sum(attention_flops(b, heads, 1, p + i, head_dim, False) for i in range(1, n)))
    return Problem(variant, shape, dtype, n * _weight_bytes(config, dtype) + cache_bytes, flops,
                   tokens=b * n)


def _build(preset: str, device: str) -> GPT:
    """GPT-2's init of `preset`, the same weights every time (fp32, on `device`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset(preset))
    return model.to(device)


def _transformers_model(model: GPT) -> torch.nn.Module:
    """transformers' GPT2LMHeadModel on `model`'s weights, through the checkpoint format both
    share (GPT.save_pretrained, GPT2LMHeadModel.from_pretrained)."""
    import transformers
    from transformers.utils import logging

    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        # No begin/end-of-text tokens: every contender generates exactly N tokens (transformers'
        # GPT-2 default names 50256 as both; with min_new_tokens it would mask that logit, and
        # outside a smaller vocabulary it warns).
        config = json.loads((Path(path) / "config.json").read_text())
        config.update(bos_token_id=None, eos_token_id=None)
        (Path(path) / "config.json").write_text(json.dumps(config))
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            hf = transformers.GPT2LMHeadModel.from_pretrained(path,
                                                              attn_implementation=HF_ATTENTION)
        finally:
            if bar:
                logging.enable_progress_bar()
        # Parameters owned by the model, whatever the loader maps from the file.
        for p in hf.parameters():
            p.data = p.data.clone()
    weight = model.lm_head.weight
    hf = hf.to(device=weight.device, dtype=weight.dtype)
    hf.generation_config.pad_token_id = 0  # never used (no padding), but generate asks for one
    return hf


def _unavailable(error: Exception) -> Callable[..., Any]:
    def fail(*args: Any) -> Any:
        raise error
    return fail


@dataclass(frozen=True)
class ModelCase:
    name: str = "model"
    baselines: tuple[str, ...] = ("torch.eager", "torch.compile", f"transformers[{HF_ATTENTION}]")

    def problems(
        self, device: str, dtypes: Sequence[torch.dtype] | None, quick: bool,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[Problem]:
        plan = PLAN[device]
        presets = {k: p for _, k, p, _ in plan}
        if quick:
            presets = {k: p for k, p, _ in QUICK}
        check_shapes(self.name, shapes, (2, 3), "BxT (train and prefill) or BxPxN (decode: "
                     "prompt and new tokens), all >= 1")
        for shape in shapes or ():
            kind = "train" if len(shape) == 2 else "decode"
            length = shape[1] if len(shape) == 2 else shape[1] + shape[2]
            block = GPTConfig.from_preset(presets[kind]).block_size
            if length > block:
                raise ValueError(f"{self.name}: shape {'x'.join(map(str, shape))} needs {length} "
                                 f"positions, more than preset {presets[kind]!r}'s block_size "
                                 f"{block}")
        plan_dtypes = list(dict.fromkeys(d for d, *_ in plan))
        if shapes:
            rows = [(k, presets[k], s) for s in shapes
                    for k in (("train", "prefill") if len(s) == 2 else ("decode",))]
        elif quick:
            rows = list(QUICK)
        else:
            rows = None
        if rows is not None:
            chosen = [(d, *row) for d in dtypes or plan_dtypes[:1] for row in rows]
        elif not dtypes:
            chosen = plan
        else:
            chosen = [row for row in plan if row[0] in dtypes] + [
                (d, *row[1:]) for d in dtypes if d not in plan_dtypes for row in plan]
        return [model_problem(kind, preset, shape, dtype) for dtype, kind, preset, shape in chosen]

    def workload(self, problem: Problem, device: str) -> Workload:
        kind, preset = parse_variant(problem.variant)
        vocab = GPTConfig.from_preset(preset).vocab_size
        g = torch.Generator(device=device).manual_seed(0)

        def tokens(*shape: int) -> torch.Tensor:
            return torch.randint(0, vocab, shape, generator=g, device=device)

        # `precision` is an empty tensor of the problem's dtype; a contender runs at its dtype.
        # The harness's float64 reference upcasts floating arguments, so eager's contender then
        # gets a float64 one and runs its float64 copy of the model.
        precision = torch.empty(0, device=device, dtype=problem.dtype)
        if kind == "train":
            b, t = problem.shape
            return Workload((tokens(b, t), tokens(b, t), precision))
        if kind == "prefill":
            return Workload((tokens(*problem.shape), precision))
        b, p, _ = problem.shape
        return Workload((tokens(b, p), precision))

    def contenders(self, problem: Problem, device: str, compile: bool) -> list[Contender]:
        kind, preset = parse_variant(problem.variant)
        build = {"train": _train_contenders, "prefill": _prefill_contenders,
                 "decode": _decode_contenders}[kind]
        return build(problem, preset, device, compile)

    def notes(self, device: str) -> list[str]:
        notes = [
            "train: forward + loss, backward, clip_grad_norm_(1.0), AdamW (lr 1e-4, weight "
            "decay 0.1); fp32 parameters, torch.autocast at bf16/fp16; each contender steps "
            "its own copy of the same initial weights",
            "prefill: model(idx) without gradients, logits at every position",
            "decode BxPxN: generate(prompt, N, temperature=0), greedy, KV cache, the prompt's "
            "prefill included; tokens/s = B*N/time; GB/s and % copy: weights read once per "
            "pass plus the KV cache each pass reads, over the copy bandwidth (the bound)",
            "torch.compile: the eager model (torch backend) compiled, dynamic=False; decode: "
            "generate(compile=True), its one-token step compiled, the prefill eager; "
            "fastgpt.<backend>+compile: the same on fastgpt's backend",
        ]
        if _has_transformers():
            notes.append(f"transformers[{HF_ATTENTION}]: GPT2LMHeadModel.from_pretrained of "
                         f"the same weights (GPT.save_pretrained), attn_implementation="
                         f"{HF_ATTENTION!r}; prefill with use_cache=False; decode "
                         "generate(do_sample=False, max_new_tokens=N, min_new_tokens=N), its "
                         "default DynamicCache, no stop token")
        else:
            notes.append("transformers: not installed, its contender not run")
        if device == "cpu":
            notes.append("peak memory: not measured on the CPU (torch's CPU allocator keeps no "
                         "statistics); on CUDA, the first call's peak above what was allocated "
                         "before it (train: the first step, optimizer state included)")
        return notes


# ------------------------------------------------------------------------------ contenders


def _auto_backends(device: str) -> list[tuple[str, str | None]]:
    """(contender name suffix, backend) of fastgpt: each usable backend, and the automatic
    choice where it has more than one to choose from."""
    backends = fastgpt_backends(device)
    rows: list[tuple[str, str | None]] = [(b, b) for b in backends]
    if len(backends) > 1:
        rows.append(("auto", None))
    return rows


def _order(eager: Contender, compiled: Contender | None, hf: Contender | None,
           fastgpt_rows: list[Contender]) -> list[Contender]:
    return [eager] + [c for c in (compiled, hf) if c is not None] + fastgpt_rows


def _transformers_contender(make_fn: Callable[[torch.nn.Module], Callable[..., Any]],
                            model: GPT, check: Callable | None = None) -> Contender | None:
    if not _has_transformers():
        return None
    name = f"transformers[{HF_ATTENTION}]"
    try:
        fn = make_fn(_transformers_model(model))
    except Exception as e:  # noqa: BLE001 - reported in its row as "skipped"
        fn = _unavailable(e)
    return Contender(name, fn, checked=True, optional=True, check=check)


def _train_contenders(problem: Problem, preset: str, device: str, compile: bool) -> list[Contender]:
    base = _build(preset, device)  # never stepped: each contender trains its own copy
    amp = problem.dtype if problem.dtype in AMP_DTYPES else None

    def step_fn(model: torch.nn.Module, forward: Callable[[Any, Any], Any], backend: str | None,
                autocast: torch.dtype | None) -> Callable[..., Any]:
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        model.train()

        def step(idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mixed = (torch.autocast(device, dtype=autocast) if autocast is not None
                     else contextlib.nullcontext())
            with fastgpt.use_backend(backend):
                with mixed:
                    loss = forward(idx, targets)
                loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach(), norm

        return step

    def ours(model: GPT, backend: str | None, compiled: bool = False) -> Callable[..., Any]:
        net = torch.compile(model, dynamic=False) if compiled else model
        step = step_fn(model, lambda idx, targets: net(idx, targets)[1], backend, amp)
        return lambda idx, targets, precision: step(idx, targets)

    eager_model = copy.deepcopy(base)
    eager_step = step_fn(eager_model, lambda idx, targets: eager_model(idx, targets)[1],
                         "torch", amp)
    reference: list[Callable[..., Any]] = []  # the float64 copy's step, made on first use

    def eager(idx, targets, precision):
        if precision.dtype != torch.float64:
            return eager_step(idx, targets)
        if not reference:
            model64 = copy.deepcopy(base).double()
            reference.append(step_fn(model64, lambda i, t: model64(i, t)[1], "torch", None))
        return reference[0](idx, targets)

    compiled = (Contender("torch.compile", ours(copy.deepcopy(base), "torch", compiled=True),
                          optional=True) if compile else None)

    def hf_step(hf: torch.nn.Module) -> Callable[..., Any]:
        def forward(idx, targets):
            logits = hf(idx, use_cache=False).logits  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=-1)
        step = step_fn(hf, forward, None, amp)
        return lambda idx, targets, precision: step(idx, targets)

    hf = _transformers_contender(hf_step, base)
    rows = [Contender(f"fastgpt.{name}", ours(copy.deepcopy(base), backend), checked=True)
            for name, backend in _auto_backends(device)]
    return _order(Contender("torch.eager", eager), compiled, hf, rows)


def _inference_model(problem: Problem, preset: str, device: str) -> tuple[GPT, Callable[[], GPT]]:
    """The model at the problem's dtype (shared by the contenders that do not compile) and a
    maker of its float64 copy (built once, on first use)."""
    model = _build(preset, device).to(problem.dtype).eval()
    copies: list[GPT] = []

    def model64() -> GPT:
        if not copies:
            copies.append(copy.deepcopy(model).double())
        return copies[0]

    return model, model64


def _prefill_contenders(problem: Problem, preset: str, device: str,
                        compile: bool) -> list[Contender]:
    model, model64 = _inference_model(problem, preset, device)

    def ours(net: Callable[..., Any], backend: str | None) -> Callable[..., Any]:
        def prefill(idx, precision):
            with torch.no_grad(), fastgpt.use_backend(backend):
                return net(idx)[0]  # (B, T, V)
        return prefill

    def eager(idx, precision):
        net = model64() if precision.dtype == torch.float64 else model
        return ours(net, "torch")(idx, precision)

    compiled = (Contender("torch.compile", ours(torch.compile(model, dynamic=False), "torch"),
                          optional=True) if compile else None)

    def hf_prefill(hf: torch.nn.Module) -> Callable[..., Any]:
        def prefill(idx, precision):
            with torch.no_grad():
                return hf(idx, use_cache=False).logits
        return prefill

    hf = _transformers_contender(hf_prefill, model)
    rows = [Contender(f"fastgpt.{name}", ours(model, backend), checked=True)
            for name, backend in _auto_backends(device)]
    return _order(Contender("torch.eager", eager), compiled, hf, rows)


def _decode_contenders(problem: Problem, preset: str, device: str,
                       compile: bool) -> list[Contender]:
    model, model64 = _inference_model(problem, preset, device)
    new_tokens = problem.shape[2]
    check = greedy_check(model, model64, problem.shape[1])

    def ours(net: GPT, backend: str | None, compiled: bool = False) -> Callable[..., Any]:
        def decode(prompt, precision):
            with fastgpt.use_backend(backend):
                return net.generate(prompt, new_tokens, temperature=0.0, compile=compiled)
        return decode

    def eager(prompt, precision):
        net = model64() if precision.dtype == torch.float64 else model
        return ours(net, "torch")(prompt, precision)

    # Compiled contenders decode on copies: generate(compile=True) keeps its compiled step on
    # the model, traced on the backend of its first call.
    compiled = (Contender("torch.compile", ours(copy.deepcopy(model), "torch", compiled=True),
                          optional=True) if compile else None)

    def hf_decode(hf: torch.nn.Module) -> Callable[..., Any]:
        def decode(prompt, precision):
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return decode

    hf = _transformers_contender(hf_decode, model, check)
    rows = [Contender(f"fastgpt.{name}", ours(model, backend), checked=True, check=check)
            for name, backend in _auto_backends(device)]
    if compile:
        # One compiled fastgpt contender: the automatic choice (the only backend where just one
        # is usable), as a user gets it from generate(compile=True).
        backends = fastgpt_backends(device)
        backend = backends[0] if len(backends) == 1 else None
        name = f"fastgpt.{backend or 'auto'}+compile"
        rows.append(Contender(name, ours(copy.deepcopy(model), backend, compiled=True),
                              checked=True, check=check))
    return _order(Contender("torch.eager", eager), compiled, hf, rows)


def greedy_check(model: GPT, model64: Callable[[], GPT], prompt_len: int
                 ) -> Callable[[Any, Any, Any], str | None]:
    """The decode check (see the module docstring): (tokens, eager's tokens, float64 eager's
    tokens) -> None or what failed. `model` is the model at the problem's dtype, `model64`
    gives its float64 copy."""

    def check(out: Any, eager: Any, reference: Any) -> str | None:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.long or out.shape != eager.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return f"returned {shape}, eager {eager.dtype} {tuple(eager.shape)}"
        if not torch.equal(out[:, :prompt_len], eager[:, :prompt_len]):
            return "the output does not begin with the prompt"
        with torch.no_grad(), fastgpt.use_backend("torch"):
            # Logits at the positions that chose the new tokens: (B, N, V)
            want = model64()(out[:, :-1])[0][:, prompt_len - 1:]
            at_dtype = model(out[:, :-1])[0][:, prompt_len - 1:].double()
        chosen = want.gather(-1, out[:, prompt_len:, None])[..., 0]  # (B, N)
        deficit = want.max(dim=-1).values - chosen  # (B, N), >= 0
        eager_error = (at_dtype - want).abs().max().item()
        floor = CHECK_TOLERANCE.get(model.lm_head.weight.dtype, CHECK_TOLERANCE[torch.float32])
        floor *= want.square().mean().sqrt().item()
        # Logits off by e each pick a token at most 2e below the best; the rule allows 2x eager's e.
        allowed = 2 * (2 * eager_error) + floor
        worst = deficit.max().item()
        if not worst <= allowed:
            b, i = divmod(int(deficit.argmax()), deficit.shape[1])
            return (f"new token {i} of row {b} ({int(out[b, prompt_len + i])}) is "
                    f"{worst:.3g} below the float64 model's best logit there; allowed {allowed:.3g} "
                    f"(2 x 2 x eager's logit error {eager_error:.3g} + floor {floor:.3g})")
        return None

    return check


CASES = (ModelCase(),)
