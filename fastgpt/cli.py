"""The command-line parser every fastgpt command shares, so a mistake reads the same everywhere."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one `error:` line (exit 2) instead of the usage
    block, as every other bad input is; subcommand parsers inherit it (add_subparsers' default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")
