"""Build fastgpt and its C++/CUDA extension ``fastgpt._C``.

The C++ CPU kernels are always built. The CUDA kernels are added when the installed torch
has CUDA and nvcc is found (CUDA_HOME), unless ``FASTGPT_CUDA=0``. ``MAX_JOBS`` caps the
parallel compile jobs (torch's BuildExtension reads it).

CUDA target architectures (torch's syntax: ``8.0;8.6;9.0+PTX``, ``;`` or space separated;
``9.0a`` names an arch-specific target, ``+PTX`` adds PTX for that architecture):

* ``FASTGPT_CUDA_ARCHS``, when set, is built exactly as written (e.g. ``9.0a`` for a quick
  H100-only build); entries below compute capability 8.0 are refused.
* Otherwise the architectures of the installed torch: ``TORCH_CUDA_ARCH_LIST`` when set, else
  those torch itself was compiled for, else (a torch without CUDA) those of the torch 2.11
  cu130 wheels, ``FALLBACK_ARCHS`` below. From that list entries below 8.0 are dropped (with a
  message), the newest architecture also gets PTX (a GPU newer than all of them JIT-compiles
  it), and 9.0 becomes 9.0a (the same GPUs run it; it may hold Hopper-only instructions).

The list built reaches the C++ code as the string macro ``FASTGPT_CUDA_ARCHS``
(``"8.0;8.6;9.0a;10.0;12.0+PTX"``: one entry per SASS target, ``+PTX`` where PTX is
embedded; ``""`` in a CPU-only build), which the extension reports at run time.

Build with ``pip install --no-build-isolation --no-deps -e .``: the extension must be compiled
against the torch that will run it, never one downloaded into an isolated build environment
(pyproject.toml deliberately does not list torch as a build requirement).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Oldest architecture built. The attention and GEMM kernels to come use cp.async and bf16
# mma.sync m16n8k16 (both sm_80+) and ldmatrix (sm_75+): an sm_75 or older GPU could not run
# them, so nothing is built for it (fastgpt then reports CUDA as unavailable on that device).
MIN_ARCH = (8, 0)

# Used where torch has no CUDA (the CPU torch of the compile-only test suite): the list the
# torch 2.11 cu130 wheels (the GPU image's torch) are built with, from pytorch's
# .ci/manywheel/build_cuda.sh, case 13.0: TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;9.0;10.0;12.0+PTX".
# sm_86 SASS also runs on 8.9 (L40S, RTX 4090), which is why 8.9 need not be listed.
FALLBACK_ARCHS = "7.5;8.0;8.6;9.0;10.0;12.0+PTX"


class Arch(NamedTuple):
    """One CUDA target: SASS for sm_<major><minor><suffix>, plus its PTX when ``ptx``."""
    major: int
    minor: int
    suffix: str = ""  # "a" (arch-specific, e.g. wgmma on 9.0a) or "f" (family), else ""
    ptx: bool = False

    @property
    def name(self):
        return f"{self.major}{self.minor}{self.suffix}"

    def __str__(self):
        return f"{self.major}.{self.minor}{self.suffix}" + ("+PTX" if self.ptx else "")


_ARCH_ENTRY = re.compile(r"(\d+)\.?(\d)([af]?)(\+PTX)?")


def parse_arch_list(text, source):
    """Arch entries of a TORCH_CUDA_ARCH_LIST-style string ("8.0;8.6 9.0+PTX"); the dotless
    form ("80;90a") is accepted too. `source` names the string in the error for a bad entry."""
    archs = []
    for entry in re.split(r"[;,\s]+", text.strip()):
        if not entry:
            continue
        m = _ARCH_ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(f"{source}: {entry!r} is not an architecture like 8.6, 9.0a or "
                             "12.0+PTX (named architectures and 'native' are not supported)")
        archs.append(Arch(int(m.group(1)), int(m.group(2)), m.group(3), bool(m.group(4))))
    return archs


def torch_arch_list(arch_flags):
    """torch.cuda.get_arch_list()'s entries ("sm_80", "sm_90a", "compute_90") as a
    TORCH_CUDA_ARCH_LIST string ("8.0;9.0a;9.0+PTX"): compute_XY is PTX for XY."""
    entries = []
    for flag in arch_flags:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", flag)
        if m is not None:
            kind, major, minor, suffix = m.groups()
            entries.append(f"{major}.{minor}{suffix}" + ("+PTX" if kind == "compute" else ""))
    return ";".join(entries)


def _merged(archs):
    """Sorted by version, one entry per target (PTX kept where any duplicate asked for it)."""
    ptx = {}
    for a in archs:
        key = a._replace(ptx=False)
        ptx[key] = ptx.get(key, False) or a.ptx
    return [key._replace(ptx=p) for key, p in sorted(ptx.items())]


class ArchPlan(NamedTuple):
    archs: list   # what is built, sorted
    dropped: list  # entries of the default list below MIN_ARCH
    source: str   # where the list came from


def cuda_archs(fastgpt_archs=None, torch_cuda_arch_list=None, torch_built=()):
    """The CUDA targets to build (a pure function of its arguments, for the tests).

    fastgpt_archs: FASTGPT_CUDA_ARCHS, built exactly as written; torch_cuda_arch_list:
    TORCH_CUDA_ARCH_LIST; torch_built: torch.cuda.get_arch_list() of the installed torch
    (empty without CUDA). Blank strings count as unset.
    """
    if fastgpt_archs and fastgpt_archs.strip():
        archs = _merged(parse_arch_list(fastgpt_archs, "FASTGPT_CUDA_ARCHS"))
        old = [str(a) for a in archs if (a.major, a.minor) < MIN_ARCH]
        if old:
            raise ValueError(f"FASTGPT_CUDA_ARCHS: {';'.join(old)} below the minimum "
                             f"{MIN_ARCH[0]}.{MIN_ARCH[1]} (fastgpt's kernels need sm_80)")
        if not archs:
            raise ValueError("FASTGPT_CUDA_ARCHS names no architecture")
        return ArchPlan(archs, [], "FASTGPT_CUDA_ARCHS")
    if torch_cuda_arch_list and torch_cuda_arch_list.strip():
        text, source = torch_cuda_arch_list, "TORCH_CUDA_ARCH_LIST"
    elif torch_arch_list(torch_built):
        text, source = torch_arch_list(torch_built), "the installed torch"
    else:
        text, source = FALLBACK_ARCHS, "the torch 2.11 cu130 wheels (fallback)"
    listed = _merged(parse_arch_list(text, source))
    archs = [a for a in listed if (a.major, a.minor) >= MIN_ARCH]
    dropped = [a for a in listed if (a.major, a.minor) < MIN_ARCH]
    plain = [a for a in archs if not a.suffix]
    if not plain:
        raise ValueError(f"{source} ({text}) names no architecture of compute capability "
                         f"{MIN_ARCH[0]}.{MIN_ARCH[1]} or newer")
    # PTX of the newest plain target: an arch-specific (a/f) PTX would not JIT on a new GPU.
    archs.append(plain[-1]._replace(ptx=True))
    # Hopper: sm_90a instead of sm_90. Both are SASS for compute capability 9.0 only (every
    # such GPU runs sm_90a), and sm_90a may hold the Hopper-only instructions (wgmma, TMA), so
    # a plain sm_90 beside it would only double nvcc's work for that target. A 9.0 that carries
    # the PTX stays (PTX of the arch-specific target could not JIT elsewhere).
    archs = _merged(archs)
    if any((a.major, a.minor, a.suffix) == (9, 0, "") for a in archs):
        archs = [a for a in archs if (a.major, a.minor, a.suffix, a.ptx) != (9, 0, "", False)]
        archs.append(Arch(9, 0, "a"))
    return ArchPlan(_merged(archs), dropped, source)


def gencode_flags(archs):
    """nvcc flags for the targets: SASS for each, PTX where asked."""
    flags = []
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a.name},code=sm_{a.name}")
        if a.ptx:
            flags.append(f"-gencode=arch=compute_{a.name},code=compute_{a.name}")
    return flags


def nvcc_flags(archs):
    """Every flag nvcc gets for csrc/cuda/*.cu (the build and tests/test_cuda_build.py)."""
    # --threads 0: nvcc compiles a file's targets in parallel, one thread per CPU (one .cu
    # file per op would otherwise compile its targets one after another).
    return ["-O3", "-lineinfo", "--threads", "0"] + gencode_flags(archs)


def archs_macro_flags(archs):
    """The C++ flag defining FASTGPT_CUDA_ARCHS as a string literal ("8.0;9.0;9.0a+PTX").

    Given unquoted: setuptools' compile passes flags as argv, and torch's ninja build
    shell-quotes every flag it writes into build.ninja (torch 2.13 here; quoting it again
    would deliver the quotes to the compiler). tests/test_setup_archs.py builds a probe
    extension both ways and checks the exact string arrives.
    """
    return ['-DFASTGPT_CUDA_ARCHS="{}"'.format(";".join(str(a) for a in archs))]


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

try:
    import torch
except ModuleNotFoundError as _err:
    if _err.name != "torch":
        raise
    # pip's default build isolation runs this file in a fresh environment without torch.
    sys.exit("fastgpt: torch is not importable while building. fastgpt._C must be compiled "
             "against the torch that will run it, so the build uses the installed torch and "
             "never downloads one (torch is deliberately not a build requirement). Install "
             "torch first, then build without isolation:\n"
             "    pip install --no-build-isolation .\n"
             "(editable: pip install --no-build-isolation --no-deps -e .)")
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension,
)


def _rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _with_cuda():
    if os.environ.get("FASTGPT_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _torch_built_archs():
    """The sm_XY / compute_XY targets the installed torch was compiled for ([] without CUDA).

    torch.cuda.get_arch_list() is the public way, but some torch versions answer [] when no
    GPU is visible (a build machine); the string it splits, torch._C._cuda_getArchFlags(),
    is compiled into every CUDA build of torch and needs no device.
    """
    if torch.version.cuda is None:
        return []
    archs = torch.cuda.get_arch_list()
    if not archs:
        flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
        archs = flags.split() if flags else []
    return archs


def _build_archs():
    """The CUDA targets of this build, from the environment and the installed torch."""
    plan = cuda_archs(os.environ.get("FASTGPT_CUDA_ARCHS"),
                      os.environ.get("TORCH_CUDA_ARCH_LIST"), _torch_built_archs())
    if plan.dropped:
        print(f"fastgpt: not building for {';'.join(str(a) for a in plan.dropped)} (from "
              f"{plan.source}): fastgpt's CUDA kernels need compute capability "
              f"{MIN_ARCH[0]}.{MIN_ARCH[1]} or newer", file=sys.stderr)
    return plan.archs


def _extension():
    # -fopenmp: ATen's at::parallel_for is a header template that runs in parallel only when
    # the calling translation unit is compiled for torch's OpenMP backend (else it runs every
    # row on one thread); it also makes `#pragma omp simd` legal in the row loops.
    # No -march=native: the wheel must run on any x86-64; the kernels pick SIMD at run time.
    # -fno-trapping-math (torch builds itself with it too): GCC's default may not turn the float
    # selects of the attention kernels' exp2 (clamp, underflow to 0) into vector blends, and
    # those loops then ran scalar (-fopt-info-vec; the CPU attention forward ran at 0.6x SDPA's
    # speed, 1.1x with it). Nothing in fastgpt reads floating-point exception flags.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    sources = ["csrc/fastgpt_ops.cpp"] + _rel("csrc/cpu/*.cpp")
    # Sources include each other relative to csrc/ ("cpu/layernorm.h", "cuda/layernorm.h").
    include_dirs = [os.path.join(HERE, "csrc")]
    if not _with_cuda():
        # FASTGPT_CUDA_ARCHS is "" here: no CUDA targets.
        cxx_flags += archs_macro_flags([])
        return CppExtension("fastgpt._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    archs = _build_archs()
    return CUDAExtension(
        "fastgpt._C",
        sources + _rel("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("FASTGPT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + archs_macro_flags(archs),
                            "nvcc": nvcc_flags(archs)},
        extra_link_args=["-fopenmp"],
    )


# Guarded so that tests can load this file for its helpers (setuptools runs it as __main__).
if __name__ == "__main__":
    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
