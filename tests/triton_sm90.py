"""Compile the Triton kernels for an H100 (sm_90a) on a machine without a GPU.

Run as a script (``python tests/triton_sm90.py``) in a process where TRITON_INTERPRET is unset:
the Triton JIT, not the interpreter, must own the kernels. It makes Triton believe the current
device is a CUDA sm_90 GPU, turns every kernel launch into a compile-only warm-up, and then
calls the real launchers of fastgpt.kernels.layernorm on CPU tensors over a matrix of dtypes,
hidden sizes and options. So the kernels compiled are exactly the variants (block size, warps,
constexpr flags, pointer alignment) that a launch on a GPU would compile, and what reaches the
GPU is checked down to the cubin even where none is lent.

For each compiled kernel it prints one JSON line: the kernel, the case, the launch config, and
ptxas's register and spill counts (ptxas -v on the PTX, for sm_90a). It exits non-zero on the
first error. tests/test_triton_sm90.py runs it and checks the output.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime import driver
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
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


def _cases():
    for dtype_name in DTYPES:
        sizes = (768, 65536) if dtype_name == "fp64" else HIDDEN
        for n in sizes:
            for op, opts in FULL:
                yield dtype_name, n, op, opts
        for n in LIGHT_HIDDEN:
            for op, opts in LIGHT:
                yield dtype_name, n, op, opts
        if dtype_name in MIXED_DTYPES:
            for n in MIXED_HIDDEN:
                for op, opts in MIXED:
                    yield dtype_name, n, op, opts


def _launch(kernels, dtype, n, op, opts):
    rows = 8
    x = torch.randn(rows, n, dtype=dtype)
    param_dtype = torch.float32 if opts.get("params_fp32") else dtype
    weight = torch.ones(n, dtype=param_dtype) if opts["affine"] else None
    if op == "fwd":
        bias = torch.zeros(n, dtype=param_dtype) if opts["affine"] and not opts["rms"] else None
        residual = torch.randn(rows, n, dtype=dtype) if opts["residual"] else None
        kernels.norm_fwd(x, weight, bias, residual, 1e-5, opts["rms"])
    else:
        stats = torch.float64 if dtype == torch.float64 else torch.float32
        mean = None if opts["rms"] else torch.zeros(rows, dtype=stats)
        rstd = torch.ones(rows, dtype=stats)
        dy = torch.randn(rows, n, dtype=dtype)
        dh = torch.randn(rows, n, dtype=dtype) if opts["dh"] else None
        affine = opts["affine"]
        kernels.norm_bwd(dy, dh, x, weight, mean, rstd, opts["rms"], affine,
                         affine and not opts["rms"])


def main():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("triton_sm90.py: unset TRITON_INTERPRET; the interpreter cannot compile")
    driver.set_active(_Sm90Driver())
    compiled = []

    def compile_only(self, grid):
        def warm_up(*args, **kwargs):
            compiled.append(self.run(*args, grid=grid, warmup=True, **kwargs))
        return warm_up

    JITFunction.__getitem__ = compile_only
    from fastgpt.kernels import layernorm as kernels  # after the patch: kernels bind lazily

    for dtype_name, n, op, opts in _cases():
        compiled.clear()
        _launch(kernels, DTYPES[dtype_name], n, op, opts)
        if not compiled:
            raise RuntimeError(f"{op} {dtype_name} N={n} {opts}: nothing was compiled")
        for kernel in compiled:
            if "cubin" not in kernel.asm or not kernel.asm["cubin"]:
                raise RuntimeError(f"{kernel.name}: no cubin")
            regs, spill_bytes = _ptxas_usage(kernel.asm["ptx"])
            print(json.dumps(dict(
                kernel=kernel.name, op=op, dtype=dtype_name, hidden=n, **opts,
                arch=kernel.metadata.target.arch, num_warps=kernel.metadata.num_warps,
                registers=regs, spill_store_bytes=spill_bytes)), flush=True)


if __name__ == "__main__":
    main()
