"""kernels/cross_entropy.py against its fp32 torch references: the row kernel's loss and gradient,
and the fused head's loss and both gradients, over vocabularies that are not a multiple of the
block, ignored targets, chunk boundaries, compile, and the memory the fused head is for. On a CPU
the kernels run in Triton's interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch

from fastgpt.profiling import cpu_peak_allocated_bytes

pytest.importorskip("triton")
from kernels import cross_entropy as ce  # noqa: E402  (after the interpreter is chosen)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -1

# (rtol, atol) of the row kernel against the fp32 reference. The loss is computed in fp32 from the
# very input values the reference upcasts, so it agrees to fp32 summation order whatever the input
# dtype; the gradient is stored in the input dtype. A missing 1/n_counted is off by a factor n >= 2,
# a wrong ignore mask puts O(1/n) where the reference has 0, and a last block off by one column
# either leaves a logit where a gradient belongs or pulls a neighbour into the sum: all far outside
# these.
CE_TOL = {
    torch.float32: {"loss": (1e-6, 1e-6), "grad": (1e-5, 1e-9)},
    # softmax - onehot stored in bf16 (the interpreter truncates, < 2^-7; a GPU rounds to nearest,
    # 2^-8); the tests divide by n in fp32.
    torch.bfloat16: {"loss": (1e-6, 1e-6), "grad": (1.5 * 2**-7, 1e-9)},
    # The same rounding in fp16; gradients below 6e-5 are subnormal, spaced 6e-8.
    torch.float16: {"loss": (1e-6, 1e-6), "grad": (1.5 * 2**-10, 1e-7)},
}
# The chunk logits come out of a matmul in the input dtype, so bf16 carries their rounding
# (2^-9 of |logit|) into the loss and both gradients; measured worst 3e-4 (loss), 0.5% (grads).
LINEAR_TOL = {
    # grad_hidden sums V products that largely cancel: fp32 rounding reaches 7e-7 at V = 50257.
    torch.float32: {"loss": (1e-6, 1e-6), "grad": (1e-5, 3e-6)},
    torch.bfloat16: {"loss": (2e-3, 1e-3), "grad": (1e-2, 1e-3)},
}


def make_targets(shape, vocab, ignored=()):
    """Random targets with the listed flat positions set to IGNORE."""
    t = torch.randint(0, vocab, shape, device=DEVICE)
    t.view(-1)[list(ignored)] = IGNORE
    return t


def close(actual, expected, tol):
    rtol, atol = tol
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def run_rows(logits, targets, block_size=None):
    """(loss, gradient) of the row kernel, its gradient of the summed row losses divided by
    n_counted (as the op's backward does, in fp32), and of the reference."""
    grad = logits.detach().clone()
    n_counted = ce.count_targets(targets, IGNORE)
    rows = ce.cross_entropy_rows(grad, targets, IGNORE, write_grad=True, block_size=block_size)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref = logits.detach().to(torch.float32, copy=True).requires_grad_()
    ref_loss = ce.cross_entropy_reference(ref, targets, IGNORE)
    ref_loss.backward()
    return (ce.mean_loss(rows, n_counted), grad.float() / n_counted.clamp(min=1)), (ref_loss, ref.grad)


# --- the row kernel ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_rows, vocab, ignored",
    [
        (1, 65, ()),  # one row, vocab far below one block
        (7, 65, (2, 5)),  # prime rows
        (11, 1031, (0,)),  # odd vocab
        (5, 50257, (3,)),  # GPT-2's vocab: 6 full blocks and 1105 columns
        (3, 50304, ()),  # padded vocab: 6 full blocks and a partial one
    ],
)
def test_cross_entropy_rows_match_reference(dtype, n_rows, vocab, ignored):
    logits = (3 * torch.randn(n_rows, vocab, device=DEVICE)).to(dtype)
    targets = make_targets((n_rows,), vocab, ignored)
    (loss, grad), (ref_loss, ref_grad) = run_rows(logits, targets)
    tol = CE_TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    close(loss, ref_loss, tol["loss"])
    close(grad, ref_grad, tol["grad"])
    assert not grad[list(ignored)].any(), "ignored rows get no gradient"


def test_cross_entropy_rows_fp16():
    logits = (3 * torch.randn(6, 1031, device=DEVICE)).half()
    (loss, grad), (ref_loss, ref_grad) = run_rows(logits, make_targets((6,), 1031, (4,)))
    close(loss, ref_loss, CE_TOL[torch.float16]["loss"])
    close(grad, ref_grad, CE_TOL[torch.float16]["grad"])


@pytest.mark.parametrize("block_size", [16, 256])
def test_cross_entropy_many_blocks(block_size):
    """Force many blocks per row, with a partial last one: 1031 = 4 x 256 + 7 = 64 x 16 + 7."""
    vocab = 1031
    logits = 3 * torch.randn(5, vocab, device=DEVICE)
    logits[1, -1] = 12.0  # the last column dominates its row: dropping it changes everything
    targets = make_targets((5,), vocab, (2,))
    targets[3] = vocab - 1
    (loss, grad), (ref_loss, ref_grad) = run_rows(logits, targets, block_size)
    close(loss, ref_loss, CE_TOL[torch.float32]["loss"])
    close(grad, ref_grad, CE_TOL[torch.float32]["grad"])


def test_masked_logits_before_the_first_finite_one():
    """-inf logits (a masked vocabulary) filling whole blocks before the first finite one."""
    logits = torch.randn(3, 100, device=DEVICE)
    logits[:, :40] = float("-inf")  # blocks 0 and 1 of 16 entirely, block 2 in part
    targets = torch.tensor([50, 99, IGNORE], device=DEVICE)
    (loss, grad), (ref_loss, ref_grad) = run_rows(logits, targets, block_size=16)
    close(loss, ref_loss, CE_TOL[torch.float32]["loss"])
    close(grad, ref_grad, CE_TOL[torch.float32]["grad"])


def test_cross_entropy_3d_with_a_fully_ignored_sequence():
    """(B, T, V) logits and (B, T) targets, as a model produces them; sequence 1 is all padding."""
    B, T, V = 3, 5, 65
    logits = 3 * torch.randn(B, T, V, device=DEVICE)
    targets = make_targets((B, T), V)
    targets[1] = IGNORE
    targets[2, 4] = IGNORE
    (loss, grad), (ref_loss, ref_grad) = run_rows(logits, targets)
    close(loss, ref_loss, CE_TOL[torch.float32]["loss"])
    close(grad, ref_grad, CE_TOL[torch.float32]["grad"])
    assert not grad[1].any()


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    """torch returns nan (0/0); a fully padded batch here contributes nothing instead."""
    targets = torch.full((4,), IGNORE, device=DEVICE)
    (loss, grad), _ = run_rows(torch.randn(4, 65, device=DEVICE), targets)
    assert loss.item() == 0.0
    assert not grad.any()
    assert ce.cross_entropy_reference(torch.randn(4, 65), targets.cpu(), IGNORE).item() == 0.0
    assert torch.isnan(torch.nn.functional.cross_entropy(torch.randn(4, 65), targets.cpu(), ignore_index=IGNORE))


def test_logits_are_only_read_without_write_grad():
    logits = torch.randn(6, 65, device=DEVICE)
    targets = make_targets((6,), 65, (1,))
    kept = logits.clone()
    rows = ce.cross_entropy_rows(logits, targets, IGNORE)
    assert torch.equal(logits, kept)
    loss = ce.mean_loss(rows, ce.count_targets(targets, IGNORE))
    close(loss, ce.cross_entropy_reference(kept, targets, IGNORE), CE_TOL[torch.float32]["loss"])


def test_cross_entropy_rows_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"targets \(5,\).*logits \(4, 65\)"):
        ce.cross_entropy_rows(torch.randn(4, 65, device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="integers"):
        ce.cross_entropy_rows(torch.randn(4, 65, device=DEVICE), torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        ce.cross_entropy_rows(torch.randn(65, 4, device=DEVICE).T, torch.zeros(4, dtype=torch.long, device=DEVICE),
                              write_grad=True)


# --- linear_cross_entropy ----------------------------------------------------------------------


def run_linear(hidden, weight, targets, chunk_size, upstream=1.0):
    h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    h_ref, w_ref = (x.detach().to(torch.float32, copy=True).requires_grad_() for x in (hidden, weight))
    loss = ce.linear_cross_entropy(h, w, targets, IGNORE, chunk_size)
    ref_loss = ce.linear_cross_entropy_reference(h_ref, w_ref, targets, IGNORE)
    g = torch.tensor(upstream, device=DEVICE)
    loss.backward(g)
    ref_loss.backward(g)
    return (loss, h.grad, w.grad), (ref_loss, h_ref.grad, w_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_rows, n_embd, vocab, chunk_size, ignored, upstream",
    [
        (1, 16, 65, None, (), 1.0),  # one row
        (37, 24, 1031, 10, (0, 17, 36), 2.0),  # prime rows, chunks of 10, 10, 10, 7
        (13, 32, 65, 1, (6,), 1.0),  # a chunk per row
        (13, 32, 65, 64, (6,), 0.5),  # one chunk larger than the batch
        (3, 8, 50257, 2, (1,), 1.0),  # GPT-2's vocab, a chunk of 2 and one of 1
    ],
)
def test_linear_cross_entropy_matches_reference(dtype, n_rows, n_embd, vocab, chunk_size, ignored, upstream):
    hidden = torch.randn(n_rows, n_embd, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, n_embd, device=DEVICE) / n_embd**0.5).to(dtype)
    targets = make_targets((n_rows,), vocab, ignored)
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden, weight, targets, chunk_size, upstream)
    tol = LINEAR_TOL[dtype]
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    close(loss, ref_loss, tol["loss"])
    close(gh, ref_gh, tol["grad"])
    close(gw, ref_gw, tol["grad"])
    assert not gh[list(ignored)].any(), "ignored rows get no gradient"


def test_linear_cross_entropy_3d_all_ignored_and_inputs_untouched():
    hidden = torch.randn(2, 5, 16, device=DEVICE)
    weight = torch.randn(65, 16, device=DEVICE) / 4
    targets = make_targets((2, 5), 65)
    targets[0] = IGNORE
    kept = hidden.clone(), weight.clone()
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden, weight, targets, chunk_size=3)
    assert torch.equal(hidden, kept[0]) and torch.equal(weight, kept[1])
    tol = LINEAR_TOL[torch.float32]
    close(loss, ref_loss, tol["loss"])
    close(gh, ref_gh, tol["grad"])
    close(gw, ref_gw, tol["grad"])

    targets[:] = IGNORE
    (loss, gh, gw), _ = run_linear(hidden, weight, targets, chunk_size=3)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_tied_weight_gets_both_gradients():
    """GPT ties the head to the token embedding: the weight's gradient is the sum of both uses,
    here through a cast to bf16 as fastgpt.ops does under autocast."""
    V, C, T = 65, 16, 11
    emb = torch.nn.Embedding(V, C).to(DEVICE)
    idx = torch.randint(0, V, (T,), device=DEVICE)
    targets = make_targets((T,), V, (4,))
    grads = []
    for loss_fn in (ce.linear_cross_entropy, ce.linear_cross_entropy_reference):
        emb.zero_grad()
        hidden = torch.tanh(emb(idx))
        loss_fn(hidden.bfloat16(), emb.weight.bfloat16(), targets, IGNORE).backward()
        grads.append(emb.weight.grad.clone())
    close(grads[0], grads[1], LINEAR_TOL[torch.bfloat16]["grad"])
    assert grads[0][idx].abs().sum() > 0


def test_linear_cross_entropy_without_grad_skips_the_gradients():
    hidden, weight = torch.randn(9, 16, device=DEVICE), torch.randn(65, 16, device=DEVICE)
    targets = make_targets((9,), 65, (2,))
    loss, _, gh, gw = torch.ops.fastgpt.linear_cross_entropy(hidden, weight, targets, IGNORE, 4, False)
    assert gh.numel() == gw.numel() == 0
    close(loss, ce.linear_cross_entropy_reference(hidden, weight, targets, IGNORE), LINEAR_TOL[torch.float32]["loss"])
    with torch.no_grad():
        loss = ce.linear_cross_entropy(hidden.requires_grad_(), weight, targets, IGNORE)
    assert not loss.requires_grad


def test_linear_cross_entropy_under_autocast_keeps_the_inputs_dtype():
    """Called directly with fp32 inputs inside autocast: the op computes in fp32 as given (fastgpt
    casts to the autocast dtype itself before calling)."""
    hidden, weight = torch.randn(9, 16, device=DEVICE), torch.randn(65, 16, device=DEVICE) / 4
    targets = make_targets((9,), 65, (2,))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss = ce.linear_cross_entropy(h, w, targets, IGNORE, 4)
    loss.backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss = ce.linear_cross_entropy_reference(h_ref, w_ref, targets, IGNORE)  # no autocast: fp32
    ref_loss.backward()
    tol = LINEAR_TOL[torch.float32]
    assert h.grad.dtype == w.grad.dtype == torch.float32
    close(loss, ref_loss, tol["loss"])
    close(h.grad, h_ref.grad, tol["grad"])
    close(w.grad, w_ref.grad, tol["grad"])


# GradScaler's first scale. fp16 cannot hold it (it rounds to inf), and a gradient divided by n
# before it arrives underflows: softmax values of 1e-6 over n = 64 rows are below fp16's 6e-8.
GRAD_SCALER_SCALE = 65536.0


def torch_fp16_head(hidden, weight, targets, upstream):
    """(loss, dhidden, dweight) of torch's own fp16 head: the unfused reference on fp16 inputs,
    whose logits are rounded to fp16 as ours are, with the loss in fp32."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = ce.linear_cross_entropy_reference(h, w, targets, IGNORE)
    loss.backward(torch.tensor(upstream, device=DEVICE))
    return loss, h.grad, w.grad


def test_linear_cross_entropy_fp16_under_grad_scaler():
    """As close to the fp32 reference as torch's own fp16 head (F.linear in fp16, fp32 loss) is:
    both round the logits to fp16, so neither can do much better."""
    n_rows, n_embd, vocab = 64, 32, 1031
    hidden = torch.randn(n_rows, n_embd, device=DEVICE).half()
    weight = (torch.randn(vocab, n_embd, device=DEVICE) / n_embd**0.5).half()
    targets = make_targets((n_rows,), vocab, (3,))
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden, weight, targets, 16, GRAD_SCALER_SCALE)
    torch_loss, torch_gh, torch_gw = torch_fp16_head(hidden, weight, targets, GRAD_SCALER_SCALE)
    assert abs(loss - ref_loss) <= 2 * abs(torch_loss - ref_loss) + 1e-6
    for ours, torch_fp16, ref in ((gh, torch_gh, ref_gh), (gw, torch_gw, ref_gw)):
        assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
        worst_torch = (torch_fp16.float() - ref).abs().max()
        assert (ours.float() - ref).abs().max() <= 1.5 * worst_torch


def test_linear_cross_entropy_fp16_weight_gradient_beyond_fp16_range_before_scaling():
    """1024 rows, all of target 0 and with a hidden column of 80, in one chunk: the unscaled
    weight gradient's sum reaches 8e4, past fp16's 65504, though the scaled result is small."""
    n_rows, n_embd, vocab = 1024, 4, 8
    hidden = torch.zeros(n_rows, n_embd, device=DEVICE)
    hidden[:, 0] = 80.0
    weight = torch.randn(vocab, n_embd, device=DEVICE) / 4
    targets = torch.zeros(n_rows, dtype=torch.long, device=DEVICE)
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden.half(), weight.half(), targets, None, 1.0)
    assert torch.isfinite(gw).all()
    _, _, torch_gw = torch_fp16_head(hidden.half(), weight.half(), targets, 1.0)  # scales before its matmul
    assert (gw.float() - ref_gw).abs().max() <= 1.5 * (torch_gw.float() - ref_gw).abs().max()


def test_default_chunk_bounds_the_logits_bytes():
    n_rows, vocab = 16 * 1024, 50304  # GPT-2 124M at batch 16 x 1024
    chunk = ce.default_chunk_size(n_rows, vocab, 2)
    assert chunk * vocab * 2 <= ce.CHUNK_LOGITS_BYTES
    assert chunk * vocab * 2 > ce.CHUNK_LOGITS_BYTES // 2  # not needlessly small
    assert ce.default_chunk_size(7, 65, 4) == 7


def test_linear_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"hidden \(4, 16\).*weight \(65, 8\)"):
        ce.linear_cross_entropy(torch.randn(4, 16, device=DEVICE), torch.randn(65, 8, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size 0"):
        ce.linear_cross_entropy(torch.randn(4, 16, device=DEVICE), torch.randn(65, 16, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE), chunk_size=0)


# --- torch.compile -----------------------------------------------------------------------------


class TinyHead(torch.nn.Module):
    """An LM head and its loss, through the fused op."""

    def __init__(self, n_embd, vocab):
        super().__init__()
        self.lm_head = torch.nn.Linear(n_embd, vocab, bias=False)

    def forward(self, hidden, targets):
        return ce.linear_cross_entropy(hidden, self.lm_head.weight, targets, IGNORE, 5)


def test_compiled_matches_eager():
    torch._dynamo.reset()
    model = TinyHead(16, 65).to(DEVICE)
    hidden = torch.randn(13, 16, device=DEVICE)
    targets = make_targets((13,), 65, (0, 7))
    results = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        h = hidden.clone().requires_grad_()
        loss = fn(h, targets)
        (2 * loss).backward()
        with torch.no_grad():
            eval_loss = fn(hidden, targets)
        results.append((loss.detach(), eval_loss, h.grad, model.lm_head.weight.grad.clone()))
    for eager, compiled in zip(*results):
        close(compiled, eager, CE_TOL[torch.float32]["grad"])


# --- memory ------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cpu", reason="counts CPU allocations; the bench measures CUDA")
def test_linear_cross_entropy_never_forms_the_full_logits():
    n_rows, n_embd, vocab, chunk = 256, 16, 4099, 32
    hidden = torch.randn(n_rows, n_embd, requires_grad=True)
    weight = torch.randn(vocab, n_embd, requires_grad=True)
    targets = make_targets((n_rows,), vocab, (5,))
    logits_bytes = n_rows * vocab * 4

    def fused():
        ce.linear_cross_entropy(hidden, weight, targets, IGNORE, chunk).backward()

    def unfused():
        ce.linear_cross_entropy_reference(hidden, weight, targets, IGNORE).backward()

    # one chunk of logits, the fp32 grad_weight accumulator, grad_hidden, and the returned grads
    budget = chunk * vocab * 4 + 2 * weight.numel() * 4 + 2 * hidden.numel() * 4
    assert cpu_peak_allocated_bytes(fused) < 1.2 * budget < 0.5 * logits_bytes
    assert cpu_peak_allocated_bytes(unfused) > 2 * logits_bytes
