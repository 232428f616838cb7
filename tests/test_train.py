"""fastgpt.train and `fastgpt train`: the byte tokenizer and batches, eager and fused training
runs agreeing step by step, checkpoints that resume the exact run, the CLI end to end, clear
errors, and DistributedDataParallel (gloo, two CPU processes) giving single-process gradients."""
import dataclasses
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastgpt
from fastgpt import cli
from fastgpt.model import GPT, GPTConfig
from fastgpt.train import (Batches, TrainConfig, decode, encode, learning_rate, load_tokens,
                           sample, train)

from helpers import assert_close_rule

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "a", "cat")


def _text_file(tmp_path, n_words=3000, seed=0, name="input.txt"):
    """Pseudo-random words from a small vocabulary: structure a tiny model learns in a few
    dozen steps (the byte distribution alone takes the loss from ln 256 = 5.5 to about 3)."""
    rng = random.Random(seed)
    path = tmp_path / name
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n")
    return path


def _tiny(path, **overrides):
    fields = dict(data=str(path), preset="tiny", steps=30, batch_size=8, block_size=32, lr=3e-3,
                  warmup_steps=5, val_fraction=0.0, device="cpu")
    return TrainConfig(**{**fields, **overrides})


# ------------------------------------------------------------------------------ pieces


def test_byte_tokenizer_round_trips_utf8_and_replaces_cut_characters():
    text = "héllo, wörld: \u00e9\u4e2d\n"
    ids = encode(text)
    assert ids.dtype == torch.long and ids.tolist() == list(text.encode("utf-8"))
    assert int(ids.min()) >= 0 and int(ids.max()) <= 255
    assert decode(ids) == text and decode(ids.tolist()) == text
    cut = encode("\u4e2d")[:2]  # a three-byte character cut after two bytes
    assert decode(cut) == "\ufffd"


def test_batches_are_seeded_windows_of_the_data(tmp_path):
    path = _text_file(tmp_path, n_words=200)
    tokens = load_tokens(str(path))
    assert tokens.dtype == torch.uint8 and tokens.tolist() == list(path.read_bytes())
    a, b = Batches(tokens, 5, 17, seed=3), Batches(tokens, 5, 17, seed=3)
    torch.manual_seed(0)  # the global generator plays no part
    x, y = a.next()
    torch.manual_seed(1)
    assert all(torch.equal(u, v) for u, v in zip((x, y), b.next()))
    assert x.shape == y.shape == (5, 17) and x.dtype == y.dtype == torch.long
    data = bytes(tokens.tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        window = bytes(row_x + row_y[-1:])
        assert window in data and row_y[:-1] == row_x[1:]
    assert not torch.equal(a.next()[0], x)  # the generator advances
    # Every start offset is reachable, the last one included.
    small = Batches(torch.arange(6, dtype=torch.uint8), 200, 3, seed=0)
    assert sorted(set(small.next()[0][:, 0].tolist())) == [0, 1, 2]


def test_learning_rate_warms_up_then_decays_to_min_lr(tmp_path):
    config = TrainConfig(data="unused", steps=100, lr=1e-3, warmup_steps=10)
    lrs = [learning_rate(s, config) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)  # the peak, then a monotone cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way down
    assert lrs[100:] == [pytest.approx(1e-4)] * 20  # min_lr = lr / 10 from lr_decay_steps on


# ------------------------------------------------------------------------------ training


def test_eager_and_fused_training_agree_and_the_loss_goes_down(tmp_path):
    """30 steps of the tiny preset from the same seed (same weights, same batches), eager
    PyTorch against fastgpt's automatic choice (the native C++ kernels on CPU).

    Tolerance: the loss curves may differ by 1e-5 relative at any step. The two runs differ
    only in fp32 rounding (other summation orders in the fused kernels); measured here (torch
    2.13 CPU, 2 threads) the largest difference over the 30 steps is 2.3e-7 relative, a couple
    of fp32 ulps, so 1e-5 leaves 40x for other machines and thread counts, while an error that
    matters is far outside it: the same eager run with the learning rate 0.1% higher moves the
    curve by 5e-4 relative.
    """
    assert fastgpt.available_backends()["native"]["cpu"], "the native CPU kernels are not built"
    path = _text_file(tmp_path)
    eager = train(_tiny(path, backend="torch")).losses
    fused = train(_tiny(path, backend=None)).losses
    assert len(eager) == len(fused) == 30
    rel = max(abs(e - f) / e for e, f in zip(eager, fused))
    assert rel < 1e-5, f"loss curves differ by {rel:.3g} relative:\n{eager}\n{fused}"
    # Different kernels ran: equal curves would mean eager was compared with itself.
    assert eager != fused, "the automatic backend ran eager PyTorch"
    for losses in (eager, fused):
        assert abs(losses[0] - 5.55) < 0.1, losses  # ln 256: a uniform guess per byte
        assert losses[-1] < losses[0] - 2.0, losses


class _Interrupted(Exception):
    pass


def test_resume_continues_the_interrupted_run_exactly(tmp_path):
    """A run killed after step 4, resumed from its step-3 checkpoint, ends bitwise where the
    uninterrupted run does: weights, optimizer state, loss history, validation losses."""
    path = _text_file(tmp_path, n_words=1000)
    config = _tiny(path, steps=6, batch_size=4, block_size=16, warmup_steps=None,
                   val_fraction=0.2, eval_every=2, eval_batches=2, save_every=3)
    straight = train(dataclasses.replace(config, out_dir=str(tmp_path / "straight")))

    def kill_after_step_4(step, steps, text):
        if step == 4:
            raise _Interrupted

    interrupted = dataclasses.replace(config, out_dir=str(tmp_path / "resumed"))
    with pytest.raises(_Interrupted):
        train(interrupted, progress=kill_after_step_4)
    assert torch.load(interrupted.checkpoint_path(), weights_only=True)["step"] == 3
    resumed = train(dataclasses.replace(interrupted, resume=True))

    assert resumed.resumed_from == 3 and resumed.step == straight.step == 6
    assert resumed.losses == straight.losses and len(straight.losses) == 6
    assert resumed.val_losses == straight.val_losses and sorted(straight.val_losses) == [2, 4, 6]
    want, got = straight.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    a, b = (torch.load(r.checkpoint, weights_only=True) for r in (straight, resumed))
    assert a["step"] == b["step"] == 6
    assert torch.equal(a["data_rng"], b["data_rng"])
    for state_a, state_b in zip(a["optimizer"]["state"].values(),
                                b["optimizer"]["state"].values()):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    assert a["model_config"] == dataclasses.asdict(GPTConfig.from_preset("tiny"))
    assert a["train_config"]["preset"] == "tiny"


@pytest.mark.parametrize("change,error,match", [
    (dict(data="missing.txt"), FileNotFoundError, "does not exist"),
    (dict(block_size=4096), ValueError, r"block_size must be in 1\.\.128"),
    (dict(preset="huge"), ValueError, "unknown preset 'huge'"),
    (dict(preset="gpt2"), ValueError, "50257-token vocabulary"),
    (dict(resume=True, out_dir="nowhere"), FileNotFoundError, "no checkpoint"),
    (dict(backend="cuda"), ValueError, "backend must be"),
    (dict(steps=0), ValueError, "steps must be >= 1"),
])
def test_bad_configs_raise_clear_errors(tmp_path, change, error, match):
    path = _text_file(tmp_path, n_words=50)
    change = {k: str(tmp_path / v) if k in ("data", "out_dir") else v for k, v in change.items()}
    with pytest.raises(error, match=match):
        train(_tiny(path, **change))


def test_a_file_shorter_than_a_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_bytes(b"x" * 32)  # block_size 32 needs 33 bytes
    with pytest.raises(ValueError, match="has 32 bytes; a training window needs block_size "
                                         r"\+ 1 = 33"):
        train(_tiny(path))
    path.write_bytes(b"x" * 33)
    assert len(train(_tiny(path, steps=1)).losses) == 1


def test_resume_refuses_another_model_or_batch_shape(tmp_path):
    path = _text_file(tmp_path, n_words=200)
    config = _tiny(path, steps=1, batch_size=2, block_size=16, out_dir=str(tmp_path / "run"))
    train(config)
    with pytest.raises(ValueError, match="trained with batch_size=2, this run asks for 3"):
        train(dataclasses.replace(config, resume=True, steps=2, batch_size=3))
    with pytest.raises(ValueError, match="not that of preset 'small'"):
        train(dataclasses.replace(config, resume=True, steps=2, preset="small"))


def test_sample_continues_the_prompt_reproducibly():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    a, b = (sample(model, "the ", 20, seed=5) for _ in range(2))
    assert a == b and a.startswith("the ") and a != sample(model, "the ", 20, seed=6)
    assert model.training  # left as it was


@pytest.mark.gpu
def test_cuda_trains_in_bf16_autocast_with_fp32_master_weights(tmp_path):
    """On CUDA the forward runs under bf16 autocast while the weights, their gradients and
    AdamW's state stay fp32. The loss curves of the fused and the eager run (both bf16
    autocast) are held to the house rule against the fp32 run on the CPU (same weights, same
    batches): fused's largest deviation at most 2x eager's plus bf16's floor."""
    path = _text_file(tmp_path)
    cpu = train(_tiny(path, backend="torch")).losses
    eager = train(_tiny(path, device="cuda", backend="torch")).losses
    fused = train(_tiny(path, device="cuda", backend=None, out_dir=str(tmp_path / "run")))
    ckpt = torch.load(fused.checkpoint, weights_only=True)
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    for state in ckpt["optimizer"]["state"].values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert fused.losses[-1] < fused.losses[0] - 2.0, fused.losses
    as_tensor = lambda losses: torch.tensor(losses, dtype=torch.float64)  # noqa: E731
    assert_close_rule("bf16 loss curve", as_tensor(fused.losses), as_tensor(eager),
                      as_tensor(cpu), atol=4e-3 * max(cpu))
    assert sample(fused.model, "the ", 16).startswith("the ")


# ------------------------------------------------------------------------------ the CLI


def _cli_args(data, out, *more):
    return ["train", "--data", str(data), "--preset", "tiny", "--batch-size", "2",
            "--block-size", "16", "--device", "cpu", "--out", str(out), "--eval-every", "2",
            *more]


def test_cli_trains_checkpoints_and_resumes(tmp_path, capsys):
    data, out = _text_file(tmp_path, n_words=500), tmp_path / "run"
    assert cli.main(_cli_args(data, out, "--steps", "2", "--sample", "8")) == cli.EXIT_OK
    stdout, stderr = capsys.readouterr()
    first = torch.load(out / "ckpt.pt", weights_only=True)
    assert first["step"] == 2 and len(first["losses"]) == 2
    assert "preset tiny" in stdout and "step 2: loss" in stdout and "sample:\n" in stdout
    assert "2/2 loss" in stderr and "tok/s" in stderr  # the progress bar

    assert cli.main(_cli_args(data, out, "--steps", "4", "--resume", "--sample", "0")) == 0
    stdout, stderr = capsys.readouterr()
    second = torch.load(out / "ckpt.pt", weights_only=True)
    assert "resuming from step 2" in stdout and "sample:" not in stdout
    assert "3/4 loss" in stderr and "1/4 loss" not in stderr  # it went on from step 2
    assert second["step"] == 4 and second["losses"][:2] == first["losses"]
    assert len(second["losses"]) == 4 and sorted(second["val_losses"]) == [2, 4]

    assert cli.main(_cli_args(data, out, "--steps", "4", "--resume")) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_cli_checkpoints_into_an_ignored_folder_by_default(tmp_path, monkeypatch, capsys):
    data = _text_file(tmp_path, n_words=100)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["train", "--data", str(data), "--preset", "tiny", "--steps", "1", "--batch-size",
            "1", "--block-size", "8", "--device", "cpu", "--sample", "0"]
    assert cli.main(args) == 0
    default = f"{cli.DEFAULT_TRAIN_OUT}/train-tiny/ckpt.pt"
    assert (work / default).is_file()
    repo = Path(__file__).resolve().parent.parent
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", default])
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{default} is not ignored by git"


@pytest.mark.parametrize("args,message", [
    (["--data", "{tmp}/missing.txt"], "does not exist"),
    (["--data", "{short}"], "a training window needs block_size + 1"),
    (["--data", "{data}", "--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "{data}", "--block-size", "129"], "block_size must be in 1..128"),
    (["--data", "{data}", "--resume", "--out", "{tmp}/none"], "no checkpoint"),
    (["--data", "{data}", "--sample", "128"], "--sample must be in 0..127"),
    (["--preset", "tiny"], "--data"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, args, message):
    data = _text_file(tmp_path, n_words=100)
    short = tmp_path / "short.txt"
    short.write_text("abc")
    args = [a.format(tmp=tmp_path, data=data, short=short) for a in args]
    if "--preset" not in args:
        args += ["--preset", "tiny"]
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--device", "cpu", "--steps", "1", *args])
    assert exc.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------ DDP

WORLD = 2
DDP_TIMEOUT_S = 120
DDP_WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradients(model, x, y, backend):
    model.zero_grad(set_to_none=True)
    with fastgpt.use_backend(backend):
        _, loss = model(x, y)
        loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_ddp_gradients_match_a_single_process_run(tmp_path):
    """Two gloo ranks on CPU, each half of a (4, 32) batch through the fused (native) ops under
    DistributedDataParallel: the averaged gradients are the single-process gradients of the
    whole batch, from the same weights.

    Tolerance: against the single-process fused run, 1e-5 of each gradient's largest entry.
    Only the order of fp32 sums differs (each rank sums its 64 rows, the all-reduce adds the
    two halves): measured here, at most 4.7e-7 of the largest entry, a few ulps. A rank
    missing from the average, a wrong scale or a stale bucket (the tied embedding) is an O(1)
    error (without DDP's all-reduce: 1.0 of the largest entry). And against the float64
    reference, the house accuracy rule, as in test_model.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 32), generator=g)  # (B, T)
    y = torch.randint(0, 256, (4, 32), generator=g)
    init_path, batch_path = tmp_path / "init.pt", tmp_path / "batch.pt"
    torch.save(model.state_dict(), init_path)
    torch.save((x, y), batch_path)

    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")  # the ranks talk over loopback only
    port = _free_port()
    # Output to files, not pipes: a rank blocked on a full pipe that nobody reads while the
    # test waits on the other rank would stall both in their collective.
    logs = [tmp_path / f"rank{rank}.log" for rank in range(WORLD)]
    ranks = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            ranks.append(subprocess.Popen(
                [sys.executable, str(DDP_WORKER), str(rank), str(WORLD), str(port),
                 str(init_path), str(batch_path), str(tmp_path)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + DDP_TIMEOUT_S
    try:
        for rank, proc in enumerate(ranks):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"DDP rank {rank} did not finish within {DDP_TIMEOUT_S} s:\n"
                            + "\n".join(f"rank {r}: {log.read_text()[-2000:]}"
                                         for r, log in enumerate(logs)))
            assert proc.returncode == 0, (f"DDP rank {rank} failed:\n"
                                          f"{logs[rank].read_text()[-4000:]}")
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    ddp_loss = sum(torch.load(tmp_path / f"loss{r}.pt", weights_only=True)
                   for r in range(WORLD)) / WORLD
    loss, fused = _gradients(model, x, y, "native")
    _, eager = _gradients(model, x, y, "torch")
    _, ref = _gradients(model.double(), x, y, "torch")
    assert ddp_grads.keys() == fused.keys()
    assert torch.allclose(ddp_loss, loss, rtol=1e-6, atol=0)
    for name, got in ddp_grads.items():
        scale = fused[name].abs().max().item()
        diff = (got - fused[name]).abs().max().item()
        assert diff <= 1e-5 * scale, f"{name}: DDP differs by {diff:.3g} (largest entry {scale:.3g})"
        assert_close_rule(f"DDP grad {name}", got, eager[name], ref[name], atol=1e-6)
