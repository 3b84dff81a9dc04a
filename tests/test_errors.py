"""One base class for every fastgpt error, one table of exit statuses, one wrapper that applies
them to every command (fastgpt/errors.py, fastgpt/cli.py)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest

import fastgpt
from fastgpt import cli
from fastgpt.errors import USER_ERRORS, DataError, ExitStatus, FastgptError, FetchError, MissingPackageError
from fastgpt.stopping import NonFiniteLossError

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("train", "sample", "prepare", "export", "plot")  # python -m fastgpt.<command>


def fastgpt_modules() -> list:
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(fastgpt.__path__, "fastgpt.")]


def test_every_error_class_in_fastgpt_is_a_fastgpt_error():
    classes = {f"{c.__module__}.{c.__qualname__}": c for module in fastgpt_modules()
               for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == module.__name__}
    assert len(classes) >= 15, sorted(classes)  # the walk found them: twelve modules' own, plus errors.py's
    assert sorted(name for name, c in classes.items() if not issubclass(c, FastgptError)) == []


def test_errors_stay_catchable_as_what_they_were():
    """`except ValueError` and `pytest.raises(RuntimeError | ImportError)` keep working."""
    assert issubclass(FastgptError, ValueError)
    assert issubclass(NonFiniteLossError, RuntimeError) and issubclass(FetchError, RuntimeError)
    assert MissingPackageError("x", name="datasets").name == "datasets"


def test_the_exit_table():
    assert {s.name: int(s) for s in ExitStatus} == {"OK": 0, "CRASH": 1, "BAD_INPUT": 2, "DIVERGED": 3}
    assert FastgptError.exit_status == DataError.exit_status == ExitStatus.BAD_INPUT
    assert NonFiniteLossError.exit_status == ExitStatus.DIVERGED


def test_the_readme_lists_the_same_exit_statuses():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"^ *\| status \| meaning \|\n *\| --- \| --- \|\n((?: *\|.*\n)+)", readme, re.M)
    assert table, "README.md has no '| status | meaning |' table"
    assert [int(row.split("|")[1]) for row in table[1].splitlines()] == [int(s) for s in ExitStatus]


# --- run_command, on bodies that fail in each way


def run(body, argv, capsys) -> tuple[int, str]:
    code = cli.run_command(body, argv)
    captured = capsys.readouterr()
    return code, captured.err


def raising(error: BaseException):
    def body(argv):
        raise error
    return body


@pytest.mark.parametrize("error, status", [
    (DataError("data file x.bin not found"), ExitStatus.BAD_INPUT),
    (FileNotFoundError(2, "No such file or directory", "x.txt"), ExitStatus.BAD_INPUT),
    (NonFiniteLossError("the loss was NaN at iteration 3"), ExitStatus.DIVERGED),
])
def test_an_error_is_one_line_and_the_table_s_status(error, status, capsys):
    code, err = run(raising(error), [], capsys)
    assert code == status and err == f"error: {error}\n"


def test_debug_anywhere_shows_the_traceback_and_reaches_no_body(capsys):
    seen = []
    assert cli.run_command(seen.append, ["a", "--debug", "b"]) == ExitStatus.OK and seen == [["a", "b"]]
    with pytest.raises(DataError, match="bad"):
        cli.run_command(raising(DataError("bad")), ["--debug"])
    assert capsys.readouterr().err == ""


def test_other_errors_are_crashes_with_their_traceback():
    assert not isinstance(KeyError("x"), USER_ERRORS)
    with pytest.raises(KeyError):
        cli.run_command(raising(KeyError("x")), [])


def test_a_body_s_own_status_passes_through():
    assert cli.run_command(lambda argv: ExitStatus.BAD_INPUT, []) == ExitStatus.BAD_INPUT


def test_the_parser_exits_bad_input_and_lists_debug(capsys):
    parser = cli.OneLineParser(prog="p")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--nope"])
    assert exit_.value.code == ExitStatus.BAD_INPUT
    assert "--debug" in parser.format_help() and cli.DEBUG_HELP in parser.format_help()


# --- the commands use them, and nothing else


def function(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_through_the_one_wrapper(command):
    tree = ast.parse((ROOT / "fastgpt" / f"{command}.py").read_text())
    calls = {n.func.id for n in ast.walk(function(tree, "main"))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "run_command" in calls
    statuses = [n.value.value for n in ast.walk(tree) if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant)
                and isinstance(n.value.value, int)]
    assert statuses == [], "a command returns a status of its own instead of one from ExitStatus"


def test_only_the_wrapper_prints_error_lines():
    printers = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "fastgpt").rglob("*.py"))
                if '"error: ' in p.read_text()]
    assert printers == ["fastgpt/cli.py"]
