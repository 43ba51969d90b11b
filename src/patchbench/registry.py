"""A small name -> factory registry shared by methods, datasets, operators and models.

Register with a decorator, create by name, list with shell-style wildcards; an unknown
name raises an error that lists the valid names and suggests the closest ones.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one kind of thing.

    Args:
        kind: What is registered ("method", "dataset", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a factory under ``name`` (default: its ``name`` attribute)."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = name or getattr(factory, "name", None) or factory.__name__
            if key in self._entries and self._entries[key] is not factory:
                raise ValueError(
                    f"{self.kind} {key!r} is already registered by "
                    f"{_where(self._entries[key])}; cannot register {_where(factory)}"
                )
            self._entries[key] = factory
            return factory

        return decorator

    def unregister(self, name: str) -> None:
        """Removes ``name`` (e.g. what a plugin registered before it failed to import)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; raises :class:`UnknownNameError` if none is."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Calls the factory registered as ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def list(self, pattern: str | list[str] = "*") -> list[str]:
        """Sorted registered names matching one or more wildcard patterns (``fnmatch``)."""
        patterns = [pattern] if isinstance(pattern, str) else pattern
        return sorted(n for n in self._entries if any(fnmatch.fnmatch(n, p) for p in patterns))

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(self.list())}."

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def values(self) -> list[Callable[..., T]]:
        """The registered entries in registration order (``list`` sorts names for people)."""
        return list(self._entries.values())


def _where(factory: Callable[..., Any]) -> str:
    return f"{factory.__module__}.{getattr(factory, '__qualname__', factory)}"
