"""Descriptor files: an (N, D) array with the image names and the config that made them (``.npy`` + a JSON sidecar,
or one ``.pt``), loadable without unpickling code."""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["save_descriptors", "load_descriptors", "LoadedDescriptors", "DESCRIPTORS_FILE_FORMAT"]

PathLike = Union[str, os.PathLike]
DESCRIPTORS_FILE_FORMAT = "aggnets.descriptors"
_FILE_VERSION = 1


class LoadedDescriptors(NamedTuple):
    descriptors: Tensor
    names: list
    config: dict


def _format_of(path: str) -> str:
    lowered = path.lower()
    if lowered.endswith(".npy"):
        return "npy"
    if lowered.endswith((".pt", ".pth")):
        return "pt"
    raise ValueError(f"descriptor file {path!r}: the extension must be .npy (array + {os.path.basename(path)}.json "
                     "sidecar) or .pt / .pth (one torch file)")


def _sidecar(path: str) -> str:
    return path + ".json"


def save_descriptors(path: PathLike, descriptors: Union[Tensor, np.ndarray], names: Sequence[str],
                     config: Optional[dict] = None) -> None:
    """Save (N, D) descriptors with their N image names and the extraction ``config`` (JSON-serialisable).

    ``.npy``: the array (``np.load``-able on its own) plus a ``<path>.json`` sidecar with the names and config;
    ``.pt`` / ``.pth``: one file of plain tensors / strings / numbers, loadable with ``torch.load(weights_only=True)``.
    """
    path = os.fspath(path)
    kind = _format_of(path)
    array = descriptors.detach().cpu() if isinstance(descriptors, Tensor) else torch.from_numpy(np.asarray(descriptors))
    if array.dim() != 2:
        raise ValueError(f"save_descriptors: descriptors must be 2-D (N, D), got shape {tuple(array.shape)}")
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise ValueError("save_descriptors: names must be a sequence of strings (one per descriptor)")
    names = list(names)
    if len(names) != array.shape[0]:
        raise ValueError(f"save_descriptors: {len(names)} names for {array.shape[0]} descriptors")
    try:
        config = json.loads(json.dumps({} if config is None else config, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_descriptors: config must be JSON-serialisable: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"save_descriptors: config must be a dict, got {type(config).__name__}")
    meta = {"format": DESCRIPTORS_FILE_FORMAT, "version": _FILE_VERSION, "count": len(names),
            "dim": int(array.shape[1]), "names": names, "config": config}
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if kind == "npy":
        np.save(path, array.numpy(), allow_pickle=False)
        with open(_sidecar(path), "w", encoding="utf-8") as handle:
            json.dump(meta, handle)
    else:
        torch.save({**meta, "descriptors": array.contiguous().clone()}, path)


def load_descriptors(path: PathLike) -> LoadedDescriptors:
    """``(descriptors (N, D) tensor, names, config)`` from a file written by :func:`save_descriptors`."""
    path = os.fspath(path)
    kind = _format_of(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"descriptor file not found: {path}")
    if kind == "npy":
        if not os.path.isfile(_sidecar(path)):
            raise FileNotFoundError(f"{path}: its sidecar {_sidecar(path)} (names and config) is missing")
        array = torch.from_numpy(np.load(path, allow_pickle=False))
        with open(_sidecar(path), encoding="utf-8") as handle:
            try:
                meta = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{_sidecar(path)} is not valid JSON: {error}") from None
        where = _sidecar(path)
    else:
        meta = torch.load(path, map_location="cpu", weights_only=True)
        array = meta.get("descriptors") if isinstance(meta, dict) else None
        where = path
    if not isinstance(meta, dict) or meta.get("format") != DESCRIPTORS_FILE_FORMAT:
        raise ValueError(f"{where} is not an aggnets descriptor file (format {DESCRIPTORS_FILE_FORMAT!r})")
    if meta.get("version") != _FILE_VERSION:
        raise ValueError(f"{where}: unsupported descriptor file version {meta.get('version')!r}")
    names, config = meta.get("names"), meta.get("config")
    if not isinstance(array, Tensor) or array.dim() != 2:
        raise ValueError(f"{path}: the descriptors are not a 2-D array")
    if not isinstance(names, list) or not isinstance(config, dict):
        raise ValueError(f"{where}: names (list) or config (dict) missing")
    if len(names) != array.shape[0]:
        raise ValueError(f"{where}: {len(names)} names for {array.shape[0]} descriptors in {path} (files out of "
                         "sync?)")
    return LoadedDescriptors(array, names, config)
