"""Reading an authors' state dict: the error every converter raises, and the key lookups the heads' ``from_reference``
converters share (the prefix of a module inside a whole model, a tensor of a given shape, keys left over)."""
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torch import Tensor

__all__ = ["StateDictError", "reference_prefix", "reference_tensor", "check_unexpected"]


class StateDictError(KeyError):
    """A state_dict that does not fit: the message names the keys and shapes. (A ``KeyError`` subclass whose
    ``str`` is the plain message.)"""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def reference_prefix(state_dict: Mapping[str, Any], anchors: Sequence[str], what: str,
                     prefix: Optional[str] = None) -> str:
    """The prefix under which an authors' module is stored in ``state_dict`` (``""`` for the module's own state
    dict, ``"aggregator."`` in a whole model, ``"module.aggregator."`` after DataParallel, ...): the one prefix ``P``
    with ``P + anchor`` present for the first anchor found, or ``prefix`` when given. ``StateDictError`` naming the
    anchor key when it is absent or ambiguous."""
    if prefix is not None:
        if prefix and not prefix.endswith("."):
            prefix += "."
        if not any(prefix + anchor in state_dict for anchor in anchors):
            under = sorted(k for k in state_dict if isinstance(k, str) and k.startswith(prefix))[:20]
            raise StateDictError(f"{what}: missing key {prefix + anchors[0]!r}; keys under prefix {prefix!r}: {under}")
        return prefix
    for anchor in anchors:
        found = sorted({k[: len(k) - len(anchor)] for k in state_dict
                        if isinstance(k, str) and (k == anchor or k.endswith("." + anchor))})
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise StateDictError(f"{what}: ambiguous, {anchor!r} found under several prefixes {found}; pass prefix= "
                                 "to choose one")
    raise StateDictError(f"{what}: missing key {anchors[0]!r} (no key ending in it; the state_dict has "
                         f"{len(state_dict)} keys, e.g. {sorted(map(str, state_dict))[:10]})")


def reference_tensor(state_dict: Mapping[str, Any], key: str, what: str, shape: Optional[tuple] = None,
                     dims: Optional[int] = None, optional: bool = False) -> Optional[Tensor]:
    """``state_dict[key]``, checked to be a tensor of ``shape`` (or of ``dims`` dimensions); ``StateDictError``
    naming the key and the expected and found shapes. None when ``optional`` and absent."""
    if key not in state_dict:
        if optional:
            return None
        raise StateDictError(f"{what}: missing key {key!r}" + (f" (expected shape {shape})" if shape else ""))
    value = state_dict[key]
    found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    if not isinstance(value, Tensor) or (shape is not None and found != tuple(shape)) or (
            dims is not None and value.dim() != dims) or 0 in value.shape:
        expected = shape if shape is not None else f"a {dims}-D tensor"
        raise StateDictError(f"{what}: {key!r} must have shape {expected}, found {found}")
    return value.detach()


def check_unexpected(state_dict: Mapping[str, Any], prefix: str, roots: Sequence[str], used: set, what: str) -> None:
    """``StateDictError`` for keys under ``prefix`` + one of the module's top-level names ``roots`` that the
    converter did not use (another architecture: e.g. more blocks, or a parameter this head does not have)."""
    extra = sorted(k for k in state_dict if isinstance(k, str) and k.startswith(prefix) and k not in used
                   and k[len(prefix):].split(".")[0] in roots)
    if extra:
        raise StateDictError(f"{what}: unexpected key(s) {extra[:10]} (not part of the published layout)")
