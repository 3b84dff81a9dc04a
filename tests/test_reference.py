"""bench/reference.py, the benchmarks' independent nanoGPT-style GPT, as an oracle: with the same
weights, fastgpt's model gives the same logits, loss and gradients (fp32, tight tolerances). And
bench/reference_train.py, nanoGPT's loop over it, as gpu_check.sh runs it."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import reference, reference_train
from fastgpt.model import GPT, GPTConfig
from fastgpt.ops import choose_ops

# fp32 on both sides, the same math in a different order: rounding differences only.
TOL = dict(rtol=1e-5, atol=1e-6)
ROOT = pathlib.Path(__file__).resolve().parents[1]
# scripts/gpu_check.sh reads fastgpt's and the reference trainer's log lines with this
LOG_LINE = re.compile(r"^iter (\d+):.* ([\d,]+) tok/s")


def pair(bias: bool, kernels: str = "torch", vocab: int = 67, block: int = 24):
    """A fastgpt GPT and the reference holding the same weights (loaded by parameter name)."""
    shape = dict(block_size=block, vocab_size=vocab, n_layer=2, n_head=3, n_embd=48, dropout=0.0, bias=bias)
    torch.manual_seed(0)
    ref = reference.ReferenceGPT(reference.ReferenceConfig(**shape))
    ours = GPT(GPTConfig(**shape), choose_ops(kernels, "cpu").ops)
    ours.load_state_dict(ref.state_dict(), strict=True)
    if bias:  # zero-initialised biases would hide a missing bias: make them count
        with torch.no_grad():
            our_params = dict(ours.named_parameters())
            for name, p in ref.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
                    our_params[name].copy_(p)
    return ours, ref


def batch(vocab: int, B: int = 3, T: int = 19):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    y[0, :5] = -1  # ignored targets, nanoGPT's convention
    return x, y


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("bias", [True, False])
def test_fastgpt_matches_the_reference(bias):
    ours, ref = pair(bias)
    x, y = batch(ref.config.vocab_size)
    logits_ref, loss_ref = ref(x, y)
    logits, loss = ours(x, y)
    if logits is not None:  # the chunked head never forms them
        torch.testing.assert_close(logits, logits_ref, **TOL)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    loss_ref.backward()
    loss.backward()
    ref_grads, our_grads = grads(ref), grads(ours)
    assert ref_grads.keys() == our_grads.keys() and len(ref_grads) > 0
    for name, g in ref_grads.items():
        torch.testing.assert_close(our_grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")
    # Generation's forward (no targets): the last position's logits.
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0][:, -1], ref(x)[0][:, -1], **TOL)


def test_triton_kernels_match_the_reference():
    """The Triton path (under the CPU interpreter here) against the same oracle: LayerNorm,
    the fused residual add and the chunked head + loss inside a whole model."""
    pytest.importorskip("triton")
    ours, ref = pair(bias=True, kernels="triton", vocab=40, block=8)
    x, y = batch(40, B=2, T=8)
    _, loss_ref = ref(x, y)
    _, loss = ours(x, y)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    loss_ref.backward()
    loss.backward()
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(ours)[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_a_wrong_model_is_caught():
    """The oracle has teeth: a missing bias or a wrong residual scale is far outside TOL."""
    ours, ref = pair(bias=True)
    x, y = batch(ref.config.vocab_size)
    with torch.no_grad():
        ours.transformer.h[1].mlp.c_proj.bias.zero_()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ours(x, y)[1], ref(x, y)[1], **TOL)


def test_reference_train_step_learns_and_get_batch_reads_windows(tmp_path):
    path = tmp_path / "train.bin"
    tokens = (np.arange(5000) % 31).astype(np.uint16)  # next = current + 1 (mod 31)
    tokens.tofile(path)
    g = torch.Generator().manual_seed(0)
    x, y = reference.get_batch(path, 4, 16, torch.device("cpu"), g)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    torch.manual_seed(0)
    model = reference.ReferenceGPT(reference.ReferenceConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32))
    opt = reference.configure_optimizer(model, 0.1, 3e-3, (0.9, 0.99))
    assert [len(group["params"]) for group in opt.param_groups] == [6, 10]  # matrices | gains and biases
    step = reference.make_train_step(model, opt, lambda: reference.get_batch(path, 8, 16, torch.device("cpu"), g),
                                     torch.device("cpu"), reference.nanogpt_dtype(torch.device("cpu")))
    first = step().item()
    for _ in range(60):
        last = step().item()
    assert first > 3.0 and last < 0.5 * first


def counting_tokens(path: pathlib.Path, n: int = 5000) -> None:
    """uint16 tokens where the next is the current + 1 (mod 31): a model learns it in seconds."""
    (np.arange(n) % 31).astype(np.uint16).tofile(path)


def test_reference_trainer_logs_what_gpu_check_parses_and_learns(tmp_path):
    counting_tokens(tmp_path / "train.bin")
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--vocab_size=32", "--block_size=16", "--batch_size=8",
            "--gradient_accumulation_steps=2", "--max_iters=42", "--log_interval=10", "--learning_rate=1e-2",
            "--warmup_iters=5", "--compile=False", "--dtype=float32", "--device=cpu"]
    out = subprocess.run([sys.executable, "-m", "bench.reference_train", f"--data_dir={tmp_path}", *tiny],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if LOG_LINE.match(line)]
    assert [int(LOG_LINE.match(line)[1]) for line in lines] == [10, 20, 30, 40, 42]  # and the last iteration
    for line in lines:
        assert re.fullmatch(r"iter \d+: loss \d+\.\d{4}, \d+\.\d ms/iter, [\d,]+ tok/s", line), line
        ms, tok_s = re.search(r"([\d.]+) ms/iter, ([\d,]+) tok/s", line).groups()
        # tokens an iteration (2 x 8 x 16) over the window's mean time an iteration
        assert int(tok_s.replace(",", "")) == pytest.approx(2 * 8 * 16 / (float(ms) / 1e3), rel=0.05, abs=2)
    losses = [float(re.search(r"loss ([\d.]+)", line)[1]) for line in lines]
    assert losses[0] > 1.0 and losses[-1] < 0.5 * losses[0]
    assert "peak memory" not in out.stdout  # CUDA only


def test_reference_trainer_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert reference_train.main([f"--data_dir={tmp_path}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no {tmp_path / 'train.bin'}") and err.count("\n") == 1
    counting_tokens(tmp_path / "train.bin", n=100)
    assert reference_train.main([f"--data_dir={tmp_path}", "--device=cpu", "--block_size=128"]) == 2
    assert "holds 100 tokens" in capsys.readouterr().err
    assert reference_train.main([f"--data_dir={tmp_path}", "--device=cpu", "--max_iters=0"]) == 2
    assert capsys.readouterr().err == "error: --max_iters=0 must be at least 1\n"


def test_reference_trainer_follows_nanogpt_schedule_and_dtypes(monkeypatch):
    args = reference_train.parse_args(["--data_dir=x"])
    assert (args.learning_rate, args.beta1, args.beta2, args.weight_decay, args.grad_clip) == (6e-4, 0.9, 0.95, 0.1, 1.0)
    assert args.min_lr == pytest.approx(6e-5)  # learning_rate / 10
    assert (args.compile, args.bias, args.dropout, args.dtype) == (True, False, 0.0, "bfloat16")
    lr = lambda it: reference_train.get_lr(it, 6e-4, 10, 30, 6e-5)  # noqa: E731
    assert lr(0) == pytest.approx(6e-4 / 11) and lr(9) == pytest.approx(6e-4 * 10 / 11)
    assert lr(10) == pytest.approx(6e-4) and lr(20) == pytest.approx(3.3e-4) and lr(30) == pytest.approx(6e-5)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert reference_train.train_dtype("bfloat16", cpu) is torch.float32  # nanoGPT's autocast is off on a CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert reference_train.train_dtype("bfloat16", gpu) is torch.float16  # with a GradScaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert reference_train.train_dtype("bfloat16", gpu) is torch.bfloat16
    assert reference_train.train_dtype("float32", gpu) is torch.float32
    with pytest.raises(SystemExit):
        reference_train.parse_args(["--data_dir=x", "--compile=yes"])
