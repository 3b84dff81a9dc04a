"""The GPT: nanoGPT's names, GPT-2's initialisation, loss, generation."""

import math

import pytest
import torch

from fastgpt.model import GPT, GPTConfig, INIT_STD, padded_vocab_size


def tiny(**kw):
    args = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def test_state_dict_uses_nanogpt_names():
    keys = set(tiny().state_dict())
    for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight",
              "lm_head.weight"):
        assert k in keys
    assert not any("bias" in k for k in tiny(bias=False).state_dict())


def test_forward_runs_every_layer_norm_in_order():
    """Each LayerNorm module is applied through its own forward (ln_2 fuses the residual add in),
    so hooks, profilers and readers see all of them: ln_1 and ln_2 per block, then ln_f."""
    m = tiny()
    ran = []
    for name, module in m.named_modules():
        if name.rsplit(".", 1)[-1].startswith("ln_"):
            module.register_forward_hook(lambda mod, args, out, name=name: ran.append(name))
    m(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    assert ran == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
                   "transformer.ln_f"]


def test_embeddings_are_tied():
    m = tiny()
    assert m.transformer.wte.weight is m.lm_head.weight


def test_gpt2_init_scales_residual_projections():
    m = tiny(n_layer=4, n_embd=128, vocab_size=256)
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in m.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in m.transformer.h])
    assert proj.std().item() == pytest.approx(INIT_STD / math.sqrt(2 * 4), rel=0.05)
    assert fc.std().item() == pytest.approx(INIT_STD, rel=0.05)


def test_loss_at_init_is_near_uniform_and_ignores_minus_one():
    m = tiny()
    x = torch.randint(0, 64, (3, 16))
    y = torch.randint(0, 64, (3, 16))
    logits, loss = m(x, y)
    assert logits.shape == (3, 16, 64)
    assert loss.item() == pytest.approx(math.log(64), abs=0.15)
    y_masked = y.clone()
    y_masked[:, 8:] = -1
    _, loss_masked = m(x, y_masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 64), y[:, :8].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


def test_causality_future_tokens_do_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 64, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % 64
    y = torch.zeros_like(x)
    a, _ = m(x, y)
    b, _ = m(x2, y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_sequence_longer_than_block_is_an_error():
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_generate_greedy_top_k_and_vocab_limit():
    m = tiny().eval()
    x = torch.randint(0, 50, (2, 4))
    out = m.generate(x, 20, top_k=1)
    assert out.shape == (2, 24) and torch.equal(out[:, :4], x)
    # top_k=1 is greedy: the same as taking the argmax one token at a time.
    idx = x
    for _ in range(20):
        logits, _ = m(idx[:, -16:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)
    sampled = m.generate(x, 200, temperature=2.0, vocab_limit=50, generator=torch.Generator().manual_seed(0))
    assert sampled.max().item() < 50  # the padding ids 50..63 never come out


def test_generate_beyond_block_size_crops_context():
    m = tiny().eval()
    out = m.generate(torch.zeros(1, 1, dtype=torch.long), 40)
    assert out.shape == (1, 41)


def test_crop_block_size():
    m = tiny()
    m.crop_block_size(8)
    assert m.transformer.wpe.weight.shape == (8, 32) and m.config.block_size == 8
    m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot grow"):
        m.crop_block_size(32)


def test_padded_vocab_and_flops():
    assert padded_vocab_size(50257, 64) == 50304
    assert padded_vocab_size(84, 64) == 128 and padded_vocab_size(84, 1) == 84
    m = tiny()
    cfg = m.config
    assert m.flops_per_token() == 6 * m.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    # GPT-2 124M has 124,439,808 parameters with its tied head counted once; without the
    # position embeddings (1024 x 768), 123,653,376.
    gpt2 = GPT(GPTConfig(vocab_size=50257))
    assert gpt2.num_params(non_embedding=False) == 124_439_808
    assert gpt2.num_params() == 123_653_376
