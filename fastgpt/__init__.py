"""fastgpt: a small, fast, readable GPT trainer."""

import importlib.machinery
import importlib.util
import pathlib
import sys


def _kernels_from_checkout() -> None:
    """Give the import name fastgpt_kernels to this checkout's kernels/ folder when nothing
    installed provides it. pyproject.toml maps the name onto the folder only when the project is
    installed, so a tree run from PYTHONPATH (a GPU image with its own torch) or an install made
    before the kernels took this name would otherwise fail on the first kernel import."""
    folder = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if importlib.util.find_spec("fastgpt_kernels") is not None or not folder.is_dir():
        return
    spec = importlib.machinery.ModuleSpec("fastgpt_kernels", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    sys.modules["fastgpt_kernels"] = importlib.util.module_from_spec(spec)


_kernels_from_checkout()
