"""What every fastgpt command shares on the command line: the parser, and the wrapper that turns
an error into one `error:` line and the exit status of `fastgpt.errors.ExitStatus`, so a mistake
reads, and exits, the same everywhere."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

from fastgpt.errors import USER_ERRORS, ExitStatus, exit_status

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the traceback behind an error message"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one `error:` line (exit 2) instead of the usage
    block, as every other bad input is, and --debug in its --help (run_command reads it);
    subcommand parsers inherit both (add_subparsers' default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: run_command takes the flag off the command line, so no namespace holds it.
        self.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)

    def error(self, message: str) -> NoReturn:
        self.exit(ExitStatus.BAD_INPUT, f"error: {message}; see {self.prog} --help\n")


def run_command(body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's `body` on `argv` (default: sys.argv[1:]) less --debug; return its status,
    OK when it returns None. An error of USER_ERRORS is printed as one `error:` line on stderr and
    exits with the status fastgpt.errors gives it, or with --debug anywhere in argv propagates
    with its traceback; any other exception propagates (a crash: Python prints it, status 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    try:
        status = body([a for a in argv if a != DEBUG_FLAG])
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return exit_status(e)
    return ExitStatus.OK if status is None else status
