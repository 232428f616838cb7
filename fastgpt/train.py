"""Train a GPT on a text file, one token per byte: ``fastgpt train`` and :func:`train`.

    config = TrainConfig(data="input.txt", preset="small", steps=1000)
    result = train(config)                      # result.model, result.losses
    print(sample(result.model, "\\n", 200))

The text is read as UTF-8 bytes and every byte is a token (ids 0..255, the "tiny" and "small"
presets' vocabulary), so there is nothing to download or fit. Each step draws ``batch_size``
random windows of ``block_size + 1`` bytes with a seeded ``torch.Generator``, predicts each byte
from the ones before it, and takes one AdamW step (weight decay on 2-D weights only, as
nanoGPT), with a linear warm-up then cosine decay of the learning rate and gradient clipping.

Precision: on CUDA the forward runs under bf16 ``torch.autocast`` while the weights, their
gradients and the optimizer state stay fp32 (the master weights); on CPU everything is fp32.

Checkpoints (``<out_dir>/ckpt.pt``) hold the model and optimizer state, the step, the model and
training configs as dicts, the loss history and the random generators' states, so a run resumed
from one continues exactly as the uninterrupted run would have (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .backends import BACKENDS, status as backend_status, use_backend
from .model import PRESETS, GPT, GPTConfig

VOCAB_SIZE = 256  # one token per byte
CHECKPOINT = "ckpt.pt"  # the file name inside out_dir

# ------------------------------------------------------------------------------ tokenizer


def encode(text: str) -> Tensor:
    """The UTF-8 bytes of `text` as token ids: (N,) int64 in 0..255."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    """Token ids (a tensor or a sequence of ints in 0..255) back to text; bytes that are not
    valid UTF-8 (a window can cut a character in half) become U+FFFD."""
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="replace")


def load_tokens(path: str) -> Tensor:
    """The bytes of the file at `path` as tokens: (N,) uint8 (8 times smaller than int64;
    batches are widened to int64 as they are drawn)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train: data file {path!r} does not exist")
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


# ------------------------------------------------------------------------------ batches


class Batches:
    """Random windows of a token stream: each :meth:`next` draws ``batch_size`` start offsets
    uniformly from the stream with its own ``torch.Generator`` (so the same seed gives the same
    batches, whatever else uses torch's global generator) and returns inputs and the next-byte
    targets.

    Args:
        tokens: (N,) integer tokens, N >= block_size + 1.
        batch_size, block_size: B and T of each batch.
        seed: the generator's seed.
    """

    def __init__(self, tokens: Tensor, batch_size: int, block_size: int, seed: int):
        if tokens.dim() != 1 or tokens.numel() < block_size + 1:
            raise ValueError(f"Batches: tokens must be 1-D with at least block_size + 1 = "
                             f"{block_size + 1} entries, got shape {tuple(tokens.shape)}")
        self.windows = tokens.unfold(0, block_size + 1, 1)  # (N - T, T + 1), a view
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Tuple[Tensor, Tensor]:
        """(x, y): (B, T) int64 each on the CPU; y[b, t] is the token after x[b, t]."""
        starts = torch.randint(len(self.windows), (self.batch_size,), generator=self.generator)
        chunk = self.windows[starts].long()  # (B, T + 1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass
class TrainConfig:
    """One training run. ``None`` fields take the default their comment gives."""

    data: str  # a text file, read as bytes
    preset: str = "small"  # a GPTConfig preset with vocab_size 256 ("tiny", "small")
    steps: int = 1000  # train until this many optimizer steps are done (counting resumed ones)
    batch_size: int = 16
    block_size: Optional[int] = None  # the training window; None: the preset's (at most that)
    lr: float = 1e-3  # the peak learning rate
    min_lr: Optional[float] = None  # where the cosine decay ends; None: lr / 10
    warmup_steps: Optional[int] = None  # linear warm-up; None: steps // 10, at most 100
    lr_decay_steps: Optional[int] = None  # the cosine reaches min_lr here; None: steps
    weight_decay: float = 0.1  # on 2-D weights (matmuls, embeddings) only
    betas: Tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # clip the gradients' global norm to this; 0: no clipping
    val_fraction: float = 0.1  # the file's tail held out for the validation loss
    eval_every: int = 0  # validation loss every this many steps (and at the end); 0: never
    eval_batches: int = 10  # batches per validation loss
    log_every: int = 1  # progress every this many steps (and at the end)
    save_every: int = 0  # checkpoint every this many steps (and at the end); 0: at the end
    out_dir: Optional[str] = None  # where ckpt.pt goes; None: no checkpoints
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    seed: int = 1337  # the initial weights and the batches
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when there is one)
    backend: Optional[str] = None  # fastgpt's backend ("torch", "triton", "native"); None: auto

    def model_config(self) -> GPTConfig:
        """The GPTConfig of the preset (ValueError if unknown or not byte-level)."""
        if self.preset not in PRESETS:
            raise ValueError(f"train: unknown preset {self.preset!r}; presets: "
                             f"{', '.join(PRESETS)}")
        config = GPTConfig.from_preset(self.preset)
        if config.vocab_size != VOCAB_SIZE:
            byte_level = [n for n, p in PRESETS.items() if p.get("vocab_size") == VOCAB_SIZE]
            raise ValueError(f"train: preset {self.preset!r} has a {config.vocab_size}-token "
                             f"vocabulary, not the {VOCAB_SIZE} bytes this trainer feeds it; "
                             f"byte-level presets: {', '.join(byte_level)}")
        return config

    def window(self) -> int:
        """The training block size T."""
        return self.block_size if self.block_size is not None else self.model_config().block_size

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"train: device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train: device 'cuda': torch sees no CUDA device")
        return torch.device(self.device)

    def checkpoint_path(self) -> Optional[str]:
        return None if self.out_dir is None else os.path.join(self.out_dir, CHECKPOINT)

    def validate(self) -> None:
        """Check the config against the data file, the device and the checkpoint before
        anything trains: FileNotFoundError or ValueError with a message naming the field."""
        model_config = self.model_config()
        for name in ("steps", "batch_size", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train: {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train: lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"train: val_fraction must be in [0, 1), got {self.val_fraction}")
        T = self.window()
        if not 1 <= T <= model_config.block_size:
            raise ValueError(f"train: block_size must be in 1..{model_config.block_size} (preset "
                             f"{self.preset!r}'s block_size), got {T}")
        if not os.path.isfile(self.data):
            raise FileNotFoundError(f"train: data file {self.data!r} does not exist")
        size = os.path.getsize(self.data)
        if size < T + 1:
            raise ValueError(f"train: data file {self.data!r} has {size} bytes; a training "
                             f"window needs block_size + 1 = {T + 1}")
        device = self.torch_device()
        if self.backend is not None:
            if self.backend not in BACKENDS:
                raise ValueError(f"train: backend must be None or one of {BACKENDS}, got "
                                 f"{self.backend!r}")
            usable = backend_status(self.backend, device)
            if not usable:
                raise ValueError(f"train: backend {self.backend!r} is unavailable on "
                                 f"{device.type}: {usable.reason}")
        if self.resume:
            path = self.checkpoint_path()
            if path is None or not os.path.isfile(path):
                raise FileNotFoundError(f"train: resume: no checkpoint {path!r} (out_dir "
                                        f"{self.out_dir!r})")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            _check_resumable(ckpt, self, model_config)


def _check_resumable(ckpt: dict, config: TrainConfig, model_config: GPTConfig) -> None:
    """The checkpoint's model and batch shape must be this run's (the rest may change)."""
    saved = ckpt["train_config"]
    if ckpt["model_config"] != dataclasses.asdict(model_config):
        raise ValueError(f"train: resume: the checkpoint holds preset {saved['preset']!r}'s "
                         f"model ({ckpt['model_config']}), not that of preset {config.preset!r}")
    for name, value in (("batch_size", config.batch_size), ("block_size", config.window())):
        if saved[name] != value:
            raise ValueError(f"train: resume: the checkpoint was trained with {name}="
                             f"{saved[name]}, this run asks for {value}")


# ------------------------------------------------------------------------------ pieces


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of 0-based step `step`: linear warm-up to lr, then a cosine decay to
    min_lr at lr_decay_steps, min_lr after that (nanoGPT's schedule)."""
    min_lr = config.min_lr if config.min_lr is not None else config.lr / 10
    warmup = config.warmup_steps if config.warmup_steps is not None else min(100, config.steps // 10)
    total = config.lr_decay_steps if config.lr_decay_steps is not None else config.steps
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    if step >= total:
        return min_lr
    ratio = (step - warmup) / (total - warmup)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.lr - min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the parameters of two or more dimensions (matmul weights and
    embeddings) and none on biases and norm affines."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied embedding once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                             fused=device.type == "cuda")


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the weights stay fp32); nothing on CPU (fp32 throughout)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: GPT, batches: Batches, n_batches: int, device: torch.device) -> float:
    """The mean loss over the next `n_batches` batches, the model in eval mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(n_batches):
        x, y = batches.next()
        with autocast(device):
            total += model(x.to(device), y.to(device))[1].item()
    model.train(was_training)
    return total / n_batches


def split(tokens: Tensor, val_fraction: float, block_size: int) -> Tuple[Tensor, Optional[Tensor]]:
    """(train, val): the last `val_fraction` of the tokens are held out for validation when
    that is at least one window (block_size + 1 tokens) and leaves one to train on; otherwise
    every token trains and val is None."""
    n_val = int(len(tokens) * val_fraction)
    if n_val < block_size + 1 or len(tokens) - n_val < block_size + 1:
        return tokens, None
    return tokens[:-n_val], tokens[-n_val:]


@torch.no_grad()
def sample(model: GPT, prompt: str, max_new_bytes: int, *, temperature: float = 0.8,
           top_k: Optional[int] = 50, seed: int = 0) -> str:
    """`prompt` followed by `max_new_bytes` bytes the model generates, as text (invalid UTF-8
    replaced). Prompt plus new bytes must fit the model's block_size."""
    device = next(model.parameters()).device
    idx = encode(prompt)[None].to(device)  # (1, T)
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_bytes, temperature=temperature, top_k=top_k,
                         generator=generator)  # (1, T + max_new_bytes)
    model.train(was_training)
    return decode(out[0])


# ------------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class TrainResult:
    model: GPT
    step: int  # optimizer steps done, resumed ones included
    losses: List[float]  # the training loss of every step, losses[i] that of step i + 1
    val_losses: Dict[int, float]  # step -> validation loss
    checkpoint: Optional[str]  # the last checkpoint written, if any
    resumed_from: int  # the checkpoint's step (0: a fresh start)


Progress = Callable[[int, int, str], None]  # (step, steps, text), e.g. fastgpt.cli's bar


def train(config: TrainConfig, progress: Optional[Progress] = None) -> TrainResult:
    """Train (or resume) the run `config` describes; see the module docstring.

    `progress(step, steps, text)` is called every ``log_every`` steps and after the last one,
    with text such as ``"loss 1.2345 val 1.3456 | 52,000 tok/s"`` (tokens per second of the
    training steps alone, not counting validation or checkpoints).

    Raises FileNotFoundError or ValueError for a bad config (see :meth:`TrainConfig.validate`),
    FloatingPointError if the loss stops being finite.
    """
    config.validate()
    device = config.torch_device()
    T = config.window()
    torch.manual_seed(config.seed)  # the initial weights
    model = GPT(config.model_config()).to(device)
    optimizer = make_optimizer(model, config, device)
    train_tokens, val_tokens = split(load_tokens(config.data), config.val_fraction, T)
    batches = Batches(train_tokens, config.batch_size, T, config.seed)
    step, losses, val_losses = 0, [], {}
    path = config.checkpoint_path()
    if config.resume:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batches.generator.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout's, where the config has any
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        step, losses, val_losses = ckpt["step"], list(ckpt["losses"]), dict(ckpt["val_losses"])
        del ckpt
    resumed_from, saved = step, None

    def save() -> str:
        os.makedirs(config.out_dir, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "model_config": dataclasses.asdict(model.config),
            "train_config": dataclasses.asdict(config),
            "data_rng": batches.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "losses": losses,
            "val_losses": val_losses,
        }
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a run killed mid-save keeps the previous checkpoint
        return path

    model.train()
    tokens_per_step = config.batch_size * T
    window_time, window_steps = 0.0, 0
    with use_backend(config.backend):
        while step < config.steps:
            start = time.perf_counter()
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batches.next()  # (B, T) int64 each
            with autocast(device):
                _, loss = model(x.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # gradients in the weights' dtype, fp32
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(loss.item())  # waits for the GPU: the time below is the step's
            step += 1
            window_time += time.perf_counter() - start
            window_steps += 1
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"train: the loss is {losses[-1]} at step {step} "
                                         f"(lr {lr:.3g}); try a lower lr")

            last = step == config.steps
            if val_tokens is not None and config.eval_every and (
                    step % config.eval_every == 0 or last):
                val_batches = Batches(val_tokens, config.batch_size, T, config.seed + 1)
                val_losses[step] = evaluate(model, val_batches, config.eval_batches, device)
            if path is not None and (last or config.save_every and step % config.save_every == 0):
                saved = save()
            if progress is not None and (step % config.log_every == 0 or last):
                text = f"loss {losses[-1]:.4f}"
                if val_losses:
                    text += f" val {val_losses[max(val_losses)]:.4f}"
                rate = window_steps * tokens_per_step / max(window_time, 1e-9)
                progress(step, config.steps, f"{text} | {rate:,.0f} tok/s")
                window_time, window_steps = 0.0, 0
    return TrainResult(model, step, losses, val_losses, saved, resumed_from)


__all__ = ["Batches", "TrainConfig", "TrainResult", "decode", "encode", "load_tokens",
           "learning_rate", "make_optimizer", "sample", "train"]
