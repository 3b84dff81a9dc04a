"""Compile every Triton kernel for a CUDA GPU on a machine that has none, and read the machine code.

    python scripts/compile_check.py [--arch 90] [--widths 768,1600,4096,8192] [--only TEXT]

The launchers in kernels/ are called on small CPU tensors of the shapes and dtypes training uses,
with Triton pointed at a CUDA target instead of a driver: each launch compiles exactly the
specialisation it would compile on the GPU (same constexprs, num_warps, alignment and divisibility
of its arguments), down to a cubin through the ptxas that ships in Triton's wheel, and then
returns without running anything (the launchers' outputs are left uninitialised). The cubins are
read with the cuobjdump from the same wheel. One line per compiled kernel:

    registers per thread, shared memory, local memory (register spills), and the widest global
    load and store in the SASS (LDG.E.128 is a 16-byte vector access, what a memory-bound kernel
    wants on Hopper), and the number of LDL/STL (local-memory) instructions.

It proves that the kernels compile for the target and shows whether they spill; it measures no
speed (that needs the GPU: scripts/gpu_check.sh). Exit status 1 when a kernel fails to compile or
uses local memory (a register spill: every access goes through the L1/L2 instead of a register).

Tied to Triton's JIT internals (3.3-3.9): the compile happens in JITFunction._do_compile, which
this script wraps. If Triton moves it, the script says so instead of checking nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fastgpt  # noqa: E402,F401  (in a checkout not installed as it stands, names kernels/ fastgpt_kernels)
TOOLS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPT2_WIDTH, GPT2_VOCAB = 768, 50304


@dataclass
class Compiled:
    case: str  # what was launched, e.g. "layer_norm bf16 N=768 bias"
    kernel: str
    cubin: bytes | None = None
    error: str | None = None


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target and a device, launches nothing."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Wraps JITFunction._do_compile: compile for real, record the cubin, skip the launch."""

    def __init__(self, only: str = ""):
        self.only = only
        self.case = ""
        self.results: list[Compiled] = []
        if not hasattr(JITFunction, "_do_compile"):
            raise SystemExit(f"compile_check: triton {triton.__version__} has no JITFunction._do_compile; "
                             "this script needs updating for it")
        self._original = JITFunction._do_compile
        recorder = self

        def _do_compile(jit_fn, *args, **kwargs):
            entry = Compiled(recorder.case, jit_fn.fn.__name__)
            try:
                kernel = recorder._original(jit_fn, *args, **kwargs)
                entry.cubin = kernel.asm["cubin"]
            except Exception as exc:  # a compile error is the finding: record it, go on
                entry.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            recorder.results.append(entry)
            return None  # JITFunction.run returns without launching

        JITFunction._do_compile = _do_compile

    def launch(self, case: str, fn, *args, **kwargs) -> None:
        if self.only not in case:
            return
        self.case = case
        before = len(self.results)
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            # Launchers run on uninitialised outputs; a failure after the compile is harmless,
            # a failure before it means this case compiled nothing.
            if len(self.results) == before:
                self.results.append(Compiled(case, "(launcher)", error=f"{type(exc).__name__}: {exc}"))


def cases(recorder: Recorder, widths: list[int]) -> None:
    """Every launcher, at the shapes and dtypes training uses: GPT-2's and wider rows."""
    from fastgpt_kernels import adamw, cross_entropy, layernorm

    rows = 8
    for name, dtype in DTYPES.items():
        # Weights in the activations' dtype, and fp32 as training's autocast leaves them.
        weight_dtypes = {name: dtype, "fp32": torch.float32}
        for n, (w_name, w_dtype), has_bias in itertools.product(widths, weight_dtypes.items(), (True, False)):
            x = torch.randn(rows, n, dtype=dtype)
            w, bias = torch.ones(n, dtype=w_dtype), torch.zeros(n, dtype=w_dtype) if has_bias else None
            mean, rstd = torch.zeros(rows), torch.ones(rows)
            tag = f"{name} N={n}{' w=' + w_name if w_name != name else ''}{' bias' if has_bias else ''}"
            recorder.launch(f"layer_norm fwd {tag}", layernorm.layer_norm_forward, x, w, bias, 1e-5)
            recorder.launch(f"add_layer_norm fwd {tag}", layernorm.layer_norm_forward, x, w, bias, 1e-5,
                            branch=x.clone())
            recorder.launch(f"layer_norm bwd {tag}", layernorm.layer_norm_backward,
                            x, None, x, w, mean, rstd, has_bias)
            recorder.launch(f"add_layer_norm bwd {tag}", layernorm.layer_norm_backward,
                            x, x.clone(), x, w, mean, rstd, has_bias)

        for vocab in (GPT2_VOCAB, 50257, 65):
            logits = torch.randn(2, vocab, dtype=dtype)
            targets = torch.tensor([1, -1])
            for write_grad in (False, True):
                recorder.launch(f"cross_entropy {name} V={vocab}{' +grad' if write_grad else ''}",
                                cross_entropy.cross_entropy_rows, logits, targets, write_grad=write_grad)

        p = [torch.zeros(5000, dtype=dtype), torch.zeros(768, dtype=dtype)]
        g = [torch.zeros_like(t) for t in p]
        m = [torch.zeros(t.shape) for t in p]
        v = [torch.zeros(t.shape) for t in p]
        steps = [torch.ones(()) for _ in p]
        hyper = torch.tensor([1e-3, 0.9, 0.95, 1e-8, 0.1], dtype=torch.float64)
        recorder.launch(f"adamw {name}", _adamw_compile_only, adamw, p, g, m, v, steps, hyper)


def _adamw_compile_only(adamw, *args) -> None:
    """adamw_step_ refuses CPU tensors unless the interpreter is on (its check reads the variable
    at call time); the kernel was created without it, so this compiles the GPU kernel."""
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        adamw.adamw_step_(*args)
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_GLOBAL_ACCESS = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack, shared and local bytes, widest global load/store, local accesses."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([TOOLS / "cuobjdump", "--dump-resource-usage", "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    reg, stack, shared, local = map(int, _RESOURCE.search(sass).groups())
    widest = {"LDG": 0, "STG": 0}
    for op, modifiers in _GLOBAL_ACCESS.findall(sass):
        bits = [int(m) for m in re.findall(r"\.(?:U|S)?(\d+)", modifiers) if int(m) in (8, 16, 32, 64, 128)]
        widest[op] = max(widest[op], max(bits) if bits else 32)
    local_ops = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    return dict(reg=reg, stack=stack, shared=shared, local=local, ldg=widest["LDG"], stg=widest["STG"],
                local_ops=local_ops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    parser.add_argument("--widths", default=f"{GPT2_WIDTH},1600,4096,8192",
                        help="LayerNorm row widths to compile (comma-separated)")
    parser.add_argument("--only", default="", help="compile only the cases whose name contains this")
    args = parser.parse_args(argv)
    if not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists():
        print(f"compile_check: no ptxas/cuobjdump in {TOOLS}; this Triton wheel cannot compile for CUDA here")
        return 2
    widths = [int(w) for w in args.widths.split(",")]

    driver.set_active(CompileOnlyDriver(args.arch))
    recorder = Recorder(args.only)
    cases(recorder, widths)

    failed = spilled = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}; "
          "reg/thread, shared and local bytes, widest global load/store in bits, LDL+STL count")
    header = f"{'case':<42} {'kernel':<24} {'reg':>4} {'shared':>7} {'local':>6} {'ldg':>4} {'stg':>4} {'l/s':>4}"
    print(header)
    print("-" * len(header))
    # cuobjdump takes ~0.4 s a cubin: read them side by side.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        usage = list(pool.map(lambda c: None if c.error else inspect_cubin(c.cubin), recorder.results))
    for c, r in zip(recorder.results, usage):
        if c.error:
            failed += 1
            print(f"{c.case:<42} {c.kernel:<24} FAILED {c.error}")
            continue
        uses_local = r["local"] + r["stack"] > 0 or r["local_ops"] > 0
        spilled += uses_local
        flag = "  <- local memory" if uses_local else ""
        print(f"{c.case:<42} {c.kernel:<24} {r['reg']:>4} {r['shared']:>7} {r['local'] + r['stack']:>6} "
              f"{r['ldg']:>4} {r['stg']:>4} {r['local_ops']:>4}{flag}")
    print(f"{len(recorder.results)} kernels compiled for sm_{args.arch}: {failed} failed, {spilled} use local memory")
    if not recorder.results:
        print("compile_check: nothing was compiled; the launch hook did not fire")
        return 1
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
