"""Saves in the background: the step waits only for the copy to host memory, the file is the one a
synchronous save writes, one write at a time, a failed write surfaces in the training thread, and
every exit (the end, a stop, an error) waits for the write in flight."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest
import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.background_save import HostCopy, HostSnapshot, host_copy_kind, tensors
from fastgpt.distributed import DistInfo
from fastgpt.fileio import WriteError, write_error
from fastgpt.model import GPT, GPTConfig
from fastgpt.optim import param_groups
from fastgpt.stopping import LossWatch, NonFiniteLossError
from fastgpt.train import train

from conftest import tiny_config

# How long a slowed write takes: long enough that the training thread is sure to run on meanwhile.
SLOW_WRITE_S = 0.3


def trained_state(device: str = "cpu") -> ckpt_io.TrainingState:
    """A tied-embedding GPT and its AdamW after one step, so both moments exist."""
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    step(model, optimizer)
    return ckpt_io.TrainingState(model, optimizer, torch.amp.GradScaler(device, enabled=False), {},
                                 model.config.to_model_args(), {"seed": 0}, {"host": "test"})


def step(model, optimizer) -> None:
    x = torch.randint(0, 64, (2, 8), device=next(model.parameters()).device)
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def assert_same(a, b, where="checkpoint"):
    """Equal keys, types, plain values and tensors (dtype, shape, values), at every depth."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def saver_for(state, out_dir, log=lambda *_: None, background=True) -> ckpt_io.Saver:
    return ckpt_io.Saver(out_dir, 2, state, DistInfo(), LossWatch(torch.device("cpu")), log, None,
                         background=background)


def test_the_copy_kind_follows_the_device():
    assert host_copy_kind(torch.device("cpu")) is HostCopy.CLONE
    assert host_copy_kind(torch.device("cuda", 1)) is HostCopy.PINNED  # page-locked, asynchronous
    assert host_copy_kind(torch.device("mps")) is HostCopy.BLOCKING


def test_the_snapshot_does_not_follow_later_updates():
    state = trained_state()
    rng = ckpt_io.rng_state()
    checkpoint = state.checkpoint(1, 2.0, [rng])
    before = saved_bytes(checkpoint)
    snapshot, nbytes = HostSnapshot()(checkpoint)
    step(state.model, state.optimizer)  # updates weights, both moments and the step counters in place
    assert saved_bytes(snapshot) == before
    params = sum(p.numel() * p.element_size() for p in state.model.parameters())  # the tied matrix once
    step_counters = 4 * len(state.optimizer.state)  # a float32 scalar per parameter
    assert nbytes == 3 * params + step_counters + rng["torch"].nbytes  # weights, two moments, counters, rng


def test_the_snapshot_keeps_tied_weights_one_tensor():
    state = trained_state()
    model = state.checkpoint(1, 2.0, [])["model"]
    assert model["lm_head.weight"].data_ptr() == model["transformer.wte.weight"].data_ptr()
    snapshot, _ = HostSnapshot()({"model": model})
    copied = snapshot["model"]
    assert copied["lm_head.weight"].data_ptr() == copied["transformer.wte.weight"].data_ptr()
    assert copied["lm_head.weight"].data_ptr() != model["lm_head.weight"].data_ptr()
    assert type(copied) is type(model) and copied._metadata == model._metadata  # what load_state_dict reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked buffers need CUDA")
def test_cuda_state_is_copied_into_page_locked_buffers_kept_for_the_next_save():
    state = trained_state("cuda")
    snapshot = HostSnapshot()
    first, nbytes = snapshot(state.checkpoint(1, 2.0, []))
    expected = {k: v.cpu() for k, v in state.model.state_dict().items()}
    step(state.model, state.optimizer)
    assert all(t.device.type == "cpu" for t in tensors(first))
    assert all(t.is_pinned() for t in tensors(first["model"]))  # (AdamW keeps its step counters on the host)
    assert_same(dict(first["model"]), expected)  # copied before the step that followed
    pointers = {k: v.data_ptr() for k, v in first["model"].items()}
    second, _ = snapshot(state.checkpoint(2, 2.0, []))
    assert {k: v.data_ptr() for k, v in second["model"].items()} == pointers  # the same buffers, refilled
    assert_same(dict(second["model"]), {k: v.cpu() for k, v in state.model.state_dict().items()})
    assert_same(second["optimizer"]["state"], {i: {k: v.cpu() for k, v in s.items()}
                                               for i, s in state.optimizer.state_dict()["state"].items()})


def test_the_background_file_is_the_synchronous_one(tmp_path):
    state = trained_state()
    torch.manual_seed(1)
    ckpt_io.write_checkpoint(tmp_path / "sync", state.checkpoint(5, 1.5, [ckpt_io.rng_state()]), keep=2)
    torch.manual_seed(1)  # the same rng state in both files
    with saver_for(state, tmp_path / "background") as saver:
        saver.save(5, 1.5)
    sync_file, background_file = tmp_path / "sync" / "ckpt.pt", tmp_path / "background" / "ckpt.pt"
    assert background_file.read_bytes() == sync_file.read_bytes()
    assert_same(ckpt_io.load_checkpoint(background_file), ckpt_io.load_checkpoint(sync_file))
    assert (tmp_path / "background" / "ckpt-5.pt").samefile(background_file)
    assert not list((tmp_path / "background").glob(".*"))  # no temporaries left


@pytest.fixture
def slow_writes(monkeypatch):
    """write_checkpoint, SLOW_WRITE_S slower; records (start, end) of each write and the most
    writes ever in flight at once."""
    write, lock, record = ckpt_io.write_checkpoint, threading.Lock(), {"spans": [], "active": 0, "most": 0}

    def slow_write(*args, **kwargs):
        with lock:
            record["active"] += 1
            record["most"] = max(record["most"], record["active"])
        start = time.monotonic()
        time.sleep(SLOW_WRITE_S)
        try:
            return write(*args, **kwargs)
        finally:
            with lock:
                record["active"] -= 1
                record["spans"].append((start, time.monotonic()))

    monkeypatch.setattr(ckpt_io, "write_checkpoint", slow_write)
    return record


def test_save_returns_before_the_write_and_a_second_save_waits_for_the_first(tmp_path, slow_writes):
    lines = []
    with saver_for(trained_state(), tmp_path, lines.append) as saver:
        start = time.monotonic()
        assert saver.save(1, 2.0) == tmp_path / "ckpt.pt"
        assert time.monotonic() - start < SLOW_WRITE_S  # the step waited for the copy only
        assert saver.last_good is None and not (tmp_path / "ckpt.pt").exists()  # never a file still being written
        saver.save(2, 2.0)
        first_end = slow_writes["spans"][0][1]
        assert time.monotonic() >= first_end  # the second save returned after the first write ended
        assert saver.last_good == tmp_path / "ckpt.pt" and ckpt_io.load_checkpoint(saver.last_good)["iter_num"] == 1
    assert slow_writes["most"] == 1 and len(slow_writes["spans"]) == 2
    assert ckpt_io.load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 2  # leaving the block waited
    assert [line.split(" (")[0] for line in lines if line.startswith("saved")] == [f"saved checkpoint to {tmp_path / 'ckpt.pt'}"] * 2
    assert lines[0].startswith("checkpoint: ") and lines[0].endswith("writing in the background")


def test_last_good_takes_in_a_finished_write_without_waiting(tmp_path):
    with saver_for(trained_state(), tmp_path) as saver:
        saver.save(1, 2.0)
        deadline = time.monotonic() + 10
        while saver.last_good is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ckpt_io.load_checkpoint(saver.last_good)["iter_num"] == 1


@pytest.fixture
def failing_writes(monkeypatch, tmp_path):
    error = write_error(tmp_path / "ckpt.pt", OSError(28, "No space left on device"), ckpt_io.OUT_DIR_HINT)

    def failing_write(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt_io, "write_checkpoint", failing_write)
    return error


def test_a_failed_write_is_raised_at_the_next_save(tmp_path, failing_writes):
    saver = saver_for(trained_state(), tmp_path)
    saver.save(1, 2.0)  # the write fails on the worker; the step goes on
    with pytest.raises(WriteError) as raised:
        saver.save(2, 2.0)
    assert raised.value is failing_writes
    saver.__exit__(None, None, None)


def test_a_failed_write_is_raised_when_the_run_ends(tmp_path, failing_writes):
    with pytest.raises(WriteError) as raised:
        with saver_for(trained_state(), tmp_path) as saver:
            saver.save(1, 2.0)
    assert raised.value is failing_writes


def test_an_error_exit_waits_and_keeps_its_own_error(tmp_path, failing_writes):
    lines = []
    with pytest.raises(ValueError, match="the run's own error"):
        with saver_for(trained_state(), tmp_path, lines.append) as saver:
            saver.save(1, 2.0)
            raise ValueError("the run's own error")
    assert lines[-1] == f"the checkpoint being written was lost too: {failing_writes}"


def test_a_nan_while_a_write_is_in_flight_stops_after_the_write_lands(tmp_path, tiny_data, slow_writes, monkeypatch):
    from fastgpt import model as model_module

    forward, calls = model_module.GPT.forward, [0]

    def nan_at_step_5(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training and targets is not None:
            calls[0] += 1
            loss = loss * float("nan") if calls[0] == 5 else loss
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", nan_at_step_5)
    with pytest.raises(NonFiniteLossError, match="at iteration 5"):
        train(tiny_config(tmp_path, tiny_data[0], max_iters=8, eval_interval=4, log_interval=1))
    assert ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 4  # the error exit waited for it


def test_a_stop_signal_saves_and_the_run_waits_for_that_write(tmp_path, tiny_data, slow_writes, monkeypatch):
    from fastgpt import train as train_module

    step_and_clip, steps = train_module.clip_and_step, [0]

    def sigterm_at_step_3(*args, **kwargs):
        steps[0] += 1
        if steps[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler sends it; the handler only sets a flag
        return step_and_clip(*args, **kwargs)

    monkeypatch.setattr(train_module, "clip_and_step", sigterm_at_step_3)
    result = train(tiny_config(tmp_path, tiny_data[0], max_iters=1000, eval_interval=1000))
    assert 3 <= result.iter_num < 1000
    assert ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == result.iter_num
    assert len(slow_writes["spans"]) == 1


def test_the_run_ends_after_its_last_write_and_resumes_exactly(tmp_path, tiny_data, slow_writes):
    """Writes slowed so that training runs on during each; the checkpoint at the end is complete,
    and a resume from the one at 10 logs what the uninterrupted run logged."""
    data_root, _ = tiny_data
    common = dict(max_iters=20, lr_decay_iters=20, eval_interval=10, log_interval=1, dropout=0.1)
    whole = train(tiny_config(tmp_path / "whole", data_root, **common))
    assert ckpt_io.load_checkpoint(tmp_path / "whole" / "out" / "ckpt.pt")["iter_num"] == 20
    assert not [t for t in threading.enumerate() if t.name.startswith("checkpoint-writer")]
    first = train(tiny_config(tmp_path / "parts", data_root, **{**common, "max_iters": 10}))
    assert first.iter_num == 10
    second = train(tiny_config(tmp_path / "parts", data_root, init_from="resume", **common))
    losses_whole, losses_resumed = dict(whole.history["train"]), dict(second.history["train"])
    assert sorted(losses_resumed) == list(range(11, 21))
    for it in range(11, 21):
        assert losses_resumed[it] == pytest.approx(losses_whole[it], rel=1e-6, abs=1e-7), it
    assert slow_writes["most"] == 1
