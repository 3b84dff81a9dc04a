"""Files written whole or not at all, and fastgpt's cache folder.

Every file fastgpt writes that a later run trusts (checkpoints, run records, token files, the
cache's downloads) goes through `atomic_writer`: a crash or Ctrl-C mid-write leaves the previous
file (or none), never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator

# Environment variable that overrides the cache location (e.g. a shared disk on a cluster).
CACHE_DIR_ENV = "FASTGPT_CACHE_DIR"
# The XDG base-directory spec's variable for per-user caches; ~/.cache is its documented default.
XDG_CACHE_ENV = "XDG_CACHE_HOME"
DEFAULT_XDG_CACHE = Path("~/.cache")
# Read files in pieces of this size when hashing, so a large file is never held whole.
HASH_BLOCK_BYTES = 1 << 20
# Permissions requested for new files before the umask applies (the usual rw-rw-rw-).
TEMP_FILE_MODE = 0o666


def cache_dir() -> Path:
    """Return fastgpt's cache folder, creating it if needed.

    `$FASTGPT_CACHE_DIR` if set, else `$XDG_CACHE_HOME/fastgpt`, else `~/.cache/fastgpt`.
    An empty variable counts as unset, as the XDG spec asks.
    """
    if os.environ.get(CACHE_DIR_ENV):
        path = Path(os.environ[CACHE_DIR_ENV]).expanduser()
    else:
        xdg = os.environ.get(XDG_CACHE_ENV) or DEFAULT_XDG_CACHE
        path = Path(xdg).expanduser() / "fastgpt"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to `path`; on clean exit make it `path` in one step.

    The temporary file lives in the same folder so that `os.replace` is a rename within one
    filesystem, which POSIX guarantees atomic. The data is fsynced before the rename (without
    that, a power loss can leave the new name pointing at an empty file) and the folder after
    it (without that, the rename itself may not survive one). On an exception the
    temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # os.open with 0o666 lets the umask decide the final permissions, as for any new file;
    # tempfile.mkstemp would leave every output readable by its owner only.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, TEMP_FILE_MODE)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or link in `folder` durable: until the folder itself is fsynced, a power
    loss can bring back the old name (POSIX leaves it to the filesystem)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (FUSE, network mounts) cannot fsync a folder at all
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in bounded blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()
