"""The place-recognition evaluation sets by name: each is one file ``conf/vpr/<name>.yaml`` giving its layout and
where its files lie under a datasets folder (``eval.root``), or a path to such a file for a set of one's own."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from aggnets.retrieval import PlaceSet, folder_place_set, index_place_set, load_image

from .config import ConfigError
from aggnets.utils import closest

__all__ = ["VPR_CONF", "vpr_set_names", "vpr_set_config", "build_place_set", "PlaceSetImages"]

VPR_CONF = Path(__file__).resolve().parents[1] / "conf" / "vpr"
_KEYS = {"folder": {"layout", "folder", "database", "queries", "threshold"},
         "index": {"layout", "images", "index", "prefix", "gt", "query_index"}}


def vpr_set_names() -> list[str]:
    """The sets named in ``conf/vpr/``."""
    return sorted(path.stem for path in VPR_CONF.glob("*.yaml"))


def vpr_set_config(name: str) -> DictConfig:
    """The set's config: ``conf/vpr/<name>.yaml``, or ``name`` itself when it is a path to a YAML file."""
    path = Path(name) if str(name).endswith((".yaml", ".yml")) else VPR_CONF / f"{name}.yaml"
    if not path.is_file():
        names = vpr_set_names()
        close = closest(str(name), names)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"eval.sets: no set {str(name)!r}; {hint}sets: {', '.join(names)} "
                          "(or the path of a .yaml file in the form of conf/vpr/*.yaml)")
    cfg = OmegaConf.load(path)
    layout = cfg.get("layout")
    if layout not in _KEYS:
        raise ConfigError(f"{path}: layout must be 'folder' or 'index', got {layout!r}")
    missing = sorted(_KEYS[layout] - set(cfg.keys()))
    if missing:
        raise ConfigError(f"{path}: a {layout}-layout set needs the keys {missing}")
    return cfg


def build_place_set(name: str, root: Optional[str], index_root: Optional[str] = None,
                    check_files: bool = True, key: str = "eval") -> PlaceSet:
    """The :class:`aggnets.retrieval.PlaceSet` of ``name`` under the datasets folder ``root`` (index-layout .npy
    files under ``index_root`` when given, e.g. the gsv-cities repository's ``datasets/``)."""
    cfg = vpr_set_config(name)
    label = Path(name).stem
    if not root:
        what = "eval.root" if key == "eval" else "data.val_root"
        raise ConfigError(f"{what}: the folder holding the evaluation sets is not set ({what}=/path/to/datasets)")
    base = Path(root)
    try:
        if cfg.layout == "folder":
            return folder_place_set(base / cfg.folder, label, threshold=float(cfg.threshold),
                                    database=cfg.database, queries=cfg.queries)
        return index_place_set(base / cfg.images, Path(index_root or root) / cfg.index, cfg.prefix, label,
                               gt=cfg.gt, query_index=cfg.get("query_index"), check_files=check_files)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{'eval.sets' if key == 'eval' else 'data.val_sets'}: {error}") from None


class PlaceSetImages(Dataset):
    """The images of a :class:`~aggnets.retrieval.PlaceSet`, database first then queries, each resized to ``size``
    (h, w) as the papers validate: items ``(image (3, h, w) float32 in [0, 1], index)``."""

    def __init__(self, place_set: PlaceSet, size: Sequence[int], resample: str = "bilinear") -> None:
        self.place_set = place_set
        self.paths = [*place_set.database, *place_set.queries]
        self.size, self.resample = (int(size[0]), int(size[1])), resample

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return load_image(self.paths[index], size=self.size, resample=self.resample), index
