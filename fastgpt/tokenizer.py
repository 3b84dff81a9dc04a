"""Tokenizers: GPT-2 BPE (tiktoken, built offline) and nanoGPT's character-level vocabulary.

The GPT-2 encoding is built from a local copy of its BPE ranks rather than with
`tiktoken.get_encoding("gpt2")`, which downloads the ranks from a blob store on first use and
hangs or fails on machines without that access. The ranks file is the same bytes everywhere
(checked by sha256), found in this order:

1. fastgpt's cache (`cache_dir()/gpt2.tiktoken`);
2. an installed `openai-whisper`, which ships it as `whisper/assets/gpt2.tiktoken`;
3. the `openai-whisper` sdist from PyPI, fetched once with pip (see `fastgpt.pypi`).

A cached copy whose hash is wrong is fetched again (the cache is ours to repair); a source
whose hash is wrong is an error, since no later source would be more trustworthy.

A dataset folder says which tokenizer it uses the way nanoGPT does: a character vocabulary means
characters, none means GPT-2 BPE. fastgpt writes the vocabulary twice: `vocab.json` (plain JSON,
which cannot run code, read first) and nanoGPT's `meta.pkl` (read, when alone, by an unpickler that
refuses every class and function).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import tiktoken
import tiktoken.load

from fastgpt import fileio, pypi
from fastgpt.errors import DataError, FetchError

# GPT-2's end-of-text marker, as a string and as a token id (the last id of the vocabulary).
EOT_TOKEN = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257  # 50,000 merges + 256 byte tokens + <|endoftext|>

# tiktoken's own pinned hash of r50k_base (= GPT-2) ranks, from tiktoken_ext/openai_public.py.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_FILENAME = "gpt2.tiktoken"
# The openai-whisper release whose sdist we read the ranks from, and where they lie in it.
WHISPER_SDIST_NAME = "openai-whisper"
WHISPER_SDIST_VERSION = "20250625"
WHISPER_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
WHISPER_SDIST_MEMBER = f"openai_whisper-{WHISPER_SDIST_VERSION}/whisper/assets/{GPT2_RANKS_FILENAME}"
WHISPER_PACKAGE_ASSET = Path("assets") / GPT2_RANKS_FILENAME

# GPT-2's pre-tokenizer regex, used only if tiktoken stops exporting `r50k_pat_str`. This is
# the pattern of OpenAI's original encoder.py; tiktoken's current one is equivalent but uses
# possessive quantifiers for speed.
GPT2_PAT_STR_FALLBACK = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# A known encoding, checked after building: a wrong pattern or ranks file fails here at once
# instead of silently training on different token ids.
GPT2_SELF_CHECK = ("Hello world", [15496, 995])

META_FILENAME = "meta.pkl"
# {"vocab_size": N, "itos": [the character of id 0, of id 1, ...]}
VOCAB_FILENAME = "vocab.json"


# --- GPT-2 ranks: find, verify, cache ----------------------------------------------------


def _installed_whisper_ranks() -> tuple[str, bytes] | None:
    """Return (path, bytes) of an installed whisper's ranks file, or None if there is none.

    `find_spec` locates the package without importing it (importing whisper pulls in torch
    and numba). Another package may also be called `whisper` (graphite's), so a spec without
    the asset file is simply not a source.
    """
    try:
        spec = importlib.util.find_spec("whisper")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / WHISPER_PACKAGE_ASSET
        if path.is_file():
            return str(path), path.read_bytes()
    return None


def _whisper_sdist_ranks() -> tuple[str, bytes]:
    """Return (description, bytes) of the ranks file inside the openai-whisper sdist."""
    tarball = pypi.fetch_sdist(WHISPER_SDIST_NAME, WHISPER_SDIST_VERSION, WHISPER_SDIST_SHA256)
    return f"{tarball}:{WHISPER_SDIST_MEMBER}", pypi.read_member(tarball, WHISPER_SDIST_MEMBER)


def gpt2_ranks_path() -> Path:
    """Return the path of a verified `gpt2.tiktoken` in fastgpt's cache, fetching it if needed.

    Raises `FetchError` naming the file and both hashes when a source has the wrong bytes.
    """
    cached = fileio.cache_dir() / GPT2_RANKS_FILENAME
    if cached.is_file():
        actual = fileio.sha256_file(cached)
        if actual == GPT2_RANKS_SHA256:
            return cached
        warnings.warn(
            f"{cached} has sha256 {actual}, expected {GPT2_RANKS_SHA256}; fetching it again",
            stacklevel=2,
        )
    found = _installed_whisper_ranks()
    origin, data = found if found is not None else _whisper_sdist_ranks()
    actual = hashlib.sha256(data).hexdigest()
    if actual != GPT2_RANKS_SHA256:
        raise FetchError(
            f"GPT-2 ranks file {origin} has sha256 {actual}, expected {GPT2_RANKS_SHA256}"
        )
    with fileio.atomic_writer(cached) as f:
        f.write(data)
    return cached


def _gpt2_pattern() -> str:
    try:
        from tiktoken_ext import openai_public
    except ImportError:
        return GPT2_PAT_STR_FALLBACK
    return getattr(openai_public, "r50k_pat_str", GPT2_PAT_STR_FALLBACK)


@functools.lru_cache(maxsize=None)
def get_gpt2_encoding() -> tiktoken.Encoding:
    """Return the GPT-2 BPE encoding, built offline from the verified ranks file.

    Never calls `tiktoken.get_encoding`, which would go to the network.
    """
    ranks_path = gpt2_ranks_path()
    # Passing the hash again makes tiktoken discard any stale copy in its own cache
    # (it caches even local files, keyed by path) instead of trusting it.
    ranks = tiktoken.load.load_tiktoken_bpe(str(ranks_path), expected_hash=GPT2_RANKS_SHA256)
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=_gpt2_pattern(),
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
    text, expected = GPT2_SELF_CHECK
    got = encoding.encode_ordinary(text)
    if got != expected:
        raise RuntimeError(
            f"GPT-2 encoding built from {ranks_path} encodes {text!r} as {got}, expected {expected}"
        )
    return encoding


# --- Tokenizers ----------------------------------------------------------------------------


class CharTokenizer:
    """nanoGPT's character-level tokenizer: each distinct character of the corpus is one id."""

    def __init__(self, stoi: Mapping[str, int], itos: Mapping[int, str]):
        if len(stoi) != len(itos) or any(itos.get(i) != ch for ch, i in stoi.items()):
            raise ValueError("stoi and itos must be inverse maps of the same characters")
        self.stoi = dict(stoi)
        self.itos = dict(itos)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Build the vocabulary of `text`: its distinct characters, sorted, as nanoGPT does."""
        chars = sorted(set(text))
        return cls({ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def meta(self) -> dict:
        """Return the dict nanoGPT pickles into meta.pkl: vocab_size, itos, stoi."""
        return {"vocab_size": self.vocab_size, "itos": dict(self.itos), "stoi": dict(self.stoi)}

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[ch] for ch in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the dataset's vocabulary "
                f"of {self.vocab_size} characters; use only characters the dataset has"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        itos = self.itos
        try:
            return "".join(itos[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(
                f"token id {e.args[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            ) from None


class Gpt2Tokenizer:
    """GPT-2 BPE via tiktoken; `<|endoftext|>` is ordinary text unless explicitly allowed."""

    vocab_size = GPT2_VOCAB_SIZE
    eot_id = GPT2_EOT_ID

    def __init__(self) -> None:
        self.encoding = get_gpt2_encoding()

    def encode(self, text: str, allow_eot: bool = False) -> list[int]:
        """Encode `text`. With `allow_eot`, the literal `<|endoftext|>` becomes id 50256.

        The default treats it as plain characters, so a corpus that happens to contain the
        string cannot inject document boundaries (and tiktoken's `encode` would raise on it).
        """
        if allow_eot:
            return self.encoding.encode(text, allowed_special={EOT_TOKEN})
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


# --- Per-dataset choice ---------------------------------------------------------------------


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings and numbers only: every other object needs
    find_class, which refuses."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which plain data never needs")


def _read_vocab_json(path: Path) -> dict:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is not a JSON vocabulary ({e}); prepare the dataset again") from e
    itos = vocab.get("itos") if isinstance(vocab, dict) else None
    if not (isinstance(itos, list) and itos and all(isinstance(c, str) for c in itos)
            and vocab.get("vocab_size") == len(itos)):
        raise DataError(f"{path} is not a fastgpt vocabulary: expected {{\"vocab_size\": N, \"itos\": [N strings]}}; "
                        "prepare the dataset again")
    return {"vocab_size": len(itos), "itos": dict(enumerate(itos)), "stoi": {c: i for i, c in enumerate(itos)}}


def _read_meta(data_dir: str | os.PathLike) -> dict | None:
    """The dataset's character vocabulary as nanoGPT's meta dict, or None for GPT-2 BPE."""
    path = Path(data_dir) / META_FILENAME
    json_path = Path(data_dir) / VOCAB_FILENAME
    if json_path.exists():
        vocab = _read_vocab_json(json_path)
        # nanoGPT's prepare.py rewrites only meta.pkl: a disagreeing one means vocab.json is stale.
        pkl = _read_meta_pkl(path) if path.exists() else vocab
        if {k: pkl.get(k) for k in vocab} != vocab:
            raise DataError(f"{json_path} and {path} hold different vocabularies; prepare the dataset again, or "
                            f"delete the one that is stale")
        return vocab
    if not path.exists():
        return None
    return _read_meta_pkl(path)


def _read_meta_pkl(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is not a file; remove it (GPT-2 BPE) or prepare the dataset again")
    # nanoGPT's meta.pkl is a pickled dict of str and int, which unpickles without looking up any
    # class or function; a pickle that asks for one (how a pickle runs code) is refused.
    with open(path, "rb") as f:
        try:
            meta = _PlainDataUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - garbage bytes raise a dozen kinds (EOF, overflow, memory...)
            raise DataError(
                f"{path} is not a plain-data nanoGPT meta.pkl ({str(e) or type(e).__name__}); refusing to load it"
            ) from e
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise DataError(f"{path} is not a nanoGPT meta.pkl: expected a dict with vocab_size, stoi, itos; prepare it again")
    size, itos = meta["vocab_size"], meta.get("itos")
    if type(size) is not int or size < 1 or (isinstance(itos, dict) and len(itos) != size):
        chars = f" for the {len(itos)} characters of itos" if isinstance(itos, dict) else ""
        raise DataError(
            f"{path} has vocab_size={size!r}{chars}; it must be a positive integer, the number of characters; "
            "prepare it again"
        )
    return meta


def load_tokenizer(data_dir: str | os.PathLike) -> CharTokenizer | Gpt2Tokenizer:
    """Return the tokenizer of a prepared dataset: characters if it has meta.pkl, else GPT-2."""
    meta = _read_meta(data_dir)
    if meta is None:
        return Gpt2Tokenizer()
    path = Path(data_dir) / META_FILENAME
    if not isinstance(meta.get("stoi"), dict) or not isinstance(meta.get("itos"), dict):
        raise DataError(f"{path} has no stoi/itos dicts; expected nanoGPT's layout, prepare it again")
    try:
        return CharTokenizer(meta["stoi"], meta["itos"])
    except ValueError as e:
        raise DataError(f"{path}: {e}; prepare it again") from e


def dataset_vocab_size(data_dir: str | os.PathLike) -> int:
    """Return the vocabulary size of a prepared dataset: meta.pkl's vocab_size, else GPT-2's."""
    meta = _read_meta(data_dir)
    return GPT2_VOCAB_SIZE if meta is None else meta["vocab_size"]


# --- GPT-2 BPE in Hugging Face's files -------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (its encoder.py): printable Latin-1 bytes stand
    for themselves, the other 68 map to code points from 256 on, so no token has spaces or
    control characters in vocab.json."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_of(token: bytes, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: BPE over its bytes with only the merges ranked
    below it ends in exactly two parts."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"GPT-2 token {token!r} is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


def write_gpt2_hf_tokenizer(out_dir: str | os.PathLike, model_max_length: int) -> list[Path]:
    """Write vocab.json and merges.txt (GPT2Tokenizer's files) and their configs into out_dir,
    from the same hash-checked ranks tiktoken uses, so transformers tokenizes exactly as fastgpt."""
    out = Path(out_dir)
    ranks = tiktoken.load.load_tiktoken_bpe(str(gpt2_ranks_path()), expected_hash=GPT2_RANKS_SHA256)
    show = _byte_to_unicode()
    text = lambda token: "".join(show[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TOKEN] = GPT2_EOT_ID
    merges = [_merge_of(token, ranks) for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
                                             "add_prefix_space": False, **special}, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    for name, content in files.items():
        with fileio.atomic_writer(out / name, "w") as f:
            f.write(content)
    return [out / name for name in files]
