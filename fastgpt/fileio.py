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
import shutil
from pathlib import Path
from typing import IO, Iterator

from fastgpt.errors import FastgptError

# Environment variable that overrides the cache location (e.g. a shared disk on a cluster).
CACHE_DIR_ENV = "FASTGPT_CACHE_DIR"
# The XDG base-directory spec's variable for per-user caches; ~/.cache is its documented default.
XDG_CACHE_ENV = "XDG_CACHE_HOME"
DEFAULT_XDG_CACHE = Path("~/.cache")
# Read files in pieces of this size when hashing, so a large file is never held whole.
HASH_BLOCK_BYTES = 1 << 20
# Permissions requested for new files before the umask applies (the usual rw-rw-rw-).
TEMP_FILE_MODE = 0o666
# torch.save reports a failed write (disk full, file too large) as a RuntimeError from its zip
# writer, e.g. "[enforce fail at inline_container.cc:672] . unexpected pos ...", not an OSError.
TORCH_WRITER_MARKERS = ("inline_container", "file write failed")
DEFAULT_WRITE_HINT = "free some space there or write to another disk"


class WriteError(FastgptError, OSError):
    """A file could not be written (disk full, over a size limit, an I/O error); the message names
    the file, the free space and what to do. Also an OSError, which it is in all but name."""


def is_write_failure(error: BaseException) -> bool:
    """Whether an exception raised while writing a file means the write itself failed."""
    if isinstance(error, OSError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in TORCH_WRITER_MARKERS)


def write_error(path: str | os.PathLike, error: BaseException, hint: str = DEFAULT_WRITE_HINT) -> WriteError:
    """One line for a failed write of `path`: the file, the cause, the free bytes on its filesystem
    and `hint`, what to do."""
    path = Path(path)
    cause = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0].strip()
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    return WriteError(f"cannot write {path} ({cause}; {free}); {hint}")


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
def atomic_writer(path: str | os.PathLike, mode: str = "wb", hint: str = DEFAULT_WRITE_HINT) -> Iterator[IO]:
    """Open a temporary file next to `path`; on clean exit make it `path` in one step.

    The temporary file lives in the same folder so that `os.replace` is a rename within one
    filesystem, which POSIX guarantees atomic. The data is fsynced before the rename (without
    that, a power loss can leave the new name pointing at an empty file) and the folder after
    it (without that, the rename itself may not survive one). On an exception the
    temporary file is removed and `path` is left untouched; a failed write (disk full, ...) is
    raised as a WriteError naming `path` and saying `hint`, what to do.
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
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if is_write_failure(e) and not isinstance(e, WriteError):
            raise write_error(path, e, hint) from e
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
