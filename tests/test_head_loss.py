"""fastgpt.head_loss: the chunked LM head + cross-entropy against F.linear + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.head_loss import chunked_head_loss
from fastgpt.model import GPT, GPTConfig
from fastgpt.profiling import cpu_peak_allocated_bytes

IGNORE = -1
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def inputs(n, c, v, dtype=torch.float32, ignored=(2, 5)):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, c, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(i for i in ignored if i < n)] = IGNORE
    return hidden, weight, targets


def reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden.float(), weight.float()), targets, ignore_index=IGNORE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, c, v, rows", [(37, 24, 1009, 8), (37, 24, 1009, 37), (37, 24, 1009, 100),
                                            (1, 16, 3, 1), (64, 33, 257, 7)])
def test_matches_torch_forward_and_backward(n, c, v, rows, dtype):
    hidden, weight, targets = inputs(n, c, v, dtype)
    h_ref, w_ref = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    upstream = torch.tensor(1.7)  # a scale the backward must carry
    loss = chunked_head_loss(hidden, weight, targets, IGNORE, rows)
    expected = reference(h_ref, w_ref, targets)
    (loss * upstream).backward()
    (expected * upstream).backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == dtype
    torch.testing.assert_close(loss, expected, **TOL[dtype])
    torch.testing.assert_close(hidden.grad.float(), h_ref.grad, **TOL[dtype])
    torch.testing.assert_close(weight.grad.float(), w_ref.grad, **TOL[dtype])


def test_every_target_ignored_is_zero_loss_and_zero_gradient():
    hidden, weight, targets = inputs(9, 8, 50)
    targets[:] = IGNORE
    loss = chunked_head_loss(hidden, weight, targets, IGNORE, 4)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


def test_without_grad_only_the_loss_is_computed():
    hidden, weight, targets = inputs(20, 8, 50)
    with torch.no_grad():
        loss = chunked_head_loss(hidden, weight, targets, IGNORE, 3)
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach(), **TOL[torch.float32])


def test_shape_mismatch_is_one_line():
    hidden, weight, targets = inputs(10, 8, 50)
    with pytest.raises(ValueError, match=r"expected hidden \(N, C\), weight \(V, C\)"):
        chunked_head_loss(hidden, weight[:, :4], targets)


def test_never_forms_the_full_logits():
    n, c, v, rows = 512, 16, 4099, 32
    hidden, weight, targets = inputs(n, c, v)
    logits_bytes = n * v * 4

    def chunked():
        hidden.grad = weight.grad = None
        chunked_head_loss(hidden, weight, targets, IGNORE, rows).backward()

    def unfused():
        hidden.grad = weight.grad = None
        reference(hidden, weight, targets).backward()

    # a chunk of logits (and its temporaries), the fp32 weight-gradient accumulator, grad_hidden
    budget = 3 * rows * v * 4 + 3 * weight.numel() * 4 + 3 * hidden.numel() * 4
    assert cpu_peak_allocated_bytes(chunked) < budget < 0.5 * logits_bytes
    assert cpu_peak_allocated_bytes(unfused) > 2 * logits_bytes


def test_the_cpu_torch_path_chunks_a_large_vocabulary(monkeypatch):
    """The model's torch ops hand a head past one chunk of logits to the chunked loss, with the
    same loss and gradients as forming the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=16, bias=True))
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    full_logits, full_loss = model(x, y)
    full_loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(ops, "CPU_FUSED_HEAD_MIN_BYTES", 32 * 300 * 4 - 1)
    logits, loss = model(x, y)
    loss.backward()
    assert full_logits is not None and logits is None
    torch.testing.assert_close(loss, full_loss, **TOL[torch.float32])
    for g, p in zip(full, model.parameters()):
        torch.testing.assert_close(p.grad, g, **TOL[torch.float32])
