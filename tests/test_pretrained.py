"""GPT-2 in the Hugging Face layout, both ways: transformers' files load into fastgpt with the same
logits, and a fastgpt run exports to a folder transformers loads with the same logits."""

import hashlib
import json
import pathlib
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # its bars would land in the stderr the tests read

from fastgpt import export, pretrained, sample
from fastgpt.model import GPT, GPTConfig
from fastgpt.pretrained import PretrainedError, load_gpt2
from fastgpt.train import main as train_main
from fastgpt.train import train

from conftest import cli_args, tiny_config

GPT2_VOCAB = 50257
TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=GPT2_VOCAB)


def hf_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # transformers zeroes biases and LayerNorm shifts at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_bin(model, folder: pathlib.Path, prefix: bool = True) -> pathlib.Path:
    """The pre-safetensors layout: a pickled state dict; without `prefix`, as GPT2Model's hub files
    (gpt2 itself) have it, with the attention-mask buffers old files carry."""
    folder.mkdir(parents=True)
    model.config.to_json_file(folder / "config.json")
    state = model.state_dict()
    if not prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def fastgpt_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model(idx, idx)  # with targets: every position's logits
    return logits


@pytest.fixture
def ids():
    return torch.randint(0, GPT2_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["safetensors", "bin", "bin-unprefixed"])
def test_transformers_gpt2_loads_with_the_same_logits(tmp_path, ids, layout):
    hf = hf_model()
    folder = tmp_path / "hf"
    if layout == "safetensors":
        hf.save_pretrained(folder)
    else:
        save_bin(hf, folder, prefix=layout == "bin")
    model, vocab = load_gpt2("gpt2", str(folder))
    assert vocab == GPT2_VOCAB and model.config.vocab_size == 50304 and model.config.gelu == "tanh"
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size, model.config.bias) == (2, 32, 64, True)
    with torch.no_grad():
        ours, theirs = fastgpt_logits(model.eval(), ids), hf(ids).logits
    torch.testing.assert_close(ours[..., :GPT2_VOCAB], theirs, rtol=1e-5, atol=1e-5)
    assert torch.all(ours[..., GPT2_VOCAB:] == 0)  # padding rows: zero, and masked when sampling


def test_a_shorter_context_crops_the_position_table(tmp_path, ids):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_gpt2("gpt2", str(tmp_path / "hf"), block_size=16, dropout=0.1)
    assert model.config.block_size == 16 and model.transformer.wpe.weight.shape == (16, 32) and model.config.dropout == 0.1
    with torch.no_grad():
        torch.testing.assert_close(fastgpt_logits(model.eval(), ids[:, :16])[..., :GPT2_VOCAB], hf(ids[:, :16]).logits,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(PretrainedError, match=r"block_size=128 exceeds gpt2's context of 64"):
        load_gpt2("gpt2", str(tmp_path / "hf"), block_size=128)


def test_the_local_hub_cache_is_found_and_nothing_is_downloaded(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2-medium" / "snapshots" / "abc123"
    hf_model().save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert pretrained.find_model_dir("gpt2-medium", None) == snapshot
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(PretrainedError) as e:
        pretrained.find_model_dir("gpt2-medium", None)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "nowhere" / "hub" / "models--gpt2-medium") in message
    assert "huggingface-cli download openai-community/gpt2-medium config.json model.safetensors" in message


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.path), "pwned"))


def bad_folder(tmp_path, kind: str) -> pathlib.Path:
    folder = tmp_path / "hf"
    hf_model().save_pretrained(folder)
    if kind == "no-weights":
        (folder / "model.safetensors").unlink()
    elif kind == "another-architecture":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif kind == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "pickle-runs-code":
        (folder / "model.safetensors").unlink()
        torch.save({"w": WritesAFile(tmp_path / "pwned")}, folder / "pytorch_model.bin")
    return folder


BAD = {
    "no-weights": "holds no weights: expected model.safetensors or pytorch_model.bin",
    "another-architecture": "describes model_type='llama', not 'gpt2'",
    "truncated": "cannot read .*model.safetensors: .*; it may be truncated, fetch it again",
    "pickle-runs-code": "refusing to load .*pytorch_model.bin: it holds objects other than tensors",
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_weights_are_one_line_and_change_nothing(tmp_path, tiny_data, capsys, kind):
    folder = bad_folder(tmp_path, kind)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    data_root, _ = tiny_data
    code = train_main(cli_args(tiny_config(tmp_path, data_root))
                      + ["--init_from=gpt2", f"--hf_dir={str(folder)!r}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(BAD[kind], err), err
    assert not (tmp_path / "pwned").exists()  # nothing in the file ran
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: h for p, h in after.items() if p in before} == before


def write_bpe_dataset(folder: pathlib.Path, n_tokens: int = 4000) -> None:
    """GPT-2 BPE ids in nanoGPT's layout (no vocabulary file: GPT-2's)."""
    folder.mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, GPT2_VOCAB, n_tokens).astype(np.uint16)
    ids[: n_tokens * 9 // 10].tofile(folder / "train.bin")
    ids[n_tokens * 9 // 10 :].tofile(folder / "val.bin")


def test_finetune_from_gpt2_then_export_round_trips_through_transformers(tmp_path, ids, capsys):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    write_bpe_dataset(tmp_path / "data" / "bpe")
    cfg = tiny_config(tmp_path, tmp_path / "data", dataset="bpe", init_from="gpt2", hf_dir=str(tmp_path / "hf"),
                      n_layer=6, n_embd=48, block_size=32, max_iters=3, eval_interval=3, learning_rate=1e-3)
    result = train(cfg)
    out = capsys.readouterr().out
    assert "took the model's shape from gpt2: n_layer=2 (config: 6), n_embd=32 (config: 48)" in out
    assert result.model.config.block_size == 32

    folder = export.export_hf(tmp_path / "out", tmp_path / "exported")
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}
    back = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    model = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids[:, :32]).logits, fastgpt_logits(model, ids[:, :32])[..., :GPT2_VOCAB],
                                   rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's own ids


@pytest.mark.parametrize("bias", [False, True])
def test_a_character_level_run_exports_with_its_vocabulary(tmp_path, tiny_data, bias):
    data_root, _ = tiny_data
    result = train(tiny_config(tmp_path, data_root, max_iters=4, eval_interval=4, bias=bias))
    folder = export.export_hf(tmp_path / "out", tmp_path / "exported")
    vocab = json.loads((folder / export.CHAR_VOCAB_NAME).read_text())
    assert vocab["vocab_size"] == 32 and vocab["itos"][:3] == ["a", "b", "c"]
    back = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert back.config.activation_function == "gelu" and back.config.vocab_size == 32
    idx = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, fastgpt_logits(result.model.eval(), idx)[..., :32],
                                   rtol=1e-5, atol=1e-5)


def test_relu2_and_an_untied_head_export_with_the_same_logits(tmp_path, tiny_data):
    """transformers' GPT-2 computes ReLU² ('relu2') and honours tie_word_embeddings=False."""
    data_root, _ = tiny_data
    result = train(tiny_config(tmp_path, data_root, max_iters=4, eval_interval=4, activation="relu2",
                               tie_embeddings=False))
    folder = export.export_hf(tmp_path / "out", tmp_path / "exported")
    back = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert back.config.activation_function == "relu2" and back.config.tie_word_embeddings is False
    assert back.lm_head.weight.data_ptr() != back.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, fastgpt_logits(result.model.eval(), idx)[..., :32],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switch", [{"rope": True}, {"qk_norm": True}, {"logit_softcap": 30.0}])
def test_export_refuses_what_gpt2_cannot_compute_in_one_line(tmp_path, tiny_data, capsys, switch):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=2, eval_interval=2, **switch))
    assert export.main([str(tmp_path / "out"), "--hf", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err.strip()
    (name, value), = switch.items()
    assert len(err.splitlines()) == 1 and f"the model uses {name}={value!r}, which Hugging Face's GPT-2" in err, err
    assert not (tmp_path / "exported").exists()


def test_gpt2_weights_decide_the_switches_and_the_log_says_so(tmp_path, capsys):
    hf_model().save_pretrained(tmp_path / "hf")
    write_bpe_dataset(tmp_path / "data" / "bpe")
    switches = dict(activation="relu2", rope=True, qk_norm=True, tie_embeddings=False, logit_softcap=30.0)
    result = train(tiny_config(tmp_path, tmp_path / "data", dataset="bpe", init_from="gpt2", hf_dir=str(tmp_path / "hf"),
                               max_iters=1, eval_interval=1, **switches))
    out = capsys.readouterr().out
    assert ("activation='gelu' (config: 'relu2'), rope=False (config: True), qk_norm=False (config: True), "
            "tie_embeddings=True (config: False), logit_softcap=0.0 (config: 30.0)") in out
    model = result.model
    assert model.lm_head.weight is model.transformer.wte.weight and "wpe" in model.transformer
    assert all(getattr(model.config, k) == getattr(GPTConfig, k) for k in switches)


def test_export_never_overwrites_and_says_so(tmp_path, tiny_data, capsys):
    data_root, _ = tiny_data
    train(tiny_config(tmp_path, data_root, max_iters=2, eval_interval=2))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert export.main([str(tmp_path / "out"), "--hf", str(tmp_path / "taken")]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep" and len(list((tmp_path / "taken").iterdir())) == 1
    assert export.main([str(tmp_path / "nothing"), "--hf", str(tmp_path / "new")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_sample_from_gpt2_weights(tmp_path, capsys):
    hf_model().save_pretrained(tmp_path / "hf")
    code = sample.main(["--init_from=gpt2", f"--hf_dir={tmp_path / 'hf'}", "--start=Hello", "--num_samples=1",
                        "--max_new_tokens=5", "--device=cpu"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("Hello")


def test_gelu_tanh_stays_out_of_nanogpts_model_args():
    assert "gelu" not in GPTConfig().to_model_args()  # nanoGPT's GPTConfig(**model_args) knows no such key
    assert GPTConfig(gelu="tanh").to_model_args()["gelu"] == "tanh"
    with pytest.raises(ValueError, match="gelu='fast' is not allowed"):
        GPTConfig(gelu="fast")


NANOGPT_CONFIGS = {
    # nanoGPT's config/eval_gpt2.py and config/finetune_shakespeare.py, as they are
    "eval_gpt2.py": "batch_size = 8\neval_iters = 500 # use more iterations to get good estimate\neval_only = True\n"
                    "wandb_log = False\ninit_from = 'gpt2'\n",
    "finetune_shakespeare.py": "import time\n\nout_dir = 'out-shakespeare'\neval_interval = 5\neval_iters = 40\n"
                               "wandb_log = False # feel free to turn on\nwandb_project = 'shakespeare'\n"
                               "wandb_run_name = 'ft-' + str(time.time())\n\ndataset = 'shakespeare'\n"
                               "init_from = 'gpt2-xl' # this is the largest GPT-2 model\n\n"
                               "always_save_checkpoint = False\n\nbatch_size = 1\ngradient_accumulation_steps = 32\n"
                               "max_iters = 20\n\nlearning_rate = 3e-5\ndecay_lr = False\n",
}


@pytest.mark.parametrize("name", NANOGPT_CONFIGS)
def test_nanogpts_gpt2_configs_run_as_they_are(tmp_path, monkeypatch, name):
    snapshot = tmp_path / "hub" / "models--gpt2-xl" / "snapshots" / "x"  # the cache layout huggingface_hub writes
    hf_model(n_positions=1024).save_pretrained(snapshot)
    (tmp_path / "hub" / "models--gpt2").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "snapshots").symlink_to(snapshot.parent)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for dataset in ("openwebtext", "shakespeare"):
        write_bpe_dataset(tmp_path / "data" / dataset, n_tokens=20_000)
    (tmp_path / name).write_text(NANOGPT_CONFIGS[name])
    monkeypatch.chdir(tmp_path)  # nanoGPT's data/ and out_dir are relative to where it runs
    # Only what a CPU needs to finish in seconds is overridden; the shape comes from the weights.
    code = train_main([name, "--device=cpu", "--dtype=float32", "--compile=False", "--eval_iters=2", "--max_iters=1",
                       "--gradient_accumulation_steps=2", "--batch_size=1"])
    assert code == 0
