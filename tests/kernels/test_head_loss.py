"""kernels/head_loss.py against its fp32 torch references: the fused head's loss and both gradients
with each row step (torch; Triton, which runs in the interpreter on a CPU), over vocabularies that
are not a multiple of the block, ignored targets, chunk boundaries, fp16 under a GradScaler,
compile, and the memory the fused head is for."""

from __future__ import annotations

import pytest
import torch

from fastgpt.profiling import cpu_peak_allocated_bytes
from fastgpt_kernels import head_loss as hl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -1


def _impls():
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["torch"]
    return ["torch", "triton"]


IMPLS = _impls()

# (rtol, atol) against the fp32 reference. The chunk logits come out of a matmul in the input
# dtype, so bf16 carries their rounding (2^-9 of |logit|) into the loss and both gradients;
# measured worst 3e-4 (loss), 0.5% (grads). A missing 1/n is off by a factor n >= 2, a wrong
# ignore mask puts O(1/n) where the reference has 0: both far outside these.
LINEAR_TOL = {
    # grad_hidden sums V products that largely cancel: fp32 rounding reaches 7e-7 at V = 50257.
    torch.float32: {"loss": (1e-6, 1e-6), "grad": (1e-5, 3e-6)},
    torch.bfloat16: {"loss": (2e-3, 1e-3), "grad": (1e-2, 1e-3)},
}
# The torch row step alone, against F.cross_entropy, in fp32: the same function to rounding.
ROW_TOL = (1e-6, 1e-7)


def make_targets(shape, vocab, ignored=()):
    """Random targets with the listed flat positions set to IGNORE."""
    t = torch.randint(0, vocab, shape, device=DEVICE)
    t.view(-1)[list(ignored)] = IGNORE
    return t


def close(actual, expected, tol):
    rtol, atol = tol
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


# --- the torch row step ------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows, vocab, ignored", [(1, 65, ()), (7, 1031, (2, 5)), (3, 50257, (1,))])
def test_torch_row_step_matches_reference(n_rows, vocab, ignored):
    logits = 3 * torch.randn(n_rows, vocab, device=DEVICE)
    logits[0, -1] = 12.0  # the last column dominates a row: dropping it changes everything
    targets = make_targets((n_rows,), vocab, ignored)
    ref = logits.clone().requires_grad_()
    ref_loss = hl.cross_entropy_reference(ref, targets, IGNORE)
    ref_loss.backward()
    n = hl.count_targets(targets, IGNORE)

    kept = logits.clone()
    rows = hl.torch_row_losses(logits, targets, IGNORE)
    assert torch.equal(logits, kept), "without write_grad the logits are only read"
    close(hl.mean_loss(rows, n), ref_loss, ROW_TOL)

    rows = hl.torch_row_losses(logits, targets, IGNORE, write_grad=True)
    close(hl.mean_loss(rows, n), ref_loss, ROW_TOL)
    close(logits / n.clamp(min=1), ref.grad, ROW_TOL)
    assert not logits[list(ignored)].any(), "ignored rows get no gradient"


def test_torch_row_step_writes_a_half_precision_gradient_in_place():
    logits = (3 * torch.randn(5, 300, device=DEVICE)).bfloat16()
    targets = make_targets((5,), 300, (3,))
    expected = torch.softmax(logits.float(), dim=1)
    expected[torch.arange(5), targets.clamp(min=0)] -= 1
    expected[3] = 0
    hl.torch_row_losses(logits, targets, IGNORE, write_grad=True)
    assert logits.dtype == torch.bfloat16
    close(logits, expected, (2**-8, 1e-6))


# --- the chunked head + loss -------------------------------------------------------------------


def run_linear(hidden, weight, targets, chunk_size, impl, upstream=1.0):
    h, w = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    h_ref, w_ref = (x.detach().to(torch.float32, copy=True).requires_grad_() for x in (hidden, weight))
    loss = hl.linear_cross_entropy(h, w, targets, IGNORE, chunk_size, impl=impl)
    ref_loss = hl.linear_cross_entropy_reference(h_ref, w_ref, targets, IGNORE)
    g = torch.tensor(upstream, device=DEVICE)
    loss.backward(g)
    ref_loss.backward(g)
    return (loss, h.grad, w.grad), (ref_loss, h_ref.grad, w_ref.grad)


@pytest.mark.parametrize("impl", IMPLS)
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
def test_linear_cross_entropy_matches_reference(impl, dtype, n_rows, n_embd, vocab, chunk_size, ignored, upstream):
    hidden = torch.randn(n_rows, n_embd, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, n_embd, device=DEVICE) / n_embd**0.5).to(dtype)
    targets = make_targets((n_rows,), vocab, ignored)
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden, weight, targets, chunk_size, impl, upstream)
    tol = LINEAR_TOL[dtype]
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    close(loss, ref_loss, tol["loss"])
    close(gh, ref_gh, tol["grad"])
    close(gw, ref_gw, tol["grad"])
    assert not gh[list(ignored)].any(), "ignored rows get no gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_3d_all_ignored_and_inputs_untouched(impl):
    hidden = torch.randn(2, 5, 16, device=DEVICE)
    weight = torch.randn(65, 16, device=DEVICE) / 4
    targets = make_targets((2, 5), 65)
    targets[0] = IGNORE
    kept = hidden.clone(), weight.clone()
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden, weight, targets, 3, impl)
    assert torch.equal(hidden, kept[0]) and torch.equal(weight, kept[1])
    tol = LINEAR_TOL[torch.float32]
    close(loss, ref_loss, tol["loss"])
    close(gh, ref_gh, tol["grad"])
    close(gw, ref_gw, tol["grad"])

    targets[:] = IGNORE  # torch's mean over no targets is nan; ours is 0, with no gradient
    (loss, gh, gw), _ = run_linear(hidden, weight, targets, 3, impl)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_weight_gets_both_gradients(impl):
    """GPT ties the head to the token embedding: the weight's gradient is the sum of both uses,
    here through a cast to bf16 as fastgpt.ops does under autocast."""
    V, C, T = 65, 16, 11
    emb = torch.nn.Embedding(V, C).to(DEVICE)
    idx = torch.randint(0, V, (T,), device=DEVICE)
    targets = make_targets((T,), V, (4,))
    grads = []
    for loss_fn in (lambda *a: hl.linear_cross_entropy(*a, impl=impl), hl.linear_cross_entropy_reference):
        emb.zero_grad()
        hidden = torch.tanh(emb(idx))
        loss_fn(hidden.bfloat16(), emb.weight.bfloat16(), targets, IGNORE).backward()
        grads.append(emb.weight.grad.clone())
    close(grads[0], grads[1], LINEAR_TOL[torch.bfloat16]["grad"])
    assert grads[0][idx].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_without_grad_skips_the_gradients(impl):
    hidden, weight = torch.randn(9, 16, device=DEVICE), torch.randn(65, 16, device=DEVICE)
    targets = make_targets((9,), 65, (2,))
    loss, _, gh, gw = torch.ops.fastgpt.linear_cross_entropy(hidden, weight, targets, IGNORE, 4, False, impl)
    assert gh.numel() == gw.numel() == 0
    close(loss, hl.linear_cross_entropy_reference(hidden, weight, targets, IGNORE), LINEAR_TOL[torch.float32]["loss"])
    with torch.no_grad():
        loss = hl.linear_cross_entropy(hidden.requires_grad_(), weight, targets, IGNORE, impl=impl)
    assert not loss.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_under_autocast_keeps_the_inputs_dtype(impl):
    """Called directly with fp32 inputs inside autocast: the op computes in fp32 as given (fastgpt
    casts to the autocast dtype itself before calling)."""
    hidden, weight = torch.randn(9, 16, device=DEVICE), torch.randn(65, 16, device=DEVICE) / 4
    targets = make_targets((9,), 65, (2,))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        loss = hl.linear_cross_entropy(h, w, targets, IGNORE, 4, impl=impl)
    loss.backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss = hl.linear_cross_entropy_reference(h_ref, w_ref, targets, IGNORE)  # no autocast: fp32
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
    loss = hl.linear_cross_entropy_reference(h, w, targets, IGNORE)
    loss.backward(torch.tensor(upstream, device=DEVICE))
    return loss, h.grad, w.grad


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_fp16_under_grad_scaler(impl):
    """As close to the fp32 reference as torch's own fp16 head (F.linear in fp16, fp32 loss) is:
    both round the logits to fp16, so neither can do much better."""
    n_rows, n_embd, vocab = 64, 32, 1031
    hidden = torch.randn(n_rows, n_embd, device=DEVICE).half()
    weight = (torch.randn(vocab, n_embd, device=DEVICE) / n_embd**0.5).half()
    targets = make_targets((n_rows,), vocab, (3,))
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden, weight, targets, 16, impl, GRAD_SCALER_SCALE)
    torch_loss, torch_gh, torch_gw = torch_fp16_head(hidden, weight, targets, GRAD_SCALER_SCALE)
    assert abs(loss - ref_loss) <= 2 * abs(torch_loss - ref_loss) + 1e-6
    for ours, torch_fp16, ref in ((gh, torch_gh, ref_gh), (gw, torch_gw, ref_gw)):
        assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
        worst_torch = (torch_fp16.float() - ref).abs().max()
        assert (ours.float() - ref).abs().max() <= 1.5 * worst_torch


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_fp16_weight_gradient_beyond_fp16_range_before_scaling(impl):
    """1024 rows, all of target 0 and with a hidden column of 80, in one chunk: the unscaled
    weight gradient's sum reaches 8e4, past fp16's 65504, though the scaled result is small."""
    n_rows, n_embd, vocab = 1024, 4, 8
    hidden = torch.zeros(n_rows, n_embd, device=DEVICE)
    hidden[:, 0] = 80.0
    weight = torch.randn(vocab, n_embd, device=DEVICE) / 4
    targets = torch.zeros(n_rows, dtype=torch.long, device=DEVICE)
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = run_linear(hidden.half(), weight.half(), targets, None, impl, 1.0)
    assert torch.isfinite(gw).all()
    _, _, torch_gw = torch_fp16_head(hidden.half(), weight.half(), targets, 1.0)  # scales before its matmul
    assert (gw.float() - ref_gw).abs().max() <= 1.5 * (torch_gw.float() - ref_gw).abs().max()


@pytest.mark.parametrize(
    "dtype, device_type, fp32_out, method",
    [
        (torch.float32, "cuda", True, "addmm"),
        (torch.float32, "cpu", False, "addmm"),
        (torch.bfloat16, "cuda", True, "addmm_fp32"),  # the matmul accumulates into fp32 itself
        (torch.float16, "cuda", True, "addmm_fp32"),
        (torch.float16, "cuda", False, "upcast"),  # a torch without addmm's fp32 output
        (torch.float16, "cpu", False, "upcast"),  # no fp16 -> fp32 matmul on a CPU
        (torch.bfloat16, "cpu", False, "add"),
        (torch.bfloat16, "cuda", False, "add"),
    ],
)
def test_weight_gradient_method(dtype, device_type, fp32_out, method):
    """The decision only CUDA takes, checked here; the GPU kernel tests run the CUDA branch."""
    assert hl.weight_grad_method(dtype, device_type, fp32_out) == method


def test_default_chunk_bounds_the_logits_bytes():
    n_rows, vocab = 16 * 1024, 50304  # GPT-2 124M at batch 16 x 1024
    chunk = hl.default_chunk_size(n_rows, vocab, 2)
    assert chunk * vocab * 2 <= hl.CHUNK_LOGITS_BYTES
    assert chunk * vocab * 2 > hl.CHUNK_LOGITS_BYTES // 2  # not needlessly small
    # a third of the full logits at most, with the fp32 weight gradient beside it
    assert chunk * vocab * 2 + 4 * vocab * 768 < n_rows * vocab * 2 / 3
    assert hl.default_chunk_size(7, 65, 4) == 7


def test_linear_cross_entropy_rejects_bad_arguments():
    zeros = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"hidden \(4, 16\).*weight \(65, 8\)"):
        hl.linear_cross_entropy(torch.randn(4, 16, device=DEVICE), torch.randn(65, 8, device=DEVICE), zeros)
    with pytest.raises(ValueError, match="chunk_size 0"):
        hl.linear_cross_entropy(torch.randn(4, 16, device=DEVICE), torch.randn(65, 16, device=DEVICE), zeros, chunk_size=0)
    with pytest.raises(ValueError, match="impl='cuda'; choose one of torch, triton"):
        hl.linear_cross_entropy(torch.randn(4, 16, device=DEVICE), torch.randn(65, 16, device=DEVICE), zeros, impl="cuda")


# --- torch.compile -----------------------------------------------------------------------------


class TinyHead(torch.nn.Module):
    """An LM head and its loss, through the fused op."""

    def __init__(self, n_embd, vocab, impl):
        super().__init__()
        self.lm_head = torch.nn.Linear(n_embd, vocab, bias=False)
        self.impl = impl

    def forward(self, hidden, targets):
        return hl.linear_cross_entropy(hidden, self.lm_head.weight, targets, IGNORE, 5, impl=self.impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_matches_eager(impl):
    torch._dynamo.reset()
    model = TinyHead(16, 65, impl).to(DEVICE)
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
        close(compiled, eager, (1e-5, 1e-9))


# --- memory ------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cpu", reason="counts CPU allocations; the bench measures CUDA")
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_never_forms_the_full_logits(impl):
    n_rows, n_embd, vocab, chunk = 256, 16, 4099, 32
    hidden = torch.randn(n_rows, n_embd, requires_grad=True)
    weight = torch.randn(vocab, n_embd, requires_grad=True)
    targets = make_targets((n_rows,), vocab, (5,))
    logits_bytes = n_rows * vocab * 4

    def fused():
        hl.linear_cross_entropy(hidden, weight, targets, IGNORE, chunk, impl=impl).backward()

    def unfused():
        hl.linear_cross_entropy_reference(hidden, weight, targets, IGNORE).backward()

    # one chunk of logits (and, for the torch row step, a temporary of the same size), the fp32
    # grad_weight accumulator, grad_hidden, and the returned grads
    budget = 2 * chunk * vocab * 4 + 2 * weight.numel() * 4 + 2 * hidden.numel() * 4
    assert cpu_peak_allocated_bytes(fused) < 1.2 * budget < 0.5 * logits_bytes
    assert cpu_peak_allocated_bytes(unfused) > 2 * logits_bytes
