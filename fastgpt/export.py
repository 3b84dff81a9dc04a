"""Export a run's newest checkpoint as a Hugging Face GPT-2 folder.

    python -m fastgpt.export out-shakespeare --hf hf-shakespeare
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf-shakespeare')"

The folder holds config.json and model.safetensors, which GPT2LMHeadModel loads and which give
fastgpt's logits, plus the tokenizer: GPT-2 BPE's vocab.json and merges.txt for BPE runs, or for a
character-level run its vocabulary as char_vocab.json ({"vocab_size", "itos"}), which
transformers has no tokenizer class for. The folder is written whole or not at all, and an
existing one is never overwritten. A model with rope, qk_norm or logit_softcap is refused in one
line: GPT2LMHeadModel computes none of them.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile

from safetensors.torch import save_file

from fastgpt import checkpoint as ckpt_io
from fastgpt.cli import OneLineParser, run_command
from fastgpt.errors import FastgptError
from fastgpt.tokenfiles import DEFAULT_DATA_ROOT
from fastgpt.model import GPT, GPTConfig
from fastgpt.pretrained import CONFIG_NAME, SAFETENSORS_NAME, check_hf_expressible, hf_config, to_hf_state
from fastgpt.tokenizer import CharTokenizer, load_tokenizer, write_gpt2_hf_tokenizer

CHAR_VOCAB_NAME = "char_vocab.json"


class ExportError(FastgptError):
    """The export cannot be made as asked; one line for the user."""


def export_hf(out_dir: str | os.PathLike, hf_dir: str | os.PathLike, data_dir: str | None = None) -> pathlib.Path:
    """Write out_dir's newest checkpoint to a new folder hf_dir; returns hf_dir."""
    target = pathlib.Path(hf_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"--hf {target} already exists and is not an empty folder; choose a new folder")
    path = ckpt_io.newest_checkpoint(out_dir) or ckpt_io.checkpoint_path(out_dir)
    checkpoint = ckpt_io.load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**checkpoint.get("model_args", {})))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: its model_args do not describe a GPT ({e})") from e
    check_hf_expressible(model.config)  # before anything is read or written for the export
    ckpt_io.load_model_state(model, checkpoint["model"], path)
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    data = pathlib.Path(data_dir) if data_dir else pathlib.Path(config.get("data_root", DEFAULT_DATA_ROOT)) / config.get("dataset", "")
    if not data.is_dir():
        raise ExportError(f"the run's dataset folder {str(data)!r} is not here, and its vocabulary goes with the "
                          "export; pass --data_dir=the dataset folder")
    tokenizer = load_tokenizer(data)
    vocab_size = tokenizer.vocab_size
    if vocab_size > model.config.vocab_size:
        raise ExportError(f"{data} has {vocab_size} token ids, more than the model's {model.config.vocab_size}; "
                          "pass --data_dir=the dataset the run trained on")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(to_hf_state(model, vocab_size), str(staging / SAFETENSORS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(hf_config(model, vocab_size), indent=2) + "\n")
        if isinstance(tokenizer, CharTokenizer):
            itos = [tokenizer.itos[i] for i in range(vocab_size)]
            (staging / CHAR_VOCAB_NAME).write_text(json.dumps({"vocab_size": vocab_size, "itos": itos}, ensure_ascii=False))
        else:
            write_gpt2_hf_tokenizer(staging, model.config.block_size)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target




def _run(argv: list[str]) -> None:
    p = OneLineParser(prog="python -m fastgpt.export", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="the run folder whose newest checkpoint to export")
    p.add_argument("--hf", required=True, metavar="DIR", help="a new folder for the Hugging Face files")
    p.add_argument("--data_dir", default=None, help="the dataset folder (default: from the checkpoint's config)")
    args = p.parse_args(argv)
    target = export_hf(args.out_dir, args.hf, args.data_dir)
    print(f"wrote {target}: load it with transformers.GPT2LMHeadModel.from_pretrained({str(target)!r})")


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
