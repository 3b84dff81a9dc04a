"""Tests for fastgpt.tokenizer and the cached assets it is built from.

The first run fetches the openai-whisper sdist from PyPI into fastgpt's cache (unless whisper
is installed); everything else runs offline.
"""

import hashlib
import pickle
import random
import re
import subprocess

import pytest

from fastgpt import fileio, pypi, tokenizer
from fastgpt.tokenizer import (
    EOT_TOKEN,
    GPT2_EOT_ID,
    GPT2_RANKS_SHA256,
    GPT2_VOCAB_SIZE,
    CharTokenizer,
    Gpt2Tokenizer,
    dataset_vocab_size,
    get_gpt2_encoding,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def gpt2():
    return Gpt2Tokenizer()


@pytest.fixture(scope="module")
def good_ranks():
    """The verified ranks bytes from the real cache, read before any test redirects it."""
    return tokenizer.gpt2_ranks_path().read_bytes()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """Point fastgpt's cache at an empty temporary folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(fileio.CACHE_DIR_ENV, str(cache))
    return cache


# --- GPT-2 BPE ------------------------------------------------------------------------------


def test_hello_world(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]


def test_encoding_shape(gpt2):
    encoding = get_gpt2_encoding()
    assert encoding.n_vocab == GPT2_VOCAB_SIZE == gpt2.vocab_size
    assert encoding.eot_token == GPT2_EOT_ID == gpt2.eot_id
    assert get_gpt2_encoding() is encoding  # built once per process


def test_round_trip_mixed_unicode(gpt2):
    rng = random.Random(0)
    alphabet = list("abcXYZ019 \n\t\r'.,!?") + ["é", "ß", "世", "界", "🙂", "—", "\u200b", "ñ"]
    texts = ["Héllo, 世界! 🙂 naïve — café\n\n\tdon't  stop\r\n"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))) for _ in range(50)]
    for text in texts:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_eot_only_when_allowed(gpt2):
    text = f"one{EOT_TOKEN}two"
    assert GPT2_EOT_ID in gpt2.encode(text, allow_eot=True)
    assert gpt2.encode(text, allow_eot=True).count(GPT2_EOT_ID) == 1
    # By default the literal string is ordinary text, so a corpus cannot inject boundaries.
    assert GPT2_EOT_ID not in gpt2.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.decode([GPT2_EOT_ID]) == EOT_TOKEN


# --- Where the ranks come from --------------------------------------------------------------


def test_whisper_sdist_holds_the_ranks():
    origin, data = tokenizer._whisper_sdist_ranks()
    assert tokenizer.WHISPER_SDIST_MEMBER in origin
    assert hashlib.sha256(data).hexdigest() == GPT2_RANKS_SHA256


def test_corrupt_cached_ranks_are_fetched_again(good_ranks, empty_cache, monkeypatch):
    # Decision: the cache is ours, so a bad copy is repaired from a source (with a warning);
    # only a bad *source* is an error. The source here is a good copy, so this stays offline.
    monkeypatch.setattr(tokenizer, "_installed_whisper_ranks", lambda: ("good-source", good_ranks))
    empty_cache.mkdir(parents=True)
    cached = empty_cache / tokenizer.GPT2_RANKS_FILENAME
    cached.write_bytes(b"not the ranks\n")

    expected_warning = re.escape(f"{cached} has sha256") + ".*" + re.escape(
        f"expected {GPT2_RANKS_SHA256}; fetching it again"
    )
    with pytest.warns(UserWarning, match=expected_warning):
        path = tokenizer.gpt2_ranks_path()

    assert path == cached
    assert fileio.sha256_file(cached) == GPT2_RANKS_SHA256


def test_corrupt_source_is_a_clear_error(empty_cache, monkeypatch):
    bad_path = "/site-packages/whisper/assets/gpt2.tiktoken"
    monkeypatch.setattr(tokenizer, "_installed_whisper_ranks", lambda: (bad_path, b"corrupt"))
    bad_hash = hashlib.sha256(b"corrupt").hexdigest()
    with pytest.raises(ValueError) as excinfo:
        tokenizer.gpt2_ranks_path()
    message = str(excinfo.value)
    assert bad_path in message and bad_hash in message and GPT2_RANKS_SHA256 in message
    assert "\n" not in message
    # Nothing unverified reaches the cache.
    assert not (empty_cache / tokenizer.GPT2_RANKS_FILENAME).exists()


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(fileio.CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv(fileio.XDG_CACHE_ENV, raising=False)
    assert fileio.cache_dir() == tmp_path / "home" / ".cache" / "fastgpt"
    monkeypatch.setenv(fileio.XDG_CACHE_ENV, str(tmp_path / "xdg"))
    assert fileio.cache_dir() == tmp_path / "xdg" / "fastgpt"
    monkeypatch.setenv(fileio.CACHE_DIR_ENV, str(tmp_path / "own"))
    assert fileio.cache_dir() == tmp_path / "own"
    assert fileio.cache_dir().is_dir()


def test_fetch_sdist_failure_is_one_clear_line(empty_cache, monkeypatch):
    stderr = (
        "ERROR: Could not find a version that satisfies the requirement nosuch==1.0\n"
        "WARNING: Location 'file:///somewhere' is ignored\n"
    )

    def fake_run(cmd, **kwargs):
        assert "--no-binary" in cmd and "nosuch==1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(pypi.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError) as excinfo:
        pypi.fetch_sdist("nosuch", "1.0")
    message = str(excinfo.value)
    assert "nosuch==1.0" in message
    assert "Could not find a version" in message  # the ERROR line, not the trailing WARNING
    assert "PyPI must be reachable the first time" in message
    assert "\n" not in message


def test_atomic_writer_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_writer(target) as f:
            f.write(b"half-written")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


# --- Character level --------------------------------------------------------------------------


def test_char_round_trip():
    text = "To be, or not to be: that is the question.\nÀ bientôt 🙂"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == [sorted(set(text)).index(ch) for ch in text]  # nanoGPT's sorted vocabulary


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"character 'z' is not in the dataset's vocabulary"):
        tok.encode("abz")
    with pytest.raises(ValueError, match=r"token id 3 is outside the vocabulary \(0..2\)"):
        tok.decode([0, 3])


def test_load_tokenizer_follows_meta_pkl(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), Gpt2Tokenizer)
    assert dataset_vocab_size(tmp_path) == GPT2_VOCAB_SIZE

    chars = sorted(set("hello"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {ch: i for i, ch in enumerate(chars)}}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, CharTokenizer)
    assert tok.decode(tok.encode("hello")) == "hello"
    assert dataset_vocab_size(tmp_path) == 4
