"""Checkpoint files: atomic writes, nanoGPT's layout, refusal of mismatched or corrupt files."""

import pytest
import torch

from fastgpt import checkpoint as ckpt_io
from fastgpt.checkpoint import CheckpointError
from fastgpt.distributed import DistInfo
from fastgpt.model import GPT, GPTConfig
from fastgpt.optim import param_groups
from fastgpt.sample import build_parser, sample
from fastgpt.train import train

from conftest import tiny_config


def small_gpt() -> GPT:
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ckpt_io.save_checkpoint(path, {"model": {"w": torch.ones(2)}})

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    monkeypatch.undo()
    assert torch.equal(ckpt_io.load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*ckpt.pt"):
        ckpt_io.load_checkpoint(path)


def nanogpt_checkpoint(model: GPT, config: dict) -> dict:
    """What nanoGPT's train.py saves: the compiled module's keys, its config globals."""
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    return {
        "model": state,
        # nanoGPT's groups: matrices and embeddings decayed, then the rest.
        "optimizer": torch.optim.AdamW(param_groups(model, 0.1)).state_dict(),
        "model_args": model.config.to_model_args(),
        "iter_num": 0,
        "best_val_loss": 9.9,
        "config": config,
    }


def test_nanogpt_checkpoint_samples_and_resumes(tmp_path, tiny_data):
    data_root, name = tiny_data
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=False))
    out = tmp_path / "out"
    out.mkdir()
    # nanoGPT's config dict has no data_root: its data live in data/<dataset>.
    torch.save(nanogpt_checkpoint(model, {"dataset": name, "n_layer": 2}), out / "ckpt.pt")

    args = build_parser().parse_args(["--out_dir", str(out), "--data_dir", str(data_root / name),
                                      "--start", "abc", "--num_samples", "1", "--max_new_tokens", "5", "--device", "cpu"])
    (text,) = sample(args)
    assert text.startswith("abc") and len(text) >= 8

    result = train(tiny_config(tmp_path, data_root, max_iters=4, eval_interval=2, init_from="resume"))
    assert result.iter_num == 4


def test_load_model_state_names_shape_mismatch():
    small = small_gpt()
    wide = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=48))
    with pytest.raises(CheckpointError, match=r"shape mismatch in transformer.wte.weight \(64, 48\) vs model \(64, 32\)"):
        ckpt_io.load_model_state(small, wide.state_dict(), "x.pt")
    deep = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(CheckpointError, match=r"unexpected transformer.h.1"):
        ckpt_io.load_model_state(small, deep.state_dict(), "x.pt")


def test_mask_buffers_of_old_nanogpt_are_ignored():
    model = small_gpt()
    state = dict(model.state_dict())
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    ckpt_io.load_model_state(model, state, "x.pt")


def test_fp16_resume_from_a_checkpoint_without_scaler_state():
    """nanoGPT's checkpoints have no scaler, and a bf16/fp32 run saves an empty one: an fp16 run
    resuming from either starts a fresh GradScaler instead of failing."""
    model = small_gpt()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1))
    for saved_scaler in ({}, None):
        ck = {"optimizer": optimizer.state_dict(), "iter_num": 3, "best_val_loss": 2.0, "config": {}}
        if saved_scaler is not None:
            ck["scaler"] = saved_scaler
        scaler = torch.amp.GradScaler("cpu", enabled=True)
        assert ckpt_io.restore_training_state(ck, optimizer, scaler, {}, "x.pt", DistInfo()) == (3, 2.0)
        assert scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_resume_keeps_this_runs_optimizer_implementation():
    """A checkpoint written by another AdamW (TritonAdamW saves fused=None, as does foreach) must
    not switch this run's fused AdamW to the slower path: torch's loader copies the saved flags."""
    model = small_gpt()
    foreach = torch.optim.AdamW(param_groups(model, 0.1), foreach=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    foreach.step()
    ck = {"optimizer": foreach.state_dict(), "iter_num": 1, "best_val_loss": 2.0, "config": {}}
    fused = torch.optim.AdamW(param_groups(model, 0.1), fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert ckpt_io.restore_training_state(ck, fused, scaler, {}, "x.pt", DistInfo()) == (1, 2.0)
    assert [(g["fused"], g["foreach"]) for g in fused.param_groups] == [(True, None)] * 2
    assert ck["optimizer"]["param_groups"][0]["foreach"] is True, "the checkpoint itself is left alone"
    fused.step()
    assert all(fused.state[p]["step"].item() == 2 for p in model.parameters())


@pytest.mark.parametrize("entry", [None, [1, 2], {"state": {}, "param_groups": "x"}, {"param_groups": [{}]}])
def test_resume_from_a_corrupt_optimizer_entry_is_a_clear_error(entry):
    model = small_gpt()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1))
    ck = {"optimizer": entry, "iter_num": 1, "best_val_loss": 2.0, "config": {}}
    with pytest.raises(CheckpointError, match=r"x.pt: its 'optimizer' entry is not an optimizer state_dict"):
        ckpt_io.restore_training_state(ck, optimizer, torch.amp.GradScaler("cpu", enabled=False), {}, "x.pt", DistInfo())


def test_a_checkpoint_of_another_format_is_refused_by_name(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "format": ckpt_io.FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match=rf"checkpoint format {ckpt_io.FORMAT_VERSION + 1}, and this fastgpt "
                                              rf"reads format {ckpt_io.FORMAT_VERSION}"):
        ckpt_io.load_checkpoint(path)
    torch.save({"model": {}}, path)  # nanoGPT's carry no version: the layout they share with ours
    assert ckpt_io.load_checkpoint(path) == {"model": {}}


@pytest.mark.parametrize("keep", [1, 3])
def test_the_newest_checkpoints_are_kept_and_ckpt_pt_is_the_newest(tmp_path, keep):
    for it in (10, 20, 30, 40):
        assert ckpt_io.write_checkpoint(tmp_path, {"model": {"w": torch.full((2,), it)}, "iter_num": it}, keep) \
            == tmp_path / "ckpt.pt"
    assert ckpt_io.load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 40
    kept = ckpt_io.numbered_checkpoints(tmp_path)
    assert [it for it, _ in kept] == ([] if keep == 1 else [20, 30, 40])
    for it, path in kept:
        assert torch.equal(ckpt_io.load_checkpoint(path)["model"]["w"], torch.full((2,), it))
    if kept:  # the newest is ckpt.pt itself, not a second copy on disk
        assert kept[-1][1].stat().st_ino == (tmp_path / "ckpt.pt").stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.pt", *(p.name for _, p in kept)])


def test_without_ckpt_pt_the_highest_numbered_checkpoint_is_the_newest(tmp_path):
    assert ckpt_io.newest_checkpoint(tmp_path) is None
    for it in (5, 100, 20):
        torch.save({"model": {}, "iter_num": it}, tmp_path / f"ckpt-{it}.pt")
    (tmp_path / "ckpt-x.pt").write_bytes(b"not ours")
    assert ckpt_io.newest_checkpoint(tmp_path) == tmp_path / "ckpt-100.pt"
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    assert ckpt_io.newest_checkpoint(tmp_path) == tmp_path / "ckpt.pt"


def test_init_from_auto_starts_fresh_then_resumes(tmp_path, tiny_data):
    data_root, _ = tiny_data
    first = train(tiny_config(tmp_path, data_root, max_iters=4, eval_interval=2, init_from="auto"))
    assert first.iter_num == 4
    second = train(tiny_config(tmp_path, data_root, max_iters=6, eval_interval=2, init_from="auto"))
    assert second.iter_num == 6 and len(second.history["eval"]) == 1  # evaluated 6 only, not 4 again
    assert [it for it, _ in ckpt_io.numbered_checkpoints(tmp_path / "out")] == [4, 6]


@pytest.mark.parametrize("saved, gpus, restored", [(8, 1, 1), (8, 2, 2), (2, 2, 2), (2, 8, 2), (1, 0, 0)])
def test_cuda_generator_states_are_restored_for_the_gpus_present(saved, gpus, restored):
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(saved)]
    assert ckpt_io.cuda_states_to_restore(states, gpus) == states[:restored]


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_the_ones_here(monkeypatch):
    """Through a stand-in torch.cuda with one GPU (tests/test_cuda.py restores on real GPUs)."""
    given = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", given.extend)
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    ckpt_io.set_rng_state({"torch": torch.get_rng_state(), "cuda": states})
    assert len(given) == 1 and torch.equal(given[0], states[0])
