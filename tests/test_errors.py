"""One base class for every fastgpt error (fastgpt/errors.py)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import fastgpt
from fastgpt.errors import FastgptError, FetchError, MissingPackageError
from fastgpt.stopping import NonFiniteLossError


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
