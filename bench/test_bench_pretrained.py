"""Loading GPT-2 124M's weights from a Hugging Face folder: fastgpt's init_from='gpt2' path against
transformers' GPT2LMHeadModel.from_pretrained, in the same run.

    pytest bench/test_bench_pretrained.py --benchmark-only

Providers:
  fastgpt       fastgpt.pretrained.load_gpt2 from model.safetensors: read, transpose the Conv1D
                weights, pad the vocabulary, build the GPT and load it
  fastgpt_bin   the same from pytorch_model.bin (torch.load with weights_only=True)
  transformers  GPT2LMHeadModel.from_pretrained on the same folder (skipped without transformers)

The weights are random, in GPT-2 124M's shapes (12 layers, 768 wide, 50257 tokens, 1024
positions, biases), written by fastgpt's own exporter; the files sit in the page cache after the
first round, so a round is parsing and building, not the disk. The size is the same on every
device: the issue this answers asks for 124M on a CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fastgpt.model import GPT, GPTConfig
from fastgpt.pretrained import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, hf_config, load_gpt2, to_hf_state

GPT2_VOCAB = 50257
ROUNDS, WARMUP_ROUNDS = 5, 1


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, bias=True, gelu="tanh"))
    state, config = to_hf_state(model, GPT2_VOCAB), hf_config(model, GPT2_VOCAB)
    folders = {}
    for layout in ("safetensors", "bin"):
        folder = tmp_path_factory.mktemp(layout)
        (folder / CONFIG_NAME).write_text(json.dumps(config))
        if layout == "safetensors":
            save_file(state, str(folder / SAFETENSORS_NAME))
        else:
            torch.save(state, folder / BIN_NAME)
        folders[layout] = folder
    return folders


@pytest.mark.benchmark(group="load_gpt2")
@pytest.mark.parametrize("provider", ["fastgpt", "fastgpt_bin", "transformers"])
def test_load_gpt2(benchmark, provider, hf_folders):
    if provider == "transformers":
        transformers = pytest.importorskip("transformers")
        transformers.utils.logging.disable_progress_bar()
        load = lambda: transformers.GPT2LMHeadModel.from_pretrained(hf_folders["safetensors"])  # noqa: E731
    else:
        folder = hf_folders["bin" if provider == "fastgpt_bin" else "safetensors"]
        load = lambda: load_gpt2("gpt2", str(folder))  # noqa: E731
    benchmark.pedantic(load, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info.update(suite="load_gpt2", shape_name="GPT-2 124M, fp32", dtype="float32",
                                seconds=round(benchmark.stats.stats.median, 3))
