"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU, and none spills.

scripts/compile_check.py runs the launchers with Triton pointed at a CUDA target: the same
specialisations the GPU would compile, through the ptxas and cuobjdump in Triton's wheel. It runs
in a subprocess because this session's triton was imported under the interpreter.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compile_check.py"
TOOLS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists(),
                                reason="this triton wheel carries no ptxas/cuobjdump")

# LayerNorm: 2 widths x 4 launches x 2 bias settings x 5 (activation, weight) dtype pairs: fp32
# weights with fp32, bf16 and fp16 activations, and bf16 and fp16 weights with their own.
# Cross-entropy: 3 dtypes x 3 vocabularies x with and without the gradient. AdamW: 3 dtypes.
EXPECTED_KERNELS = 2 * 4 * 2 * 5 + 3 * 3 * 2 + 3


def compile_check(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """Run the script (after `prelude`, Python run first in the same process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import runpy, sys; sys.path.insert(0, {str(ROOT)!r}); {prelude}\n"
            f"sys.argv = ['compile_check.py', *{list(args)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_every_kernel_compiles_for_sm90_without_spilling():
    result = compile_check("--arch", "90", "--widths", "768,8192")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{EXPECTED_KERNELS} kernels compiled for sm_90: 0 failed, 0 use local memory" in result.stdout
    lines = [line for line in result.stdout.splitlines() if "_kernel" in line]
    assert len(lines) == EXPECTED_KERNELS
    # Full chunks of GPT-2's padded vocabulary and of AdamW's params move 16 bytes per access.
    for line in lines:
        if line.startswith(("cross_entropy bf16 V=50304 +grad", "adamw")):
            assert line.split()[-3:-1] == ["128", "128"], line


def test_a_row_too_wide_for_registers_is_reported():
    # Lift the launcher's width limit: the backward at 16384 spills, and the script must say so.
    result = compile_check("--only", "layer_norm bwd bf16 N=16384 bias", "--widths", "16384",
                           prelude="import fastgpt, fastgpt_kernels.layernorm as ln; ln.MAX_FUSED_BLOCK = 1 << 16")
    assert result.returncode == 1, result.stdout + result.stderr
    flagged = [line for line in result.stdout.splitlines() if line.endswith("<- local memory")]
    assert flagged and all("bwd bf16 N=16384 bias" in line for line in flagged), result.stdout
    assert f"0 failed, {len(flagged)} use local memory" in result.stdout
