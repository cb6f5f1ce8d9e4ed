"""Split work across processes started by ``accelerate launch`` (one process: no split).

``accelerate launch --multi_gpu --num_processes N -m attnctl eval ...`` starts N processes
through torchrun (on a machine without CUDA they form a gloo CPU group). Note that
``accelerate launch --cpu --num_processes N`` needs MPI and otherwise starts one process.

Items are dealt round robin (item ``i`` goes to rank ``i % world``); each rank writes its own
per-item files, and after a barrier the main process merges them, so the merged results are
the same as those of a single-process run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


@dataclass
class Shard:
    """This process's place in the job, with a barrier."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """The items this process handles."""
        return [it for i, it in enumerate(items) if i % self.world == self.rank]


def current_shard() -> Shard:
    """The shard of this process: from ``accelerate`` when it launched us, else a single process."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard(device="cuda" if torch.cuda.is_available() else "cpu")
    from accelerate import PartialState

    # without CUDA, accelerate only forms a process group (gloo) when asked for CPU explicitly
    state: Any = PartialState(cpu=not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))
