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

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


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
    if not _with_cuda():
        return CppExtension("fastgpt._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    nvcc_flags = ["-O3", "-lineinfo"] + _gencode_flags()
    return CUDAExtension(
        "fastgpt._C",
        sources + _rel("csrc/cuda/*.cu"),
        define_macros=[("FASTGPT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
