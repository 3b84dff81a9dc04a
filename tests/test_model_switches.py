"""The modded-nanogpt switches (activation, rope, qk_norm, tie_embeddings, zero_init_proj,
logit_softcap): each one's math, each one learning, and all of them at once through the trainer,
a resume, sampling, the Triton ops and the export."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt import checkpoint as ckpt_io
from fastgpt import export, init_from, model as model_module, sample
from fastgpt.config import ConfigError, TrainConfig, help_text
from fastgpt.model import GPT, MLP, ROPE_BASE, GPTConfig, Rotary, rotate_pairs_complex, rotate_pairs_real
from fastgpt.train import train

from conftest import tiny_config
from test_train import first_moments

SWITCHES = dict(activation="relu2", rope=True, qk_norm=True, tie_embeddings=False, zero_init_proj=True,
                logit_softcap=15.0)
ONE_AT_A_TIME = [{k: v} for k, v in SWITCHES.items()]


def tiny(**kw) -> GPT:
    args = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


# --- RoPE ---------------------------------------------------------------------------------------


def test_rope_scores_depend_only_on_the_distance():
    """One q and one k placed at every position: q_i . k_j must be a function of i - j alone."""
    torch.manual_seed(0)
    rotary, T, hs = Rotary(head_size=8, block_size=24), 24, 8
    q, k = torch.randn(hs), torch.randn(hs)
    q_rot = rotary(q.expand(1, 1, T, hs))[0, 0]  # (T, hs): q at positions 0..T-1
    k_rot = rotary(k.expand(1, 1, T, hs))[0, 0]
    scores = q_rot @ k_rot.T  # (T, T): scores[i, j] = q at i . k at j
    for shift in (1, 5, 11):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores[0, 0], scores[3, 0])  # and it does depend on the distance
    torch.testing.assert_close(q_rot[0], q)  # position 0 is not turned


def test_rope_keeps_every_norm_and_the_dtype():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 16, 8)
    y = Rotary(head_size=8, block_size=16)(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y, x)
    assert Rotary(8, 16)(x.bfloat16()).dtype == torch.bfloat16


def test_rope_turns_adjacent_pairs_by_position_times_frequency():
    """Pair 0 turns by t radians at position t (frequency 1); pair i by t * base^(-2i/hs)."""
    x = torch.zeros(1, 1, 3, 8)
    x[..., 0], x[..., 6] = 1.0, 1.0  # pair 0 and pair 3 point along their real axis
    y = Rotary(head_size=8, block_size=3)(x)[0, 0]  # (T, hs)
    for t in range(3):
        slow = t * ROPE_BASE ** (-6 / 8)
        want = torch.tensor([math.cos(t), math.sin(t), 0, 0, 0, 0, math.cos(slow), math.sin(slow)])
        torch.testing.assert_close(y[t], want)


def test_rope_compiled_form_equals_the_complex_one(monkeypatch):
    """A compiled model turns the pairs in real arithmetic (inductor leaves complex ops unfused):
    the same numbers, fed the awkward strides attention gives it (q sliced out of qkv)."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 24, 3 * 3 * 8)  # (B, T, 3C) with nh=3, hs=8
    q = qkv[..., :24].view(2, 24, 3, 8).transpose(1, 2)  # (B, nh, T, hs), not contiguous
    rotary = Rotary(head_size=8, block_size=24)
    eager = rotary(q)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(rotary(q), eager, rtol=0, atol=1e-6)
    cos, sin = rotary.cos, rotary.sin
    torch.testing.assert_close(rotate_pairs_real(q, cos, sin), rotate_pairs_complex(q, cos, sin), rtol=0, atol=1e-6)


def test_rope_model_has_no_position_table_and_counts_right():
    m = tiny(rope=True)
    keys = set(m.state_dict())
    assert not any("wpe" in k for k in keys) and not any("rotary" in k for k in keys)  # buffers stay out
    assert keys == set(tiny().state_dict()) - {"transformer.wpe.weight"}
    assert m.num_params() == m.num_params(non_embedding=False) == tiny().num_params()
    cfg = m.config
    assert m.flops_per_token() == 6 * m.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    m.crop_block_size(8)
    m(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="head size n_embd / n_head = 3 must be even"):
        GPTConfig(n_embd=6, n_head=2, rope=True)


def test_rope_buffers_are_real_in_a_model_built_on_meta():
    """A resume builds the model on the meta device and assigns the checkpoint's tensors; RoPE's
    tables come from no checkpoint, so they must be computed values, not meta tensors."""
    ref = tiny(rope=True)
    with torch.device("meta"):
        m = GPT(GPTConfig(**ref.config.to_model_args()))
    ckpt_io.load_model_state(m, ref.state_dict(), "ckpt.pt", assign=True)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(m(x, x)[1], ref(x, x)[1])


# --- QK-norm, ReLU² ------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [False, True])
def test_qk_norm_gives_unit_rms_q_and_k_per_head(monkeypatch, rope):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q, k))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    m = tiny(qk_norm=True, rope=rope)
    m(torch.randint(0, 64, (2, 16)))
    assert len(seen) == 2  # one per layer
    for q, k in seen:
        for t in (q, k):  # (B, nh, T, hs)
            rms = t.pow(2).mean(dim=-1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-5, atol=1e-5)
    assert not any(k.endswith(("q_norm.weight", "k_norm.weight")) for k in m.state_dict())  # no parameters


def test_relu2_is_relu_squared_in_the_mlp():
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(n_embd=32, activation="relu2"))
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))
    with pytest.raises(ValueError, match="activation='swish' is not allowed; choose one of 'gelu', 'relu2'"):
        GPTConfig(activation="swish")


# --- logit soft-capping --------------------------------------------------------------------------


def capped_pair(cap: float) -> tuple[GPT, GPT]:
    """The same weights with and without the cap, the head scaled up so that the cap bites."""
    plain, capped = tiny(), tiny(logit_softcap=cap)
    with torch.no_grad():
        plain.lm_head.weight.mul_(60.0)  # logits up to ~3 caps: tanh bites but stays below 1 in fp32
    capped.load_state_dict(plain.state_dict())
    return plain, capped


def test_softcap_bounds_the_logits_and_is_the_formula():
    cap = 15.0
    plain, capped = capped_pair(cap)
    x = torch.randint(0, 64, (3, 16))
    raw, _ = plain(x, x)
    logits, _ = capped(x, x)
    assert raw.abs().max() > 2 * cap  # the cap has something to do
    assert logits.abs().max() < cap
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap))
    last, _ = capped(x)  # generation's path: the last position only, capped too
    torch.testing.assert_close(last, logits[:, [-1]])


def test_softcap_loss_is_cross_entropy_of_the_capped_logits():
    cap = 15.0
    plain, capped = capped_pair(cap)
    x, y = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    y[0, :7] = -1
    raw, _ = plain(x, y)
    logits, loss = capped(x, y)
    expected = F.cross_entropy((cap * torch.tanh(raw / cap)).view(-1, 64), y.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected)
    _, all_ignored = capped(x, torch.full_like(y, -1))
    assert all_ignored.item() == 0.0  # as on every other path, not nan
    with pytest.raises(ValueError, match=r"logit_softcap=-1.0 must be a finite number >= 0"):
        GPTConfig(logit_softcap=-1.0)


# --- untied head, zero-initialised projections ---------------------------------------------------


def test_untied_head_has_its_own_weight():
    m = tiny(tie_embeddings=False)
    assert m.lm_head.weight is not m.transformer.wte.weight
    state = m.state_dict()
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert state["lm_head.weight"].data_ptr() != state["transformer.wte.weight"].data_ptr()
    assert m.num_params(non_embedding=False) == tiny().num_params(non_embedding=False) + 64 * 32
    assert m.num_params() == m.num_params(non_embedding=False) - 64 * 32 - 16 * 32  # no lookup tables
    with torch.device("meta"):
        loaded = GPT(m.config)
    ckpt_io.load_model_state(loaded, state, "ckpt.pt", assign=True)
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight  # the load does not tie them


@pytest.mark.parametrize("tie", [True, False])
def test_zero_init_proj_starts_the_projections_at_zero(tie):
    m = tiny(zero_init_proj=True, tie_embeddings=tie)
    for block in m.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)  # the rest: GPT-2's
    # Untied, the head starts at zero as well (uniform logits); tied, it is the embedding and is not.
    assert bool(m.lm_head.weight.any()) is tie
    if not tie:
        x = torch.randint(0, 64, (2, 16))
        assert m(x, x)[1].item() == pytest.approx(math.log(64))


# --- model_args and the config ------------------------------------------------------------------


def test_model_args_hold_a_switch_only_when_it_is_on():
    nanogpt_keys = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}
    assert set(GPTConfig().to_model_args()) == nanogpt_keys  # nanoGPT's GPTConfig(**model_args) loads it
    for switch in ONE_AT_A_TIME:
        args = GPTConfig(**switch).to_model_args()
        assert set(args) == nanogpt_keys | set(switch) and GPTConfig(**args) == GPTConfig(**switch)


def test_a_resume_reads_a_missing_switch_as_its_default(tmp_path):
    """A nanoGPT checkpoint has no switches: it is a default model whatever the config asks for."""
    wanted = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **SWITCHES)
    saved = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32).to_model_args()
    config, taken = init_from.adopt_model_args(saved, wanted, 64, tmp_path / "ckpt.pt")
    defaults = GPTConfig()
    assert all(getattr(config, k) == getattr(defaults, k) for k in SWITCHES if k != "zero_init_proj")
    assert "rope=False (config: True)" in taken and "logit_softcap=0.0 (config: 15.0)" in taken
    assert not any(t.startswith("zero_init_proj") for t in taken)  # a new model's init, not the weights'


@pytest.mark.parametrize("values, message", [
    ({"activation": "swish"}, r"activation='swish' is not allowed; choose one of 'gelu', 'relu2'"),
    ({"logit_softcap": -1.0}, r"logit_softcap=-1.0 must be >= 0"),
    ({"rope": True, "n_embd": 30, "n_head": 2}, r"rope=True .* head size n_embd / n_head = 15 must be even"),
    ({"logit_softcap": 30.0, "head_loss_kernel": "fp8"}, r"head_loss_kernel='fp8' cannot apply logit_softcap=30.0"),
])
def test_config_refuses_switch_values_naming_the_field(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_help_names_every_switch():
    text = help_text()
    for name in SWITCHES:
        assert f"--{name}=" in text
    assert TrainConfig().to_dict().items() >= {"rope": False, "tie_embeddings": True, "logit_softcap": 0.0}.items()


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("switch", ONE_AT_A_TIME, ids=lambda s: next(iter(s)))
def test_each_switch_learns(tmp_path, tiny_data, switch):
    data_root, _ = tiny_data
    result = train(tiny_config(tmp_path, data_root, max_iters=40, eval_interval=40, eval_iters=5, lr_decay_iters=40,
                               **switch))
    assert all(getattr(result.model.config, k) == v for k, v in switch.items())
    (_, _, first_val), (_, _, last_val) = result.history["eval"][0], result.history["eval"][-1]
    assert last_val < 0.5 * first_val  # ~4.2 at init, ~1.3 after 40 steps on the counting pattern


def test_all_switches_resume_exactly_then_sample_and_refuse_export(tmp_path, tiny_data, capsys):
    data_root, _ = tiny_data
    common = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, log_interval=1, dropout=0.1, **SWITCHES)
    whole = train(tiny_config(tmp_path / "whole", data_root, **common))
    losses_whole = dict(whole.history["train"])
    assert losses_whole[20] < 0.6 * losses_whole[1]
    out = tmp_path / "parts"
    train(tiny_config(out, data_root, **{**common, "max_iters": 10}))
    # The config no longer names the switches: the checkpoint's model_args bring them back.
    resumed = train(tiny_config(out, data_root, init_from="resume", max_iters=20, lr_decay_iters=20, eval_interval=10,
                                log_interval=1, dropout=0.1))
    assert "took the model's shape from ckpt.pt: activation='relu2' (config: 'gelu'), rope=True" in capsys.readouterr().out
    losses_resumed = dict(resumed.history["train"])
    assert sorted(losses_resumed) == list(range(11, 21))
    for it in range(11, 21):
        assert losses_resumed[it] == pytest.approx(losses_whole[it], rel=1e-6, abs=1e-7), it
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    checkpoint = ckpt_io.load_checkpoint(out / "out" / "ckpt.pt")
    architecture = {k: v for k, v in SWITCHES.items() if k != "zero_init_proj"}  # the init is the first run's
    assert {k: checkpoint["model_args"][k] for k in architecture} == architecture
    assert checkpoint["config"]["rope"] is True  # the run's config adopted the checkpoint's switches

    assert sample.main(["--out_dir", str(out / "out"), "--start", "abc", "--num_samples=1", "--max_new_tokens=8",
                        "--device=cpu"]) == 0
    assert capsys.readouterr().out.startswith("abc")

    target = tmp_path / "hf"
    assert export.main([str(out / "out"), "--hf", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rope=True" in err and "qk_norm=True" in err and "logit_softcap=15.0" in err
    assert not target.exists()


def test_triton_and_torch_ops_agree_with_every_switch_on(tmp_path, tiny_data):
    """The Triton LayerNorms (Triton's interpreter on a CPU) against torch's: the same initial
    losses and the same first gradients (AdamW's first moment after one step)."""
    pytest.importorskip("triton")
    data_root, _ = tiny_data
    common = dict(max_iters=1, eval_interval=1, eval_iters=2, grad_clip=0.0, optimizer_kernel="torch", **SWITCHES)
    ref = train(tiny_config(tmp_path / "torch", data_root, kernels="torch", **common))
    tri = train(tiny_config(tmp_path / "triton", data_root, kernels="triton", **common))
    for (_, *a), (_, *b) in zip(ref.history["eval"], tri.history["eval"]):
        assert b == pytest.approx(a, rel=1e-5)
    for g_ref, g_tri in zip(first_moments(tmp_path / "torch" / "out"), first_moments(tmp_path / "triton" / "out")):
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-6)
