"""Per-run storage for what a strategy records in one place and reads in another.

Prompt-to-Prompt's local blend sums cross-attention maps over the steps; an auto-mask
reads maps recorded earlier in the same UNet pass. ``RunState.store(instance)`` gives each
instance a ``RunStore``: tensors by key (any hashable: site, step, role, ...), dropped with
the run, and counted: the run report lists every store's size and its peak.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator

import torch


class RunStore:
    """Tensors by key for one strategy instance during one run, with their memory counted."""

    def __init__(self, instance: str):
        self.instance = instance
        self._items: dict[Hashable, torch.Tensor] = {}
        self.peak_bytes = 0

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Store ``tensor`` under ``key`` (replacing what was there)."""
        self._items[key] = tensor
        self._count()

    def add(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Add ``tensor`` to what is stored under ``key`` (store it if nothing is): a running sum."""
        old = self._items.get(key)
        self._items[key] = tensor if old is None else old + tensor
        self._count()

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._items.get(key, default)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        return self._items.pop(key, default)

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(t.numel() * t.element_size() for t in self._items.values())

    def _count(self) -> None:
        # inside a compiled forward the peak is not read (dynamo would bake the number into its
        # guards); the run counts it eagerly at every step's start instead (``RunState.begin_step``)
        if not torch.compiler.is_compiling():
            self.count()

    def count(self) -> None:
        """Update ``peak_bytes`` with what is held now."""
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
