"""fastgpt.model.GPT: Hugging Face GPT-2 parity on every backend (logits, loss, gradients),
checkpoints both ways, KV-cache generation against the uncached model and transformers'
greedy generate, torch.compile, presets and errors."""
import json
import os

import pytest
import torch

import fastgpt
from fastgpt.model import GPT, GPTConfig

from helpers import BACKEND_DEVICES, KERNEL_BACKEND_DEVICES, assert_close_rule

VOCAB = 101


def _hf_gpt2(initializer_range=0.02, seed=0, **overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=initializer_range,
        attn_implementation="sdpa", **overrides)
    model = transformers.GPT2LMHeadModel(config).eval()
    # Biases and LayerNorm affines are initialised to 0 and 1; random ones test their layout.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _pair(tmp_path, **kwargs):
    """A random transformers GPT-2 and fastgpt's GPT loaded from its saved checkpoint."""
    hf = _hf_gpt2(**kwargs)
    hf.save_pretrained(tmp_path / "hf")
    return hf, GPT.from_pretrained(tmp_path / "hf").eval()


def _ids(b, t, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton", "native"])
def test_bf16_logits_match_transformers_gpt2_by_the_rule(backend, tmp_path):
    """bf16 on the GPU: fastgpt's error against transformers in float64 is at most twice
    transformers' own error in bf16."""
    hf, model = _pair(tmp_path)
    ids = _ids(4, 64)
    with torch.no_grad():
        ref = hf.double()(ids).logits
        want = hf.to("cuda", torch.bfloat16)(ids.cuda()).logits.cpu()
        with fastgpt.use_backend(backend):
            got = model.to("cuda", torch.bfloat16)(ids.cuda())[0].cpu()
    assert got.dtype == torch.bfloat16
    assert_close_rule(f"bf16 {backend} logits", got, want, ref, atol=1e-3)


def _next_token_targets(ids):
    """GPT's targets for transformers' labels=ids (which shifts them internally)."""
    return torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -1)), dim=1)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_logits_and_loss_match_transformers_gpt2(backend, device, tmp_path):
    hf, model = _pair(tmp_path)
    ids = _ids(2, 37)
    with torch.no_grad():
        out = hf(ids, labels=ids)
        ref = hf.double()(ids, labels=ids)
        with fastgpt.use_backend(backend):
            logits, loss = model.to(device)(ids.to(device), _next_token_targets(ids).to(device))
    assert logits.shape == (2, 37, VOCAB) and logits.dtype == torch.float32
    name = f"{backend}-{device}"
    assert_close_rule(f"{name} logits", logits.cpu(), out.logits, ref.logits, atol=1e-5)
    assert_close_rule(f"{name} loss", loss.cpu(), out.loss, ref.loss, atol=1e-5)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES
                                            if p.id in ("native-cpu", "native-cuda")])
def test_gradients_match_transformers_gpt2(backend, device, tmp_path):
    hf, model = _pair(tmp_path)
    ids = _ids(2, 29, seed=2)
    hf64 = _hf_gpt2().double()
    hf64.load_state_dict(hf.state_dict())
    hf(ids, labels=ids).loss.backward()
    hf64(ids, labels=ids).loss.backward()
    model.to(device)
    with fastgpt.use_backend(backend):
        model(ids.to(device), _next_token_targets(ids).to(device))[1].backward()
    hf_params = dict(hf.named_parameters())
    hf64_params = dict(hf64.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        # The same names as transformers'; Conv1D's weights are (in, out).
        transposed = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        want, ref = hf_params[name].grad, hf64_params[name].grad
        got = p.grad.cpu()
        assert_close_rule(f"grad {name}", got.t() if transposed else got, want, ref, atol=1e-6)
        checked += 1
    assert checked == len(hf_params)  # every parameter (the tied embedding once)


def test_save_pretrained_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
    model.save_pretrained(tmp_path / "ours")
    assert os.path.isfile(tmp_path / "ours" / "model.safetensors")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert hf.config.n_positions == 48 and hf.config.vocab_size == VOCAB
    ids = _ids(3, 20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-5, rtol=1e-5)
    again = GPT.from_pretrained(tmp_path / "ours")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_pytorch_model_bin_checkpoints_load(tmp_path):
    """A torch.save'd state dict (older transformers' format, and GPT2Model's key names
    without the "transformer." prefix)."""
    hf = _hf_gpt2()
    (tmp_path / "bin").mkdir()
    hf.config.to_json_file(tmp_path / "bin" / "config.json")
    torch.save(hf.transformer.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model = GPT.from_pretrained(tmp_path / "bin").eval()
    ids = _ids(1, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_from_pretrained_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model, not gpt2"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPT.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------ generation


def _spread_model(tmp_path):
    """Weights large enough that the next token's logits are far apart: greedy decoding
    then does not hinge on float rounding (with GPT-2's 0.02 init the top logits of a random
    model lie within ~1e-3 of each other)."""
    return _pair(tmp_path, initializer_range=0.3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_cached_generation_equals_uncached_for_prompts_of_different_lengths(backend, device,
                                                                            tmp_path):
    _, model = _spread_model(tmp_path)
    model.to(device)
    # Fewer steps through Triton's interpreter (each uncached step reruns the whole sequence;
    # 7 + 5 steps took 159 s there); every step and prompt length runs compiled elsewhere.
    steps = 3 if backend == "triton" and device == "cpu" else 7
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).to(device) for n in (1, 9, 4)]
    with fastgpt.use_backend(backend):
        cached = model.generate(prompts, steps, temperature=0.0)
        uncached = model.generate(prompts, steps, temperature=0.0, use_cache=False)
        batch = torch.stack([p[:4] for p in prompts[1:]])  # (2, 4)
        cached_batch = model.generate(batch, steps - 2, temperature=0.0)
        uncached_batch = model.generate(batch, steps - 2, temperature=0.0, use_cache=False)
    for p, c, u in zip(prompts, cached, uncached):
        assert c.shape == (p.numel() + steps,) and torch.equal(c[:p.numel()], p)
        assert torch.equal(c, u)
    assert cached_batch.shape == (2, 2 + steps) and torch.equal(cached_batch, uncached_batch)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    hf, model = _spread_model(tmp_path)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 8)]
    ours = model.generate(prompts, 10, temperature=0.0)
    for p, got in zip(prompts, ours):
        want = hf.generate(p[None], max_new_tokens=10, min_new_tokens=10, do_sample=False,
                           pad_token_id=0)
        assert torch.equal(got, want[0])


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    _, model = _spread_model(tmp_path)
    ids = _ids(2, 5, seed=7)
    a = model.generate(ids, 6, temperature=1.0, top_k=3,
                       generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, 6, temperature=1.0, top_k=3,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(a[:, :5], ids)
    top1 = model.generate(ids, 6, temperature=1.0, top_k=1,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, model.generate(ids, 6, temperature=0.0))  # top-1 is greedy


def test_generate_rejects_bad_input(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="exceeds block_size=128"):
        model.generate(torch.zeros(1, 120, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty 1-D int64"):
        model.generate([torch.zeros(3, dtype=torch.long), torch.zeros(0, dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, top_k=0)


# ------------------------------------------------------------------------------ the model


def test_forward_compiles_fullgraph():
    torch.manual_seed(8)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 256, (2, 24))
    targets = torch.randint(0, 256, (2, 24))
    want_logits, want_loss = model(ids, targets)
    compiled = torch.compile(model, fullgraph=True)
    logits, loss = compiled(ids, targets)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)


def test_presets_have_gpt2_sizes():
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.from_preset("gpt2"))
        xl = GPT(GPTConfig.from_preset("gpt2-xl"))
    assert gpt2.num_parameters() == 124_439_808  # OpenAI's GPT-2 "124M", tied embeddings
    assert xl.num_parameters() == 1_557_611_200
    assert GPTConfig.from_preset("small", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="n_embd=100 is not a multiple of n_head=3"):
        GPTConfig(n_embd=100, n_head=3)


def test_dropout_trains_unfused_and_evaluates_as_without():
    torch.manual_seed(9)
    config = GPTConfig.from_preset("tiny")
    plain = GPT(config).eval()
    dropped = GPT(GPTConfig.from_preset("tiny", dropout=0.2))
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 256, (2, 16))
    dropped.train()
    a, b = dropped(ids)[0], dropped(ids)[0]
    assert not torch.equal(a, b)  # dropout is active in training
    dropped.eval()
    torch.testing.assert_close(dropped(ids)[0], plain(ids)[0])


def test_forward_rejects_bad_input():
    model = GPT(GPTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="idx must be"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="more than block_size=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_compiled_decoding_step_gives_the_same_tokens(tmp_path):
    _, model = _spread_model(tmp_path)
    ids = _ids(2, 6, seed=10)
    want = model.generate(ids, 8, temperature=0.0)
    got = model.generate(ids, 8, temperature=0.0, compile=True)
    assert torch.equal(got, want)


def test_generation_under_autocast_caches_in_the_autocast_dtype():
    torch.manual_seed(11)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 256, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_caches(2, 8)[0].k.dtype == torch.bfloat16
        out = model.generate(ids, 3, temperature=0.0)
    assert out.shape == (2, 8) and torch.equal(out[:, :5], ids)


def test_training_step_under_autocast_keeps_float32_weights_and_stream():
    torch.manual_seed(12)
    model = GPT(GPTConfig.from_preset("tiny"))
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(ids, ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
