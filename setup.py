"""Build fastgpt and its C++/CUDA extension ``fastgpt._C``.

The C++ CPU kernels are always built. The CUDA kernels are added when the installed torch
has CUDA and nvcc is found (CUDA_HOME), unless ``FASTGPT_CUDA=0``. Target architectures come
from ``FASTGPT_CUDA_ARCHS`` (semicolon or comma separated, default ``90a``); ``MAX_JOBS`` caps
the parallel compile jobs (torch's BuildExtension reads it).

Build with ``pip install --no-build-isolation --no-deps -e .``: the build needs the torch that
will run the extension, never one downloaded into an isolated build environment.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_toolkit_root():
    """The CUDA toolkit that the nvcc on PATH belongs to, or None.

    torch takes CUDA_HOME to be the parent of the directory holding nvcc, which is wrong when
    nvcc is a wrapper script elsewhere (e.g. /usr/local/bin/nvcc exec'ing the real one): the
    build would then find no cuda_runtime.h. nvcc itself reports its root (TOP) on --dryrun.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return guess
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(\S+)", proc.stdout + proc.stderr, re.M)
    return os.path.realpath(top.group(1)) if top else None


# Must be settled before torch.utils.cpp_extension is imported: it reads CUDA_HOME then.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _root = _nvcc_toolkit_root()
    if _root is not None:
        os.environ["CUDA_HOME"] = _root

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension,
)


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _with_cuda():
    if os.environ.get("FASTGPT_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _gencode_flags():
    archs = [a for a in re.split(r"[;,\s]+", os.environ.get("FASTGPT_CUDA_ARCHS", "90a")) if a]
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _extension():
    # -fopenmp: ATen's at::parallel_for is a header template that runs in parallel only when
    # the calling translation unit is compiled for torch's OpenMP backend (else it runs every
    # row on one thread); it also makes `#pragma omp simd` legal in the row loops.
    # No -march=native: the wheel must run on any x86-64; the kernels pick SIMD at run time.
    cxx_flags = ["-O3", "-fopenmp"]
    sources = ["csrc/fastgpt_ops.cpp"] + _rel("csrc/cpu/*.cpp")
    # Sources include each other relative to csrc/ ("cpu/layernorm.h", "cuda/layernorm.h").
    include_dirs = [os.path.join(HERE, "csrc")]
    if not _with_cuda():
        return CppExtension("fastgpt._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    nvcc_flags = ["-O3", "-lineinfo"] + _gencode_flags()
    return CUDAExtension(
        "fastgpt._C",
        sources + _rel("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("FASTGPT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


# Guarded so that tests can load this file for its helpers (setuptools runs it as __main__).
if __name__ == "__main__":
    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
