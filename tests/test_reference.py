"""bench/reference.py, the benchmarks' independent nanoGPT-style GPT, as an oracle: with the same
weights, fastgpt's model gives the same logits, loss and gradients (fp32, tight tolerances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import reference
from fastgpt.model import GPT, GPTConfig
from fastgpt.ops import choose_kernels

# fp32 on both sides, the same math in a different order: rounding differences only.
TOL = dict(rtol=1e-5, atol=1e-6)


def pair(bias: bool, kernels: str = "torch", vocab: int = 67, block: int = 24):
    """A fastgpt GPT and the reference holding the same weights (loaded by parameter name)."""
    shape = dict(block_size=block, vocab_size=vocab, n_layer=2, n_head=3, n_embd=48, dropout=0.0, bias=bias)
    torch.manual_seed(0)
    ref = reference.ReferenceGPT(reference.ReferenceConfig(**shape))
    ours = GPT(GPTConfig(**shape), choose_kernels(kernels, "cpu").ops)
    ours.load_state_dict(ref.state_dict(), strict=True)
    if bias:  # zero-initialised biases would hide a missing bias: make them count
        with torch.no_grad():
            our_params = dict(ours.named_parameters())
            for name, p in ref.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
                    our_params[name].copy_(p)
    return ours, ref


def batch(vocab: int, B: int = 3, T: int = 19):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    y[0, :5] = -1  # ignored targets, nanoGPT's convention
    return x, y


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("bias", [True, False])
def test_fastgpt_matches_the_reference(bias):
    ours, ref = pair(bias)
    x, y = batch(ref.config.vocab_size)
    logits_ref, loss_ref = ref(x, y)
    logits, loss = ours(x, y)
    if logits is not None:  # the chunked head never forms them
        torch.testing.assert_close(logits, logits_ref, **TOL)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    loss_ref.backward()
    loss.backward()
    ref_grads, our_grads = grads(ref), grads(ours)
    assert ref_grads.keys() == our_grads.keys() and len(ref_grads) > 0
    for name, g in ref_grads.items():
        torch.testing.assert_close(our_grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")
    # Generation's forward (no targets): the last position's logits.
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0][:, -1], ref(x)[0][:, -1], **TOL)


def test_triton_kernels_match_the_reference():
    """The Triton path (under the CPU interpreter here) against the same oracle: LayerNorm,
    the fused residual add and the chunked head + loss inside a whole model."""
    pytest.importorskip("triton")
    ours, ref = pair(bias=True, kernels="triton", vocab=40, block=8)
    x, y = batch(40, B=2, T=8)
    _, loss_ref = ref(x, y)
    _, loss = ours(x, y)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    loss_ref.backward()
    loss.backward()
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(ours)[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_a_wrong_model_is_caught():
    """The oracle has teeth: a missing bias or a wrong residual scale is far outside TOL."""
    ours, ref = pair(bias=True)
    x, y = batch(ref.config.vocab_size)
    with torch.no_grad():
        ours.transformer.h[1].mlp.c_proj.bias.zero_()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours(x, y)[1], ref(x, y)[1], **TOL)


def test_reference_train_step_learns_and_get_batch_reads_windows(tmp_path):
    path = tmp_path / "train.bin"
    tokens = (np.arange(5000) % 31).astype(np.uint16)  # next = current + 1 (mod 31)
    tokens.tofile(path)
    g = torch.Generator().manual_seed(0)
    x, y = reference.get_batch(path, 4, 16, torch.device("cpu"), g)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    torch.manual_seed(0)
    model = reference.ReferenceGPT(reference.ReferenceConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32))
    opt = reference.configure_optimizer(model, 0.1, 3e-3, (0.9, 0.99))
    assert [len(group["params"]) for group in opt.param_groups] == [6, 10]  # matrices | gains and biases
    step = reference.make_train_step(model, opt, lambda: reference.get_batch(path, 8, 16, torch.device("cpu"), g),
                                     torch.device("cpu"), reference.nanogpt_dtype(torch.device("cpu")))
    first = step().item()
    for _ in range(60):
        last = step().item()
    assert first > 3.0 and last < 0.5 * first
