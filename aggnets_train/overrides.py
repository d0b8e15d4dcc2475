"""Command-line overrides checked before Hydra runs: a misspelt key (``trainer.max_epoch=3``) fails with the valid
keys of its node and the closest match, instead of Hydra's bare "Key 'max_epoch' is not in struct"."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig
from aggnets.utils import closest

__all__ = ["check_overrides", "exit_on_unknown_keys"]

CONF = Path(__file__).resolve().parents[1] / "conf"
_SKIPPED_FLAGS = ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--resolve", "-p", "--package")


def _groups(conf_dir: Path) -> set[str]:
    return {path.name for path in conf_dir.iterdir() if path.is_dir()}


def _unknown(cfg: DictConfig, key: str) -> Optional[str]:
    """The error for ``key`` (dotted) when it is not in ``cfg``, else None."""
    node, walked = cfg, []
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return None  # inside a list or a value: leave it to Hydra
        if part not in node.keys():  # not `part in node`: OmegaConf answers False for a required (???) value
            where = ".".join(walked) or "the config"
            valid = sorted(str(k) for k in node.keys())
            close = closest(part, valid)
            hint = f"did you mean {'.'.join([*walked, close[0]])!r}? " if close else ""
            return (f"{key}: no key {part!r} in {where}; {hint}valid keys: {', '.join(valid)} "
                    f"(to add a new key on purpose: +{key}=...)")
        node, walked = node._get_node(part), [*walked, part]
    return None


def check_overrides(config_name: str, args: Sequence[str], conf_dir: Path = CONF) -> list[str]:
    """The errors of the plain ``key=value`` overrides in ``args`` whose key the composed config lacks (group
    choices such as ``head=gem`` and ``experiment=...`` are applied first; ``+``/``~`` overrides and ``hydra.*``
    keys are Hydra's business)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    args = [a for a in args if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(args)
    groups = _groups(conf_dir)
    choices = [a for a, o in zip(args, parsed) if "." not in o.key_or_group and o.key_or_group in groups]
    keys = [o.key_or_group for o in parsed if o.type == OverrideType.CHANGE and o.package is None
            and not o.key_or_group.startswith("hydra.") and o.key_or_group not in groups]
    if not keys:
        return []
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[c.split(",")[0] for c in choices])
    return [error for key in keys if (error := _unknown(cfg, key)) is not None]


def exit_on_unknown_keys(config_name: str, conf_dir: Path = CONF) -> None:
    """Run :func:`check_overrides` on ``sys.argv``; print the errors and exit with status 2 if there are any."""
    args = sys.argv[1:]
    if any(a in _SKIPPED_FLAGS or a.startswith("--config") for a in args):
        return
    try:
        errors = check_overrides(config_name, args, conf_dir)
    except Exception:  # a malformed override or group: Hydra reports those itself, with the choices
        return
    if errors:
        print("\n".join(f"Config error: {e}" for e in errors), file=sys.stderr)
        sys.exit(2)
