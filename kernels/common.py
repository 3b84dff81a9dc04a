"""What every kernel file shares: whether Triton can run here, launch sizing, input hygiene.

Kernels know nothing of fastgpt; fastgpt decides in one place whether to call them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import pathlib

import torch

# Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported) runs kernels with
# numpy: slow, but exact enough to test them on a machine without a GPU.
INTERPRET_ENV = "TRITON_INTERPRET"
# Widest row one program holds in registers: compiled for sm_90, the LayerNorm backward keeps x, dy,
# w and the dw/db sums of a row in registers without spilling up to this width, and spills to local
# memory at twice it (tests/kernels/test_compile_sm90.py checks both; scripts/compile_check.py
# prints the registers, bench/README.md the last figures). Wider rows need a looping kernel; until
# one exists they go to torch.
MAX_FUSED_BLOCK = 8192


def triton_installed() -> bool:
    """True if the triton package is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get(INTERPRET_ENV) == "1"


def triton_usable(device: torch.device | str) -> bool:
    """Kernels can run on `device`: CUDA with triton installed, or anywhere under the interpreter."""
    device = torch.device(device)
    return triton_installed() and (device.type == "cuda" or interpreting())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints; triton.cdiv also unwraps constexprs, which costs host time per launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Warps per program for a row of `block` elements: more warps for wider rows (the heuristic
    of Triton's layer-norm tutorial), between 4 and 16."""
    return min(max(block // 256, 4), 16)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where to launch a kernel on t: Triton launches on the current CUDA device and its stream,
    not the tensors' (cuda:1 tensors would be read by a launch on cuda:0)."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """A contiguous (rows, last dim) view. Kernels read raw pointers, so a strided view (such as
    the stride-0 gradient `.sum()` sends back) must be made dense first."""
    return x.contiguous().view(-1, x.shape[-1])


# Under the interpreter programs run one after another in Python: a few are enough to exercise
# how a kernel splits its rows between programs, and each extra one costs test time.
INTERPRET_PROGRAMS = 4


@functools.lru_cache(maxsize=None)
def kernels_source_tag(folder: pathlib.Path = pathlib.Path(__file__).parent) -> str:
    """A name for this version of the kernel files: a hash of every .py file in `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return "fastgpt-kernels-" + digest.hexdigest()[:16]


def tag_compile_caches() -> None:
    """Put kernels_source_tag() into torch.compile's cache keys (keeping any tag already set).

    torch's compile caches key a graph by the names of the ops in it, not by their code, so a
    graph compiled against an older version of these ops would be reused after an upgrade: a
    changed output arity fails obscurely, a changed meaning (say, a gradient no longer divided
    by n) would train wrongly without a word. The tag is process-wide (torch.compiler.config),
    so importing the kernels does not set it: call this right before torch.compile of anything
    that holds these ops, as the trainer's compile step does. Calling it again changes nothing."""
    tag, current = kernels_source_tag(), torch.compiler.config.cache_key_tag
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current}+{tag}" if current else tag
