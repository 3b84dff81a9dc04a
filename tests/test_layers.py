"""The import rules of ARCHITECTURE.md, read from its layer table and checked on the source."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# import name -> its folder: the kernels live in kernels/ and are imported as fastgpt_kernels
# (ARCHITECTURE.md says why)
FOLDERS = {"fastgpt": "fastgpt", "fastgpt_kernels": "kernels"}
PACKAGES = tuple(FOLDERS)
IMPORT_NAMES = {folder: name for name, folder in FOLDERS.items()}


def unit(module: str) -> str | None:
    """The table's name for a dotted module: `kernels` for all of kernels/, `corpora` for its
    package, else the module under fastgpt (None for fastgpt itself)."""
    parts = module.split(".")
    if parts[0] == "fastgpt_kernels":
        return "kernels"
    if len(parts) == 1:
        return None
    return parts[1]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every fastgpt or kernels module the file imports, at any depth of the file (imports
    inside functions count: they are the ones that hide a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                folder, *rest = path.relative_to(ROOT).parent.parts
                package = (IMPORT_NAMES.get(folder, folder), *rest)
                base = ".".join(package[: len(package) - node.level + 1])
                names = [f"{base}.{node.module}" if node.module else base]
            else:
                names = [node.module]
            if names[0] in PACKAGES:  # `from fastgpt import data` names a module
                names += [f"{names[0]}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def module_name(path: pathlib.Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    return ".".join((IMPORT_NAMES.get(folder, folder), *rest)).removesuffix(".__init__")


def source_files() -> list[pathlib.Path]:
    return sorted(p for folder in FOLDERS.values() for p in (ROOT / folder).rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports."""
    graph: dict[str, set[str]] = {}
    for path in source_files():
        name = unit(module_name(path))
        if name is None:
            continue
        deps = {unit(m) for m in imported_modules(path)} - {None, name}
        graph.setdefault(name, set()).update(deps)
    return graph


def layer_table() -> dict[str, tuple[int, str]]:
    """unit -> (layer, group), from the ```layers block of ARCHITECTURE.md."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = re.search(r"^```layers\n(.*?)^```", text, re.M | re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    table = {}
    for line in block[1].splitlines():
        layer, group, *units = line.split()
        for name in units:
            assert name not in table, f"{name} is in two rows of the layer table"
            table[name] = (int(layer), group)
    return table


def allowed(importer: tuple[int, str], imported: tuple[int, str]) -> bool:
    (layer, group), (other_layer, other_group) = importer, imported
    if other_layer < layer:
        return True
    return other_layer == layer and other_group == group and group != "commands"


def test_every_module_is_placed_in_the_table():
    table, graph = layer_table(), import_graph()
    assert sorted(set(graph) - set(table)) == [], "modules missing from ARCHITECTURE.md's layer table"
    assert sorted(set(table) - set(graph)) == [], "the layer table names modules that do not exist"


def test_the_readme_draws_the_same_layers():
    """README's Layout block names each unit on its layer's line."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Layout\n\n```\n(.*?)^```", readme, re.M | re.S)
    assert block, "README.md's Layout section has no drawing"
    drawn = {}
    for line in block[1].splitlines():
        layer, *words = line.split()
        for word in words:
            drawn.setdefault(word.rstrip("/"), int(layer))
    table = layer_table()
    assert {name: drawn.get(name) for name in table} == {name: layer for name, (layer, _) in table.items()}


def test_imports_point_down_the_layers():
    table = layer_table()
    broken = [f"{a} ({table[a][1]}) imports {b} ({table[b][1]})"
              for a, deps in import_graph().items() for b in sorted(deps)
              if not allowed(table[a], table[b])]
    assert broken == []


def test_no_import_cycle():
    graph, done, path = import_graph(), set(), []

    def visit(name):
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_kernels_import_nothing_of_fastgpt():
    offenders = {module_name(p): sorted(m for m in imported_modules(p) if m.split(".")[0] != "fastgpt_kernels")
                 for p in (ROOT / "kernels").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_nothing_imports_the_kernels_folder_by_its_own_name():
    """`kernels` is Hugging Face's import name (transformers 5 depends on it): our folder is
    imported as fastgpt_kernels everywhere, and holds no __init__.py that would let `import
    kernels` from the repository root reach it instead of theirs."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if path.relative_to(ROOT).parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n and n.split(".")[0] == "kernels"]
    assert offenders == []


# Imports every module named on its command line into a fresh interpreter, after torch, numpy and
# triton (whose own exit hooks are not ours to count), and reports what changed process-wide:
# torch.compile's cache-key tag, the atexit handlers, and the C libraries loaded through ctypes
# (glibc's mallopt, fastgpt.runtime.keep_freed_memory, is reached that way). Then it calls the
# trainer's tag_compile_caches, which must set the tag.
IMPORT_EFFECTS = r"""
import atexit, ctypes, importlib, json, sys
import numpy, torch
try:
    import triton
except ImportError:
    pass
registered, libraries = [], []
real_register, real_cdll = atexit.register, ctypes.CDLL
atexit.register = lambda fn, *a, **k: (registered.append(getattr(fn, "__qualname__", repr(fn))), real_register(fn, *a, **k))[1]
class Recorded(real_cdll):
    def __init__(self, name, *args, **kwargs):
        libraries.append(str(name))
        super().__init__(name, *args, **kwargs)
ctypes.CDLL = Recorded
tag, hooks = torch.compiler.config.cache_key_tag, atexit._ncallbacks()
for name in sys.argv[1:]:
    importlib.import_module(name)
after_import = dict(tag_changed=torch.compiler.config.cache_key_tag != tag, new_hooks=atexit._ncallbacks() - hooks,
                    registered=registered, libraries=libraries)
from fastgpt.ops import tag_compile_caches
from fastgpt_kernels.common import kernels_source_tag
tag_compile_caches()
print(json.dumps(dict(after_import=after_import, tagged=torch.compiler.config.cache_key_tag == kernels_source_tag())))
"""


def test_importing_any_module_changes_no_process_wide_state():
    """Importing fastgpt or its kernels registers torch ops and nothing else: the compile-cache tag,
    the exit hooks and the allocator setting are left to the commands that call for them, since
    they hold for the whole process (a notebook, a test session, another trainer importing us)."""
    modules = [module_name(p) for p in source_files()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: importing triton needs it without a GPU
    proc = subprocess.run([sys.executable, "-c", IMPORT_EFFECTS, *modules], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["after_import"] == dict(tag_changed=False, new_hooks=0, registered=[], libraries=[])
    assert report["tagged"], "tag_compile_caches() did not put the kernels' source hash in the cache key"


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_data_reaches_no_command_line_module():
    """Reading batches pulls in neither a command nor the argument parser, even indirectly."""
    table, graph = layer_table(), import_graph()
    cli_side = {name for name, (_, group) in table.items() if group in ("commands", "cli")}
    for reader in ("data", "tokenizer", "tokenfiles"):
        assert closure(graph, reader) & cli_side == set(), reader


@pytest.mark.parametrize("name", ["reference.py", "reference_train.py"])
def test_the_bench_reference_is_independent(name):
    assert imported_modules(ROOT / "bench" / name) == set()


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules can fail: a base module importing the model, or kernels importing fastgpt."""
    table = layer_table()
    assert not allowed(table["hardware"], table["model"])
    assert not allowed(table["data"], table["model"])  # side by side in layer 2
    assert not allowed(table["sample"], table["train"])
    assert allowed(table["train"], table["cli"]) and allowed(table["ops"], table["kernels"])
    bad = tmp_path / "kernels" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from fastgpt.model import GPT\nfrom . import common\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported_modules(bad) == {"fastgpt.model", "fastgpt_kernels", "fastgpt_kernels.common"}
