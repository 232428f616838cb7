"""Measurement core shared by every benchmark case.

A case (bench/layernorm.py is the first) describes *what* to run: its problems (variant,
shape, dtype and the work each one must do), the inputs, and the contenders. This module
does the rest the same way for every op:

- check before timing (llm.c's habit): every fastgpt contender's output is compared once
  with the first contender (eager PyTorch) run in float64, FlashAttention's rule: its
  error may be at most twice eager's own error at that dtype, plus a small floor; a
  mismatch is reported in place of a time;
- time: CUDA events through ``triton.testing.do_bench`` on the GPU, median of many
  repetitions, L2 flushed before each one; on the CPU, ``timeit`` blocks of every
  contender in turn, over several rounds, median, with the process's thread count;
- relate each time to the work and the device's measured ceilings: bytes moved over the
  measured copy bandwidth, FLOPs over the measured torch.matmul rate (when a case asks);
- write the result as JSON plus a markdown table, and render both as text.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import statistics
import subprocess
import timeit
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

import fastgpt
from fastgpt.testing import as_tuple, compare

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Row statuses: "ok"; "mismatch" (failed the check); "error" (a fastgpt contender raised);
# "unsupported" (a fastgpt backend refused the input with BackendError, by design);
# "skipped" (an optional contender such as torch.compile failed); "oom" (a torch contender ran
# out of device memory). Rows whose status is one
# of these make a run fail (CLI exit status 1):
FAILED = ("mismatch", "error")


# ----------------------------------------------------------------------------------------
# What a case provides
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One timed configuration of a case and the least work any implementation must do."""

    variant: str  # e.g. "fwd", "fwd+residual", "bwd", "bwd+residual"
    shape: tuple[int, ...]
    dtype: torch.dtype
    bytes: int  # each input read once, each output written once
    flops: int = 0
    # Set by cases whose ceiling is arithmetic (GEMM epilogues, attention): percent of the
    # torch.matmul rate at this dtype is reported next to TFLOP/s.
    gemm_dtype: torch.dtype | None = None
    # Set by cases that produce tokens (decoding): tokens per call, reported as tokens/s.
    tokens: int = 0

    @property
    def label(self) -> str:
        return f"{self.variant} {shape_label(self.shape)} {DTYPE_NAMES.get(self.dtype, self.dtype)}"


@dataclass(frozen=True)
class Contender:
    """An implementation of a problem's forward function."""

    name: str  # "torch.eager", "torch.compile", "fastgpt.<backend>"
    fn: Callable[..., Any]
    checked: bool = False  # compare the output with the reference before timing
    optional: bool = False  # a failure is recorded as "skipped" (not ours), not as "error"
    # The check of a checked contender: (output, eager's output, float64 reference) -> None or
    # what failed. None: fastgpt.testing.compare, the accuracy rule. Cases whose outputs are
    # not values with an error (generated tokens) give their own.
    check: Callable[[Any, Any, Any], str | None] | None = None


@dataclass
class Workload:
    """A problem's inputs; `runner` turns a contender into the zero-argument thunk to time.

    Forward problems time ``fn(*args)``. Backward problems (``grad_outputs`` set) run the
    forward once, then time only ``torch.autograd.grad`` over the retained graph, for every
    input that requires grad; with ``with_forward`` each timed call runs the forward and then
    the backward (a training step's cost of the op).
    """

    args: tuple
    grad_outputs: tuple[torch.Tensor, ...] | None = None
    with_forward: bool = False

    def upcast(self, dtype: torch.dtype) -> Workload:
        """The same inputs in `dtype` (floating tensors only), for a high-precision reference."""

        def up(a: Any) -> Any:
            if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
                return a
            return a.detach().to(dtype).requires_grad_(a.requires_grad)

        grads = None if self.grad_outputs is None else tuple(map(up, self.grad_outputs))
        return Workload(tuple(map(up, self.args)), grads, self.with_forward)

    def runner(self, fn: Callable[..., Any]) -> Callable[[], Any]:
        args = self.args
        if self.grad_outputs is None:
            return lambda: fn(*args)
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
        grad_outputs = self.grad_outputs
        if self.with_forward:
            return lambda: torch.autograd.grad(as_tuple(fn(*args)), inputs, grad_outputs)
        outputs = as_tuple(fn(*args))
        return lambda: torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)


class Case(Protocol):
    name: str
    # Contender names each row's time is compared with ("x torch.eager" columns).
    baselines: tuple[str, ...]

    # `shapes`: the user's own shapes (``fastgpt bench --shape``), replacing the device's
    # default plan; a case raises ValueError naming the shape it cannot take.
    def problems(
        self, device: str, dtypes: Sequence[torch.dtype] | None, quick: bool,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[Problem]: ...

    def workload(self, problem: Problem, device: str) -> Workload: ...

    # The first contender is eager PyTorch: run in float64 it is the check's reference.
    def contenders(self, problem: Problem, device: str, compile: bool) -> list[Contender]: ...

    # Optional: ``notes(device) -> list[str]``, lines printed under the case's table and kept
    # in its result (what a contender runs, what a column means, what is not measured).


def fastgpt_backends(device: str) -> list[str]:
    """fastgpt backends worth timing on `device`: those available_backends() says are usable,
    less "torch" (eager PyTorch, already the baseline) and, on the CPU, "triton" (there it
    is only the interpreter, a correctness tool)."""
    names = []
    for name, status in fastgpt.available_backends().items():
        if name == "torch" or (name == "triton" and device == "cpu"):
            continue
        if status[device].available:
            names.append(name)
    return names


def standard_contenders(
    eager: Callable[..., Any],
    fastgpt_fn: Callable[[str], Callable[..., Any]],
    device: str,
    compile: bool,
) -> list[Contender]:
    """Eager PyTorch (the reference), torch.compile of that same eager function, and each
    usable fastgpt backend (`fastgpt_fn(backend)` gives its forward function)."""
    contenders = [Contender("torch.eager", eager)]
    if compile:
        # Static shapes: what a user with fixed shapes gets. torch.compile is lazy, so a
        # failure to compile surfaces at the first call, where run_problem records it.
        contenders.append(Contender("torch.compile", torch.compile(eager, dynamic=False), optional=True))
    contenders += [Contender(f"fastgpt.{b}", fastgpt_fn(b), checked=True) for b in fastgpt_backends(device)]
    return contenders


# ----------------------------------------------------------------------------------------
# Timing and ceilings
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimerSettings:
    cpu_min_run_time_s: float  # least time per block of calls of one contender (timeit)
    gpu_warmup_ms: int  # do_bench warm-up and repetition budgets (milliseconds)
    gpu_rep_ms: int
    copy_bytes: int  # size of each of the two buffers of the copy-bandwidth probe
    gemm_size: dict[str, int]  # square torch.matmul size of the GEMM-rate probe, per device


# CPU timing rounds (see Session._time_cpu_interleaved).
CPU_ROUNDS = 10

FULL_TIMER = TimerSettings(1.0, 25, 200, 256 << 20, {"cuda": 8192, "cpu": 2048})
QUICK_TIMER = TimerSettings(0.05, 5, 20, 32 << 20, {"cuda": 1024, "cpu": 256})


class Session:
    """One benchmark run on one device: timing settings, and the device's ceilings,
    measured once (on first use) and shared by every case of the run."""

    def __init__(
        self, device: str, *, quick: bool = False, compile: bool = True,
        shapes: Sequence[tuple[int, ...]] | None = None, cpu_heap: dict[str, Any] | None = None,
    ):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.quick = quick
        self.shapes = [tuple(s) for s in shapes] if shapes else None  # None: each case's plan
        self.compile = compile
        self.cpu_heap = cpu_heap  # cpuheap.setup's record of a CPU run, kept in every result
        self.timer = QUICK_TIMER if quick else FULL_TIMER
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self._copy_gbps: float | None = None
        self._gemm_tflops: dict[torch.dtype, float] = {}

    def time(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(median, interquartile range) of one call of `fn`, in milliseconds."""
        result = self.time_all([fn])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def time_all(self, fns: Sequence[Callable[[], Any]]) -> list[tuple[float, float] | Exception]:
        """`time` for each of `fns`, all under the same conditions: per fn, (median ms, IQR ms),
        or the exception it raised while being timed."""
        if self.device == "cuda":
            return [_attempt(lambda fn=fn: self._time_cuda(fn)) for fn in fns]
        return self._time_cpu_interleaved(fns)

    def _time_cuda(self, fn: Callable[[], Any]) -> tuple[float, float]:
        from triton.testing import do_bench

        # do_bench times each repetition with CUDA events after zeroing a 256 MB buffer,
        # which evicts L2, so every repetition reads its inputs from HBM (the default
        # GPU shapes are larger than L2 as well). The 0.5 quantile is the median the
        # table reports; the quartiles give the spread.
        q1, median, q3 = do_bench(
            fn,
            warmup=self.timer.gpu_warmup_ms,
            rep=self.timer.gpu_rep_ms,
            quantiles=[0.25, 0.5, 0.75],
            return_mode="median",
        )
        return median, q3 - q1

    def _time_cpu_interleaved(self, fns: Sequence[Callable[[], Any]]) -> list[tuple[float, float] | Exception]:
        """CPU timing in rounds: each round times one block of calls of every fn in turn.

        A shared VM's speed drifts by tens of percent within minutes (page-fault cost, memory
        bandwidth); timing contenders one after another would put that drift into their
        ratios. Interleaved, every contender sees the same drift. Round 0 is a warm-up that
        also sizes the blocks: each fn gets max(cpu_min_run_time, 10 calls) of timed calls in
        all, split into CPU_ROUNDS blocks. Median and IQR are over the per-call means of the
        blocks. Blocks are timed with the standard library's timeit (what
        torch.utils.benchmark.Timer wraps; its own timeit() adds two untimed warm-up calls
        per block, which would triple the run time of slow contenders)."""
        results: list[tuple[float, float] | Exception | None] = [None] * len(fns)
        blocks: list[list[float]] = [[] for _ in fns]
        number = [1] * len(fns)
        for round_ in range(CPU_ROUNDS + 1):
            for i, fn in enumerate(fns):
                if isinstance(results[i], Exception):
                    continue
                try:
                    # timeit runs the calls with the garbage collector off, as Timer does.
                    per_call = timeit.Timer(fn).timeit(number[i]) / number[i]
                except Exception as e:  # noqa: BLE001 - reported in this fn's row
                    results[i] = e
                    continue
                if round_ == 0:
                    budget = max(self.timer.cpu_min_run_time_s, 10 * per_call)
                    number[i] = max(1, round(budget / CPU_ROUNDS / per_call))
                else:
                    blocks[i].append(per_call)
        for i, times in enumerate(blocks):
            if results[i] is None:
                q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
                results[i] = (median * 1e3, (q3 - q1) * 1e3)
        return results  # type: ignore[return-value]

    def copy_bandwidth(self) -> float:
        """GB/s of a large ``dst.copy_(src)`` into a preallocated dst, counting the bytes read
        plus the bytes written: the ceiling for memory-bound ops."""
        if self._copy_gbps is None:
            n = self.timer.copy_bytes // 4
            src = torch.randn(n, device=self.device)  # random, never zeros: untouched or
            dst = torch.empty_like(src)  # zero pages can read faster than real data
            ms, _ = self.time(lambda: dst.copy_(src))
            self._copy_gbps = 2 * src.nbytes / ms / 1e6
        return self._copy_gbps

    def gemm_rate(self, dtype: torch.dtype = torch.bfloat16) -> float:
        """TFLOP/s of a square torch.matmul at `dtype`: the ceiling for arithmetic-bound ops."""
        if dtype not in self._gemm_tflops:
            n = self.timer.gemm_size[self.device]
            a = torch.randn(n, n, device=self.device, dtype=dtype)
            b = torch.randn(n, n, device=self.device, dtype=dtype)
            ms, _ = self.time(lambda: torch.matmul(a, b))
            self._gemm_tflops[dtype] = 2 * n**3 / ms / 1e9
        return self._gemm_tflops[dtype]

    def timer_description(self) -> str:
        if self.device == "cuda":
            return (
                f"triton.testing.do_bench (CUDA events, L2 flushed per repetition), median; "
                f"warmup={self.timer.gpu_warmup_ms} ms, rep={self.timer.gpu_rep_ms} ms"
            )
        return (
            f"timeit, contenders interleaved in {CPU_ROUNDS} rounds, "
            f"max({self.timer.cpu_min_run_time_s} s, 10 calls) each, median of the rounds; "
            f"{torch.get_num_threads()} threads"
        )

    def metadata(self) -> dict[str, Any]:
        """Everything a result file records besides its rows."""
        return {
            "device": device_info(self.device),
            "versions": versions(),
            "date": self.started.isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "ceilings": {
                "copy_gbps": self.copy_bandwidth(),
                "copy_bytes": 2 * self.timer.copy_bytes,
                "gemm_tflops": {DTYPE_NAMES.get(d, str(d)): r for d, r in self._gemm_tflops.items()},
            },
            "cpu_heap": self.cpu_heap,
            "settings": {
                "quick": self.quick,
                "compile": self.compile,
                "shapes": [shape_label(s) for s in self.shapes] if self.shapes else None,
                "timer": self.timer_description(),
            },
            "backends": backend_status(self.device),
        }


# ----------------------------------------------------------------------------------------
# Check and run
# ----------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shape_label(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def check_shapes(case: str, shapes: Sequence[tuple[int, ...]] | None, dims: tuple[int, ...],
                 form: str, valid: Callable[[tuple[int, ...]], bool] | None = None) -> None:
    """ValueError naming `case` and the `form` it takes for a --shape with a length not in
    `dims`, an entry below 1, or (where given) one `valid` rejects."""
    for shape in shapes or ():
        if len(shape) not in dims or min(shape) < 1 or (valid is not None and not valid(shape)):
            raise ValueError(f"{case} takes shapes {form}, got {shape_label(shape)}")


def run_problem(case: Case, problem: Problem, session: Session, log: Callable[[str], None] | None = None) -> list[dict]:
    """Check and time every contender of one problem; one row (a dict) per contender."""
    if session.compile:
        # Cases build their eager functions from shared code, so every problem would be a
        # recompile of the same code object, and past torch.compile's recompile limit it
        # silently runs eager. A reset per problem gives each one a fresh compile.
        torch.compiler.reset()
    workload = case.workload(problem, session.device)
    contenders = case.contenders(problem, session.device, session.compile)
    rows = []
    reference, reference_error = None, ""
    if any(c.checked for c in contenders):
        try:
            reference = workload.upcast(torch.float64).runner(contenders[0].fn)()
        except Exception as e:  # noqa: BLE001 - reported in the checked rows
            reference_error = _one_line(f"{type(e).__name__}: {e}")
    eager = None
    runs: dict[int, Callable[[], Any]] = {}  # row index -> the thunk to time
    for index, contender in enumerate(contenders):
        if log:
            log(f"{case.name} {problem.label} {contender.name}")
        row = {
            "case": case.name,
            "variant": problem.variant,
            "shape": list(problem.shape),
            "dtype": DTYPE_NAMES.get(problem.dtype, str(problem.dtype)),
            "contender": contender.name,
            "bytes": problem.bytes,
            "flops": problem.flops,
        }
        if contender.checked and (eager is None or reference is None):
            failed = contenders[0].name + (" in float64: " + reference_error if reference_error else "")
            out, run, outcome = None, None, ("error", f"nothing to check against: {failed} failed")
            peak = None
        else:
            check = (eager, reference) if contender.checked else None
            out, run, outcome, peak = _check(contender, workload, check)
        if index == 0:
            eager = out
        row["status"], row["detail"] = outcome
        row["peak_mib"] = peak
        row["ms"] = row["iqr_ms"] = None
        if run is not None:
            runs[index] = run
        rows.append(row)
    # Every contender that passed its check is timed in one go (interleaved on the CPU).
    for index, timed in zip(runs, session.time_all(list(runs.values()))):
        if isinstance(timed, Exception):
            rows[index]["status"], rows[index]["detail"] = _failure(contenders[index], timed)
        else:
            rows[index]["ms"], rows[index]["iqr_ms"] = timed
    _add_rates(rows, problem, session, case.baselines)
    return rows


def _check(
    contender: Contender, workload: Workload, check: tuple[Any, Any] | None
) -> tuple[Any, Callable[[], Any] | None, tuple[str, str], float | None]:
    """Run `contender` once and check the output against (eager output, float64 reference)
    unless `check` is None. Returns (the output, the thunk to time or None if it failed,
    (status, detail), peak MiB of that first run on CUDA or None)."""
    # Any exception from a contender (a compile failure, a kernel that rejects the input,
    # a crash) becomes the row's status, so one failure never hides the other rows.
    try:
        with _peak_memory() as peak:
            run = workload.runner(contender.fn)
            out = run()
        if check is not None:
            mismatch = (contender.check or compare)(out, *check)
            if mismatch:
                return out, None, ("mismatch", mismatch), peak["mib"]
    except Exception as e:  # noqa: BLE001 - see above
        return None, None, _failure(contender, e), None
    return out, run, ("ok", ""), peak["mib"]


class _peak_memory:
    """Context manager: on CUDA, the MiB allocated at the peak of the block above what was
    allocated when it began (``{"mib": ...}``; None on the CPU, where no allocator reports one).
    The first call of a contender is measured: its forward, and its backward's graph."""

    def __enter__(self) -> dict:
        self.record: dict = {"mib": None}
        self.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self.record

    def __exit__(self, *exc) -> None:
        if self.cuda and exc[0] is None:
            torch.cuda.synchronize()
            self.record["mib"] = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def _failure(contender: Contender, e: Exception) -> tuple[str, str]:
    """(status, detail) of a contender that raised."""
    if isinstance(e, torch.OutOfMemoryError) and not contender.name.startswith("fastgpt."):
        status = "oom"  # eager attention at long sequences: a result, not a failure
    elif contender.optional:
        status = "skipped"
    else:
        status = "unsupported" if isinstance(e, fastgpt.BackendError) else "error"
    return status, _one_line(f"{type(e).__name__}: {e}")


def _attempt(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or the exception it raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the caller reports it
        return e


def _add_rates(rows: list[dict], problem: Problem, session: Session, baselines: Sequence[str]) -> None:
    times = {r["contender"]: r["ms"] for r in rows if r["ms"]}
    for r in rows:
        ms = r["ms"]
        # bytes 0: a problem whose work is FLOPs only (a training step); no GB/s then.
        r["gbps"] = problem.bytes / ms / 1e6 if ms and problem.bytes else None
        r["pct_copy"] = 100 * r["gbps"] / session.copy_bandwidth() if r["gbps"] else None
        r["tflops"] = problem.flops / ms / 1e9 if ms and problem.flops else None
        r["pct_gemm"] = (
            100 * r["tflops"] / session.gemm_rate(problem.gemm_dtype)
            if r["tflops"] and problem.gemm_dtype is not None
            else None
        )
        r["tokens_per_s"] = problem.tokens / ms * 1e3 if ms and problem.tokens else None
        r["speedup"] = {b: times[b] / ms for b in baselines if ms and b in times}


def run_case(
    case: Case,
    session: Session,
    dtypes: Sequence[torch.dtype] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every problem of `case` (restricted to `dtypes` if given); returns the result
    (metadata, baselines, rows) that write_results saves and render_* print."""
    rows = []
    for problem in case.problems(session.device, dtypes, session.quick, session.shapes):
        rows += run_problem(case, problem, session, log)
    notes = getattr(case, "notes", None)
    return {"case": case.name, **session.metadata(), "baselines": list(case.baselines), "rows": rows,
            "notes": list(notes(session.device)) if notes else []}


def failed_rows(result: dict[str, Any]) -> list[dict]:
    return [r for r in result["rows"] if r["status"] in FAILED]


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {
            "kind": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
    threads = torch.get_num_threads()
    return {"kind": "cpu", "name": f"{_cpu_model()} ({threads} threads)", "threads": threads}


def device_slug(info: dict[str, Any]) -> str:
    """File-name form of the device: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    if info["kind"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["fastgpt"] = fastgpt.__version__
    return out


def git_commit() -> str | None:
    """HEAD of the checkout this file lives in ("+dirty" if tracked files other than
    bench/results changed: results do not change what is measured), or None outside a git
    checkout."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def backend_status(device: str) -> dict[str, str]:
    """fastgpt backend -> "available" or the reason it is not, on `device`."""
    return {
        name: "available" if status[device].available else status[device].reason
        for name, status in fastgpt.available_backends().items()
    }


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------


def render_header(result: dict[str, Any]) -> list[str]:
    dev, ver, ceil = result["device"], result["versions"], result["ceilings"]
    lines = [
        f"device: {dev['name']} ({dev['kind']})",
        "versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + f"; commit {result['git_commit'] or 'unknown'}",
        f"date: {result['date']}",
        f"copy bandwidth: {ceil['copy_gbps']:.1f} GB/s (dst.copy_(src), {ceil['copy_bytes'] >> 20} MiB read+written)",
    ]
    lines += [f"torch.matmul {name}: {rate:.1f} TFLOP/s" for name, rate in ceil["gemm_tflops"].items()]
    lines.append(f"timer: {result['settings']['timer']}")
    if result.get("cpu_heap"):  # CPU runs: what the optional cpuheap module set up
        from .cpuheap import describe

        lines += describe(result["cpu_heap"])
    if result["settings"]["quick"]:
        lines.append("quick run: tiny shapes (unless --shape) and short timings; a smoke test, not a measurement")
    if result["settings"].get("shapes"):
        lines.append("shapes: " + ", ".join(result["settings"]["shapes"]) + " (--shape; not the default plan)")
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = result["rows"]
    gemm = any(r["pct_gemm"] is not None for r in rows)
    flops = any(r["tflops"] is not None for r in rows)
    peak = any(r.get("peak_mib") is not None for r in rows)
    tokens = any(r.get("tokens_per_s") is not None for r in rows)
    headers = ["variant", "shape", "dtype", "contender", "ms"] + ["tokens/s"] * tokens
    headers += ["GB/s", "% copy"]
    headers += ["TFLOP/s"] * flops + ["% gemm"] * gemm + ["peak MiB"] * peak
    headers += [f"x {b}" for b in result["baselines"]] + ["status"]
    body = []
    for r in rows:
        cells = [r["variant"], shape_label(r["shape"]), r["dtype"], r["contender"]]
        cells += [_fmt(r["ms"], ".3f")] + [_fmt(r.get("tokens_per_s"), ".0f")] * tokens
        cells += [_fmt(r["gbps"], ".1f"), _fmt(r["pct_copy"], ".0f")]
        cells += [_fmt(r["tflops"], ".3g")] * flops + [_fmt(r["pct_gemm"], ".0f")] * gemm
        cells += [_fmt(r.get("peak_mib"), ".0f")] * peak
        cells += [_fmt(r["speedup"].get(b), ".2f") for b in result["baselines"]]
        cells.append(r["status"] + (f": {r['detail']}" if r["detail"] else ""))
        body.append(cells)
    return headers, body


def render_table(result: dict[str, Any]) -> str:
    """Plain-text table of a result, columns aligned (numbers to the right)."""
    headers, body = _table(result)
    widths = [max(len(c) for c in col) for col in zip(headers, *body)]
    text_cols = {0, 1, 2, 3, len(headers) - 1}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    notes = [f"note: {n}" for n in result.get("notes", ())]
    return "\n".join([f"== {result['case']} ==", line(headers), *map(line, body), *notes])


def render_markdown(result: dict[str, Any] | str | Path) -> str:
    """Markdown of a result (or of a result JSON file): header as a list, then the table."""
    if not isinstance(result, dict):
        result = json.loads(Path(result).read_text())
    headers, body = _table(result)
    lines = [f"### {result['case']}", ""]
    lines += [f"- {line}" for line in render_header(result)]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    if result.get("notes"):
        lines += [""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Save `result` as <case>-<device>-<YYYYMMDD-HHMMSS>.json plus the same name .md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.fromisoformat(result["date"]).strftime("%Y%m%d-%H%M%S")
    stem = f"{result['case']}-{device_slug(result['device'])}-{stamp}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(render_markdown(result))
    return json_path, md_path


__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FAILED",
    "Case",
    "Contender",
    "Problem",
    "Session",
    "TimerSettings",
    "Workload",
    "backend_status",
    "compare",
    "device_info",
    "device_slug",
    "failed_rows",
    "fastgpt_backends",
    "git_commit",
    "render_header",
    "render_markdown",
    "render_table",
    "run_case",
    "run_problem",
    "shape_label",
    "standard_contenders",
    "versions",
    "write_results",
]
