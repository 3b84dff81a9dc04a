"""kernels/cross_entropy.py, the row kernel, against its fp32 torch reference: each row's loss and
the gradient written over the logits, over vocabularies that are not a multiple of the block,
masked logits and ignored targets. The fused head that calls it is tested in test_head_loss.py.
On a CPU the kernel runs in Triton's interpreter (conftest)."""

from __future__ import annotations

import pytest
import torch

from fastgpt_kernels import head_loss as hl
from test_head_loss import close, make_targets  # the same helpers for the row kernel and the head that calls it

pytest.importorskip("triton")
from fastgpt_kernels import cross_entropy as ce  # noqa: E402  (after the interpreter is chosen)

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


def run_rows(logits, targets, block_size=None):
    """(loss, gradient) of the row kernel, its gradient of the summed row losses divided by
    n_counted (as the op's backward does, in fp32), and of the reference."""
    grad = logits.detach().clone()
    n_counted = hl.count_targets(targets, IGNORE)
    rows = ce.cross_entropy_rows(grad, targets, IGNORE, write_grad=True, block_size=block_size)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref = logits.detach().to(torch.float32, copy=True).requires_grad_()
    ref_loss = hl.cross_entropy_reference(ref, targets, IGNORE)
    ref_loss.backward()
    return (hl.mean_loss(rows, n_counted), grad.float() / n_counted.clamp(min=1)), (ref_loss, ref.grad)


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
    assert hl.cross_entropy_reference(torch.randn(4, 65), targets.cpu(), IGNORE).item() == 0.0
    assert torch.isnan(torch.nn.functional.cross_entropy(torch.randn(4, 65), targets.cpu(), ignore_index=IGNORE))


def test_logits_are_only_read_without_write_grad():
    logits = torch.randn(6, 65, device=DEVICE)
    targets = make_targets((6,), 65, (1,))
    kept = logits.clone()
    rows = ce.cross_entropy_rows(logits, targets, IGNORE)
    assert torch.equal(logits, kept)
    loss = hl.mean_loss(rows, hl.count_targets(targets, IGNORE))
    close(loss, hl.cross_entropy_reference(kept, targets, IGNORE), CE_TOL[torch.float32]["loss"])


def test_cross_entropy_rows_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"targets \(5,\).*logits \(4, 65\)"):
        ce.cross_entropy_rows(torch.randn(4, 65, device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="integers"):
        ce.cross_entropy_rows(torch.randn(4, 65, device=DEVICE), torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        ce.cross_entropy_rows(torch.randn(65, 4, device=DEVICE).T, torch.zeros(4, dtype=torch.long, device=DEVICE),
                              write_grad=True)
