"""fastgpt.ops: each op's choice, and the model on Triton kernels (CPU: Triton's interpreter) or
the fp8 head against the model on torch."""

import json

import pytest
import torch

from fastgpt import hardware, ops
from fastgpt.model import GPT, GPTConfig
from fastgpt.ops import KernelChoiceError, TORCH_OPS, choose_ops, resolve_choices
from fastgpt.train import train

from conftest import tiny_config

pytest.importorskip("triton")

CPU = torch.device("cpu")


def test_auto_is_torch_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    auto = choose_ops("auto", CPU)
    assert auto.ops is TORCH_OPS and auto.optimizer is torch.optim.AdamW
    with pytest.raises(KernelChoiceError, match=r"kernels='triton' cannot run here: device cpu is not CUDA"):
        choose_ops("triton", CPU)
    assert choose_ops("torch", CPU).ops is TORCH_OPS
    with pytest.raises(KernelChoiceError, match=r"kernels='cuda' is not allowed"):
        choose_ops("cuda", CPU)


def test_triton_allowed_on_cpu_under_the_interpreter(monkeypatch):
    from fastgpt_kernels.adamw import TritonAdamW

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = choose_ops("triton", CPU)
    assert triton.ops.name == "triton" and triton.optimizer is TritonAdamW
    assert choose_ops("auto", CPU).ops is TORCH_OPS  # auto never picks the (slow) interpreter


def pair(bias=True):
    cfg = GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=48, bias=bias)
    torch.manual_seed(0)
    a = GPT(cfg, TORCH_OPS)
    b = GPT(cfg, choose_ops("triton", CPU).ops)
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
    from fastgpt_kernels import layernorm
    from fastgpt_kernels.common import MAX_FUSED_BLOCK

    ops = choose_ops("triton", CPU).ops
    calls = []
    monkeypatch.setattr(layernorm, "layer_norm", lambda *a: calls.append("ln") or TORCH_OPS.layer_norm(*a[:3]))
    monkeypatch.setattr(layernorm, "add_layer_norm", lambda *a: calls.append("add") or TORCH_OPS.add_layer_norm(*a[:4]))
    for width, routed in ((MAX_FUSED_BLOCK, ["ln", "add"]), (MAX_FUSED_BLOCK + 1, [])):
        calls.clear()
        x, branch = torch.randn(2, width), torch.randn(2, width)
        w, b = torch.rand(width) + 0.5, torch.randn(width)
        torch.testing.assert_close(ops.layer_norm(x, w, b), TORCH_OPS.layer_norm(x, w, b))
        s, y = ops.add_layer_norm(x, branch, w, b)
        s_ref, y_ref = TORCH_OPS.add_layer_norm(x, branch, w, b)
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
    # The fp8 head's rounding moves the losses a little, never the training.
    fp8_run = train(tiny_config(tmp_path / "f", data_root, kernels="torch", head_loss_kernel="fp8", **common))
    for (it, la), (_, lb) in zip(torch_run.history["train"], fp8_run.history["train"]):
        assert lb == pytest.approx(la, rel=0.02), it
    # A checkpoint written with the Triton kernels (and Triton AdamW) resumes on torch ops, and
    # the other way round.
    longer = dict(common, max_iters=9)
    assert train(tiny_config(tmp_path / "k", data_root, kernels="torch", init_from="resume", **longer)).iter_num == 9
    assert train(tiny_config(tmp_path / "t", data_root, kernels="triton", init_from="resume", **longer)).iter_num == 9


# --- choosing each op --------------------------------------------------------------------------

H200 = "NVIDIA H200"
MEASURED = {"H200": {"tokens_per_s": {"torch": 100_000, "layer_norm=triton": 100_500, "head_loss=triton": 93_000,
                                      "optimizer=triton": 101_200}}}
ALL_TORCH = {"layer_norm": "torch", "head_loss": "torch", "optimizer": "torch"}


def test_auto_takes_a_triton_op_only_where_the_measurement_shows_it_winning(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda = torch.device("cuda", 0)
    # optimizer: +1.2%, a win; layer_norm: +0.5%, within run-to-run noise; head_loss: slower
    assert resolve_choices("auto", {}, cuda, H200, (9, 0), MEASURED) == {**ALL_TORCH, "optimizer": "triton"}
    # another GPU class has no measurement: torch throughout, even for the op that won on the H200
    assert resolve_choices("auto", {}, cuda, "NVIDIA H100 80GB HBM3", (9, 0), MEASURED) == ALL_TORCH
    assert resolve_choices("auto", {}, cuda, H200, (9, 0), {}) == ALL_TORCH
    # never on a CPU, whatever was measured on a GPU
    assert resolve_choices("auto", {}, CPU, None, None, MEASURED) == ALL_TORCH


def test_each_op_is_chosen_on_its_own(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    choices = resolve_choices("torch", {"optimizer": "triton", "head_loss": "fp8"}, CPU)
    assert choices == {"layer_norm": "torch", "head_loss": "fp8", "optimizer": "triton"}
    op_choices = ops.build_ops(choices)
    from fastgpt_kernels.adamw import TritonAdamW

    assert op_choices.optimizer is TritonAdamW and op_choices.ops.layer_norm is ops._torch_layer_norm
    assert op_choices.ops.name == "layer_norm=torch, head_loss=fp8, optimizer=triton"
    # an op's own choice wins over `kernels`, and None leaves it to `kernels`
    assert resolve_choices("triton", {"layer_norm": "torch", "head_loss": None}, CPU)["head_loss"] == "triton"


def test_a_choice_that_cannot_run_names_its_field(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelChoiceError, match=r"^optimizer_kernel='triton' cannot run here: device cpu is not CUDA"):
        resolve_choices("torch", {"optimizer": "triton"}, CPU)
    with pytest.raises(KernelChoiceError, match=r"^layer_norm_kernel='fp8' is not allowed; choose one of auto, triton, torch$"):
        resolve_choices("auto", {"layer_norm": "fp8"}, CPU)
    with pytest.raises(KernelChoiceError, match=r"^head_loss_kernel='fp8' cannot run here: NVIDIA A100.* 8\.9"):
        resolve_choices("auto", {"head_loss": "fp8"}, torch.device("cuda", 0), "NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(KernelChoiceError, match=r"^kernels='fp8' is not allowed"):
        resolve_choices("fp8", {}, CPU)


def test_the_fp8_head_needs_shapes_in_multiples_of_16():
    ops.check_head_shapes(ALL_TORCH, 10, 30, 65)  # only the fp8 head cares
    ops.check_head_shapes({**ALL_TORCH, "head_loss": "fp8"}, 64, 32, 128)
    with pytest.raises(KernelChoiceError, match=r"head_loss_kernel='fp8': batch_size x block_size = 12, .*rows 12"):
        ops.check_head_shapes({**ALL_TORCH, "head_loss": "fp8"}, 12, 32, 128)


def test_committed_measurements_name_known_gpus_and_every_op():
    """kernel_measurements.json is written from gpu_check.sh's end-to-end table: one entry per GPU
    class, each with the all-torch step and the ops whose Triton kernel alone was measured beside
    it, in one run."""
    table = json.loads(ops.MEASUREMENTS.read_text())
    for gpu, entry in table.items():
        assert hardware.gpu_class(gpu) == gpu, f"{gpu} is not a GPU class fastgpt.hardware knows"
        rates = entry["tokens_per_s"]
        assert "torch" in rates and set(rates) <= {"torch", *(f"{op}=triton" for op in ops.OP_CHOICES)}, gpu
        assert all(rate > 0 for rate in rates.values()), gpu
        assert entry["source"] and entry["step"], "where and what was measured"


def test_the_fp8_head_trains_like_the_torch_head():
    """Same weights, same batch: the loss within fp8's rounding of the torch head's, and
    gradients that point the same way."""
    cfg = GPTConfig(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=32, bias=False)
    torch.manual_seed(0)
    a = GPT(cfg, TORCH_OPS)
    b = GPT(cfg, ops.build_ops({**ALL_TORCH, "head_loss": "fp8"}).ops)
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 128, (4, 16)), torch.randint(0, 128, (4, 16))
    y[0, :3] = -1
    (_, loss_a), (logits_b, loss_b) = a(x, y), b(x, y)
    assert logits_b.shape == (4, 16, 128)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=0.01)
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        cos = torch.nn.functional.cosine_similarity(pa.grad.flatten(), pb.grad.flatten(), dim=0)
        assert cos > 0.99, name


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
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    for g, p in zip(full, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
