"""The ``fastgpt`` command (also ``python -m fastgpt``).

    fastgpt bench [CASE ...] [--device cpu|cuda|auto] [--dtype DTYPE ...] [--shape SHAPE ...]
                  [--quick] [--warm-heap | --first-touch] [--out DIR] [--no-compile]
    fastgpt info
    fastgpt profile attention [--seq-lens 512,1024,...] [--batch B] [--heads H] [--head-dim D]
                  [--causal] [--backward] [--dtype DTYPE] [--device cpu|cuda|auto]
                  [--json FILE] [--plot FILE.png] [--trace DIR]
    fastgpt train --data FILE [--preset tiny|small] [--steps N] [--batch-size B]
                  [--block-size T] [--lr LR] [--device cpu|cuda|auto]
                  [--backend torch|triton|native|auto] [--out DIR] [--resume] [--seed S]
                  [--eval-every N] [--save-every N] [--log-every N] [--sample BYTES]

Exit status: 0 ok; 1 a fastgpt contender failed its check against eager PyTorch or raised
(a backend refusing an input by design, with BackendError, is reported but not a failure),
or training diverged (the loss stopped being finite); 2 usage error (for train also a missing
or too short data file, or a checkpoint to resume that is missing or does not match).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Where `fastgpt bench` writes unless --out says otherwise: ignored by git (.gitignore), so
# that running a benchmark never dirties a checkout. Results worth keeping are copied into
# bench/results/ and committed on purpose.
DEFAULT_OUT = "bench/results/local"

# Where `fastgpt train` keeps its checkpoint unless --out says otherwise (runs/train-<preset>),
# ignored by git for the same reason.
DEFAULT_TRAIN_OUT = "runs"


def _bench(args: argparse.Namespace) -> int:
    # Imported here: `fastgpt info` should not pay for the benchmark machinery.
    from . import bench

    cases = list(dict.fromkeys(args.cases)) or list(bench.CASES)
    unknown = [c for c in cases if c not in bench.CASES]
    if unknown:
        args.parser.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(bench.CASES)}")
    device = _resolve_device(args)

    shapes = list(dict.fromkeys(args.shape)) if args.shape else None
    for name in cases:  # a shape a case cannot take is a usage error, before anything runs
        try:
            bench.CASES[name].problems(device, None, args.quick, shapes)
        except ValueError as exc:
            args.parser.error(f"--shape: {exc}")

    cpu_heap = None
    if device == "cpu":
        # Before any benchmark tensor exists: mallopt only governs later blocks. The flags'
        # work (mallopt, the probe) runs only when asked; the record is kept either way, so
        # that a CPU result says which heap its times include.
        from .bench import cpuheap

        cpu_heap = cpuheap.setup(warm=args.warm_heap, first_touch=args.first_touch)
    elif args.warm_heap or args.first_touch:
        flag = "--warm-heap" if args.warm_heap else "--first-touch"
        args.parser.error(f"{flag}: CPU only (CUDA's caching allocator already reuses memory)")
    session = bench.Session(device, quick=args.quick, compile=not args.no_compile, shapes=shapes,
                            cpu_heap=cpu_heap)
    dtypes = [bench.DTYPES[d] for d in dict.fromkeys(args.dtype)] if args.dtype else None

    print("\n".join(bench.render_header(session.metadata())) + "\n", flush=True)
    failed = []
    for name in cases:
        result = bench.run_case(bench.CASES[name], session, dtypes, log=_progress)
        json_path, md_path = bench.write_results(result, args.out)
        print(bench.render_table(result))
        print(f"wrote {json_path} and {md_path.name}\n", flush=True)
        failed += bench.failed_rows(result)
    if failed:
        print(f"{len(failed)} row(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['case']} {r['variant']} {r['dtype']} {r['contender']}: {r['status']}: {r['detail']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _shape(text: str) -> tuple[int, ...]:
    """argparse type for --shape: sizes joined by "x", e.g. 4x768."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes joined by 'x' (e.g. 4x768), got {text!r}")
    return shape


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _info(args: argparse.Namespace) -> int:
    import fastgpt

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fastgpt {fastgpt.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}, python {platform.python_version()}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"devices: cpu ({torch.get_num_threads()} threads), cuda: {cuda}")
    print("backends:")
    for name, per_device in fastgpt.available_backends().items():
        for device, status in per_device.items():
            print(f"  {name:<7} {device:<5} {'available' if status.available else 'no: ' + status.reason}")
    return EXIT_OK


def _resolve_device(args: argparse.Namespace) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        args.parser.error("--device cuda: torch sees no CUDA device")
    return args.device


def _profile(args: argparse.Namespace) -> int:
    import json

    from .bench import profile

    device = _resolve_device(args)
    try:
        seq_lens = profile.parse_seq_lens(args.seq_lens)
    except ValueError as exc:
        args.parser.error(f"--seq-lens: {exc}")
    for flag in ("batch", "heads", "head_dim"):
        if getattr(args, flag) < 1:
            args.parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            args.parser.error("--plot needs matplotlib (pip install matplotlib)")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    spec = profile.Spec(device=device, seq_lens=seq_lens, batch=args.batch, heads=args.heads,
                        head_dim=args.head_dim, causal=args.causal, backward=args.backward,
                        dtype=dtype, trace_dir=args.trace)
    result = profile.run(spec, progress=_progress_bar)
    print(profile.render_table(result))
    print("\n".join(result["summary"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        profile.plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.trace:
        print(f"wrote Chrome traces under {args.trace} (open in chrome://tracing or Perfetto)")
    failed = [p for p in result["points"]
              if p["status"] == "error" or (p["status"] == "oom" and p["contender"].startswith("fastgpt."))]
    for p in failed:
        print(f"{p['contender']} T={p['seq_len']}: {p['status']}: {p['detail']}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _progress_bar(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<48}", end=end,
          file=sys.stderr, flush=True)


def _train(args: argparse.Namespace) -> int:
    from . import train
    from .backends import use_backend

    out = args.out if args.out is not None else f"{DEFAULT_TRAIN_OUT}/train-{args.preset}"
    config = train.TrainConfig(
        data=args.data, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
        block_size=args.block_size, lr=args.lr, eval_every=args.eval_every,
        save_every=args.save_every, log_every=args.log_every, out_dir=out, resume=args.resume,
        seed=args.seed, device=args.device,
        backend=None if args.backend == "auto" else args.backend)
    try:
        config.validate()
    except (FileNotFoundError, ValueError) as exc:
        args.parser.error(str(exc).removeprefix("train: "))
    model_config = config.model_config()
    block_size = config.window()
    n_sample = args.sample if args.sample is not None else min(200, model_config.block_size - 1)
    if not 0 <= n_sample < model_config.block_size:
        args.parser.error(f"--sample must be in 0..{model_config.block_size - 1} (one prompt "
                          f"byte plus the sample fit block_size), got {n_sample}")

    device = config.torch_device()
    precision = "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"
    print(f"fastgpt train: preset {args.preset} ({model_config.n_layer} layers, "
          f"{model_config.n_embd} wide), {os.path.getsize(args.data):,} bytes of {args.data}, "
          f"batch {args.batch_size}x{block_size}, {device.type} {precision}, backend "
          f"{args.backend}", flush=True)
    if args.resume:
        step = torch.load(config.checkpoint_path(), map_location="cpu", weights_only=True,
                          mmap=True)["step"]
        print(f"resuming from step {step} of {config.checkpoint_path()}", flush=True)
    try:
        result = train.train(config, progress=_progress_bar)
    except FloatingPointError as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.step == result.resumed_from:
        print(f"nothing to do: the checkpoint is at step {result.step}, --steps {args.steps}")
        return EXIT_OK
    summary = f"step {result.step}: loss {result.losses[-1]:.4f}"
    if result.val_losses:
        summary += f", val loss {result.val_losses[max(result.val_losses)]:.4f}"
    print(summary + (f"; wrote {result.checkpoint}" if result.checkpoint else ""))
    if n_sample:
        with use_backend(config.backend):
            text = train.sample(result.model, "\n", n_sample, seed=args.seed)
        print(f"sample:\n{text}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .backends import BACKENDS

    parser = argparse.ArgumentParser(prog="fastgpt", description="fastgpt kernels: benchmarks, diagnostics and training")
    parser.add_argument("--version", action="version", version=f"fastgpt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="check and time the ops against eager PyTorch and torch.compile",
        description=(
            "Check each fastgpt backend against eager PyTorch, then time it; print a table and "
            "write <case>-<device>-<date>.json and .md under --out. Exit 1 if any check fails."
        ),
    )
    bench.add_argument("cases", nargs="*", metavar="CASE", help="cases to run (default: all)")
    bench.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="auto: cuda if available")
    bench.add_argument(
        "--dtype",
        action="append",
        choices=("fp32", "bf16", "fp16"),
        help="run only these dtypes (repeatable; default: the device's default set)",
    )
    bench.add_argument("--quick", action="store_true", help="tiny shapes, short timings: a smoke test")
    bench.add_argument(
        "--shape",
        action="append",
        type=_shape,
        metavar="SHAPE",
        help=("time these shapes, every variant, instead of the default plan (repeatable; norms: "
              "ROWSxHIDDEN, e.g. 4x768; attention: BxHxTxD; decode: BxHqxHkxTxD, e.g. 1x32x8x32768x128; "
              "linear: MxNxK; model: BxT for train/prefill, BxPxN for decode)"),
    )
    heap = bench.add_mutually_exclusive_group()
    heap.add_argument(
        "--warm-heap",
        action="store_true",
        help=(
            "CPU: make glibc malloc reuse freed buffers, so times exclude the page faults of "
            "first-touching fresh outputs (default: include them, as users see them)"
        ),
    )
    heap.add_argument(
        "--first-touch",
        action="store_true",
        help="CPU: also measure the write rate to freshly allocated pages, the floor under large outputs",
    )
    bench.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=(
            "result directory (default: %(default)s, ignored by git; "
            "commit results worth keeping under bench/results/)"
        ),
    )
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    bench.set_defaults(handler=_bench, parser=bench)  # usage errors name `fastgpt bench`

    info = commands.add_parser("info", help="versions and the backends usable here")
    info.set_defaults(handler=_info)

    profile = commands.add_parser("profile", help="profile an op's speed and memory against its size")
    ops = profile.add_subparsers(dest="op", metavar="OP", required=True)
    attention = ops.add_parser(
        "attention",
        help="attention: time and peak memory of each backend vs eager and SDPA, per sequence length",
        description=(
            "For each sequence length, time and peak memory of every fastgpt backend usable here, "
            "of eager attention (T x T softmax materialised) and of torch's SDPA; a summary line "
            "per length. Eager running out of memory is recorded as OOM. Exit 1 if a fastgpt "
            "backend fails."
        ),
    )
    attention.add_argument("--seq-lens", default="512,1024,2048,4096", metavar="T,T,...",
                           help="sequence lengths (default: %(default)s)")
    attention.add_argument("--batch", type=int, default=1, help="B (default: %(default)s)")
    attention.add_argument("--heads", type=int, default=12, help="H (default: %(default)s)")
    attention.add_argument("--head-dim", type=int, default=64, help="D (default: %(default)s)")
    attention.add_argument("--causal", action="store_true", help="causal attention")
    attention.add_argument("--backward", action="store_true", help="time forward + backward")
    attention.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                           help="default: bf16 on cuda, fp32 on cpu")
    attention.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    attention.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    attention.add_argument("--plot", metavar="FILE.png",
                           help="plot speed-up and memory against T (needs matplotlib)")
    attention.add_argument("--trace", metavar="DIR",
                           help="write a torch.profiler Chrome trace per contender and length")
    attention.set_defaults(handler=_profile, parser=attention)

    train = commands.add_parser(
        "train",
        help="train a small GPT on a text file, one token per byte",
        description=(
            "Train a byte-level GPT preset on a local text file: AdamW, warm-up and cosine "
            "learning rate, bf16 autocast with fp32 weights on CUDA (fp32 on CPU). A progress "
            "bar shows the loss and tokens/s; --out keeps a checkpoint that --resume continues "
            "exactly; a short sample is printed at the end."
        ),
    )
    train.add_argument("--data", required=True, metavar="FILE", help="the text to train on")
    train.add_argument("--preset", default="small", metavar="NAME",
                       help="a byte-level GPTConfig preset: tiny or small (default: %(default)s)")
    train.add_argument("--steps", type=int, default=1000,
                       help="train until this many steps are done, resumed ones included "
                            "(default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=16, help="B (default: %(default)s)")
    train.add_argument("--block-size", type=int,
                       help="the training window T (default and most: the preset's block_size)")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="peak learning rate (default: %(default)s)")
    train.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                       help="auto: cuda if available")
    train.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                       help="fastgpt's kernels (default: auto; torch: eager PyTorch)")
    train.add_argument("--out", metavar="DIR",
                       help=f"checkpoint directory (default: {DEFAULT_TRAIN_OUT}/train-PRESET, "
                            "ignored by git)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in --out (same preset, batch and "
                            "block size)")
    train.add_argument("--seed", type=int, default=1337,
                       help="initial weights, batches and sample (default: %(default)s)")
    train.add_argument("--eval-every", type=int, default=100, metavar="N",
                       help="validation loss on the file's last 10%% every N steps; 0: never "
                            "(default: %(default)s)")
    train.add_argument("--save-every", type=int, default=100, metavar="N",
                       help="checkpoint every N steps and at the end; 0: at the end only "
                            "(default: %(default)s)")
    train.add_argument("--log-every", type=int, default=1, metavar="N",
                       help="update the progress bar every N steps (default: %(default)s)")
    train.add_argument("--sample", type=int, metavar="BYTES",
                       help="generate this many bytes at the end; 0: none (default: 200, at "
                            "most block_size - 1)")
    train.set_defaults(handler=_train, parser=train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits with status 2 on a usage error
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.handler(args)
