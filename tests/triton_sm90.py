"""Compile the Triton kernels for an H100 (sm_90a) on a machine without a GPU.

Run as a script (``python tests/triton_sm90.py [suite ...] [--jobs N]``) in a process where
TRITON_INTERPRET is unset: the Triton JIT, not the interpreter, must own the kernels. It makes
Triton believe the current device is a CUDA sm_90 GPU, turns every kernel launch into a
compile-only warm-up, and then calls the real launchers of fastgpt.kernels on CPU tensors over
each op's matrix of cases (dtypes, sizes, options). So the kernels compiled are exactly the
variants (block size, warps, constexpr flags, pointer alignment) that a launch on a GPU would
compile, and what reaches the GPU is checked down to the cubin even where none is lent.

An autotuned kernel would benchmark its configs at the first launch; here it compiles them
instead: every config its pruning keeps for the launch's arguments (the configs the autotuner
could pick), or, for a case marked ``configs="first"``, the first of them only (to keep the
run short; every config is still compiled at full strength in some other case).

For each compiled kernel it prints one JSON line: the suite (op), the case, the kernel, the
launch config, ptxas's register and spill counts (ptxas -v on the PTX, for sm_90a), the shared
memory the kernel is compiled to use, whether its PTX holds tensor-core instructions (any,
and Hopper's wgmma) and whether it loads through TMA (cp.async.bulk.tensor). It
exits non-zero on the first error. tests/test_triton_sm90.py runs it and checks the output.
"""
import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}

# ----------------------------------------------------------------------------------------------
# layernorm: kernels/layernorm.py
# ----------------------------------------------------------------------------------------------

# Every layout and warp count the launchers pick: one warp up to hidden 256 (fp32), row in
# registers with 4..16 warps, the backward's last in-register size (8192), then looped rows.
HIDDEN = (17, 768, 4096, 8192, 16384, 65536)
# (op, options) at the heaviest register use, compiled at every size...
FULL = (("fwd", dict(rms=False, residual=True, affine=True)),
        ("bwd", dict(rms=False, dh=True, affine=True)))
# ...and the other constexpr branches, at one in-register and one looped size.
LIGHT = (("fwd", dict(rms=True, residual=False, affine=True)),
         ("fwd", dict(rms=False, residual=False, affine=False)),
         ("bwd", dict(rms=True, dh=False, affine=True)),
         ("bwd", dict(rms=False, dh=False, affine=False)))
LIGHT_HIDDEN = (768, 65536)
# Mixed precision: float32 weight and bias beside 16-bit x (the kernels load them as they are).
MIXED = tuple((op, dict(opts, params_fp32=True)) for op, opts in FULL)
MIXED_DTYPES = ("fp16", "bf16")
MIXED_HIDDEN = (4096, 8192, 65536)


def _layernorm_cases():
    for dtype_name in DTYPES:
        sizes = (768, 65536) if dtype_name == "fp64" else HIDDEN
        for n in sizes:
            for op, opts in FULL:
                yield dict(op=op, dtype=dtype_name, hidden=n, **opts)
        for n in LIGHT_HIDDEN:
            for op, opts in LIGHT:
                yield dict(op=op, dtype=dtype_name, hidden=n, **opts)
        if dtype_name in MIXED_DTYPES:
            for n in MIXED_HIDDEN:
                for op, opts in MIXED:
                    yield dict(op=op, dtype=dtype_name, hidden=n, **opts)


def _layernorm_launch(case):
    from fastgpt.kernels import layernorm as kernels

    rows, n, dtype = 8, case["hidden"], DTYPES[case["dtype"]]
    x = torch.randn(rows, n, dtype=dtype)
    param_dtype = torch.float32 if case.get("params_fp32") else dtype
    weight = torch.ones(n, dtype=param_dtype) if case["affine"] else None
    if case["op"] == "fwd":
        bias = torch.zeros(n, dtype=param_dtype) if case["affine"] and not case["rms"] else None
        residual = torch.randn(rows, n, dtype=dtype) if case["residual"] else None
        kernels.norm_fwd(x, weight, bias, residual, 1e-5, case["rms"])
    else:
        stats = torch.float64 if dtype == torch.float64 else torch.float32
        mean = None if case["rms"] else torch.zeros(rows, dtype=stats)
        rstd = torch.ones(rows, dtype=stats)
        dy = torch.randn(rows, n, dtype=dtype)
        dh = torch.randn(rows, n, dtype=dtype) if case["dh"] else None
        affine = case["affine"]
        kernels.norm_bwd(dy, dh, x, weight, mean, rstd, case["rms"], affine,
                         affine and not case["rms"])


# ----------------------------------------------------------------------------------------------
# attention: kernels/attention.py
# ----------------------------------------------------------------------------------------------

# Head dims: one per row of the launcher's config tables (padded head dim 64, 128, 256); 72, a
# multiple of 8 but not of 16 (rows 16-byte aligned only through the kernels' stride units);
# and 111, whose inputs the launchers copy to zero-padded rows and whose outputs have rows at
# any alignment.
ATTN_HEAD_DIMS = (64, 128, 256, 72, 111)
# Sequence lengths: several blocks of every config, multiples of 16 (the usual training case).
ATTN_SEQ = 512
# (dtype, head dims, causal, configs) per group of cases, each compiled forward and backward.
# Every config of every table row is compiled where the kernels hold most registers: fp16,
# causal (the diagonal loop adds the mask's registers), at each row's head dim. The other
# combinations share the kernels' structure and tile shapes with those, so they compile the
# first config of their row each, which holds them to the same checks (tensor cores, spills,
# shared memory) at a fraction of the compile time. fp32 (exact fp32 products, one config per
# head dim) at one small size, and causal at the largest (its other config).
ATTN_GROUPS = (
    ("fp16", (64, 128, 256), (True,), "all"),
    ("fp16", (64, 128, 256), (False,), "first"),
    ("fp16", (72, 111), (False, True), "first"),
    ("bf16", (64, 128, 256, 72), (False, True), "first"),
    ("fp32", (64,), (False, True), "all"),
    ("fp32", (256,), (True,), "all"),
)


def _attention_cases():
    for dtype_name, head_dims, causals, configs in ATTN_GROUPS:
        for head_dim in head_dims:
            for causal in causals:
                for op in ("fwd", "bwd"):
                    yield dict(op=op, dtype=dtype_name, head_dim=head_dim, causal=causal,
                               configs=configs)


def _attention_launch(case):
    from fastgpt.kernels import attention as kernels

    # GQA (2 query heads per kv head): the dk/dv kernel's loop over the group is compiled.
    dtype, e, n = DTYPES[case["dtype"]], case["head_dim"], ATTN_SEQ
    q = torch.randn(1, 4, n, e, dtype=dtype)
    k = torch.randn(1, 2, n, e, dtype=dtype)
    v = torch.randn(1, 2, n, e, dtype=dtype)
    if case["op"] == "fwd":
        kernels.attention_fwd(q, k, v, case["causal"], e ** -0.5)
    else:
        out = torch.randn(1, 4, n, e, dtype=dtype)
        lse = torch.zeros(1, 4, n, dtype=torch.float32)
        kernels.attention_bwd(out, q, k, v, out, lse, case["causal"], e ** -0.5)


# ----------------------------------------------------------------------------------------------
# attention_with_kvcache: kernels/attention.py (split-KV decoding)
# ----------------------------------------------------------------------------------------------

# (dtype, head dim, query heads per kv head, new queries, splits, configs). Every config of the
# 16-bit table rows is compiled at the fewest rows a program holds (G * Tq = 4, padded to 16:
# one decode step of GQA 4:1) and at head dim 256 also at the most (8 x 8 = 64,
# _KVCACHE_MAX_BLOCK_M, where the accumulators hold most registers), with the combine pass; the
# first config elsewhere: one split (the split kernel writes out itself), bf16, head dims 72
# and 111 (rows aligned through the stride units / copied to padded rows), and fp32 (one config
# per head dim; at most 32 rows, reached by 8 x 4).
KVCACHE_CASES = (
    ("fp16", 64, 4, 1, 3, "all"),
    ("fp16", 128, 4, 1, 3, "all"),
    ("fp16", 256, 4, 1, 3, "all"),
    ("fp16", 256, 8, 8, 3, "all"),
    ("fp16", 128, 8, 8, 1, "first"),
    ("bf16", 128, 4, 1, 3, "first"),
    ("fp16", 72, 4, 3, 3, "first"),
    ("fp16", 111, 1, 1, 3, "first"),
    ("fp32", 64, 8, 4, 3, "first"),
    ("fp32", 128, 8, 4, 3, "first"),
    ("fp32", 256, 8, 4, 3, "first"),
)
KVCACHE_TMAX = 1024


def _kvcache_cases():
    for dtype_name, head_dim, group, q_len, splits, configs in KVCACHE_CASES:
        yield dict(op="kvcache", dtype=dtype_name, head_dim=head_dim, group=group, q_len=q_len,
                   splits=splits, configs=configs)


def _kvcache_launch(case):
    from fastgpt.kernels import attention as kernels

    dtype, e, hk = DTYPES[case["dtype"]], case["head_dim"], 2
    q = torch.randn(1, hk * case["group"], case["q_len"], e, dtype=dtype)
    k = torch.randn(1, hk, KVCACHE_TMAX, e, dtype=dtype)
    v = torch.randn(1, hk, KVCACHE_TMAX, e, dtype=dtype)
    kv_lens = torch.full((1,), KVCACHE_TMAX, dtype=torch.int32)
    kernels.attention_with_kvcache(q, k, v, kv_lens, e ** -0.5, _splits=case["splits"])


# ----------------------------------------------------------------------------------------------
# linear: kernels/linear.py
# ----------------------------------------------------------------------------------------------

# (op, dtype, activation, bias + residual + saved pre-activation, fp32 precision, TMA, configs).
# TMA: None for the pointer path (b row-major, (K, Nb)), or the TMA path forced with b laid out
# as `linear._tma_layout` names it: "nk" b = weight^T (fastgpt.linear's forward), "kn" b
# row-major (torch.matmul, the backward's dx).
# Every config of every table row is compiled at full strength (16-bit and fp32: plain and the
# gated two-accumulator variant; fp32 with tf32 and exact products; 16-bit gelu and silu, whose
# configs are pruned further); the other epilogue
# branches with their first config; the persistent kernel with all its configs, plain and
# gated; the TMA path with all configs per tile and persistent, plain and gated, for the
# forward's layout and for the row-major b, 16-bit and tf32 (exact fp32 products never take it);
# the activation backward for a plain, a gated and a bias-only call.
LINEAR_CASES = (
    ("gemm", "fp16", "none", False, None, None, "all"),
    ("gemm", "fp16", "swiglu", True, None, None, "all"),
    ("gemm", "bf16", "gelu_tanh", True, None, None, "first"),
    ("gemm", "bf16", "geglu", False, None, None, "first"),
    ("gemm", "fp32", "gelu", True, "tf32", None, "all"),
    ("gemm", "fp32", "none", False, "ieee", None, "all"),
    ("gemm", "fp32", "swiglu", False, "tf32", None, "all"),
    ("gemm", "fp16", "gelu", True, None, None, "all"),
    ("gemm", "bf16", "silu", True, None, None, "all"),
    ("gemm_persistent", "bf16", "gelu", True, None, None, "all"),
    ("gemm_persistent", "fp16", "gelu_tanh", True, None, None, "all"),
    ("gemm_persistent", "bf16", "swiglu", False, None, None, "all"),
    ("gemm", "fp16", "none", False, None, "nk", "all"),
    ("gemm", "fp16", "swiglu", True, None, "nk", "all"),
    ("gemm", "bf16", "gelu_tanh", True, None, "nk", "first"),
    ("gemm_persistent", "fp16", "gelu_tanh", True, None, "nk", "all"),
    ("gemm_persistent", "bf16", "swiglu", False, None, "nk", "all"),
    ("gemm", "bf16", "none", False, None, "kn", "all"),
    ("gemm", "fp16", "geglu", False, None, "kn", "all"),
    ("gemm", "fp32", "gelu", True, "tf32", "nk", "all"),
    ("gemm", "fp32", "none", False, "tf32", "kn", "all"),
    ("act_bwd", "bf16", "gelu_tanh", True, None, None, "all"),
    ("act_bwd", "fp16", "swiglu", True, None, None, "all"),
    ("act_bwd", "fp32", "none", True, None, None, "all"),
)
LINEAR_SIZE = 512


def _linear_cases():
    for op, dtype_name, act, epilogue, precision, tma, configs in LINEAR_CASES:
        yield dict(op=op, dtype=dtype_name, act=act, epilogue=epilogue, precision=precision,
                   tma=tma, configs=configs)


def _linear_launch(case):
    from fastgpt.kernels import linear as kernels

    dtype, n = DTYPES[case["dtype"]], LINEAR_SIZE
    cols = 2 * n if case["act"] in kernels.GATED else n
    if case["op"] in ("gemm", "gemm_persistent"):
        torch.backends.cuda.matmul.allow_tf32 = case["precision"] == "tf32"
        a = torch.randn(n, n, dtype=dtype)
        if case["tma"] == "nk":
            b = torch.randn(cols, n, dtype=dtype).t()
        else:
            b = torch.randn(n, cols, dtype=dtype)
        epilogue = case["epilogue"]
        kernels.gemm(a, b, case["act"], bias=torch.zeros(cols, dtype=dtype) if epilogue else None,
                     residual=torch.zeros(n, n, dtype=dtype) if epilogue else None,
                     save_pre=epilogue and case["act"] != "none",
                     persistent=case["op"] == "gemm_persistent", tma=case["tma"] is not None)
    else:
        pre = torch.randn(n, cols, dtype=dtype) if case["act"] != "none" else None
        kernels.act_backward(torch.randn(n, n, dtype=dtype), pre, case["act"], case["epilogue"])


# Per suite (op): its cases and how to launch one.
SUITES = {
    "layernorm": (_layernorm_cases, _layernorm_launch),
    "attention": (_attention_cases, _attention_launch),
    "attention_with_kvcache": (_kvcache_cases, _kvcache_launch),
    "linear": (_linear_cases, _linear_launch),
}


def cases(suites=None):
    """(suite, case) for every case of the given suites (all by default)."""
    for suite in suites or SUITES:
        for case in SUITES[suite][0]():
            yield suite, case


# ----------------------------------------------------------------------------------------------
# Compiling without a GPU
# ----------------------------------------------------------------------------------------------


class _Sm90Driver:
    """The part of Triton's driver interface that compiling (not launching) a kernel uses."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")


def _ptxas_usage(ptx):
    """(registers, spill store bytes) that ptxas reports for this PTX on sm_90a."""
    ptxas = get_ptxas(TARGET.arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                              capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log[-4000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spills is None:
        raise RuntimeError(f"cannot read ptxas -v output:\n{log[-4000:]}")
    return int(regs.group(1)), int(spills.group(1))


def _config_record(config):
    """An autotune config as JSON (None for a kernel launched without autotuning)."""
    if config is None:
        return None
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _install_compile_only(compiled, state):
    """Turn launches into compile-only warm-ups that append (kernel, config) to `compiled`.
    `state["configs"]` ("all" or "first") says which of an autotuner's configs to compile."""

    def compile_only(self, grid):
        def warm_up(*args, **kwargs):
            compiled.append((self.run(*args, grid=grid, warmup=True, **kwargs), None))
        return warm_up

    def compile_configs(self, grid):
        def warm_up(*args, **kwargs):
            nargs = dict(zip(self.arg_names, args))
            self.nargs = nargs  # what the configs' pruning reads
            configs = self.prune_configs(kwargs)
            self.nargs = None
            if state["configs"] == "first":
                configs = configs[:1]
            for config in configs:
                if config.pre_hook is not None:
                    # As Autotuner.run calls it before a launch (it may set what the kernel is
                    # compiled against, e.g. a TMA descriptor's block shape).
                    config.pre_hook({**nargs, **kwargs, **config.all_kwargs()})
                kernel = self.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
                compiled.append((kernel, config))
        return warm_up

    JITFunction.__getitem__ = compile_only
    Autotuner.__getitem__ = compile_configs


_COMPILED = []  # this process's compile-only launches, (kernel, config)
_STATE = {}


def _init_process():
    """Make this process compile for sm_90a instead of launching. Before the kernels are
    imported: their modules bind the launch machinery lazily."""
    driver.set_active(_Sm90Driver())
    _install_compile_only(_COMPILED, _STATE)


def _compile_case(suite_case):
    """Launch one case compile-only; returns one record (a dict) per kernel compiled."""
    suite, case = suite_case
    _COMPILED.clear()
    _STATE["configs"] = case.get("configs", "all")
    SUITES[suite][1](case)
    if not _COMPILED:
        raise RuntimeError(f"{suite} {case}: nothing was compiled")
    records = []
    for kernel, config in _COMPILED:
        if "cubin" not in kernel.asm or not kernel.asm["cubin"]:
            raise RuntimeError(f"{kernel.name}: no cubin")
        ptx = kernel.asm["ptx"]
        regs, spill_bytes = _ptxas_usage(ptx)
        records.append(dict(
            suite=suite, case=case, kernel=kernel.name, config=_config_record(config),
            arch=kernel.metadata.target.arch, num_warps=kernel.metadata.num_warps,
            registers=regs, spill_store_bytes=spill_bytes, shared=kernel.metadata.shared,
            tensor_cores=bool(re.search(r"\b(wgmma|mma\.sync)\.", ptx)),
            wgmma=bool(re.search(r"\bwgmma\.", ptx)),
            tma=bool(re.search(r"\bcp\.async\.bulk\.tensor\.", ptx))))
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*",
                        help=f"ops to compile, of {list(SUITES)} (default: all)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes compiling cases side by side (default 1)")
    args = parser.parse_args()
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suites {unknown}; known: {list(SUITES)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("triton_sm90.py: unset TRITON_INTERPRET; the interpreter cannot compile")
    todo = list(cases(args.suites))
    if args.jobs <= 1:
        _init_process()
        _print_records(map(_compile_case, todo))
    else:
        # Fresh interpreters (spawn), each compiling the next case when it is free; the records
        # come back in case order.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_process) as pool:
            _print_records(pool.map(_compile_case, todo))


def _print_records(results):
    for records in results:
        for record in records:
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
