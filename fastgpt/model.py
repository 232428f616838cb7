"""A GPT-2 on fastgpt's fused ops: one file, nanoGPT's structure, Hugging Face's names.

    config = GPTConfig.from_preset("gpt2")        # or GPTConfig(n_layer=..., ...)
    model = GPT(config)                           # or GPT.from_pretrained("path/to/gpt2")
    logits, loss = model(idx, targets)            # idx, targets: (B, T) int64
    out = model.generate(idx, max_new_tokens=32, temperature=0.0)   # greedy, with a KV cache

Every block is pre-norm, as GPT-2's::

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))         mlp(h) = c_proj(gelu_tanh(c_fc(h)))

and every step of it is one fastgpt op: ln_1 a LayerNorm; the attention's qkv projection, the
causal attention and the output projection; ln_2 adds the attention's output to the residual
stream and normalises the sum in one pass (:class:`fastgpt.nn.LayerNorm` with ``residual``);
c_fc has the bias and GELU fused into its GEMM, c_proj the residual add. The embeddings are
tied to the output projection (``lm_head``).

The model calls fastgpt modules only, so the backend is chosen the library's way: the automatic
choice, or ``with fastgpt.use_backend("torch"):`` for the eager reference (F.layer_norm,
F.linear, SDPA) on the same weights.

Parameter names are those of transformers' ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn
.weight``, ...), with ``nn.Linear``'s (out, in) weight layout where GPT-2's Conv1D stores
(in, out): :meth:`GPT.from_pretrained` and :meth:`GPT.save_pretrained` transpose those.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import CausalSelfAttention, KVCache, LayerNorm, Linear

# (n_layer, n_head, n_embd) of OpenAI's GPT-2 sizes, and small configs for tests and CPU demos
# (a byte-level vocabulary of 256: `fastgpt train` tokenises text as UTF-8 bytes).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),             # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),     # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),      # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),         # 1558M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=256),
    "small": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=256),
}

# The weights GPT-2's Conv1D stores transposed, (in, out), by their name's last two parts.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# transformers' names of GPT-2's tanh-approximated GELU.
_HF_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclasses.dataclass
class GPTConfig:
    """A GPT-2 shape. ``n_inner`` None is ``4 * n_embd``; ``dropout`` applies to the
    embeddings, the attention weights and both residual branches in training (0 by default:
    the fused paths do not drop)."""

    vocab_size: int = 50257
    block_size: int = 1024  # the longest sequence (position embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: Optional[int] = None
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """One of PRESETS ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "small"),
        with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"GPTConfig: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not a multiple of "
                             f"n_head={self.n_head}")

    @property
    def hidden(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.hidden, config.bias, activation="gelu_tanh")
        self.c_proj = Linear(config.hidden, config.n_embd, config.bias)
        self.dropout = config.dropout

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + c_proj(gelu_tanh(c_fc(x)))."""
        h = self.c_fc(x)  # (B, T, 4C)
        if self.training and self.dropout > 0:
            return residual + F.dropout(self.c_proj(h), self.dropout)
        return self.c_proj(h, residual=residual)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, bias=config.bias,
                                        dropout=config.dropout)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        a = self.attn(self.ln_1(x), cache)  # (B, T, C)
        # Under torch.autocast a comes in the autocast dtype while the residual stream keeps
        # its own (float32), as eager's x + a would promote it.
        h_norm, h = self.ln_2(a.to(x.dtype), residual=x)  # h = x + a, h_norm = ln_2(h)
        return self.mlp(h_norm, residual=h)  # (B, T, C)


Prompts = Union[Tensor, Sequence[Tensor]]


class GPT(nn.Module):
    """GPT-2 (see the module docstring). ``forward(idx, targets=None)`` takes token ids
    ``(B, T)`` int64 with T <= block_size and returns ``(logits (B, T, vocab_size) in the
    weights' dtype, loss)``; loss is the mean cross-entropy over targets ``(B, T)`` (entries -1
    are ignored), or None without targets."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------ forward

    def _hidden(self, idx: Tensor, caches: Optional[List[KVCache]] = None) -> Tensor:
        """The final hidden states (B, T, C) of idx (B, T); with caches, idx continues each
        row at its cache's length and the caches advance."""
        B, T = idx.shape
        if caches is None:
            if T > self.config.block_size:
                raise ValueError(f"GPT: {T} tokens are more than block_size="
                                 f"{self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            pos = caches[0].seqlens.long()[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i])  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"GPT: idx must be (B, T) int64, got {idx.dtype} {tuple(idx.shape)}")
        logits = self.lm_head(self._hidden(idx))  # (B, T, V)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"GPT: targets {tuple(targets.shape)} must have idx's shape "
                                 f"{tuple(idx.shape)}")
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------------ generation

    def new_caches(self, batch: int, max_len: int) -> List[KVCache]:
        """One empty :class:`fastgpt.nn.KVCache` per layer on the weights' device (dtype: see
        :meth:`fastgpt.nn.CausalSelfAttention.new_cache`)."""
        return [block.attn.new_cache(batch, max_len) for block in self.transformer.h]

    @torch.no_grad()
    def generate(self, idx: Prompts, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, *, use_cache: bool = True,
                 compile: bool = False,
                 generator: Optional[torch.Generator] = None) -> Prompts:
        """Continue each prompt by ``max_new_tokens`` tokens.

        Args:
            idx: ``(B, T)`` int64 prompts of one length, or a list of 1-D int64 prompts of
                different lengths (each at least one token).
            temperature: logits are divided by it before sampling; 0 picks the most likely
                token (greedy, deterministic).
            top_k: sample only among the k most likely tokens (None: all).
            use_cache: decode one token per step over a preallocated KV cache per layer
                (:func:`fastgpt.attention_with_kvcache`); False re-runs the whole sequence each
                step (the reference the cache must match).
            compile: run the one-token decoding step through ``torch.compile`` (fullgraph,
                static shapes; compiled once per model, batch size and cache length), which
                removes the per-op Python overhead that dominates small decoding steps.
            generator: the random generator for sampling.

        Returns:
            idx's form: ``(B, T + max_new_tokens)``, or a list of 1-D tensors, each prompt
            followed by its new tokens. A prompt plus its new tokens must fit block_size.
        """
        batched = isinstance(idx, Tensor)
        if batched and idx.dim() != 2:
            raise ValueError(f"GPT.generate: idx must be (B, T) or a list of 1-D prompts, got "
                             f"shape {tuple(idx.shape)}")
        prompts = list(idx)  # (T,) each
        for i, p in enumerate(prompts):
            if p.dim() != 1 or p.numel() == 0 or p.dtype != torch.long:
                raise ValueError(f"GPT.generate: prompt {i} must be a non-empty 1-D int64 "
                                 f"tensor, got {p.dtype} {tuple(p.shape)}")
        longest = max((p.numel() for p in prompts), default=0) + max_new_tokens
        if longest > self.config.block_size:
            raise ValueError(f"GPT.generate: a prompt of {longest - max_new_tokens} tokens plus "
                             f"{max_new_tokens} new ones exceeds block_size="
                             f"{self.config.block_size}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"GPT.generate: top_k must be None or >= 1, got {top_k}")
        if not prompts or max_new_tokens <= 0:
            return idx
        if use_cache:
            steps = self._cached_steps(prompts, batched, max_new_tokens, temperature, top_k,
                                       generator, compile)
        else:
            steps = self._uncached_steps(prompts, batched, max_new_tokens, temperature, top_k,
                                         generator)
        new = torch.stack(list(steps), dim=1)  # (B, max_new_tokens)
        if batched:
            return torch.cat((idx, new), dim=1)
        return [torch.cat((p, n)) for p, n in zip(prompts, new)]

    def _pick(self, logits: Tensor, temperature: float, top_k: Optional[int],
              generator: Optional[torch.Generator]) -> Tensor:
        """The next token (B,) from the last position's logits (B, V)."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def _decode_step(self, token: Tensor, caches: List[KVCache]) -> Tensor:
        """The next-token logits (B, V) of one new token per row (B, 1)."""
        return self.lm_head(self._hidden(token, caches)[:, -1])

    def _cached_steps(self, prompts, batched, max_new_tokens, temperature, top_k, generator,
                      compile):
        decode = self._decode_step
        if compile:
            if getattr(self, "_compiled_decode", None) is None:
                self._compiled_decode = torch.compile(self._decode_step, fullgraph=True,
                                                      dynamic=False)
            decode = self._compiled_decode
        longest = max(p.numel() for p in prompts)
        caches = self.new_caches(len(prompts), longest + max_new_tokens)
        if batched:  # one prefill for the whole batch
            last = self.lm_head(self._hidden(torch.stack(prompts), caches)[:, -1])  # (B, V)
        else:  # each prompt on its own rows of the caches
            last = torch.cat([
                self.lm_head(self._hidden(p[None], [c.rows(b, b + 1) for c in caches])[:, -1])
                for b, p in enumerate(prompts)])  # (B, V)
        for i in range(max_new_tokens):
            token = self._pick(last, temperature, top_k, generator)  # (B,)
            yield token
            if i + 1 < max_new_tokens:
                last = decode(token[:, None], caches)  # (B, V)

    def _uncached_steps(self, prompts, batched, max_new_tokens, temperature, top_k, generator):
        seqs = list(prompts)
        for _ in range(max_new_tokens):
            if batched:
                last = self(torch.stack(seqs))[0][:, -1]  # (B, V)
            else:
                last = torch.cat([self(s[None])[0][:, -1] for s in seqs])  # (B, V)
            token = self._pick(last, temperature, top_k, generator)  # (B,)
            seqs = [torch.cat((s, t[None])) for s, t in zip(seqs, token)]
            yield token

    # ------------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, device=None,
                        dtype: Optional[torch.dtype] = None) -> "GPT":
        """A GPT from a local Hugging Face GPT-2 checkpoint directory: config.json and
        model.safetensors (needs the safetensors package) or pytorch_model.bin. Nothing is
        downloaded. The weights keep their stored dtype unless ``dtype`` is given."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"GPT.from_pretrained: {path!r} is not a directory (a local "
                                    "checkpoint with config.json and model.safetensors or "
                                    "pytorch_model.bin; nothing is downloaded)")
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"GPT.from_pretrained: {path!r} has no config.json")
        with open(config_file) as f:
            config = _config_from_hf(json.load(f), config_file)
        state = _read_weights(path)
        model = cls(config)
        model.load_state_dict(_from_hf_state(state, config), strict=True)
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        """Write a checkpoint directory transformers' ``GPT2LMHeadModel.from_pretrained``
        loads: config.json and model.safetensors (pytorch_model.bin where safetensors is not
        installed), Conv1D weights in GPT-2's (in, out) layout, the tied lm_head left out."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(_config_to_hf(self.config), f, indent=2)
        state = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            t = t.detach().cpu()
            state[name] = (t.t() if name.endswith(_CONV1D) else t).contiguous()
        try:
            from safetensors.torch import save_file
        except ImportError:
            torch.save(state, os.path.join(path, "pytorch_model.bin"))
        else:
            save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _config_from_hf(hf: dict, where: str) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"GPT.from_pretrained: {where} is a {hf['model_type']!r} model, not gpt2")
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_GELU_TANH:
        raise ValueError(f"GPT.from_pretrained: {where}: activation_function {act!r} is not "
                         f"GPT-2's tanh GELU ({', '.join(_HF_GELU_TANH)})")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError(f"GPT.from_pretrained: {where}: untied word embeddings are not supported")
    return GPTConfig(vocab_size=hf.get("vocab_size", 50257),
                     block_size=hf.get("n_positions", 1024), n_layer=hf.get("n_layer", 12),
                     n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
                     n_inner=hf.get("n_inner"), dropout=0.0,
                     layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))


def _config_to_hf(config: GPTConfig) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": True,
        # GPT-2's <|endoftext|> where the vocabulary is GPT-2's; none for other vocabularies
        # (transformers would otherwise assume 50256).
        "bos_token_id": 50256 if config.vocab_size == 50257 else None,
        "eos_token_id": 50256 if config.vocab_size == 50257 else None,
    }


def _read_weights(path: str) -> dict:
    st = os.path.join(path, "model.safetensors")
    if os.path.isfile(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"GPT.from_pretrained: {st} needs the safetensors package "
                              "(pip install safetensors)") from None
        return load_file(st)
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"GPT.from_pretrained: {path!r} has neither model.safetensors nor "
                            "pytorch_model.bin (sharded checkpoints are not supported)")


def _from_hf_state(state: dict, config: GPTConfig) -> dict:
    """transformers' GPT-2 state dict (GPT2LMHeadModel's or GPT2Model's keys) as GPT's."""
    out = {}
    for name, t in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal-mask buffers of older transformers versions
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from GPT2Model
        out[name] = t.t() if name.endswith(_CONV1D) else t
    out.setdefault("lm_head.weight", out.get("transformer.wte.weight"))
    if out["lm_head.weight"] is None:
        raise ValueError("GPT.from_pretrained: the checkpoint has no transformer.wte.weight")
    return out


__all__ = ["GPT", "GPTConfig", "PRESETS"]
