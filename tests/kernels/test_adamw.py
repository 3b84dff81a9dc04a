"""kernels/adamw.py against torch.optim.AdamW(foreach=False) and the plain-torch fp32 reference.

On a machine without CUDA the kernel runs in Triton's interpreter (tests/conftest.py selects it).
"""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch

pytest.importorskip("triton")

import fastgpt_kernels.adamw as adamw  # noqa: E402
from fastgpt_kernels.adamw import TritonAdamW, adamw_reference  # noqa: E402
from fastgpt_kernels.common import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Awkward on purpose: a single element, 1023 (three full chunks of BLOCK and a masked one), a
# prime, a 2-D 37x61 (nine chunks, the last partial) and a 2x256 that fills its chunks exactly.
SHAPES = [(1,), (1023,), (1009,), (37, 61), (2, 256)]
# Small chunks, so that the shapes above cross chunk boundaries (the default is 4096).
BLOCK = 256
STEPS = 20
LR_MAX, LR_MIN = 1e-2, 1e-3  # large enough that a bf16 param moves by several ulps a step
WEIGHT_DECAY = 0.1  # the first group's; the second group has none
BETAS, EPS = (0.9, 0.95), 1e-8
# (step, param index) pairs whose gradient is None: that param skips the step, so its step count,
# and with it its bias correction, lags the others' (torch counts steps per param too).
NO_GRAD = {(0, 4), (3, 2), (4, 2), (11, 0)}

# Tolerances, per param dtype, of the params after STEPS steps against torch.
# fp32: the kernel writes torch's single-tensor update in torch's order, with the scalars formed
# in fp64 as torch forms them in Python; what is left is FMA contraction and the like, a few fp32
# ulps a step. 1e-5 relative on params of size ~1 is 1e-3 of one step's update (lr ~ 1e-2), so a
# wrong scale factor on the update, a missing bias correction or an L2-coupled decay fails (see
# test_tolerance_catches_a_broken_update).
# bf16/fp16 (compared step by step with torch on an fp32 copy of the same params, so both start
# every step from the same values): the fp32 results agree to a few fp32 ulps, and rounding two
# such values to the param dtype differs by at most one ulp, when they straddle a rounding
# boundary: rtol is one ulp, 2**-7 for bf16, 2**-10 for fp16. atol only covers params near zero.
PARAM_TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}
# The moments are fp32 on both sides and see the same gradients (of size ~1): a few fp32 ulps.
# exp_avg is a running mean that can cancel to near zero, so its error is a few ulps of the
# gradients' scale, not of its own; exp_avg_sq is a sum of squares and stays relative.
STATE_TOLERANCES = {"exp_avg": dict(rtol=1e-5, atol=1e-6), "exp_avg_sq": dict(rtol=1e-5, atol=1e-9)}


def cosine_lr(step: int) -> float:
    return LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1 + math.cos(math.pi * step / STEPS))


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() for shape in SHAPES]


def make_grads(dtype: torch.dtype, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """STEPS lists of one gradient per param (None where NO_GRAD says), in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return [
        [None if (step, i) in NO_GRAD else torch.randn(shape, generator=g).to(DEVICE, dtype)
         for i, shape in enumerate(SHAPES)]
        for step in range(STEPS)
    ]


def clone_params(params: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [p.detach().to(dtype or p.dtype, copy=True).requires_grad_() for p in params]


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]


HYPER = dict(lr=LR_MAX, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def ours(params: list[torch.Tensor], **hyper) -> TritonAdamW:
    return TritonAdamW(groups(params), block_size=BLOCK, **(hyper or HYPER))


def torchs(params: list[torch.Tensor], **hyper) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups(params), foreach=False, **(hyper or HYPER))


def take_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list, step: int) -> None:
    """Set the gradients (cast to each param's dtype) and the scheduled lr, then step."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(p.dtype, copy=True)
    for group in opt.param_groups:
        group["lr"] = cosine_lr(step)  # a float every step, as the trainer sets it
    opt.step()


def assert_same_state(opt_a, params_a, opt_b, params_b) -> None:
    """Moments within STATE_TOLERANCES, equal step counts, and no state where either has none."""
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert bool(sa) == bool(sb)
        if not sa:
            continue
        assert float(sa["step"]) == float(sb["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key].float(), sb[key].float(), **STATE_TOLERANCES[key])


def run_against_torch(make_opt, dtype=torch.float32, steps=range(STEPS), hyper=None, grad_scale=1.0) -> None:
    """`make_opt`'s optimizer and torch's AdamW (both with `hyper`, default HYPER), from the same
    params through the same gradients (times grad_scale) and lrs, agree on params and state."""
    params = make_params(dtype)
    reference = clone_params(params)
    opt, ref_opt = make_opt(params, **(hyper or {})), torchs(reference, **(hyper or {}))
    for step, grads in zip(steps, make_grads(dtype)):
        grads = [None if g is None else g * grad_scale for g in grads]
        take_step(opt, params, grads, step)
        take_step(ref_opt, reference, grads, step)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, **PARAM_TOLERANCES[dtype])
    assert_same_state(opt, params, ref_opt, reference)


class ReferenceAdamW(torch.optim.Optimizer):
    """adamw_reference (or a deliberately broken `update`) one tensor at a time: the harness's
    stand-in for the kernel, to check the reference and the tolerances themselves."""

    def __init__(self, params, update=adamw_reference):
        super().__init__(params, dict(lr=LR_MAX, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY))
        self.update = update

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                self.update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                            *group["betas"], group["eps"], group["weight_decay"])


def coupled_weight_decay(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """Adam with L2 regularization: the decay goes through the moments instead of the param."""
    return adamw_reference(p, g + weight_decay * p, m, v, step, lr, beta1, beta2, eps, 0.0)


def no_bias_correction(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """beta**inf == 0.0, so both bias corrections become 1."""
    return adamw_reference(p, g, m, v, math.inf, lr, beta1, beta2, eps, weight_decay)


# ---------------------------------------------------------------------------------------------
# The update


def test_reference_matches_torch():
    run_against_torch(lambda params: ReferenceAdamW(groups(params)))


@pytest.mark.parametrize("broken", [coupled_weight_decay, no_bias_correction])
def test_tolerance_catches_a_broken_update(broken):
    with pytest.raises(AssertionError, match="not close"):
        run_against_torch(lambda params: ReferenceAdamW(groups(params), update=broken))


def test_matches_torch_fp32():
    run_against_torch(ours)


def test_eps_and_a_small_beta1_match_torch():
    """eps = 1e-3 against gradients of 1e-4, where eps's place in the denominator decides the
    step (the default 1e-8 hides it); beta1 = 0.3 takes the other branch of torch's lerp."""
    run_against_torch(ours, hyper=dict(lr=LR_MAX, betas=(0.3, 0.95), eps=1e-3, weight_decay=WEIGHT_DECAY),
                      grad_scale=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_torch_half_params(dtype):
    """Half-precision params, fp32 moments: each step equals torch's AdamW on an fp32 copy of the
    same params, rounded once. (torch's AdamW on the half params themselves keeps half moments and
    rounds the decay and the update separately: a 0.1% decay is below half a bf16 ulp and mostly
    lost, so the two differ by design and are not compared.)"""
    params = make_params(dtype)
    shadow = clone_params(params, torch.float32)
    opt, ref_opt = ours(params), torchs(shadow)
    for step, grads in enumerate(make_grads(dtype)):
        with torch.no_grad():
            for p, s in zip(params, shadow):
                s.copy_(p)
        take_step(opt, params, grads, step)
        take_step(ref_opt, shadow, grads, step)
        for p, s in zip(params, shadow):
            assert p.dtype == dtype
            torch.testing.assert_close(p.float(), s.to(dtype).float(), **PARAM_TOLERANCES[dtype])
        assert_same_state(opt, params, ref_opt, shadow)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_bf16_matches_reference_exactly():
    """The kernel is adamw_reference on fp32 copies, rounded to nearest even once: bit for bit
    under the interpreter, whose numpy does torch's fp32 operations. Compiled code may contract
    to FMAs, which moves a result by an fp32 ulp and can flip a bf16 rounding: one bf16 ulp."""
    params = make_params(torch.bfloat16)
    expected = [p.detach().clone() for p in params]
    moments = [(torch.zeros(p.shape, device=DEVICE), torch.zeros(p.shape, device=DEVICE)) for p in params]
    counts = [0] * len(params)
    opt = ours(params)
    for step, grads in enumerate(make_grads(torch.bfloat16)):
        take_step(opt, params, grads, step)
        for i, ((m, v), g) in enumerate(zip(moments, grads)):
            if g is not None:
                counts[i] += 1
                wd = WEIGHT_DECAY if i < 3 else 0.0
                adamw_reference(expected[i], g, m, v, counts[i], cosine_lr(step), *BETAS, EPS, wd)
    tolerance = dict(rtol=0, atol=0) if interpreting() else PARAM_TOLERANCES[torch.bfloat16]
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, **tolerance)


def test_param_without_grad_is_untouched():
    params = make_params(torch.float32)
    frozen = params[1]
    before = frozen.detach().clone()
    opt = ours(params)
    for step, grads in enumerate(make_grads(torch.float32)[:3]):
        grads[1] = None
        take_step(opt, params, grads, step)
    assert frozen not in opt.state
    torch.testing.assert_close(frozen, before, rtol=0, atol=0)


def test_strided_grad_and_tensor_lr():
    """A stride-0 gradient (what `.sum()` sends back) is read as its values; a tensor lr works."""
    p = torch.randn(37, 61, device=DEVICE, requires_grad=True)
    r = p.detach().clone().requires_grad_()
    opt = TritonAdamW([p], lr=torch.tensor(0.01), block_size=BLOCK)
    ref_opt = torch.optim.AdamW([r], lr=torch.tensor(0.01), foreach=False)
    for _ in range(3):
        p.grad = torch.randn(61, device=DEVICE).expand(37, 61)
        r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(p, r, **PARAM_TOLERANCES[torch.float32])


# ---------------------------------------------------------------------------------------------
# Launches


class CountingKernel:
    """Stands in for adamw._adamw_kernel: counts launches and records their arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_one_launch_per_group_and_dtype(monkeypatch):
    counter = CountingKernel(adamw._adamw_kernel)
    monkeypatch.setattr(adamw, "_adamw_kernel", counter)
    params = make_params(torch.float32)
    halves = [torch.randn(300, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    idle = torch.randn(5, device=DEVICE, requires_grad=True)  # never has a grad
    opt = TritonAdamW(
        [{"params": params[:3] + halves[:1]}, {"params": params[3:]}, {"params": halves[1:]}, {"params": [idle]}],
        block_size=BLOCK,
    )
    for step, grads in enumerate(make_grads(torch.float32)[:3]):
        for h in halves:
            h.grad = torch.randn(300, device=DEVICE, dtype=torch.bfloat16)
        before = len(counter.launches)
        take_step(opt, params, grads, step)
        # group 0: an fp32 and a bf16 launch; group 1: fp32; group 2: bf16; group 3: nothing to do
        assert len(counter.launches) - before == 4


def test_changing_lr_changes_no_kernel_argument(monkeypatch):
    """lr is read on the device: every launch of a group, at any lr, gets the same arguments, so
    Triton has nothing new to specialise on."""
    counter = CountingKernel(adamw._adamw_kernel)
    monkeypatch.setattr(adamw, "_adamw_kernel", counter)
    p = torch.randn(1023, device=DEVICE, requires_grad=True)
    p.grad = torch.randn(1023, device=DEVICE)  # kept: the same addresses every step
    opt = TritonAdamW([p], block_size=BLOCK)
    for step in range(3):
        opt.param_groups[0]["lr"] = cosine_lr(step)
        opt.step()
    first = counter.launches[0]
    for grid, args, kwargs in counter.launches[1:]:
        assert grid == first[0] and kwargs == first[2]
        assert all(a is b for a, b in zip(args, first[1]))
    assert all(isinstance(a, torch.Tensor) for a in first[1])


def test_gradients_set_to_none_and_made_elsewhere_each_step():
    """The trainer's zero_grad(set_to_none=True): every backward allocates new gradients, and
    here they land at new addresses each step (the old ones are held), so the cached launch
    tables are rebuilt and, on CUDA, uploaded from pinned memory without a sync while the last
    launch may still be reading the previous ones. Each step must still match torch's."""
    params = make_params(torch.float32)
    reference = clone_params(params)
    opt, ref_opt = ours(params), torchs(reference)
    held, previous = [], None
    for step, grads in enumerate(make_grads(torch.float32)[:6]):
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
            for group in o.param_groups:
                group["lr"] = cosine_lr(step)
        held += [torch.empty_like(p) for p in params]  # sit where the freed gradients were
        for ps in (params, reference):
            sum((p * g).sum() for p, g in zip(ps, grads) if g is not None).backward()  # grad = g
        addresses = tuple(p.grad.data_ptr() for p in params if p.grad is not None)
        assert addresses != previous
        previous = addresses
        opt.step()
        ref_opt.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p, r, **PARAM_TOLERANCES[torch.float32])
    assert_same_state(opt, params, ref_opt, reference)


# ---------------------------------------------------------------------------------------------
# State dicts, both ways with torch.optim.AdamW


def saved(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() through torch.save/torch.load, as a checkpoint carries it (and sharing no
    tensor with opt)."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def run_handover(make_first, make_second, dtype=torch.float32, edit=None):
    """STEPS/2 steps with make_first's optimizer, its state_dict loaded into make_second's on a
    copy of the params, STEPS/2 more steps on both: the continuation must agree with an
    uninterrupted torch run. Returns the second optimizer and its params."""
    params = make_params(dtype)
    reference = clone_params(params)
    first, ref_opt = make_first(params), torchs(reference)
    grads = make_grads(dtype)
    half = STEPS // 2
    for step in range(half):
        take_step(first, params, grads[step], step)
        take_step(ref_opt, reference, grads[step], step)
    state = saved(first)
    if edit is not None:
        edit(state)
    resumed = clone_params(params)
    second = make_second(resumed)
    second.load_state_dict(state)
    for step in range(half, STEPS):
        take_step(second, resumed, grads[step], step)
        take_step(ref_opt, reference, grads[step], step)
    for p, r in zip(resumed, reference):
        torch.testing.assert_close(p, r, **PARAM_TOLERANCES[dtype])
    assert_same_state(second, resumed, ref_opt, reference)
    return second, resumed


def test_state_dict_layout_matches_torch():
    params = make_params(torch.float32)
    reference = clone_params(params)
    opt, ref_opt = ours(params), torchs(reference)
    grads = make_grads(torch.float32)
    take_step(opt, params, grads[0], 0)
    take_step(ref_opt, reference, grads[0], 0)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert [set(g) for g in sd["param_groups"]] == [set(g) for g in ref_sd["param_groups"]]
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in ref_sd["param_groups"]]
    assert sd["state"].keys() == ref_sd["state"].keys()
    for index, state in sd["state"].items():
        ref_state = ref_sd["state"][index]
        assert list(state) == list(ref_state) == ["step", "exp_avg", "exp_avg_sq"]
        for key in state:
            assert state[key].shape == ref_state[key].shape and state[key].dtype == ref_state[key].dtype, key


def test_torch_state_dict_loads_into_ours():
    opt, params = run_handover(torchs, ours)
    for p in params:
        state = opt.state[p]
        assert state["step"].shape == () and state["step"].dtype == torch.float32
        assert state["step"].device == p.device and state["exp_avg"].dtype == torch.float32


def test_our_state_dict_loads_into_torch():
    run_handover(ours, torchs)


def test_our_bf16_state_reloads_without_rounding():
    """torch's loader casts moments to the param dtype; ours restores the saved fp32 values."""
    params = make_params(torch.bfloat16)
    opt = ours(params)
    for step, grads in enumerate(make_grads(torch.bfloat16)[:3]):
        take_step(opt, params, grads, step)
    state = saved(opt)
    again = ours(clone_params(params))
    again.load_state_dict(state)
    for p, q in zip(params, again.param_groups[0]["params"] + again.param_groups[1]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert again.state[q][key].dtype == torch.float32
            torch.testing.assert_close(again.state[q][key], opt.state[p][key], rtol=0, atol=0)


TORCH_FLAGS = ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def test_state_dicts_of_other_torch_versions_load():
    """Across torch 2.11-2.13 the AdamW param_group flags come and go: a state_dict missing some,
    or carrying one we do not know, loads either way."""

    def drop_flags(state):
        for group in state["param_groups"]:
            for key in TORCH_FLAGS:
                group.pop(key, None)
            group["some_future_flag"] = True

    run_handover(torchs, ours, edit=drop_flags)
    run_handover(ours, torchs, edit=drop_flags)


# ---------------------------------------------------------------------------------------------
# What is not supported


@pytest.mark.parametrize("kwargs", [dict(amsgrad=True), dict(maximize=True), dict(lr=-1.0),
                                    dict(betas=(0.9, 1.0)), dict(weight_decay=-0.1), dict(block_size=1000)])
def test_rejects_unsupported_arguments(kwargs):
    with pytest.raises(ValueError):
        TritonAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("torch_optimizer, match", [(functools.partial(torch.optim.AdamW, amsgrad=True), "amsgrad"),
                                                    (torch.optim.Adam, "decoupled_weight_decay")],
                         ids=["amsgrad", "adam_l2"])
def test_rejects_state_of_an_update_we_do_not_compute(torch_optimizer, match):
    p = torch.zeros(3, requires_grad=True)
    state = torch_optimizer([p]).state_dict()
    with pytest.raises(ValueError, match=match):
        TritonAdamW([p]).load_state_dict(copy.deepcopy(state))


def test_failed_step_leaves_state_alone(monkeypatch):
    p = torch.randn(4, device=DEVICE, requires_grad=True)
    p.grad = torch.randn(4, device=DEVICE)
    before = p.detach().clone()
    opt = TritonAdamW([p])
    monkeypatch.setattr(adamw, "triton_usable", lambda device: False)
    with pytest.raises(RuntimeError, match="Triton cannot run"):
        opt.step()
    assert float(opt.state[p]["step"]) == 0
    torch.testing.assert_close(p, before, rtol=0, atol=0)
    monkeypatch.undo()
    opt.step()
    assert float(opt.state[p]["step"]) == 1


def test_rejects_non_contiguous_params():
    p = torch.randn(8, 6, device=DEVICE).t().requires_grad_()
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="contiguous"):
        TritonAdamW([p]).step()
