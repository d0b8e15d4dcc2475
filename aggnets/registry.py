"""Name -> head class registry, so configs and users can build a head from a string."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn
from .utils import closest

__all__ = ["register_head", "build_head", "list_heads", "get_head_class"]

_HEADS: dict[str, type[nn.Module]] = {}
T = TypeVar("T", bound=type)


def register_head(name: str) -> Callable[[T], T]:
    """Class decorator: make a head buildable as ``build_head(name, ...)``."""
    def decorator(cls: T) -> T:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"head name {name!r} is already registered to {_HEADS[name].__qualname__}")
        _HEADS[name] = cls
        return cls
    return decorator


def list_heads() -> list[str]:
    """Sorted names of all registered heads."""
    return sorted(_HEADS)


def get_head_class(name: str) -> type[nn.Module]:
    """The class registered as ``name`` (case-insensitive, '-' and '_' equivalent)."""
    key = name.lower().replace("-", "_")
    if key not in _HEADS:
        close = closest(key, _HEADS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown head {name!r}.{hint} Available heads: {', '.join(list_heads())}")
    return _HEADS[key]


def build_head(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered head, e.g. ``build_head("netvlad", in_channels=1024, num_clusters=64)``."""
    return get_head_class(name)(**kwargs)
