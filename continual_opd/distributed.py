"""Multi-process runs: who writes, how work is split across ranks, and how results come back together.

Runs start with `accelerate launch [--num_processes N] -m continual_opd recipe R` (or torchrun). Every rank runs the
same pipeline on its own copy of the control flow; accelerate's `PartialState` owns the process group (gloo on CPU,
NCCL on GPU). The rules:
- rank 0 is the only writer of the run directory (metrics.jsonl, summary.json, run_state.json, snapshots,
  checkpoints, reports); the other ranks compute the same paths and never write them;
- a decision one rank makes (the run dir exists, a bad recipe) is broadcast (`on_main`), so every rank raises the
  same error instead of the others waiting forever in a collective;
- eval prompts and OPD prompts are split across ranks and gathered back in their original order.
A single process (no launcher) takes the same code paths with world size 1 and never creates a process group.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


def launched() -> bool:
    """True under accelerate launch / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.lru_cache(maxsize=1)
def state():
    """accelerate's PartialState (initializes the process group once, gloo on CPU); None for one process."""
    if not launched():
        return None
    from accelerate import PartialState

    return PartialState(cpu=not _has_gpu())


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def world_size() -> int:
    s = state()
    return s.num_processes if s is not None else 1


def rank() -> int:
    s = state()
    return s.process_index if s is not None else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if state() is not None:
        state().wait_for_everyone()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if state() is None:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(items: list) -> list:
    """Concatenate every rank's list in rank order, on every rank."""
    if state() is None:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def all_sum(value: float) -> float:
    return all_sum_list([value])[0]


def all_sum_list(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (one all-reduce); the values themselves for one process."""
    if state() is None:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=state().device)
    dist.all_reduce(t)
    return t.tolist()


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks, in one all-reduce (every rank must pass the same keys); the values
    themselves for one process."""
    keys = sorted(values)
    return dict(zip(keys, all_sum_list([values[k] for k in keys])))


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result to every rank. A ContinualOPDError there is raised on every
    rank (same message), so no rank is left waiting in a collective that the failed one never reaches."""
    from continual_opd.errors import ContinualOPDError

    if state() is None:
        return fn()
    result: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            result = ("ok", fn())
        except ContinualOPDError as e:
            result = ("error", (type(e), str(e)))
    kind, value = broadcast(result)
    if kind == "error":
        cls, message = value
        raise cls(message)
    return value


def shard_batches(n: int, batch_size: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """This rank's batches of item indices. Items are cut into batches exactly as one process would cut them (in
    `order`), and whole batches are dealt to ranks round-robin: each batch is computed as in a one-process run, so a
    sharded greedy eval gives the same answers. Ranks with fewer batches get empty lists at the end, so every rank
    makes the same number of calls (FSDP / ZeRO-3 generation needs that)."""
    order = list(order) if order is not None else list(range(n))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    w, r = world_size(), rank()
    mine = batches[r::w]
    rounds = -(-len(batches) // w) if batches else 0
    return mine + [[] for _ in range(rounds - len(mine))]


def shard_list(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of `items` (accelerate's split: sizes differ by at most one, rank order)."""
    if state() is None:
        return list(items)
    with state().split_between_processes(list(items)) as mine:
        return list(mine)


def env_rank() -> int:
    """The launcher's RANK, read without starting the process group (for printing and logging decisions)."""
    return int(os.environ.get("RANK", "0") or 0) if launched() else 0


def is_sharded(model) -> bool:
    """Parameters split across ranks (FSDP / FSDP2 / DeepSpeed ZeRO-3): forward passes are collective."""
    if state() is None:
        return False
    for p in model.parameters():
        if hasattr(p, "ds_id") or type(p).__name__ == "DTensor":
            return True
        break
    return any(type(m).__name__ in ("FullyShardedDataParallel",) or type(m).__name__.startswith("FSDP")
               for m in model.modules())
