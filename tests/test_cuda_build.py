"""The CUDA code is compiled here even though no GPU runs it, so it cannot rot.

* every csrc/cuda/*.cu through nvcc (compile only), with the include path, nvcc flags and
  default architectures setup.py gives it (all targets in one nvcc run), without a spill,
  and it includes only CUDA headers;
* setup.py finds the CUDA toolkit even where nvcc on PATH is a wrapper script outside it;
* the torch glue csrc/fastgpt_ops.cpp with its CUDA half switched on (syntax only: a CPU
  build of torch ships c10/cuda headers but not the generated cuda_cmake_macros.h, which a
  one-line stand-in replaces), with the FASTGPT_CUDA_ARCHS macro the build defines.

The arch-list logic itself is tested in tests/test_setup_archs.py.
"""
import glob
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


@needs_nvcc
@pytest.mark.parametrize("src", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(src, tmp_path, setup_config):
    # Every default target in one nvcc run (measured here: ~4 min for layernorm.cu on 2
    # cores, 6 SASS targets + PTX; one run per target would repeat the host-side work).
    cmd = [NVCC, "-c", "-std=c++17", *setup_config["nvcc_flags"]]
    cmd += [f"-I{d}" for d in setup_config["include_dirs"]]
    cmd += ["-Xptxas", "-v", src, "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # ptxas reports every kernel for every SASS target; none may spill (the launch configs
    # assume registers only). nvcc --threads may interleave the targets' reports, so spills
    # are counted over the whole log (the message shows each nonzero line with the entry
    # line before it).
    targets = set(re.findall(r"Compiling entry function '\S+' for '(sm_\w+)'", proc.stderr))
    expected = {f.rsplit("code=", 1)[1] for f in setup_config["nvcc_flags"] if "code=sm_" in f}
    assert targets == expected, (targets, proc.stderr[-2000:])
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    assert len(spills) >= len(expected), proc.stderr[-2000:]
    assert not any(spills), re.findall(r".*Compiling entry.*\n.*\n.*[1-9]\d* bytes spill stores.*",
                                       proc.stderr)


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
