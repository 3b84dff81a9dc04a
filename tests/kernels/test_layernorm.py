"""kernels/layernorm.py against the plain-torch fp32 reference: outputs and every gradient.

On a machine without CUDA the kernels run in Triton's interpreter (tests/conftest.py selects it).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastgpt_kernels.common import MAX_FUSED_BLOCK  # noqa: E402
from fastgpt_kernels.layernorm import (  # noqa: E402
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (atol, rtol) of an output in its own dtype against the fp32 reference on the same input values.
# The kernels compute in fp32 and round once on store, so a half-precision result is off by at
# most one unit in the last place: rtol is a little over one ulp, 2**-7 for bf16 (all of it used:
# the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest), 2**-10 for fp16. atol
# only covers fp32 noise in results that cancel to near zero. fp32 is tight enough that reading
# one element past the row (mean off by ~x/N) fails.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-4, rtol=1e-2),
    torch.float16: dict(atol=1e-4, rtol=1e-3),
}

# Awkward on purpose: a prime number of rows and a width of 1023 (not a power of two, so the
# block is masked); a single row of 1500; 3-D (B, T, C) input with a power-of-two width.
SHAPES = [(37, 1023), (1, 1500), (3, 5, 512)]
# Inputs with a nonzero mean, so masking mistakes in the statistics show.
X_SCALE, X_SHIFT = 2.0, 0.5
# add_layer_norm inputs lie on a grid of 1/16 within (-8, 8): their sum is then exact in bf16 and
# fp16 alike, so the fp32 reference normalizes the very s the kernel rounds and stores.
GRID, GRID_LIMIT = 16, 8 - 1 / 16


def randn(shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(DEVICE)


def on_grid(t):
    return (t * GRID).round().div(GRID).clamp(-GRID_LIMIT, GRID_LIMIT)


def leaves(dtype, *tensors):
    """The same values twice: leaves in `dtype` for the kernel, fp32 leaves for the reference."""
    ours = [None if t is None else t.to(dtype).detach().clone().requires_grad_() for t in tensors]
    ref = [None if t is None else t.to(dtype).float().detach().clone().requires_grad_() for t in tensors]
    return ours, ref


def params(n, bias, seed):
    """(weight, bias or None), far from the identity so that a weight left out shows."""
    return randn(n, seed, 1.0, 1.0), randn(n, seed + 1, 0.5) if bias else None


def assert_all_close(op, dtype, got, want, names):
    for name, g, w in zip(names, got, want):
        assert g is not None, f"{op}: no gradient for {name}"
        assert g.dtype == dtype, f"{op}: {name} is {g.dtype}, expected {dtype}"
        torch.testing.assert_close(g.float(), w, **TOLERANCES[dtype], msg=lambda m: f"{op} {name}: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_reference(shape, dtype, bias):
    n = shape[-1]
    (x, w, b), (x_ref, w_ref, b_ref) = leaves(dtype, randn(shape, 0, X_SCALE, X_SHIFT), *params(n, bias, 1))
    dy = randn(shape, 3).to(dtype)  # one upstream gradient for both sides

    y = layer_norm(x, w, b)
    y_ref = layer_norm_reference(x_ref, w_ref, b_ref)
    y.backward(dy)
    y_ref.backward(dy.float())

    names = ["y", "dx", "dweight"] + (["dbias"] if bias else [])
    got = [y, x.grad, w.grad] + ([b.grad] if bias else [])
    want = [y_ref, x_ref.grad, w_ref.grad] + ([b_ref.grad] if bias else [])
    assert_all_close("layer_norm", dtype, got, want, names)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_layer_norm_matches_reference(shape, dtype, bias):
    n = shape[-1]
    x0, br0 = on_grid(randn(shape, 0, X_SCALE, X_SHIFT)), on_grid(randn(shape, 1, X_SCALE))
    (x, br, w, b), (x_ref, br_ref, w_ref, b_ref) = leaves(dtype, x0, br0, *params(n, bias, 2))
    ds, dy = randn(shape, 4).to(dtype), randn(shape, 5).to(dtype)  # gradients into both outputs

    s, y = add_layer_norm(x, br, w, b)
    s_ref, y_ref = add_layer_norm_reference(x_ref, br_ref, w_ref, b_ref)
    torch.autograd.backward([s, y], [ds, dy])
    torch.autograd.backward([s_ref, y_ref], [ds.float(), dy.float()])

    names = ["s", "y", "dx", "dbranch", "dweight"] + (["dbias"] if bias else [])
    got = [s, y, x.grad, br.grad, w.grad] + ([b.grad] if bias else [])
    want = [s_ref, y_ref, x_ref.grad, br_ref.grad, w_ref.grad] + ([b_ref.grad] if bias else [])
    assert_all_close("add_layer_norm", dtype, got, want, names)


def test_half_activations_with_fp32_parameters():
    """Under autocast a bf16 activation meets fp32 LayerNorm parameters: y and dx come back in
    bf16, dweight and dbias in fp32."""
    shape, n = (37, 1023), 1023
    (x, br), (x_ref, br_ref) = leaves(torch.bfloat16, on_grid(randn(shape, 0, X_SCALE)), on_grid(randn(shape, 1, X_SCALE)))
    (w, b), (w_ref, b_ref) = leaves(torch.float32, *params(n, True, 2))
    ds, dy = randn(shape, 4).bfloat16(), randn(shape, 5).bfloat16()

    s, y = add_layer_norm(x, br, w, b)
    s_ref, y_ref = add_layer_norm_reference(x_ref, br_ref, w_ref, b_ref)
    torch.autograd.backward([s, y], [ds, dy])
    torch.autograd.backward([s_ref, y_ref], [ds.float(), dy.float()])

    assert_all_close("add_layer_norm", torch.bfloat16, [s, y, x.grad, br.grad], [s_ref, y_ref, x_ref.grad, br_ref.grad],
                     ["s", "y", "dx", "dbranch"])
    assert_all_close("add_layer_norm", torch.float32, [w.grad, b.grad], [w_ref.grad, b_ref.grad], ["dweight", "dbias"])


def test_sum_backward_reads_the_stride0_gradient():
    """`.sum().backward()` sends an expanded, stride-0 gradient; read as contiguous it is garbage."""
    shape, n = (37, 1023), 1023
    (x, w, b), (x_ref, w_ref, b_ref) = leaves(torch.float32, randn(shape, 0, X_SCALE, X_SHIFT), *params(n, True, 1))
    layer_norm(x, w, b).sum().backward()
    layer_norm_reference(x_ref, w_ref, b_ref).sum().backward()
    assert_all_close("layer_norm", torch.float32, [x.grad, w.grad, b.grad], [x_ref.grad, w_ref.grad, b_ref.grad],
                     ["dx", "dweight", "dbias"])

    (x, br, w), (x_ref, br_ref, w_ref) = leaves(torch.float32, randn(shape, 0), randn(shape, 1), params(n, False, 2)[0])
    s, y = add_layer_norm(x, br, w)
    s_ref, y_ref = add_layer_norm_reference(x_ref, br_ref, w_ref)
    (s.sum() + y.sum()).backward()
    (s_ref.sum() + y_ref.sum()).backward()
    assert_all_close("add_layer_norm", torch.float32, [x.grad, br.grad, w.grad], [x_ref.grad, br_ref.grad, w_ref.grad],
                     ["dx", "dbranch", "dweight"])


def test_add_layer_norm_with_only_y_used():
    """When s is not used its gradient arrives as zeros (or not at all): dx is the norm's alone."""
    shape, n = (37, 1023), 1023
    (x, br, w), (x_ref, br_ref, w_ref) = leaves(torch.float32, randn(shape, 0), randn(shape, 1), params(n, False, 2)[0])
    dy = randn(shape, 3)
    add_layer_norm(x, br, w)[1].backward(dy)
    add_layer_norm_reference(x_ref, br_ref, w_ref)[1].backward(dy)
    assert_all_close("add_layer_norm", torch.float32, [x.grad, br.grad, w.grad], [x_ref.grad, br_ref.grad, w_ref.grad],
                     ["dx", "dbranch", "dweight"])


def test_non_contiguous_inputs():
    """Transposed and strided views (of leaves, so the grads land in their bases)."""
    rows, n = 37, 1023
    x_base = randn((n, rows), 0, X_SCALE, X_SHIFT).requires_grad_()
    br_base = randn((rows, 2 * n), 1).requires_grad_()
    w_base = randn(2 * n, 2, 1.0, 1.0).requires_grad_()
    x, br, w = x_base.t(), br_base[:, ::2], w_base[::2]  # strides (1, rows), (2n, 2), (2,)
    assert not (x.is_contiguous() or br.is_contiguous() or w.is_contiguous())
    b = randn(n, 3).requires_grad_()
    _, (x_ref, br_ref, w_ref, b_ref) = leaves(torch.float32, x, br, w, b)
    dy = randn((rows, n), 4)

    layer_norm(x, w, b).backward(dy)
    layer_norm_reference(x_ref, w_ref, b_ref).backward(dy)
    assert_all_close("layer_norm", torch.float32, [x_base.grad.t(), w_base.grad[::2], b.grad],
                     [x_ref.grad, w_ref.grad, b_ref.grad], ["dx", "dweight", "dbias"])

    for t in (x_base, br_base, w_base, b, x_ref, br_ref, w_ref, b_ref):
        t.grad = None
    s, y = add_layer_norm(x, br, w, b)
    s_ref, y_ref = add_layer_norm_reference(x_ref, br_ref, w_ref, b_ref)
    torch.autograd.backward([s, y], [dy, dy.t().contiguous().t()])  # a column-major gradient too
    torch.autograd.backward([s_ref, y_ref], [dy, dy])
    assert_all_close("add_layer_norm", torch.float32,
                     [s, y, x_base.grad.t(), br_base.grad[:, ::2], w_base.grad[::2], b.grad],
                     [s_ref, y_ref, x_ref.grad, br_ref.grad, w_ref.grad, b_ref.grad],
                     ["s", "y", "dx", "dbranch", "dweight", "dbias"])


def test_shape_errors_name_the_shapes():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\); expected \(8,\)"):
        layer_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias has shape \(8, 1\); expected \(8,\)"):
        layer_norm(x, w, torch.zeros(8, 1, device=DEVICE))
    with pytest.raises(ValueError, match=r"branch is \(4, 7\)"):
        add_layer_norm(x, torch.randn(4, 7, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"branch is \(4, 8\) torch.float16"):
        add_layer_norm(x, x.half(), w)
    with pytest.raises(ValueError, match=r"weight is on meta"):
        layer_norm(x, torch.ones(8, device="meta"))
    wide = MAX_FUSED_BLOCK + 1
    with pytest.raises(ValueError, match=rf"{wide} wide; one program holds at most MAX_FUSED_BLOCK = {MAX_FUSED_BLOCK}"):
        layer_norm(torch.randn(1, wide, device=DEVICE), torch.ones(wide, device=DEVICE))


class ResidualBlock(torch.nn.Module):
    """A GPT-2 block's use of the ops: ln_1 into a branch, then the residual add fused with ln_2."""

    def __init__(self, n):
        super().__init__()
        self.ln_1_weight = torch.nn.Parameter(randn(n, 10, 0.1, 1.0))
        self.ln_1_bias = torch.nn.Parameter(randn(n, 11, 0.1))
        self.branch = torch.nn.Linear(n, n, device=DEVICE)
        self.ln_2_weight = torch.nn.Parameter(randn(n, 12, 0.1, 1.0))

    def forward(self, x):
        h = self.branch(layer_norm(x, self.ln_1_weight, self.ln_1_bias))
        s, y = add_layer_norm(x, h, self.ln_2_weight)  # no bias: the Optional[Tensor] path
        return s, y


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    block = ResidualBlock(96)
    compiled = torch.compile(block, fullgraph=True)
    x = randn((2, 7, 96), 0, X_SCALE, X_SHIFT)
    upstream = [randn((2, 7, 96), 1), randn((2, 7, 96), 2)]
    results = []
    for module in (block, compiled):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        outputs = module(xi)
        torch.autograd.backward(outputs, upstream)
        results.append([*outputs, xi.grad] + [p.grad.clone() for p in block.parameters()])
    names = ["s", "y", "dx"] + [f"d{name}" for name, _ in block.named_parameters()]
    assert_all_close("add_layer_norm", torch.float32, results[1], results[0], names)


@pytest.mark.parametrize("m, warps, sms", [(16384, 4, 132), (100, 4, 132), (1, 4, 132), (9, 4, 132), (16384, 16, 132),
                                           (5000, 8, 114), (7, 4, None), (2048, 4, None)])
def test_backward_grid_gives_every_program_rows_and_every_row_a_program(m, warps, sms):
    from fastgpt_kernels.layernorm import BWD_RESIDENT_WARPS, MIN_ROWS_PER_PROGRAM, backward_grid

    programs, rows = backward_grid(m, warps, sms)
    assert (programs - 1) * rows < m <= programs * rows
    if sms is not None:
        assert programs <= sms * max(1, BWD_RESIDENT_WARPS // warps)
        assert programs <= -(-m // MIN_ROWS_PER_PROGRAM) or programs == 1  # partials bounded by the rows


def test_backward_grid_at_gpt2_shape():
    from fastgpt_kernels.layernorm import backward_grid

    assert backward_grid(16384, 4, 132) == (1024, 16)  # batch 16 x 1024 at width 768 on an H100's 132 SMs
    assert backward_grid(0, 4, 132) == (1, 0)  # no rows: one program's zero partials
