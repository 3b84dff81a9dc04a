"""Loaded before tests/ and bench/ conftests: a Python without the project's dependencies gets one
line saying how to install them, not an ImportError traceback from a conftest."""

from __future__ import annotations

import importlib.util
import sys

# Looked up, not imported: triton must not be imported before tests/conftest.py picks its interpreter.
missing = [name for name in ("numpy", "torch", "triton", "pytest_benchmark") if importlib.util.find_spec(name) is None]
if missing:
    # SystemExit, not pytest.exit: pytest wraps any Exception a conftest raises in a traceback.
    raise SystemExit(f"error: {sys.executable} lacks the test dependencies {', '.join(missing)}; install them with "
                     "`pip install -e '.[dev]'` in this Python, or run the Python they are installed in")
