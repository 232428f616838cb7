"""The CUDA code is compiled here even though no GPU runs it, so it cannot rot.

* every csrc/cuda/*.cu through nvcc (compile only), with the include path, nvcc flags and
  default architectures setup.py gives it (all targets in one nvcc run, once per source and
  module), without a spill, and it includes only CUDA headers;
* the tile-product kernels of attention.cu and linear.cu run on tensor cores: their SASS holds
  HMMA instructions for every target (cuobjdump of the object compiled above);
* setup.py finds the CUDA toolkit even where nvcc on PATH is a wrapper script outside it;
* the torch glue csrc/fastgpt_ops.cpp with its CUDA half switched on (syntax only: a CPU
  build of torch ships c10/cuda headers but not the generated cuda_cmake_macros.h, which a
  one-line stand-in replaces), with the FASTGPT_CUDA_ARCHS macro the build defines.

The arch-list logic itself is tested in tests/test_setup_archs.py.
"""
import collections
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_SOURCES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def setup_config():
    """What setup.py would build with: its include dirs, nvcc flags for the default
    architectures, the arch macro flags and the CUDA toolkit root. Read in a subprocess, since
    loading setup.py may set CUDA_HOME for its process; without FASTGPT_CUDA_ARCHS and
    TORCH_CUDA_ARCH_LIST, so these are the defaults."""
    code = ("import json, runpy, sys\n"
            "ns = runpy.run_path(sys.argv[1], run_name='fastgpt_setup')\n"
            "archs = ns['_build_archs']()\n"
            "print(json.dumps({'include_dirs': ns['_extension']().include_dirs,\n"
            "                  'archs': [str(a) for a in archs],\n"
            "                  'nvcc_flags': ns['nvcc_flags'](archs),\n"
            "                  'macro_flags': ns['archs_macro_flags'](archs),\n"
            "                  'cuda_root': ns['_nvcc_toolkit_root']()}))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTGPT_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST")}  # the defaults
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "setup.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_there_are_cuda_sources():
    assert CU_SOURCES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("src", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_includes_only_cuda_headers(src):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', open(src).read(), re.M)
    bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "Python.h")]
    assert not bad, f"{src} includes torch headers {bad}: kernels get raw pointers only"


@needs_nvcc
def test_setup_finds_the_cuda_toolkit(setup_config):
    root = setup_config["cuda_root"]
    assert root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")), root


def test_setup_default_targets_from_8_0_with_sm90a_and_ptx(setup_config):
    archs = setup_config["archs"]
    assert archs[0] == "8.0" and "9.0a" in archs and archs[-1].endswith("+PTX"), archs
    flags = setup_config["nvcc_flags"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags, flags
    assert sum("code=compute_" in f for f in flags) == 1, flags


@pytest.fixture(scope="module")
def nvcc_objects(setup_config, tmp_path_factory):
    """compile(src) -> (nvcc's CompletedProcess, object path): src compiled for every default
    target in one nvcc run, at most once per module (the compile and the SASS checks share it).
    Measured here on 2 cores, 6 SASS targets + PTX: ~4 min for layernorm.cu, 2.8-3.5 min for
    attention.cu (other jobs sharing the cores); one run per target would repeat the host-side
    work."""
    done = {}

    def compile_(src):
        if src not in done:
            obj = tmp_path_factory.mktemp(os.path.basename(src).replace(".", "_")) / "k.o"
            cmd = [NVCC, "-c", "-std=c++17", *setup_config["nvcc_flags"]]
            cmd += [f"-I{d}" for d in setup_config["include_dirs"]]
            cmd += ["-Xptxas", "-v", src, "-o", str(obj)]
            done[src] = (subprocess.run(cmd, capture_output=True, text=True, timeout=1800), obj)
        return done[src]

    return compile_


def _sass_targets(setup_config):
    return {f.rsplit("code=", 1)[1] for f in setup_config["nvcc_flags"] if "code=sm_" in f}


@needs_nvcc
@pytest.mark.parametrize("src", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(src, nvcc_objects, setup_config):
    proc, _ = nvcc_objects(src)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # ptxas reports every kernel for every SASS target; none may spill (the launch configs
    # assume registers only). nvcc --threads may interleave the targets' reports, so spills
    # are counted over the whole log (the message shows each nonzero line with the entry
    # line before it).
    targets = set(re.findall(r"Compiling entry function '\S+' for '(sm_\w+)'", proc.stderr))
    expected = _sass_targets(setup_config)
    assert targets == expected, (targets, proc.stderr[-2000:])
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    assert len(spills) >= len(expected), proc.stderr[-2000:]
    assert not any(spills), re.findall(r".*Compiling entry.*\n.*\n.*[1-9]\d* bytes spill stores.*",
                                       proc.stderr)


def _cuobjdump(setup_config):
    """cuobjdump of the CUDA toolkit, else on PATH, else the one Triton ships; None if none."""
    found = [os.path.join(setup_config["cuda_root"] or "", "bin", "cuobjdump"),
             shutil.which("cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        found += [os.path.join(d, "backends", "nvidia", "bin", "cuobjdump")
                  for d in spec.submodule_search_locations]
    return next((f for f in found if f and os.access(f, os.X_OK)), None)


# Per source, the kernels whose tile products must run on tensor cores (mma.sync: HMMA in the
# SASS of every target, sm_90a included), as substrings of their mangled SASS function names:
# every one must exist for every SASS target and hold HMMA.
TENSOR_CORE_KERNELS = {
    "attention.cu": ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"),
    "linear.cu": ("gemm_kernel",),
}


@needs_nvcc
@pytest.mark.parametrize("source", sorted(TENSOR_CORE_KERNELS))
def test_tile_kernels_use_tensor_cores(nvcc_objects, setup_config, source):
    cuobjdump = _cuobjdump(setup_config)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin, PATH, triton's bundled copy)")
    kernels = TENSOR_CORE_KERNELS[source]
    proc, obj = nvcc_objects(os.path.join(CSRC, "cuda", source))
    assert proc.returncode == 0, proc.stderr[-4000:]
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                          timeout=600)
    assert sass.returncode == 0, sass.stderr[-2000:]
    hmma = collections.Counter()  # (target, function) -> HMMA instructions
    target = function = None
    for line in sass.stdout.splitlines():  # ~700k lines: plain substring tests first
        if "HMMA." in line:
            if function is not None:
                hmma[target, function] += 1
        elif "code for sm_" in line:
            target, function = line.split("code for ", 1)[1].strip(), None
        elif "Function : " in line:
            function = line.split("Function : ", 1)[1].strip()
            hmma[target, function] += 0
    tile = {(t, f): n for (t, f), n in hmma.items() if any(k in f for k in kernels)}
    expected = _sass_targets(setup_config)
    assert {t for t, _ in tile} == expected, sorted(hmma)
    for t in expected:
        names = [f for (tt, f) in tile if tt == t]
        for kernel in kernels:
            assert any(kernel in f for f in names), (t, kernel, names)
    assert all(tile.values()), sorted(k for k, n in tile.items() if n == 0)


@needs_nvcc
def test_cuda_glue_compiles(tmp_path, setup_config):
    includes = list(cpp_extension.include_paths())
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(d, macros)) for d in includes):
        stub = tmp_path / macros
        stub.parent.mkdir(parents=True)
        stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, str(tmp_path))
    includes += [os.path.join(setup_config["cuda_root"], "include")]
    includes += [sysconfig.get_paths()["include"], *setup_config["include_dirs"]]
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DFASTGPT_WITH_CUDA"]
    cmd += setup_config["macro_flags"]  # what the build defines: FASTGPT_CUDA_ARCHS
    cmd += [f"-I{d}" for d in includes] + [os.path.join(CSRC, "fastgpt_ops.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
