"""Named choices: a table from the names users type to what they pick, with one way to fail.

Guidance losses, evaluation metrics, benchmark variants and architectures are each a
``Registry``: lookups and comma lists give the same did-you-mean error naming the option
and the valid names. (Strategies are plugins, found through pluggy; recipes are files.)
"""

from __future__ import annotations

from typing import Callable, Generic, Iterable, Iterator, Mapping, TypeVar, overload

from attnctl.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Ordered name -> item table.

    Args:
        kind: what an item is, for messages ("guidance loss", "metric").
        items: initial entries, in the order ``names()`` lists them.
        error: the exception class raised for a bad name (default ``ConfigError``).
    """

    def __init__(self, kind: str, items: Mapping[str, T] | None = None, error: type[Exception] = ConfigError):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = dict(items or {})

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, item: T) -> T: ...

    def register(self, name: str, item=None):
        """Add ``item`` as ``name`` (or use as a decorator: ``@registry.register("name")``)."""

        def add(value: T) -> T:
            if name in self._items:
                raise self.error(f"a {self.kind} named '{name}' is already registered; pick another name")
            self._items[name] = value
            return value

        return add if item is None else add(item)

    def names(self) -> list[str]:
        """Every name, in registration order."""
        return list(self._items)

    def get(self, name: str, where: str = "") -> T:
        """The item called ``name``; an error naming ``where`` and the valid names otherwise."""
        if name not in self._items:
            prefix = f"{where}: " if where else ""
            raise self.error(
                f"{prefix}unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                f"choose from {', '.join(self._items)}"
            )
        return self._items[name]

    def parse_list(self, text: str | Iterable[str], where: str) -> list[str]:
        """``"a,b"`` (or names) -> checked, de-duplicated names in the order given; empty is an error."""
        names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
        for name in names:
            self.get(name, where)
        if not names:
            raise self.error(f"{where} is empty; choose from {', '.join(self._items)}")
        return list(dict.fromkeys(names))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self):
        return self._items.items()

    def __getitem__(self, name: str) -> T:
        return self.get(name)
