"""setup.py's choice of CUDA target architectures, and the string macro that reports it.

The choice is a pure function (setup.cuda_archs) of FASTGPT_CUDA_ARCHS, TORCH_CUDA_ARCH_LIST
and the installed torch's own arch list, so it is tested here with made-up lists. The macro is
tested by building a one-line extension through torch's BuildExtension, with ninja and without:
the two pass flags to the compiler differently (a shell command line vs argv).
"""
import json
import os
import re
import runpy
import subprocess
import sys

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="fastgpt_setup")


def names(plan):
    return [str(a) for a in plan.archs]


def test_fallback_is_the_cu130_wheel_list_from_8_0():
    plan = S["cuda_archs"]()
    assert names(plan) == ["8.0", "8.6", "9.0a", "10.0", "12.0+PTX"]
    assert [str(a) for a in plan.dropped] == ["7.5"]


def test_torch_cuda_arch_list_is_honoured_with_spaces_or_semicolons():
    for text in ("8.0;8.6;10.0", "8.0 8.6 10.0", " 10.0; 8.6 8.0 "):
        plan = S["cuda_archs"](None, text, ["sm_90"])
        assert names(plan) == ["8.0", "8.6", "10.0+PTX"], text
        assert plan.source == "TORCH_CUDA_ARCH_LIST"


def test_installed_torch_list_is_used_without_torch_cuda_arch_list():
    built = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    plan = S["cuda_archs"](None, "", built)
    assert names(plan) == ["8.0", "8.6", "9.0a", "10.0", "12.0+PTX"]
    assert plan.source == "the installed torch"


def test_torch_arch_names_become_list_entries():
    assert S["torch_arch_list"](["sm_80", "sm_90a", "compute_90", "gfx90a"]) == "8.0;9.0a;9.0+PTX"


def test_below_8_0_dropped_and_reported():
    plan = S["cuda_archs"](None, "6.0;7.0;7.5+PTX;8.6", ())
    assert names(plan) == ["8.6+PTX"]
    assert [str(a) for a in plan.dropped] == ["6.0", "7.0", "7.5+PTX"]


def test_nothing_left_at_8_0_or_newer_is_an_error():
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        S["cuda_archs"](None, "7.0;7.5", ())


def test_ptx_goes_to_the_newest_plain_architecture_only():
    plan = S["cuda_archs"](None, "9.0;8.0;12.0a;10.0", ())
    assert names(plan) == ["8.0", "9.0a", "10.0+PTX", "12.0a"]


def test_ptx_asked_for_in_the_list_is_kept():
    assert names(S["cuda_archs"](None, "8.0+PTX;8.6", ())) == ["8.0+PTX", "8.6+PTX"]


def test_9_0_becomes_9_0a_unless_it_carries_the_ptx():
    assert names(S["cuda_archs"](None, "8.0;9.0;10.0", ())) == ["8.0", "9.0a", "10.0+PTX"]
    assert names(S["cuda_archs"](None, "8.0;9.0", ())) == ["8.0", "9.0+PTX", "9.0a"]
    assert "9.0a" not in names(S["cuda_archs"](None, "8.0;8.9;10.0", ()))
    assert names(S["cuda_archs"](None, "9.0;9.0a", ())) == ["9.0+PTX", "9.0a"]


def test_fastgpt_cuda_archs_overrides_everything_verbatim():
    plan = S["cuda_archs"]("9.0", "8.0;8.6", ["sm_80", "sm_120"])
    assert names(plan) == ["9.0"]  # no PTX, no 9.0a added
    assert names(S["cuda_archs"]("9.0a", None, ())) == ["9.0a"]
    assert names(S["cuda_archs"]("80;90a", None, ())) == ["8.0", "9.0a"]  # the old syntax
    assert names(S["cuda_archs"]("8.6+PTX 8.0", None, ())) == ["8.0", "8.6+PTX"]


def test_fastgpt_cuda_archs_below_8_0_is_an_error_not_a_silent_drop():
    with pytest.raises(ValueError, match="7.5"):
        S["cuda_archs"]("7.5;8.0", None, ())


@pytest.mark.parametrize("bad", ["Hopper", "native", "sm_90", "9", "9.0b"])
def test_unknown_entries_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        S["cuda_archs"](None, f"8.0;{bad}", ())


def test_gencode_flags():
    archs = S["cuda_archs"](None, "8.6;9.0", ()).archs
    assert S["gencode_flags"](archs) == [
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]


PROBE = r'''
extern "C" const char fastgpt_archs_probe[] = "<<<" FASTGPT_CUDA_ARCHS ">>>";
'''
PROBE_SETUP = r'''
import json, sys
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
flags, use_ninja = json.loads(sys.argv.pop(1)), sys.argv.pop(1) == "1"
setup(name="probe", ext_modules=[CppExtension("probe", ["probe.cpp"],
                                              extra_compile_args={"cxx": flags})],
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=use_ninja)})
'''


@pytest.mark.parametrize("use_ninja", [True, False], ids=["ninja", "setuptools"])
@pytest.mark.parametrize("text", ["8.0;8.6;9.0;12.0+PTX"])
def test_macro_string_arrives_exactly(tmp_path, use_ninja, text):
    if use_ninja and not cpp_extension.is_ninja_available():
        pytest.skip("ninja not installed")
    archs = S["cuda_archs"](text, None, ()).archs
    expected = ";".join(str(a) for a in archs)
    (tmp_path / "probe.cpp").write_text(PROBE)
    (tmp_path / "probe_setup.py").write_text(PROBE_SETUP)
    flags = S["archs_macro_flags"](archs)
    proc = subprocess.run(
        [sys.executable, "probe_setup.py", json.dumps(flags), "1" if use_ninja else "0",
         "build_ext", "--build-lib", "lib", "--build-temp", "tmp"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    built = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "lib") for f in fs]
    assert len(built) == 1, built
    found = re.findall(rb"<<<([^>]*)>>>", open(built[0], "rb").read())
    assert found == [expected.encode()]


def test_cpu_build_defines_the_macro_empty():
    ext = S["_extension"]()  # the CPU torch here: a CppExtension
    assert S["archs_macro_flags"]([])[0] in ext.extra_compile_args["cxx"]


def test_a_build_without_torch_says_to_turn_isolation_off():
    """pip's default build isolation runs setup.py where torch cannot be imported (torch is not
    a build requirement, so that pip never downloads one): the build stops with that advice."""
    code = ("import runpy, sys\n"
            "sys.modules['torch'] = None  # import torch fails, as in an isolated build\n"
            "sys.argv = ['setup.py', 'egg_info']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
