"""Small helpers shared across aggnets: the "did you mean" part of error messages, one progress bar, array and
argument coercions. Not part of the modelling API."""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from torch import Tensor

__all__ = ["closest", "close_names", "progress_bar", "to_numpy", "check_ks", "is_none"]


def closest(name: str, candidates: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The ``n`` candidates closest to ``name`` (difflib), best first; ``[]`` when none is close."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)


def close_names(name: str, candidates: Iterable[str], n: int = 8) -> str:
    """``"Close valid names: a, b, c."`` for an error message (else the first valid names, or those sharing the
    first dotted part of ``name``)."""
    candidates = list(dict.fromkeys(c for c in candidates if c))
    close = closest(name, candidates, n=n, cutoff=0.5)
    if not close:
        close = [c for c in candidates if name.split(".")[0] in c][:n]
    return f"Close valid names: {', '.join(close)}." if close else f"Valid names include: {', '.join(candidates[:n])}."


class _NoBar:
    """The stand-in of a disabled progress bar: iterates what it wraps, ignores updates."""

    def __init__(self, iterable: Optional[Iterable] = None) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, enabled: bool = True,
                 desc: str = "", unit: str = "it") -> Any:
    """A tqdm bar (over ``iterable``, or updated by hand up to ``total``) that disappears when done; a no-op
    stand-in with the same methods when not ``enabled``."""
    if not enabled:
        return _NoBar(iterable)
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)


def to_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view / copy of ``x`` (numpy array, torch tensor or nested sequence); ValueError naming ``name``."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be array-like (numpy array or torch tensor), got {type(x).__name__}") from err


def check_ks(ks: Sequence[int], name: str = "ks") -> tuple[int, ...]:
    """A non-empty sequence of positive ints (the k of recall@k, mP@k), as a tuple; ValueError naming ``name``."""
    try:
        values = tuple(ks)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {ks!r}") from None
    if not values or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in values):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in values)


def is_none(value: Any) -> bool:
    """Whether a config value means "none": None, False, "" or "none" (any case)."""
    return value is None or value is False or (isinstance(value, str) and value.lower() in ("none", ""))
