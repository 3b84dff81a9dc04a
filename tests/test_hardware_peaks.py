"""fastgpt.hardware's peaks and peak memory: the datasheet figure of each GPU class, found from the
names torch.cuda.get_device_name() really gives, and the CUDA branches through a stand-in
torch.cuda (tests/test_cuda.py reads them on a real GPU). The throughput meter and the metrics
log are tests/test_metrics.py's."""

import pytest
import torch

from fastgpt.hardware import GPU_PEAK_FLOPS, describe_peak, gpu_class, gpu_peak_flops, peak_flops, peak_memory

# torch.cuda.get_device_name() on each GPU, as the machines report it.
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA L40S": "L40S",
    "NVIDIA L40": "L40",
    "NVIDIA L4": "L4",
    "NVIDIA A10G": "A10G",
    "NVIDIA A10": "A10",
    "Tesla V100-SXM2-16GB": "V100",
    "Tesla T4": "T4",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA RTX A6000": None,
    "NVIDIA H800": None,
}
# Dense bf16 and TF32 datasheet figures, TFLOP/s, of the classes whose rows were once wrong.
DATASHEET_TFLOPS = {
    "H200": (989, 494), "GH200": (989, 494), "H100 SXM": (989, 494), "H100 NVL": (835, 418), "H200 NVL": (835, 418),
    "H100 PCIe": (756, 378), "L40": (181, 90.5), "L4": (121, 60), "L40S": (362, 183),
}


@pytest.mark.parametrize("name, expected", DEVICE_NAMES.items())
def test_each_device_name_reads_as_its_class(name, expected):
    assert gpu_class(name) == expected


def test_every_class_is_named_by_some_device():
    assert set(GPU_PEAK_FLOPS) - set(DEVICE_NAMES.values()) == {"RTX 3090"}  # no such machine to copy a name from
    assert gpu_class("NVIDIA GeForce RTX 3090") == "RTX 3090"


@pytest.mark.parametrize("name, tflops", DATASHEET_TFLOPS.items())
def test_datasheet_peaks(name, tflops):
    device_name = next(n for n, c in DEVICE_NAMES.items() if c == name)
    half, fp32 = tflops
    for dtype in (torch.bfloat16, torch.float16):
        assert gpu_peak_flops(device_name, dtype) == pytest.approx(half * 1e12)
    assert gpu_peak_flops(device_name, torch.float32) == pytest.approx(fp32 * 1e12)


def test_an_unknown_gpu_has_no_peak_and_no_mfu():
    assert gpu_peak_flops("NVIDIA RTX A6000", torch.bfloat16) is None
    assert describe_peak(torch.device("cuda", 0), torch.bfloat16, None).endswith("MFU not reported")


def test_a_gpus_peak_is_its_datasheets(monkeypatch):
    names = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names.append(device) or "NVIDIA H100 PCIe")
    device = torch.device("cuda", 1)
    peak = peak_flops(device, torch.bfloat16)
    assert peak == pytest.approx(756e12) and names == [device]
    assert describe_peak(device, torch.bfloat16, peak) == "MFU against 756 TFLOP/s bfloat16 peak (datasheet)"


def test_peak_memory_on_a_gpu_is_the_allocators_peak_of_that_gpu(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 123)
    assert peak_memory(torch.device("cuda", 1)) == (123, "torch.cuda.max_memory_allocated")
    assert asked == [torch.device("cuda", 1)]
