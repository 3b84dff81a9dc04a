"""`--profile` on a tiny model: the traces parse and name the model's operators and the loop's
regions, the summary gives each region's share, and no checkpoint is written or moved."""

import gzip
import json
import re
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from fastgpt.config import ConfigError, load_config
from fastgpt.profiling import REGIONS, summarize
from fastgpt.train import main, parse_args, train

from conftest import tiny_config

SHORT = ["--dataset=tiny", "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=4", "--block_size=16",
         "--warmup_iters=2", "--lr_decay_iters=20", "--max_iters=20", "--eval_iters=2", "--device=cpu", "--compile=False"]


def trace_names(path):
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    return {e.get("name") for e in trace["traceEvents"]}


def test_profile_flag_writes_traces_and_a_summary(tmp_path, tiny_data, capsys):
    data_root, _ = tiny_data
    out = tmp_path / "out"
    code = main([*SHORT, f"--data_root={data_root}", f"--out_dir={out}", "--profile", "--profile_active=2"])
    printed = capsys.readouterr().out
    assert code == 0
    chrome = out / "profile" / "trace_rank0.json.gz"
    names = trace_names(chrome)
    assert {"aten::mm", "aten::scaled_dot_product_attention"} <= names
    assert set(REGIONS) <= names
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and "ProfilerStep#4" not in names  # wait 1, warm-up 1, active 2
    tensorboard = list((out / "profile" / "tensorboard").glob("rank0.*.pt.trace.json.gz"))
    assert len(tensorboard) == 1 and set(REGIONS) <= trace_names(tensorboard[0])
    shares = {}
    for name in (*REGIONS, "other"):
        m = re.search(rf"^  {name}\s+([\d.]+)\s+([\d.]+)%", printed, re.M)
        assert m, f"no share for {name} in:\n{printed}"
        shares[name] = float(m.group(2))
    assert sum(shares.values()) == pytest.approx(100, abs=0.6)
    assert shares["forward"] > 0 and shares["backward"] > 0
    assert "top operators by self CPU time:" in printed and re.search(r"^  aten::\w+\s+[\d.]+\s+[\d.]+%", printed, re.M)
    assert re.search(r"^peak memory [\d,.]+ MiB \(peak RSS of the process\)$", printed, re.M)
    assert f"wrote {chrome} (" in printed and f"wrote {tensorboard[0]} (" in printed
    assert not (out / "ckpt.pt").exists() and not (out / "metrics.jsonl").exists()


def test_profile_keeps_an_existing_checkpoint_in_place(tmp_path, tiny_data):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=5, eval_interval=5))
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    log_before = (tmp_path / "out" / "metrics.jsonl").read_bytes()
    result = train(tiny_config(tmp_path, data_root, profile=True, profile_wait=0, profile_warmup=1, profile_active=1))
    assert result.iter_num == 2  # the schedule's steps, then out; no evaluation
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    assert not list((tmp_path / "out").glob("ckpt.*.pt"))  # not set aside either
    assert (tmp_path / "out" / "metrics.jsonl").read_bytes() == log_before
    assert (tmp_path / "out" / "profile" / "trace_rank0.json.gz").exists()


def test_profile_needs_enough_steps(tmp_path, tiny_data):
    data_root, _ = tiny_data
    with pytest.raises(ConfigError, match=r"profile needs 5 training steps .* only 4 remain before max_iters=4"):
        train(tiny_config(tmp_path, data_root, max_iters=4, profile=True))


def test_bare_profile_flag_and_its_fields():
    path, overrides = parse_args(["cfg.py", "--profile", "--profile_active=4"])
    assert path == "cfg.py" and overrides == ["--profile=True", "--profile_active=4"]
    cfg = load_config(None, overrides)
    assert cfg.profile and (cfg.profile_wait, cfg.profile_warmup, cfg.profile_active) == (1, 1, 4)


@pytest.mark.parametrize("override, message", [
    ("--profile_active=0", "profile_active=0 must be a positive integer"),
    ("--profile_wait=-1", "profile_wait=-1 must be >= 0"),
    ("--profile_warmup=-2", "profile_warmup=-2 must be >= 0"),
    ("--eval_only=True", "profile=True profiles training steps; it cannot go with eval_only=True"),
])
def test_bad_profile_settings_are_one_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["--profile=True", override])


def test_bad_profile_settings_exit_2(tmp_path, capsys):
    assert main([f"--out_dir={tmp_path}", "--profile", "--profile_active=0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: profile_active=0 must be a positive integer\n"


def event(key, device=DeviceType.CPU, total=0.0, self_cpu=0.0, self_device=0.0, count=1, annotation=False):
    """The fields of a prof.key_averages() row that summarize reads."""
    return SimpleNamespace(key=key, device_type=device, cpu_time_total=total, self_cpu_time_total=self_cpu,
                           self_device_time_total=self_device, count=count, is_user_annotation=annotation)


def test_cuda_summary_keeps_host_regions_and_device_kernels_apart():
    """On CUDA, key_averages has a device-side row for each region (same name, no host time) and one
    per kernel; the shares come from the host rows, the CUDA table from the kernels alone."""
    rows = [
        event("ProfilerStep*", total=20_000, count=2, annotation=True),
        event("forward", total=6_000, count=2, annotation=True),
        event("backward", total=10_000, count=2, annotation=True),
        event("data", total=1_000, count=2, annotation=True),
        event("optimizer", total=2_000, count=2, annotation=True),
        event("forward", device=DeviceType.CUDA, self_device=5_500, count=2, annotation=True),  # the GPU-side range
        event("aten::mm", total=3_000, self_cpu=3_000, count=40),
        event("sm90_xmma_gemm_bf16", device=DeviceType.CUDA, self_device=9_000, count=40),
        event("triton_layernorm_fwd", device=DeviceType.CUDA, self_device=1_000, count=10),
    ]
    text = summarize(rows, steps=2, cuda=True)
    assert re.search(r"^  forward\s+3\.00\s+30\.0%$", text, re.M)
    assert re.search(r"^  backward\s+5\.00\s+50\.0%$", text, re.M)
    assert re.search(r"^  other\s+0\.50\s+5\.0%$", text, re.M)
    cuda_table = text.split("top operators by self CUDA time:")[1]
    assert re.search(r"sm90_xmma_gemm_bf16\s+4\.500\s+90\.0%\s+20\.0$", cuda_table, re.M)
    assert "forward" not in cuda_table and "aten::mm" not in cuda_table
    assert "forward" not in text.split("top operators by self CPU time:")[1].split("top operators")[0]
