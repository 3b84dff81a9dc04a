"""Runs fastgpt.train under torchrun with a test instrument attached (not a test file itself).

    torchrun --standalone --nproc_per_node=2 tests/ddp_harness.py MODE OUT_FILE -- [--key=value ...]

MODE count_allreduce: counts DDP's gradient all-reduces (a comm hook) and writes rank 0's count.
MODE fail_rank1: rank 1 raises on its third training batch, as a crashing rank would.
MODE save_weights: each rank saves its model's final state dict to OUT_FILE.rank<RANK>.
"""

import os
import pathlib
import sys

import torch
import torch.distributed as dist

from fastgpt import data, distributed, train


def count_allreduce(out_file: pathlib.Path) -> None:
    calls = [0]
    wrap = distributed.wrap

    def counting_hook(state, bucket):
        # The all-reduce runs synchronously here, not as default_hooks' async all-reduce with a
        # Python .then() callback: gloo's worker threads outlive destroy_process_group once DDP
        # has held the group, and one still releasing that callback while the interpreter
        # finalizes aborts the rank ("terminate called without an active exception").
        calls[0] += 1
        grads = bucket.buffer().div_(dist.get_world_size())
        dist.all_reduce(grads)
        done = torch.futures.Future()
        done.set_result(grads)
        return done

    def wrap_and_count(model, info, device):
        ddp = wrap(model, info, device)
        ddp.register_comm_hook(None, counting_hook)
        return ddp

    distributed.wrap = wrap_and_count
    code = train.main(sys.argv[sys.argv.index("--") + 1 :])
    if int(os.environ["RANK"]) == 0:
        out_file.write_text(str(calls[0]))
    sys.exit(code)


def save_weights(out_file: pathlib.Path) -> None:
    run = train.train

    def run_and_save(cfg):
        result = run(cfg)
        torch.save(result.model.state_dict(), f"{out_file}.rank{os.environ['RANK']}")
        return result

    train.train = run_and_save
    sys.exit(train.main(sys.argv[sys.argv.index("--") + 1 :]))


def fail_rank1() -> None:
    if int(os.environ["RANK"]) == 1:
        batch = data.BatchStream.batch

        def failing_batch(self, i):
            if i == 2 and self.rank == 1:
                raise RuntimeError("injected failure on rank 1")
            return batch(self, i)

        data.BatchStream.batch = failing_batch
    sys.exit(train.main(sys.argv[sys.argv.index("--") + 1 :]))


if __name__ == "__main__":
    torch.manual_seed(0)
    mode, out = sys.argv[1], pathlib.Path(sys.argv[2])
    {"count_allreduce": count_allreduce, "save_weights": save_weights}.get(mode, lambda _: fail_rank1())(out)
