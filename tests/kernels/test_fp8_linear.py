"""kernels/fp8_linear.py: the fp8 head's matmuls against fp32 references built from the same fp8
values (tight: what the op promises to compute) and against the plain fp32 matmul (loose: what
fp8 costs), with the layouts CUDA's torch._scaled_mm demands checked on the CPU."""

from __future__ import annotations

import pytest
import torch

from fastgpt_kernels import fp8_linear as f8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||result - reference|| / ||reference|| for the same fp8 values: fp32 accumulation in another
# order on a CPU; on a GPU, Hopper's fp8 tensor cores keep partial sums to fewer bits than fp32
# (seen on an H200: 1e-4 of the result's norm, a few elements near zero off by 25% each), so
# the GPU is held to the norm, not element by element. A scale applied twice or not at all, or a
# transposed operand, is off by the whole norm.
SAME_VALUES_REL = 1e-3 if DEVICE == "cuda" else 1e-6
# ||fp8 result - fp32 result|| / ||fp32 result|| over random inputs: e4m3 rounds each element by up
# to 2^-4 (e5m2 the gradient by 2^-3), about 3% (5%) of a dot product's norm; a transposed operand
# or a wrong scale gives ~1 or more.
FORWARD_REL, BACKWARD_REL = 0.06, 0.1


def rel_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def inputs(n=48, c=32, v=80, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).to(DEVICE, dtype)
    w = (torch.randn(v, c, generator=g) / c**0.5).to(DEVICE, dtype)
    dy = torch.randn(n, v, generator=g).to(DEVICE, dtype)
    return x, w, dy


@pytest.mark.parametrize("fp8_dtype", [f8.E4M3, f8.E5M2])
def test_to_fp8_scales_the_largest_value_to_the_format_maximum(fp8_dtype):
    t = torch.randn(33, 17, device=DEVICE) * 1e-3  # far below the format's range: the scale lifts it
    t8, scale = f8.to_fp8(t, fp8_dtype)
    assert t8.dtype == fp8_dtype and t8.is_contiguous() and scale.dtype == torch.float32
    largest = torch.finfo(fp8_dtype).max
    assert t8.float().abs().max().item() == largest
    mantissa_bits = 3 if fp8_dtype == f8.E4M3 else 2
    # round to nearest: half a unit in the last place, relative, for every normal value
    normal = t.abs() > torch.finfo(fp8_dtype).smallest_normal * scale
    err = (t8.float() * scale - t).abs()
    assert (err[normal] <= 2.0 ** -(mantissa_bits + 1) * t.abs()[normal] * (1 + 1e-6)).all()


def test_to_fp8_of_zeros_is_zeros_with_scale_one():
    t8, scale = f8.to_fp8(torch.zeros(16, 16, device=DEVICE), f8.E4M3)
    assert scale.item() == 1.0 and not t8.float().any()


def test_forward_is_the_fp8_values_product():
    x, w, _ = inputs()
    y = f8.fp8_linear(x, w)
    assert y.dtype == x.dtype and y.shape == (48, 80)
    assert rel_error(y, f8.fp8_linear_reference(x, w)) < SAME_VALUES_REL
    assert rel_error(y, x @ w.t()) < FORWARD_REL


def test_backward_is_the_fp8_values_product():
    x, w, dy = inputs()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    f8.fp8_linear(xg, wg).backward(dy)
    x8, sx = f8.to_fp8(x, f8.E4M3)
    w8, sw = f8.to_fp8(w, f8.E4M3)
    g8, sg = f8.to_fp8(dy, f8.E5M2)
    x_q, w_q, g_q = x8.float() * sx, w8.float() * sw, g8.float() * sg
    assert rel_error(xg.grad, g_q @ w_q) < SAME_VALUES_REL
    assert rel_error(wg.grad, g_q.t() @ x_q) < SAME_VALUES_REL
    assert xg.grad.dtype == wg.grad.dtype == torch.float32
    assert rel_error(xg.grad, dy @ w) < BACKWARD_REL
    assert rel_error(wg.grad, dy.t() @ x) < BACKWARD_REL


def test_bf16_activations_with_an_fp32_weight():
    """The model's case under autocast: bf16 hidden states out, an fp32 master weight whose
    gradient comes back in fp32."""
    x, w, dy = inputs()
    xg, wg = x.bfloat16().requires_grad_(), w.clone().requires_grad_()
    y = f8.fp8_linear(xg, wg, out_dtype=torch.bfloat16)
    y.backward(dy.bfloat16())
    assert y.dtype == xg.grad.dtype == torch.bfloat16 and wg.grad.dtype == torch.float32
    assert rel_error(y, x @ w.t()) < FORWARD_REL
    assert rel_error(wg.grad, dy.t() @ x) < BACKWARD_REL


def test_operands_have_the_layouts_cuda_requires(monkeypatch):
    """torch._scaled_mm on CUDA takes A row-major, B column-major, dimensions multiples of 16 and
    one fp32 scale each; the CPU takes anything, so the rule is checked here by hand."""
    real = torch._scaled_mm
    calls = []

    def checked(a, b, *, scale_a, scale_b, out_dtype, use_fast_accum=False):
        assert a.is_contiguous(), f"A must be row-major, got strides {a.stride()}"
        assert b.t().is_contiguous(), f"B must be column-major, got strides {b.stride()}"
        assert all(d % 16 == 0 for d in (*a.shape, b.shape[1])), (a.shape, b.shape)
        assert not (a.dtype == b.dtype == f8.E5M2), "e5m2 x e5m2 has no kernel"
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
        calls.append(use_fast_accum)
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    x, w, dy = inputs()
    f8.fp8_linear(x.requires_grad_(), w.requires_grad_()).backward(dy)
    assert calls == [True, False, False]  # fast accumulation for the forward only


def test_shapes_must_be_multiples_of_16():
    x, w, _ = inputs()
    with pytest.raises(ValueError, match=r"rows 10, out_features 81 must be multiples of 16"):
        f8.fp8_linear(x[:10], torch.randn(81, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"x \(48, 32\) must be \(N, C\) and weight \(80, 16\)"):
        f8.fp8_linear(x, w[:, :16])


@pytest.mark.parametrize(
    "device_type, capability, ok",
    [("cpu", None, True), ("cuda", (9, 0), True), ("cuda", (8, 9), True), ("cuda", (8, 0), False),
     ("cuda", (7, 5), False), ("mps", None, False)],
)
def test_where_fp8_runs(device_type, capability, ok):
    why = f8.fp8_unsupported_reason(device_type, capability, "NVIDIA A100-SXM4-80GB")
    assert (why is None) == ok
    if device_type == "cuda" and not ok:
        assert "A100" in why and "8.9" in why


# Compiled and eager compute the loss's gradient in other orders, and a last-bit difference in
# an element next to a rounding boundary of e5m2 moves it a whole step (25%): on an H200 9% of
# dx's elements differed, by 2% of its norm. A wrong cast or scale in the compiled graph is off
# by the whole norm.
COMPILED_REL = 0.05 if DEVICE == "cuda" else 1e-6


def test_compiles_into_the_head_and_loss():
    """The model runs the fp8 head under torch.compile (fullgraph): the loss and gradients of
    eager, to the rounding of the quantized gradient."""
    import torch.nn.functional as F

    def head_loss(x, w, t):
        return F.cross_entropy(f8.fp8_linear(x, w, out_dtype=torch.bfloat16).float(), t)

    torch._dynamo.reset()
    x, w, _ = inputs()
    t = torch.randint(0, 80, (48,), device=DEVICE)
    results = []
    for fn in (head_loss, torch.compile(head_loss, fullgraph=True)):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xg, wg, t)
        loss.backward()
        results.append((loss, xg.grad, wg.grad))
    for eager, compiled in zip(*results):
        assert rel_error(compiled, eager) < COMPILED_REL
