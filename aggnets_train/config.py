"""Turn a composed Hydra config into the run's objects with ``hydra.utils.instantiate``, checking every group
against its target's signature first, so that a bad value fails at once with the config key in the message."""
from __future__ import annotations

import collections.abc
import inspect
import os
import typing
from pathlib import PurePath
from typing import Any, Callable, Optional

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationToMissingValueError

__all__ = ["ConfigError", "check_config", "build", "build_head", "call"]

# filled in by the training code (in_h / in_w: when left at ???)
AUTO_FILLED = {"in_channels", "in_h", "in_w"}


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key (``head.num_clusters: ...``)."""


def _target_callable(node: DictConfig, key: str) -> Callable[..., Any]:
    target = node.get("_target_")
    try:
        return get_object(target)
    except Exception as error:  # ImportError, AttributeError, ValueError from hydra's locate
        raise ConfigError(f"{key}._target_: cannot import {target!r} ({error})") from None


def _signature(target: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        parameters = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return {}, {}
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # unresolvable forward references: check names only
        hints = {}
    return parameters, hints


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value can be passed where ``hint`` is annotated (lenient where unsure)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if value is None:
        return False
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        return isinstance(value, (list, tuple, ListConfig))
    if isinstance(hint, type):
        if issubclass(hint, (os.PathLike, PurePath)):
            return isinstance(value, (str, hint))
        return isinstance(value, hint)
    return True  # generics such as Callable[..., X]: left to the target


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_config(node: Any, key: str, *, allow_missing: frozenset[str] = frozenset(AUTO_FILLED)) -> None:
    """Check a ``_target_`` node (recursively): the target imports, every key is one of its arguments, every
    value has the annotated type, and nothing required is missing. Raises :class:`ConfigError` naming the key."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    target = _target_callable(node, key)
    parameters, hints = _signature(target)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    partial = bool(node.get("_partial_", False))
    for name in node:
        if str(name).startswith("_"):
            continue
        full = f"{key}.{name}"
        if parameters and name not in parameters and not takes_any:
            valid = ", ".join(p for p in parameters if p not in ("self", "args", "kwargs"))
            raise ConfigError(f"{full}: not an argument of {node._target_}; valid: {valid}")
        if OmegaConf.is_missing(node, name):
            if name in allow_missing or partial:
                continue
            raise ConfigError(f"{full}: required value missing (???) — set it on the command line, e.g. {full}=...")
        try:
            value = node[name]
        except InterpolationToMissingValueError:  # e.g. a wrapped head's in_channels: ${..in_channels}
            continue
        if isinstance(value, DictConfig) and "_target_" in value:
            check_config(value, full, allow_missing=allow_missing)
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        hint = hints.get(name, inspect.Parameter.empty)
        if not _matches(value, hint):
            raise ConfigError(f"{full}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


def build(node: Any, key: str, *args: Any, partial: bool = False, **kwargs: Any) -> Any:
    """``check_config`` then ``instantiate`` (``partial=True``: a factory to call later); any error raised by the
    target comes back as a :class:`ConfigError` that names ``key`` and the target."""
    check_config(node, key, allow_missing=frozenset(AUTO_FILLED | set(kwargs)))
    try:
        return instantiate(node, *args, _partial_=True, **kwargs) if partial else instantiate(node, *args, **kwargs)
    except ConfigError:
        raise
    except Exception as error:
        cause = error.__cause__ or error
        raise ConfigError(f"{key} ({node.get('_target_')}): {type(cause).__name__}: {cause}") from error


def call(factory: Callable[..., Any], key: str, target: Optional[str] = None, **kwargs: Any) -> Any:
    """Call a factory from :func:`build` (``partial=True``) and name ``key`` in any error."""
    try:
        return factory(**kwargs)
    except Exception as error:
        name = target or getattr(getattr(factory, "func", factory), "__qualname__", "")
        raise ConfigError(f"{key} ({name}): {type(error).__name__}: {error}") from error


def _image_size(cfg: DictConfig) -> Optional[tuple[int, int]]:
    """The training images' (height, width): ``data.train.image_size`` (an int or a pair), if the config has one."""
    size = OmegaConf.select(cfg, "data.train.image_size", default=None)
    if size is None:
        return None
    size = OmegaConf.to_container(size) if isinstance(size, ListConfig) else size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_head(cfg: DictConfig, backbone: Any) -> Any:
    """The ``head`` group with ``in_channels`` set from the backbone (an int is taken as the channel count) and, for a
    head built for one map size, ``in_h`` / ``in_w`` left at ``???`` set to the map the backbone gives for the data's
    image size (``backbone.output_size(*data.train.image_size)``). Written into the config, so the saved run config
    records them, and a wrapped head's ``${..in_channels}`` resolves."""
    in_channels = backbone if isinstance(backbone, int) else backbone.out_channels
    with open_dict(cfg):
        cfg.head.in_channels = in_channels
        keys = list(cfg.head.keys())  # (``key in cfg`` is False for a ??? value)
        missing = [key for key in ("in_h", "in_w") if key in keys and OmegaConf.is_missing(cfg.head, key)]
        if missing:
            size = _image_size(cfg)
            if size is None or isinstance(backbone, int):
                raise ConfigError(f"head.{missing[0]}: the map size this head is built for could not be derived (no "
                                  "data.train.image_size here): set head.in_h and head.in_w, e.g. head.in_h=20 "
                                  "head.in_w=20")
            height, width = backbone.output_size(*size)
            cfg.head.in_h, cfg.head.in_w = int(height), int(width)
    return build(cfg.head, "head")
