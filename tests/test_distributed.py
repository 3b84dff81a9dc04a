"""fastgpt.distributed's device choices, on any machine: which GPU a process and each rank use,
what binds the process group and DDP to it. tests/test_cuda.py runs the same choices on a GPU."""

import pytest
import torch

from fastgpt.distributed import ddp_device_ids, indexed_device, rank_placement


def no_current_device() -> int:
    raise AssertionError("asked for the current CUDA device where the device already says which")


@pytest.mark.parametrize("current", [0, 3])
def test_an_index_less_gpu_becomes_the_current_one(current):
    assert indexed_device("cuda", lambda: current) == torch.device("cuda", current)
    assert indexed_device(torch.device("cuda"), lambda: current) == torch.device("cuda", current)


@pytest.mark.parametrize("device", ["cpu", "cuda:1", "cuda:0", "mps", torch.device("cpu")])
def test_a_named_gpu_or_another_device_stays_as_it_is(device):
    assert indexed_device(device, no_current_device) == torch.device(device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:5"])
@pytest.mark.parametrize("local_rank", [0, 3])
def test_each_rank_takes_its_local_gpu_and_nccl_binds_to_it(device, local_rank):
    rank_device, backend, device_id = rank_placement(torch.device(device), "nccl", local_rank)
    assert rank_device == device_id == torch.device("cuda", local_rank)
    assert backend == "nccl"


def test_gloo_on_gpus_is_not_bound_to_a_device():
    rank_device, backend, device_id = rank_placement(torch.device("cuda"), "gloo", 2)
    assert (rank_device, backend, device_id) == (torch.device("cuda", 2), "gloo", None)


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_cpu_ranks_use_gloo_unbound(backend):
    assert rank_placement(torch.device("cpu"), backend, 1) == (torch.device("cpu"), "gloo", None)


def test_ddp_holds_the_ranks_gpu_or_none_on_a_cpu():
    assert ddp_device_ids(torch.device("cuda", 3)) == [3]
    assert ddp_device_ids(torch.device("cpu")) is None
