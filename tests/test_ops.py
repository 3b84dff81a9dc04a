"""fastgpt.ops: the model on Triton kernels (CPU: Triton's interpreter) against the model on torch."""

import pytest
import torch

from fastgpt.model import GPT, GPTConfig
from fastgpt.ops import KernelChoiceError, TORCH_OPS, choose_kernels
from fastgpt.train import train

from conftest import tiny_config

pytest.importorskip("triton")

CPU = torch.device("cpu")


def test_auto_is_torch_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    auto = choose_kernels("auto", CPU)
    assert auto.ops is TORCH_OPS and auto.optimizer is torch.optim.AdamW
    with pytest.raises(KernelChoiceError, match=r"kernels='triton' cannot run here: device cpu is not CUDA"):
        choose_kernels("triton", CPU)
    assert choose_kernels("torch", CPU).ops is TORCH_OPS
    with pytest.raises(KernelChoiceError, match=r"kernels='cuda' is not allowed"):
        choose_kernels("cuda", CPU)


def test_triton_allowed_on_cpu_under_the_interpreter(monkeypatch):
    from kernels.adamw import TritonAdamW

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = choose_kernels("triton", CPU)
    assert triton.ops.name == "triton" and triton.optimizer is TritonAdamW
    assert choose_kernels("auto", CPU).ops is TORCH_OPS  # auto never picks the (slow) interpreter


def pair(bias=True):
    cfg = GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=48, bias=bias)
    torch.manual_seed(0)
    a = GPT(cfg, TORCH_OPS)
    b = GPT(cfg, choose_kernels("triton", CPU).ops)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("bias", [True, False])
def test_same_loss_and_gradients(bias):
    a, b = pair(bias)
    x = torch.randint(0, 90, (3, 16))
    y = torch.randint(0, 90, (3, 16))
    y[0, :5] = -1
    _, loss_a = a(x, y)
    logits_b, loss_b = b(x, y)
    assert logits_b is None  # the fused head never forms the logits
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    grads_b = dict(b.named_parameters())
    for name, p in a.named_parameters():
        torch.testing.assert_close(grads_b[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_every_target_ignored_gives_zero_loss_on_both_paths():
    a, b = pair(True)
    x, y = torch.randint(0, 90, (2, 16)), torch.full((2, 16), -1)
    for model in (a, b):
        _, loss = model(x, y)
        loss.backward()
        assert loss.item() == 0.0
        assert all(not p.grad.any() for p in model.parameters())


def test_rows_wider_than_one_program_go_to_torch(monkeypatch):
    from kernels import layernorm
    from kernels.common import MAX_FUSED_BLOCK

    ops = choose_kernels("triton", CPU).ops
    calls = []
    monkeypatch.setattr(layernorm, "layer_norm", lambda *a: calls.append("ln") or TORCH_OPS.layer_norm(*a[:3]))
    monkeypatch.setattr(layernorm, "add_layer_norm", lambda *a: calls.append("add") or TORCH_OPS.add_layer_norm(*a[:4]))
    for width, routed in ((MAX_FUSED_BLOCK, ["ln", "add"]), (MAX_FUSED_BLOCK + 1, [])):
        calls.clear()
        x, r = torch.randn(2, width), torch.randn(2, width)
        w, b = torch.rand(width) + 0.5, torch.randn(width)
        torch.testing.assert_close(ops.layer_norm(x, w, b), TORCH_OPS.layer_norm(x, w, b))
        s, y = ops.add_layer_norm(x, r, w, b)
        s_ref, y_ref = TORCH_OPS.add_layer_norm(x, r, w, b)
        torch.testing.assert_close(s, s_ref)
        torch.testing.assert_close(y, y_ref)
        assert calls == routed, width


def test_triton_model_compiles_without_graph_breaks():
    _, b = pair()
    compiled = torch.compile(b, fullgraph=True)
    x = torch.randint(0, 90, (2, 16))
    _, loss = compiled(x, x)
    _, expected = b(x, x)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_short_runs_match_and_checkpoints_cross_over(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    data_root, _ = tiny_data
    common = dict(max_iters=6, eval_interval=3, eval_iters=1, log_interval=1, lr_decay_iters=12)
    torch_run = train(tiny_config(tmp_path / "t", data_root, kernels="torch", **common))
    triton_run = train(tiny_config(tmp_path / "k", data_root, kernels="triton", **common))
    for (it, la), (_, lb) in zip(torch_run.history["train"], triton_run.history["train"]):
        assert lb == pytest.approx(la, rel=1e-4, abs=1e-5), it
    # A checkpoint written with the Triton kernels (and Triton AdamW) resumes on torch ops, and
    # the other way round.
    longer = dict(common, max_iters=9)
    assert train(tiny_config(tmp_path / "k", data_root, kernels="torch", init_from="resume", **longer)).iter_num == 9
    assert train(tiny_config(tmp_path / "t", data_root, kernels="triton", init_from="resume", **longer)).iter_num == 9
