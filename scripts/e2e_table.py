"""The end-to-end table of scripts/gpu_check.sh: each training run's steady speed, read off its log.

    python scripts/e2e_table.py GPU_CHECK.log [--markdown E2E.md] [--measurements OUT.json --gpu NAME]

gpu_check.sh brackets each run in its log between
    === e2e run NAME | SHAPE | TOKENS_PER_ITER | WHAT
    === e2e end NAME rc=STATUS
and this script reads every run between such lines: the log lines of fastgpt's trainer
(`iter N: loss L, lr R, T ms/iter, S tok/s, mfu M%, ...`), of bench/reference_train.py
(`iter N: loss L, T ms/iter, S tok/s`) and of nanoGPT's train.py (`iter N: loss L, time Tms,
...`, one iteration a line; its MFU is against an A100 whatever the GPU, so it is not read). The steady time per iteration is the median over the log windows
from iteration STEADY_FROM on (the first windows hold torch.compile), and tokens/s follow from
it. Each row is compared with the reference trainer (compiled) at the same shape.

--measurements writes what fastgpt.ops's kernels='auto' reads for this GPU class
(fastgpt/kernel_measurements.json): the all-torch step and each op's Triton kernel alone, from the
runs named torch-A, layer_norm-A, head_loss-A and optimizer-A (an op whose run did not finish is
left out, and 'auto' keeps it in torch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from dataclasses import dataclass, field

STEADY_FROM = 10  # iterations: compile and warm-up end well before
RUN = re.compile(r"^=== e2e run (\S+) \| (.*?) \| (\d+) \| (.*)$")
END = re.compile(r"^=== e2e end (\S+) rc=(\d+)")
ITER = re.compile(r"^iter (\d+):.*?([\d.]+) ms/iter, ([\d,]+) tok/s(?:, mfu ([\d.]+)%)?")
# nanoGPT's MFU is against an A100's peak whatever the GPU, so only its time is read.
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
PEAK = re.compile(r"peak memory ([\d,.]+) MiB")
VAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
REFERENCE = "reference"  # the run name prefix of the baseline every row is compared with
# Runs whose tokens/s kernels='auto' is decided by: all torch, then one op at a time in Triton.
MEASURED_RUNS = {"torch": "torch-A", "layer_norm=triton": "layer_norm-A", "head_loss=triton": "head_loss-A",
                 "optimizer=triton": "optimizer-A"}


@dataclass
class Run:
    name: str
    shape: str
    tokens_per_iter: int
    what: str
    ms: list[float] = field(default_factory=list)
    mfu: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    val_loss: tuple[int, float] | None = None  # (iteration, loss) of the last evaluation
    rc: int | None = None  # None: the log ends inside this run (cut off by a cap)

    @property
    def steady_ms(self) -> float | None:
        return statistics.median(self.ms) if self.ms else None

    @property
    def tokens_per_s(self) -> float | None:
        ms = self.steady_ms
        return self.tokens_per_iter / ms * 1e3 if ms else None


def read_runs(lines) -> list[Run]:
    runs, current = [], None
    for line in lines:
        line = line.rstrip("\n")
        if m := RUN.match(line):
            current = Run(m[1], m[2], int(m[3]), m[4])
            runs.append(current)
        elif m := END.match(line):
            if current is not None and current.name == m[1]:
                current.rc = int(m[2])
            current = None
        elif current is None:
            continue
        elif m := ITER.match(line):
            if int(m[1]) >= STEADY_FROM:
                current.ms.append(float(m[2]))
                if m[4]:
                    current.mfu.append(float(m[4]))
        elif m := NANOGPT_ITER.match(line):
            if int(m[1]) >= STEADY_FROM:
                current.ms.append(float(m[2]))
        elif m := VAL.match(line):
            current.val_loss = (int(m[1]), float(m[3]))
        if current is not None and (m := PEAK.search(line)):
            current.peak_mib = float(m[1].replace(",", ""))
    return runs


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(runs: list[Run]) -> str:
    """One row per run, in the order they ran, each against the reference at its shape."""
    base = {r.shape: r.tokens_per_s for r in runs if r.name.startswith(REFERENCE) and r.tokens_per_s}
    lines = ["| run | shape | what | ms/iter | tokens/s | vs reference (compiled) | MFU | peak MiB | val loss | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        tok = r.tokens_per_s
        ratio = tok / base[r.shape] if tok and base.get(r.shape) else None
        mfu = statistics.median(r.mfu) if r.mfu else None
        val = f"{r.val_loss[1]:.4f} @ {r.val_loss[0]}" if r.val_loss else "-"
        status = "cut off" if r.rc is None else ("ok" if r.rc == 0 else f"exit {r.rc}")
        lines.append(f"| {r.name} | {r.shape} | {r.what} | {_fmt(r.steady_ms, '.1f')} | {_fmt(tok, ',.0f')} | "
                     f"{_fmt(ratio, '.3f')}{'x' if ratio else ''} | {_fmt(mfu, '.1f')}{'%' if mfu else ''} | "
                     f"{_fmt(r.peak_mib, ',.0f')} | {val} | {status} |")
    return "\n".join(lines)


def measurement(runs: list[Run], source: str) -> dict | None:
    """The kernel_measurements.json entry for this GPU: the all-torch step and each op whose
    Triton run finished (an op left out stays torch under 'auto'); None without the all-torch run."""
    by_name = {r.name: r for r in runs if r.rc == 0 and r.tokens_per_s}
    rates = {key: by_name[name].tokens_per_s for key, name in MEASURED_RUNS.items() if name in by_name}
    if "torch" not in rates or len(rates) < 2:
        return None
    step = by_name[MEASURED_RUNS["torch"]]
    return {"source": source, "step": f"GPT-2 124M, {step.shape}, bf16, torch.compile; steady tokens/s",
            "tokens_per_s": {key: round(rate) for key, rate in rates.items()}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("log", help="gpu_check.sh's log")
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--measurements", help="write this GPU's kernel_measurements.json entry here")
    parser.add_argument("--gpu", help="the GPU's name (torch.cuda.get_device_name), for --measurements")
    parser.add_argument("--commit", default="", help="the commit measured, for --measurements")
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as f:
        runs = read_runs(f)
    table = markdown(runs)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.measurements:
        from fastgpt.hardware import gpu_class  # imports torch: only here

        day = datetime.date.today().isoformat()
        entry = measurement(runs, f"scripts/gpu_check.sh e2e on {args.gpu}, {day}, commit {args.commit}")
        cls = gpu_class(args.gpu or "")
        if entry is None or cls is None:
            print(f"no measurement written: {'a run it needs did not finish' if entry is None else f'unknown GPU {args.gpu!r}'}")
        else:
            with open(args.measurements, "w") as f:
                json.dump({cls: entry}, f, indent=1)
            print(f"wrote {args.measurements} for {cls}: {entry['tokens_per_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
