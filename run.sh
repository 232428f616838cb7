#!/usr/bin/env bash
# fastgpt's two entry points; each sets up what it needs, then runs:
#
#   ./run.sh bench [fastgpt bench args]   kernel benchmarks on whatever device is present
#   ./run.sh test  [pytest args]          the test suite (tests/, or the paths given)
#
# Set-up: a Python that already has torch and triton (the GPU image, or your own
# environment; PYTHON=... picks one) keeps them as they are. Otherwise .venv is created with
# the pinned CPU stack: torch 2.13.0 (never an unpinned torch, which would pull gigabytes of
# CUDA wheels) and triton 3.9.0. Into whichever Python that is, the tools the command needs
# are installed if, and only if, one is missing (ninja for the build; pytest,
# pytest-benchmark, matplotlib (`fastgpt profile --plot`) and numpy < 2.4 for the tests:
# Triton's interpreter, which runs the Triton tests on CPU, has broken with newer numpy),
# each checked by importing it and none of which depends on torch, so pip never touches torch; with nothing missing, nothing is
# downloaded. Then fastgpt is installed in editable mode, compiling fastgpt._C (with CUDA
# where torch has it and nvcc is found) whenever a source under csrc/ is newer than the
# built library.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
# module:requirement, installed when the module cannot be imported
BUILD_DEPS=(ninja:ninja)
TEST_DEPS=(pytest:pytest pytest_benchmark:pytest-benchmark "numpy:numpy<2.4" "matplotlib:matplotlib")
# Tried, but the tests run without them (their tests skip): transformers, for the drop-in test
# of Hugging Face's SDPA attention path. A machine without network (the GPU image) goes on.
OPTIONAL_TEST_DEPS=(transformers:transformers)

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

install_missing() {
  local dep missing=()
  for dep in "$@"; do
    has "${dep%%:*}" || missing+=("${dep#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "run.sh: installing ${missing[*]} into $PY" >&2
    "$PY" -m pip install -q "${missing[@]}"
  fi
}

install_optional() {
  local dep
  for dep in "$@"; do
    if ! has "${dep%%:*}"; then
      echo "run.sh: installing optional ${dep#*:} into $PY" >&2
      "$PY" -m pip install -q "${dep#*:}" ||
        echo "run.sh: could not install ${dep#*:}; the tests that need it are skipped" >&2
    fi
  done
}

setup() {
  if ! has "torch, triton"; then
    if [ ! -x .venv/bin/python ]; then
      "$PY" -m venv .venv
    fi
    PY=.venv/bin/python
    if ! has "torch, triton"; then
      "$PY" -m pip install -q --upgrade pip setuptools wheel
      "$PY" -m pip install -q "torch==2.13.0" "triton==3.9.0" "numpy<2.4"
    fi
  fi
  install_missing "$@"
  local so
  so=$(ls fastgpt/_C*.so 2>/dev/null | head -n 1 || true)
  if [ -z "$so" ] || ! has "fastgpt.kernels" || [ -n "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ]; then
    echo "run.sh: building fastgpt (fastgpt._C) with $PY" >&2
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    setup "${BUILD_DEPS[@]}" "${TEST_DEPS[@]}"
    install_optional "${OPTIONAL_TEST_DEPS[@]}"
    # No path given: pytest runs pyproject.toml's testpaths (tests/); a path runs only that.
    exec "$PY" -m pytest "$@"
    ;;
  bench)
    setup "${BUILD_DEPS[@]}"
    exec "$PY" -m fastgpt bench "$@"
    ;;
  *)
    echo "usage: ./run.sh bench [args] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
