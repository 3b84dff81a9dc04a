"""The branches only CUDA takes, run on a GPU: the prefetcher's pinned ring on an index-less
'cuda', a whole fp16 run with its loss scaler and a resume, the profiler's CUDA side, CUDA
generator states from a machine with more GPUs, and, in a one-rank NCCL group, DDP's device, the
stop vote and the loss watch (neither may wait for the GPU). The decisions behind them have CPU
tests beside their modules; this file is skipped without CUDA (scripts/gpu_check.sh runs it).
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastgpt import checkpoint as ckpt_io
from fastgpt import distributed
from fastgpt.data import BatchStream, Prefetcher
from fastgpt.hardware import GPU_PEAK_FLOPS, gpu_class, peak_flops, peak_memory
from fastgpt.hardware import grad_scaler, resolve_device
from fastgpt.stopping import LossWatch, NonFiniteLossError, StopVote
from fastgpt.train import train

from conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Spin cycles of torch.cuda._sleep that keep a GPU busy for ~0.5 s at 2 GHz: far longer than a
# host-side call takes, so a call that returns while the GPU still spins did not wait for it.
BUSY_CYCLES = 10**9


@pytest.fixture(autouse=True)
def _keep_tf32_flags():
    """train() turns TF32 on; kernel tests run after this file in the same process compare fp32
    matmuls against torch and must not inherit it."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [flag.allow_tf32 for flag in flags]
    yield
    for flag, value in zip(flags, before):
        flag.allow_tf32 = value


def current_gpu() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def test_the_run_device_names_its_gpu():
    assert resolve_device("cuda") == resolve_device("auto") == current_gpu()


def test_pinned_ring_hands_out_every_batch_intact_on_an_index_less_gpu():
    """More batches than ring slots, all kept on the GPU: a host buffer refilled before its copy
    had finished, or a batch read before its copy, would differ from the CPU stream's."""
    tokens = (np.arange(300_000) % 50_257).astype(np.uint16)
    batch, block, depth = 32, 512, 1  # ring of depth + 2 = 3 slots
    p = Prefetcher(BatchStream(tokens, batch, block, 0, "train"), "cuda", depth=depth)
    reference = BatchStream(tokens, batch, block, 0, "train")
    try:
        assert p.device == current_gpu()
        drawn = [next(p) for _ in range(4 * (depth + 2))]
    finally:
        p.close()
    for x, y in drawn:
        xy = torch.from_numpy(next(reference).astype(np.int64))
        assert x.device == p.device and x.dtype == torch.int64
        assert torch.equal(x.cpu(), xy[:, :-1]) and torch.equal(y.cpu(), xy[:, 1:])


def test_fp16_run_on_an_index_less_gpu_scales_its_loss_evaluates_and_resumes(tmp_path, tiny_data, capsys):
    """The first GPU run crashed at its first evaluation here (the prefetcher's worker was given
    'cuda' without an index). Then the fp16 path: autocast, the GradScaler (also saved and
    restored), fused AdamW, the CUDA generator states in the checkpoint."""
    data_root, _ = tiny_data
    assert grad_scaler(current_gpu(), torch.float16).is_enabled()
    common = dict(device="cuda", dtype="float16", kernels="torch", compile=False, eval_interval=2, log_interval=1)
    first = train(tiny_config(tmp_path, data_root, max_iters=4, **common))
    assert f"device {current_gpu()}, autocast float16" in capsys.readouterr().out
    (_, _, val_before), *_, (_, _, val_after) = first.history["eval"]
    assert val_after < val_before  # the scaled fp16 steps trained
    checkpoint = ckpt_io.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert checkpoint["scaler"]["scale"] > 0 and len(checkpoint["rng"][0]["cuda"]) == torch.cuda.device_count()
    resumed = train(tiny_config(tmp_path, data_root, max_iters=6, init_from="resume", **common))
    assert resumed.iter_num == 6 and np.isfinite(resumed.losses["val"])


def test_profile_on_a_gpu_writes_the_memory_snapshot_and_kernel_times(tmp_path, tiny_data, capsys):
    data_root, _ = tiny_data
    cfg = tiny_config(tmp_path, data_root, device="cuda", kernels="torch", profile=True, profile_wait=0,
                      profile_warmup=1, profile_active=1)
    train(cfg)
    printed = capsys.readouterr().out
    assert "each region ending in a CUDA sync" in printed and "top operators by self CUDA time:" in printed
    assert "torch.cuda.max_memory_allocated" in printed
    assert (tmp_path / "out" / "profile" / "memory_rank0.pickle").stat().st_size > 0
    assert (tmp_path / "out" / "profile" / "trace_rank0.json.gz").exists()


def test_cuda_generator_states_saved_on_eight_gpus_restore_on_the_gpus_here():
    saved = []
    for seed in range(8):
        torch.cuda.manual_seed(seed)
        saved.append(torch.cuda.get_rng_state())
    ckpt_io.set_rng_state({"torch": torch.get_rng_state(), "cuda": saved})
    for i in range(torch.cuda.device_count()):
        assert torch.equal(torch.cuda.get_rng_state(i), saved[i])


def test_peak_memory_and_peak_flops_of_this_gpu():
    device = current_gpu()
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(2**20, dtype=torch.float32, device=device)
    assert peak_memory(device)[0] >= block.numel() * 4
    name = torch.cuda.get_device_name(device)
    if gpu_class(name) is None:
        pytest.skip(f"{name!r} is not in GPU_PEAK_FLOPS: add its class to report MFU on it")
    assert peak_flops(device, torch.bfloat16) == GPU_PEAK_FLOPS[gpu_class(name)][1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="class")
def group():
    """distributed.setup as torchrun's environment describes one rank, so it joins an NCCL group
    bound to its GPU; the group is left after the last test of the class using it."""
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        info, device = distributed.setup(torch.device("cuda"), "nccl", timeout_s=60)
        try:
            yield info, device
        finally:
            distributed.teardown()


class TestOneRankNcclGroup:
    """What a rank of a torchrun job does on its GPU, in a group of one. The tests that time a
    call run it once first: CUDA loads a kernel's module at its first launch, and loading may
    wait for the GPU."""

    def test_the_rank_joins_nccl_on_its_gpu(self, group):
        info, device = group
        assert device == torch.device("cuda", 0) == current_gpu()
        assert dist.get_backend() == "nccl" and info.enabled
        distributed.barrier(info)
        assert distributed.mean_over_ranks(3.0, info, device) == 3.0
        assert distributed.gather_objects({"rank": info.rank}, info) == [{"rank": 0}]  # the saver's RNG gather

    def test_ddp_holds_the_ranks_gpu_and_no_sync_defers_the_reduction(self, group):
        info, device = group
        torch.manual_seed(0)
        plain = torch.nn.Linear(8, 4).to(device)
        wrapped = distributed.wrap(torch.nn.Linear(8, 4).to(device), info, device)
        wrapped.module.load_state_dict(plain.state_dict())
        assert wrapped.device_ids == [device.index]
        x = torch.randn(3, 2, 8, device=device)
        with wrapped.no_sync():
            wrapped(x[0]).sum().backward()
        wrapped(x[1]).sum().backward()
        for i in range(2):
            plain(x[i]).sum().backward()
        for a, b in zip(wrapped.module.parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad)

    def test_stop_vote_answers_one_call_after_the_signal(self, group):
        info, device = group
        stop = SimpleNamespace(received=None)
        vote = StopVote(stop, info.enabled, device)
        assert [vote() for _ in range(3)] == [False, False, False]
        stop.received = "SIGTERM"
        assert vote() is False  # this call starts the vote that carries the flag
        assert vote() is True
        vote.close()

    def test_stop_vote_does_not_wait_for_the_gpu(self, group):
        info, device = group
        vote = StopVote(SimpleNamespace(received=None), info.enabled, device)
        vote()
        torch.cuda.synchronize()
        torch.cuda._sleep(BUSY_CYCLES)  # a training step still running
        vote()
        assert not torch.cuda.current_stream().query(), "the vote waited for the GPU"
        vote.close()

    def test_loss_watch_names_the_first_bad_iteration_without_waiting_for_the_gpu(self, group):
        info, device = group
        watch = LossWatch(device)
        losses = [torch.tensor(v, device=device) for v in (2.0, float("nan"), float("inf"), 1.0)]
        watch.update(losses[0], 1)
        torch.cuda.synchronize()
        torch.cuda._sleep(BUSY_CYCLES)
        watch.update(losses[0], 1)
        assert not torch.cuda.current_stream().query(), "update waited for the GPU"
        watch.check(info.enabled, None)  # finite so far: no error
        for iter_num, loss in enumerate(losses[1:], start=2):
            watch.update(loss, iter_num)
        with pytest.raises(NonFiniteLossError, match="at iteration 2;"):
            watch.check(info.enabled, None)
