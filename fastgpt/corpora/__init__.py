"""The datasets fastgpt knows by name: the built-in ones it prepares on demand, and the hook
the trainer calls (`ensure_dataset`) to find or prepare a dataset before it reads it.

One module a corpus: `shakespeare` (built in), `text` (your own files), `openwebtext`; they
write the layout of `fastgpt.tokenfiles`.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastgpt.corpora.openwebtext import OPENWEBTEXT, OPENWEBTEXT_INSTALL_HINT
from fastgpt.corpora.shakespeare import prepare_shakespeare, prepare_shakespeare_char
from fastgpt.tokenfiles import DEFAULT_DATA_ROOT, TRAIN_FILENAME, VAL_FILENAME, check_out_dir

_BUILDERS = {"shakespeare_char": prepare_shakespeare_char, "shakespeare": prepare_shakespeare}
BUILTIN_DATASETS = tuple(_BUILDERS)


def prepare(name: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Prepare a built-in dataset into `out_dir` (default `data/NAME`); return the folder."""
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown built-in dataset {name!r}; expected one of {', '.join(BUILTIN_DATASETS)}"
        )
    out = Path(out_dir) if out_dir is not None else DEFAULT_DATA_ROOT / name
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    _BUILDERS[name](out)
    return out


def _prepare_command(dataset: str, data_dir: Path) -> str:
    """Return the shell command that prepares `dataset` into `data_dir`."""
    default_dir = DEFAULT_DATA_ROOT / dataset
    out = "" if data_dir == default_dir else f" --out {data_dir}"
    if dataset in BUILTIN_DATASETS or dataset == OPENWEBTEXT:
        return f"python -m fastgpt.prepare {dataset}{out}"
    return f"python -m fastgpt.prepare text --input FILE [FILE ...] --out {data_dir}"


def ensure_dataset(dataset: str, data_dir: str | os.PathLike) -> None:
    """Make sure `data_dir` holds train.bin and val.bin, preparing built-in datasets on demand.

    Raises `FileNotFoundError` naming the missing file and the command that prepares it when
    the dataset is not built in.
    """
    data_dir = Path(data_dir)
    paths = [data_dir / TRAIN_FILENAME, data_dir / VAL_FILENAME]
    missing = [path for path in paths if not path.is_file()]
    if not missing:
        return
    if dataset in BUILTIN_DATASETS:
        print(f"{missing[0]} not found; preparing {dataset} into {data_dir}")
        prepare(dataset, data_dir)
        return
    # OpenWebText is not prepared on demand: the first download is ~54 GB (nanoGPT's figure)
    # and takes hours, and under DDP every rank would start one. The command stays last in
    # the message so it can be copied.
    install = ""
    if dataset == OPENWEBTEXT:
        install = f"install the `datasets` package if needed ({OPENWEBTEXT_INSTALL_HINT}), then "
    raise FileNotFoundError(
        f"{missing[0]} not found; {install}prepare the dataset with: {_prepare_command(dataset, data_dir)}"
    )
