"""Runs fastgpt.train with a SIGKILL planted at one point of the run (not a test file itself).

    python tests/fault_harness.py POINT N -- [--key=value ...]
    torchrun --nproc_per_node=2 tests/fault_harness.py POINT N -- [--key=value ...]

POINT is where this process kills itself, once per run folder (a marker file there makes a
restarted job run clean):
  none           no fault: the uninterrupted reference run
  step           after the N-th optimizer step of this process, once no checkpoint is being written
  mid_write      halfway through writing the N-th checkpoint's bytes
  before_rename  the N-th checkpoint written and fsynced, not yet renamed to ckpt.pt
  after_rename   the N-th checkpoint renamed to ckpt.pt, before its numbered copy is linked
Under torchrun only rank 1 kills itself, as a node lost mid-job would.
"""

import io
import os
import pathlib
import signal
import sys

import torch

from fastgpt import train

MARKER = ".fault-injected"


def out_dir(argv: list[str]) -> pathlib.Path:
    return pathlib.Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out_dir=")).strip("'\""))


def plant(point: str, n: int, marker: pathlib.Path) -> None:
    count = [0]

    def die() -> None:
        marker.write_text(point)
        os.kill(os.getpid(), signal.SIGKILL)

    def nth() -> bool:
        count[0] += 1
        return count[0] == n

    if point == "step":
        step, init, savers = train.clip_and_step, train.ckpt_io.Saver.__init__, []

        def recording_init(saver, *args, **kwargs):
            init(saver, *args, **kwargs)
            savers.append(saver)

        def killing_step(*args, **kwargs):
            taken = step(*args, **kwargs)
            if nth():
                for saver in savers:  # between checkpoints: a background write in flight lands first
                    saver.wait()
                die()
            return taken

        train.clip_and_step, train.ckpt_io.Saver.__init__ = killing_step, recording_init
    elif point == "mid_write":
        save = torch.save

        def half_save(obj, f, *args, **kwargs):
            if not (hasattr(f, "write") and nth()):
                return save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        torch.save = half_save
    elif point in ("before_rename", "after_rename"):
        replace, link = os.replace, os.link

        def killing_replace(src, dst):
            if pathlib.Path(dst).name == "ckpt.pt" and point == "before_rename" and nth():
                die()
            replace(src, dst)

        def killing_link(src, dst):
            if pathlib.Path(src).name == "ckpt.pt" and point == "after_rename" and nth():
                die()
            link(src, dst)

        os.replace, os.link = killing_replace, killing_link
    elif point != "none":
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    point, n = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    marker = out_dir(args) / MARKER
    if int(os.environ.get("RANK", "1")) == 1 and not marker.exists():
        plant(point, n, marker)
    sys.exit(train.main(args))
