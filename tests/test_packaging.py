"""What the project installs, and next to what: import names that are ours alone, Hugging Face's
`kernels` (a dependency of transformers 5) reachable beside fastgpt, and CI running the README's
own test command in an environment of its own."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def our_top_level_names() -> set[str]:
    """The top-level import names pyproject.toml installs."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package.split(".")[0] for package in config["packages"]}


def top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    """The top-level modules and packages a distribution installs: its top_level.txt where it has
    one, else the first part of every importable file it records."""
    listed = dist.read_text("top_level.txt")
    if listed:
        return {line.strip() for line in listed.splitlines() if line.strip()}
    names = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first.endswith((".dist-info", ".egg-info", ".data")) or first in ("..", "__pycache__"):
            continue
        if len(file.parts) > 1 or file.suffix in (".py", ".so", ".pyd"):
            names.add(first.split(".")[0] if len(file.parts) == 1 else first)
    return names


def clashes(names: set[str]) -> dict[str, list[str]]:
    """Installed distributions other than fastgpt that also provide one of `names`."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or "?"
        if name.lower() != "fastgpt" and (shared := top_level_names(dist) & names):
            found[name] = sorted(shared)
    return found


def test_no_other_installed_distribution_provides_our_names():
    """A top-level name two distributions install is whichever sys.path finds first: a broken
    transformers or a broken fastgpt."""
    ours = our_top_level_names()
    assert ours == {"fastgpt", "fastgpt_kernels"}
    assert clashes(ours) == {}, "installed distributions that also provide our import names"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
def test_the_check_catches_the_name_we_had():
    """Our kernels installed as `kernels` until transformers 5 brought Hugging Face's."""
    assert "kernels" in clashes({"kernels"}).get("kernels", [])


def test_the_wheel_holds_no_top_level_name_but_ours(tmp_path):
    """`pip wheel .` (built from a copy, so the checkout gains no build/ or egg-info)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("fastgpt", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist")]
    if importlib.util.find_spec("setuptools"):
        cmd.append("--no-build-isolation")  # the environment's own setuptools: no download
    proc = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fastgpt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastgpt", "fastgpt_kernels"}
    assert "fastgpt_kernels/head_loss.py" in names and "fastgpt/kernel_measurements.json" in names


SIDE_BY_SIDE = """
import pathlib, sys, tempfile
import torch
import fastgpt.ops, fastgpt.train, fastgpt_kernels.head_loss
import kernels
from transformers import GPT2Config, GPT2LMHeadModel
root = pathlib.Path(sys.argv[1])
assert not pathlib.Path(kernels.__file__).is_relative_to(root), kernels.__file__
with tempfile.TemporaryDirectory() as folder:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=96, n_positions=16)).save_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder)  # where transformers imports `kernels`
print(tuple(model(torch.tensor([[1, 2, 3]])).logits.shape), kernels.__file__)
"""


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None or importlib.util.find_spec("transformers") is None,
                    reason="needs transformers 5 and Hugging Face's kernels (pip install -e '.[dev]')")
@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_gpt2_loads_and_runs_next_to_fastgpt(where, tmp_path):
    """Run as users run: `python -c` from the checkout (its folder first on sys.path, as
    `python -m` puts it) and from elsewhere."""
    cwd = ROOT if where == "repository root" else tmp_path
    proc = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE, str(ROOT)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("(1, 3, 96)")


FROM_CHECKOUT = """
import importlib.util, sys
# As on a GPU image running this tree from PYTHONPATH: no install maps fastgpt_kernels.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path[:] = [sys.argv[1]] + [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
if importlib.util.find_spec("fastgpt_kernels") is not None:
    print("installed")  # a non-editable install provides the name: nothing to show
else:
    import fastgpt.ops, fastgpt_kernels.head_loss
    print(fastgpt_kernels.head_loss.__file__)
"""


def test_a_checkout_not_installed_finds_its_kernels(tmp_path):
    """pyproject.toml maps fastgpt_kernels onto kernels/ only at install time; importing fastgpt
    from a checkout gives the folder the name when nothing installed does."""
    proc = subprocess.run([sys.executable, "-c", FROM_CHECKOUT, str(ROOT)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.strip() == "installed":
        pytest.skip("fastgpt_kernels is installed as files, not mapped onto this checkout")
    assert pathlib.Path(proc.stdout.strip()) == ROOT / "kernels" / "head_loss.py"


def test_pytest_in_a_python_without_the_dependencies_says_how_to_install_them(tmp_path):
    """The root conftest.py stops collection with one line before tests/conftest.py fails on
    `import torch` with a traceback. The Python here sees this one's packages but torch."""
    site_packages = pathlib.Path(pytest.__file__).parent.parent
    for entry in site_packages.iterdir():
        if not entry.name.startswith("torch"):
            (tmp_path / entry.name).symlink_to(entry)
    proc = subprocess.run([sys.executable, "-S", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests",
                           "bench"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == [f"error: {sys.executable} lacks the test dependencies torch; install them with `pip install -e "
                     "'.[dev]'` in this Python, or run the Python they are installed in"], lines[-20:]


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme.split("## Quickstart", 1)[1], re.S)
    return commands[1].strip()


def test_ci_runs_the_readme_test_command_in_a_new_environment():
    """.ci/run makes a virtual environment outside the checkout on every run and runs the
    README's second quickstart command in it, as written."""
    command = readme_test_command()
    assert command == "pip install -e '.[dev]' && python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    # the command as written, at the start of a line (what follows it only keeps its status)
    assert any(line == command or line.startswith(command + " ||") for line in ci.splitlines())
    assert "python3 -m venv" in ci and "mktemp -d" in ci
