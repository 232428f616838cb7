#!/usr/bin/env bash
# GPU validation in one go: build fastgpt with its CUDA kernels, run the whole test suite on
# the GPU, then the benchmarks, then the attention profile (time and memory against T). This run's results (JSON and markdown tables) and its full
# log, gpu_check.log, go to $OUT when it is set, else to a new folder under
# bench/results/local/ (ignored by git); the results are also copied into bench/results/,
# where the ones worth keeping are committed.
#
#   bash bench/gpu_check.sh            # on a machine with a CUDA GPU, torch and triton
#   bash bench/gpu_check.sh tests      # only some stages: tests, bench (the build always runs,
#   bash bench/gpu_check.sh bench      # and is quick when fastgpt._C is up to date), e.g. where
#   bash bench/gpu_check.sh profile    # one command may only run for a limited time
#   BENCH_ARGS="--no-compile" bash bench/gpu_check.sh   # extra `fastgpt bench` arguments
#                                      # (skipping torch.compile saves minutes of compiling)
#
# Stage headers show the seconds since the start. Uses the python that has torch (PYTHON=... to choose);
# downloads nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=${*:-tests bench profile}
for stage in $STAGES; do
  case "$stage" in
    tests|bench|profile) ;;
    *) echo "usage: bash bench/gpu_check.sh [tests] [bench] [profile]" >&2; exit 2 ;;
  esac
done
wants() { [[ " $STAGES " == *" $1 "* ]]; }

PY=${PYTHON:-python3}
RESULTS=bench/results
DEST=${OUT:-$RESULTS/local/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DEST" "$RESULTS"
LOG="$DEST/gpu_check.log"
export PYTHONUNBUFFERED=1
status=0

T0=$SECONDS
step() { echo; echo "=== $* (at $((SECONDS - T0)) s) ===" | tee -a "$LOG"; }

: > "$LOG"
step "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

# Build for this GPU only (9.0 -> 9.0a, which also holds the Hopper-only kernels): the default
# list (every architecture of the installed torch) compiles several times longer, and the CPU
# suite already compiles it for every default architecture.
if [ -z "${FASTGPT_CUDA_ARCHS:-}" ]; then
  FASTGPT_CUDA_ARCHS=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c == (9, 0) else ''))" 2>/dev/null || true)
  export FASTGPT_CUDA_ARCHS
fi
step "build (FASTGPT_CUDA_ARCHS=${FASTGPT_CUDA_ARCHS:-torch defaults})"
if ! MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1; then
  echo "build failed; see $LOG" | tee -a "$LOG"
  tail -n 60 "$LOG"
  exit 1
fi
"$PY" -c "import fastgpt; s = fastgpt.available_backends(); print({k: {d: (v.available or v.reason) for d, v in s[k].items()} for k in s})" 2>&1 | tee -a "$LOG"

if wants tests; then
  step "tests"
  "$PY" -m pytest tests -q -p no:cacheprovider -rfE --durations=15 2>&1 | tee -a "$LOG" | tail -n 60
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wants bench; then
  step "benchmarks"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  "$PY" -m fastgpt bench --device cuda --out "$DEST" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG" >/dev/null
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  cp "$DEST"/*.json "$DEST"/*.md "$RESULTS"/ 2>/dev/null || true
fi

if wants profile; then
  step "profile attention"
  # The GPU target's shape (bf16, D=128, causal), B*H*T constant-ish as T grows: eager's
  # T x T matrices run out of memory at the long end, which the profile records as OOM.
  stem="profile-attention-cuda-$(date +%Y%m%d-%H%M%S)"
  "$PY" -m fastgpt profile attention --device cuda --causal --batch 1 --heads 16 --head-dim 128 \
    --seq-lens 1024,2048,4096,8192,16384,32768 --json "$DEST/$stem.json" \
    --plot "$DEST/$stem.png" 2>&1 | tee -a "$LOG" | tail -n 20
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  cp "$DEST/$stem".* "$RESULTS"/ 2>/dev/null || true
fi

step "summary (status $status)"
for md in "$DEST"/*.md; do
  [ -e "$md" ] && cat "$md"
done
exit $status
