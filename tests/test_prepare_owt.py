"""Tests for `python -m fastgpt.prepare openwebtext` and configs/owt.py, offline.

The real run downloads ~54 GB with Hugging Face `datasets`. Here a stand-in `datasets` module is
put into `sys.modules`; its `load_dataset` returns a few hundred short generated documents in
an object with exactly the part of the `datasets.Dataset` API that fastgpt calls, so the same
code path runs end to end without the package or the network. All outputs go to temporary folders.
"""

import math
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fastgpt import corpora, prepare
from fastgpt.corpora import openwebtext as owt
from fastgpt.corpora.encode import encode_gpt2_batch
from fastgpt.tokenfiles import DEFAULT_DATA_ROOT
from fastgpt.config import load_config
from fastgpt.tokenizer import EOT_TOKEN, GPT2_EOT_ID, get_gpt2_encoding

REPO_ROOT = Path(__file__).resolve().parent.parent
OWT_CONFIG = REPO_ROOT / "configs" / "owt.py"

# 301 documents, 5% held out: datasets rounds the test count up, ceil(15.05) = 16 val documents,
# 285 train. Shards of at most 7 documents: 41 train shards (39 of 7, 2 of 6) and 3 val shards
# (6, 5, 5), so neither split divides evenly and a dropped or repeated edge document shows.
N_DOCUMENTS = 301
VAL_FRACTION = 0.05
EXPECTED_VAL_DOCUMENTS = math.ceil(VAL_FRACTION * N_DOCUMENTS)
DOCS_PER_SHARD = 7
SEED = 2357
# nanoGPT's GPT-2 124M recipe: 40 global micro-batches of 12 sequences of 1024 tokens.
OWT_TOKENS_PER_ITER = 491_520


def read_bin(path):
    return np.fromfile(path, dtype=np.uint16)


def make_documents(n: int = N_DOCUMENTS, seed: int = 0) -> list[str]:
    """Short varied documents: words, digits, non-ASCII, edge whitespace, an empty one, and one
    that contains the end-of-text string as plain text (it must stay text, not become id 50256)."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "naïve", "café", "日本語", "1999", "don't", "—", "\n", "  "]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    docs[3] = ""
    docs[10] = f"text before {EOT_TOKEN} and after"
    docs[20] = "  leading and trailing spaces \n\n"
    return docs


class FakeDataset:
    """The part of `datasets.Dataset` that fastgpt.corpora.openwebtext uses, over a list of texts.

    `shard` and `train_test_split` follow datasets' own rules (contiguous shards whose sizes
    differ by at most one, the larger first; the test count rounded up), so the sizes match
    what the real package would give.
    """

    def __init__(self, texts, log=None):
        self.texts = list(texts)
        self.log = log if log is not None else []

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, column):
        if column != "text":
            raise KeyError(f"no column {column!r}; OpenWebText has only 'text'")
        return list(self.texts)

    def shard(self, num_shards, index, contiguous=False):
        assert contiguous, "prepare must ask for contiguous shards, which keep document order"
        self.log.append(("shard", len(self), num_shards, index))
        size, extra = divmod(len(self), num_shards)
        start = size * index + min(index, extra)
        return FakeDataset(self.texts[start:start + size + (index < extra)], self.log)

    def train_test_split(self, test_size, seed, shuffle):
        self.log.append(("train_test_split", test_size, seed, shuffle))
        n_test = math.ceil(test_size * len(self))
        order = list(range(len(self)))
        if shuffle:
            random.Random(seed).shuffle(order)
        return {
            "train": FakeDataset([self.texts[i] for i in order[n_test:]], self.log),
            "test": FakeDataset([self.texts[i] for i in order[:n_test]], self.log),
        }


def expected_splits(docs, val_fraction=VAL_FRACTION, seed=SEED):
    split = FakeDataset(docs).train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return split["train"].texts, split["test"].texts


@pytest.fixture
def fake_datasets(monkeypatch):
    """Install a stand-in `datasets` module; return its call log."""
    log = []
    docs = make_documents()

    def load_dataset(name, num_proc=None):
        log.append(("load_dataset", name, num_proc))
        return {"train": FakeDataset(docs, log)}

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    module.__version__ = "0.0-stand-in"
    monkeypatch.setitem(sys.modules, "datasets", module)
    return log


@pytest.fixture(scope="module")
def encoding():
    return get_gpt2_encoding()


def run_owt(out, num_proc=2, **kwargs):
    kwargs = {"val_fraction": VAL_FRACTION, "docs_per_shard": DOCS_PER_SHARD, **kwargs}
    return owt.prepare_openwebtext(out, num_proc=num_proc, **kwargs)


# --- The OpenWebText path, on the stand-in -----------------------------------------------------


def test_owt_round_trips_documents(tmp_path, monkeypatch, fake_datasets, encoding):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "openwebtext").mkdir(parents=True)
    (tmp_path / "data" / "openwebtext" / "meta.pkl").write_bytes(b"left by a character-level run")
    out = owt.prepare_openwebtext(num_proc=2, val_fraction=VAL_FRACTION, docs_per_shard=DOCS_PER_SHARD)
    assert out == Path("data") / "openwebtext"
    assert sorted(p.name for p in out.iterdir()) == ["identity.json", "train.bin", "val.bin"]  # no meta.pkl, no temp files

    docs = make_documents()
    train_docs, val_docs = expected_splits(docs)
    assert len(val_docs) == EXPECTED_VAL_DOCUMENTS
    assert sorted(train_docs + val_docs) == sorted(docs)
    for name, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = read_bin(out / f"{name}.bin")
        # Each document, in the split's order, then <|endoftext|>: nothing dropped or repeated
        # at the shard edges, and the literal "<|endoftext|>" in one document stayed text.
        assert encoding.decode(ids.tolist()) == "".join(d + EOT_TOKEN for d in split_docs)
        assert int((ids == GPT2_EOT_ID).sum()) == len(split_docs)
        assert ids[-1] == GPT2_EOT_ID
        assert len(ids) == sum(len(encoding.encode_ordinary(d)) + 1 for d in split_docs)
        expected = [t for d in split_docs for t in encoding.encode_ordinary(d) + [GPT2_EOT_ID]]
        assert ids.tolist() == expected


def test_owt_calls_datasets_as_nanogpt_does(tmp_path, fake_datasets):
    run_owt(tmp_path, num_proc=3)
    assert fake_datasets[0] == ("load_dataset", "openwebtext", 3)
    assert fake_datasets[1] == ("train_test_split", VAL_FRACTION, SEED, True)
    # Every split is cut into ceil(n / 7) contiguous shards, each asked for exactly once.
    shards = [entry[1:] for entry in fake_datasets if entry[0] == "shard"]
    n_val = EXPECTED_VAL_DOCUMENTS
    n_train = N_DOCUMENTS - n_val
    expected = [(n_train, 41, i) for i in range(41)] + [(n_val, 3, i) for i in range(3)]
    assert math.ceil(n_train / DOCS_PER_SHARD) == 41 and n_train % 41
    assert shards == expected


def test_owt_output_is_independent_of_threads_and_shard_size(tmp_path, fake_datasets):
    outputs = []
    for num_proc, docs_per_shard in ((1, DOCS_PER_SHARD), (2, DOCS_PER_SHARD), (2, 1000)):
        out = tmp_path / f"out-{num_proc}-{docs_per_shard}"
        run_owt(out, num_proc=num_proc, docs_per_shard=docs_per_shard)
        outputs.append({name: (out / f"{name}.bin").read_bytes() for name in ("train", "val")})
    assert outputs[0] == outputs[1] == outputs[2]


def test_owt_prints_progress_per_shard(tmp_path, fake_datasets, capsys):
    run_owt(tmp_path)
    lines = capsys.readouterr().out.splitlines()
    train_lines = [line for line in lines if line.startswith("train: shard")]
    assert len(train_lines) == 41
    n_train = N_DOCUMENTS - EXPECTED_VAL_DOCUMENTS
    assert train_lines[-1].startswith(f"train: shard 41/41, {n_train:,} documents")
    assert "tokens" in train_lines[-1]


def test_owt_cli(tmp_path, fake_datasets):
    out = tmp_path / "owt"
    argv = ["openwebtext", "--out", str(out), "--num-proc", "2", "--val-fraction", str(VAL_FRACTION),
            "--docs-per-shard", str(DOCS_PER_SHARD)]
    assert prepare.main(argv) == 0
    val = read_bin(out / "val.bin")
    assert int((val == GPT2_EOT_ID).sum()) == EXPECTED_VAL_DOCUMENTS


def test_owt_interrupted_run_keeps_previous_files(tmp_path, monkeypatch, fake_datasets):
    (tmp_path / "train.bin").write_bytes(b"old train")
    (tmp_path / "val.bin").write_bytes(b"old val")
    real_shard = FakeDataset.shard

    def shard_then_interrupt(self, num_shards, index, contiguous=False):
        if index == 5:  # several shards of train.bin are already written by now
            raise KeyboardInterrupt
        return real_shard(self, num_shards, index, contiguous)

    monkeypatch.setattr(FakeDataset, "shard", shard_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_owt(tmp_path)
    assert (tmp_path / "train.bin").read_bytes() == b"old train"
    assert (tmp_path / "val.bin").read_bytes() == b"old val"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "val.bin"]  # no temp files left


def test_owt_without_datasets_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError) as excinfo:
        owt.prepare_openwebtext(tmp_path / "owt")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "pip install -e '.[openwebtext]'" in message and "pip install datasets" in message
    assert not (tmp_path / "owt").exists()

    assert prepare.main(["openwebtext", "--out", str(tmp_path / "owt")]) == 2
    assert "error: openwebtext needs the optional `datasets` package" in capsys.readouterr().err


def test_owt_loading_script_refusal_says_what_to_do(tmp_path, monkeypatch, fake_datasets):
    def refuse(name, num_proc=None):
        raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")

    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", refuse)
    refusal = r"datasets 0\.0-stand-in will not run the loading script"
    with pytest.raises(RuntimeError, match=refusal) as excinfo:
        run_owt(tmp_path)
    assert "pip install 'datasets>=2.14,<4'" in str(excinfo.value)
    assert "HF_DATASETS_TRUST_REMOTE_CODE=1 python -m fastgpt.prepare openwebtext" in str(excinfo.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 0.0}, "--val-fraction must be between 0 and 1"),
        ({"num_proc": 0}, "--num-proc must be at least 1, got 0"),
        ({"docs_per_shard": 0}, "--docs-per-shard must be at least 1, got 0"),
    ],
)
def test_owt_bad_arguments_fail_before_loading(tmp_path, fake_datasets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        owt.prepare_openwebtext(tmp_path, **kwargs)
    assert fake_datasets == []  # nothing downloaded


def test_ensure_dataset_openwebtext_says_to_install_the_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as excinfo:
        corpora.ensure_dataset("openwebtext", DEFAULT_DATA_ROOT / "openwebtext")
    message = str(excinfo.value)
    assert "pip install -e '.[openwebtext]'" in message
    assert message.endswith("with: python -m fastgpt.prepare openwebtext")


# --- The generic writer, without any datasets object ---------------------------------------------


def test_write_document_splits_takes_plain_iterables(tmp_path, fake_datasets):
    """Lists and generators give the same bytes as the Dataset path."""
    run_owt(tmp_path / "owt")
    train_docs, val_docs = expected_splits(make_documents())
    splits = {"train": train_docs, "val": (d for d in val_docs)}
    counts = owt.write_document_splits(splits, tmp_path / "plain", threads=2, docs_per_shard=DOCS_PER_SHARD)
    assert counts["val"].documents == EXPECTED_VAL_DOCUMENTS
    assert counts["train"].documents == N_DOCUMENTS - EXPECTED_VAL_DOCUMENTS
    for name in ("train", "val"):
        data = (tmp_path / "plain" / f"{name}.bin").read_bytes()
        assert data == (tmp_path / "owt" / f"{name}.bin").read_bytes()
        assert len(data) // np.dtype(np.uint16).itemsize == counts[name].tokens


def test_encode_gpt2_batch_marks_document_ends(encoding):
    texts = ["Hello world", " and more", ""]
    plain = [encoding.encode_ordinary(t) for t in texts]
    assert encode_gpt2_batch(texts, threads=2) == [ids + [GPT2_EOT_ID] for ids in plain]
    ends = (False, True, False)  # the text path: only a file's last piece ends its document
    expected = [plain[0], plain[1] + [GPT2_EOT_ID], plain[2]]
    assert encode_gpt2_batch(texts, threads=2, ends_document=ends) == expected
    with pytest.raises(ValueError, match="ends_document has 2 flags for 3 texts"):
        encode_gpt2_batch(texts, threads=1, ends_document=(True, True))


def test_document_shards_cover_the_source_once():
    docs = [str(i) for i in range(23)]
    from_dataset = list(owt.document_shards(FakeDataset(docs), docs_per_shard=5))
    from_iterable = list(owt.document_shards(iter(docs), docs_per_shard=5))
    assert [len(s) for s in from_dataset] == [5, 5, 5, 4, 4]  # datasets balances the sizes
    assert [len(s) for s in from_iterable] == [5, 5, 5, 5, 3]
    assert sum(from_dataset, []) == sum(from_iterable, []) == docs


def test_write_document_splits_rejects_an_empty_split_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"split 'val' has no documents"):
        owt.write_document_splits({"train": ["some text"], "val": []}, tmp_path, threads=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../train", "sub/train", ".hidden"])
def test_write_document_splits_rejects_path_like_names(tmp_path, name):
    with pytest.raises(ValueError, match="must be a plain file name"):
        owt.write_document_splits({name: ["text"]}, tmp_path, threads=1)


def test_a_split_given_as_one_string_is_an_error():
    with pytest.raises(ValueError, match="a split is one string"):
        list(owt.document_shards("not a list of documents"))


# --- configs/owt.py -------------------------------------------------------------------------------


def test_owt_config_is_nanogpts_gpt2_recipe():
    cfg = load_config(str(OWT_CONFIG), [])
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    assert tokens_per_iter == OWT_TOKENS_PER_ITER == 40 * 12 * 1024
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias) == (12, 12, 768, 0.0, False)
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters) == (6e-4, 6e-5, 2000)
    assert cfg.max_iters == cfg.lr_decay_iters == 600_000
    assert (cfg.weight_decay, cfg.beta1, cfg.beta2, cfg.grad_clip) == (0.1, 0.9, 0.95, 1.0)
    assert (cfg.dtype, cfg.compile, cfg.dataset, cfg.out_dir) == ("bfloat16", True, "openwebtext", "out-owt")
    assert (cfg.eval_interval, cfg.eval_iters, cfg.log_interval) == (1000, 200, 10)


@pytest.mark.parametrize(
    "overrides, ranks",
    [([], 8), ([], 1), (["--gradient_accumulation_steps=48", "--batch_size=10"], 16)],
)
def test_owt_config_launches_divide_among_ranks(overrides, ranks):
    """The header's launches: 8 GPUs (5 micro-batches each), one GPU, and the 2-node override."""
    cfg = load_config(str(OWT_CONFIG), overrides)
    assert cfg.gradient_accumulation_steps % ranks == 0
    assert cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size == OWT_TOKENS_PER_ITER


def test_owt_config_header_names_the_commands():
    header = OWT_CONFIG.read_text()
    for command in (
        "python -m fastgpt.prepare openwebtext",
        "torchrun --standalone --nproc_per_node=8 -m fastgpt.train configs/owt.py",
        "torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:PORT --nproc_per_node=8",
    ):
        assert command in header
