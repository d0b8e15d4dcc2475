"""The authors' released weights as :class:`aggnets.Embedder` models: CosPlace and EigenPlaces (ResNet-18/50/101/152,
VGG16), MixVPR, gsv-cities' ConvAP, BoQ (ResNet-50, DINOv2), SALAD, NetVLAD (pytorch-NetVlad), Patch-NetVLAD's
NetVLAD + WPCA, the deep-visual-geo-localization benchmark's NetVLAD / CRN / GeM + FC models, and the
cnnimageretrieval-pytorch GeM networks with their whitening. Each loads with outputs equal to the authors' model and
its :class:`Preprocessing` attached (``embedder.preprocessing``).

    >>> aggnets.pretrained.list("boq")                    # names; info(name) for the details
    >>> model = aggnets.pretrained.load("boq_resnet50_16384")          # downloads once, into torch.hub's cache
    >>> model = aggnets.pretrained.load("mixvpr_resnet50_4096", file="resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt")
"""
from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import zipfile
from typing import Any, Optional

import numpy as np
import torch

from ..heads.reference import StateDictError
from ..models import Embedder
from . import builders
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .table import MODELS, PretrainedModel
from ..utils import closest

__all__ = ["list", "info", "load", "load_checkpoint", "download", "from_checkpoint", "BUILDERS", "Preprocessing",
           "PretrainedModel", "MODELS", "IMAGENET_MEAN", "IMAGENET_STD"]

#: family -> the converter of a checkpoint in that family's layout (:mod:`aggnets.pretrained.builders`)
BUILDERS = {"cosplace": builders.cosplace_embedder, "eigenplaces": builders.cosplace_embedder,
            "mixvpr": builders.mixvpr_embedder, "convap": builders.convap_embedder, "boq": builders.boq_embedder,
            "salad": builders.salad_embedder, "netvlad": builders.netvlad_embedder,
            "patch_netvlad": builders.netvlad_embedder, "benchmark": builders.benchmark_embedder,
            "cirtorch": builders.cirtorch_embedder}


def list(family: Optional[str] = None) -> builtins.list[str]:  # noqa: A001 (the name users expect)
    """The names of the published models (of one ``family``: cosplace, eigenplaces, mixvpr, convap, boq, salad,
    netvlad, patch_netvlad, benchmark, cirtorch)."""
    if family is not None and family not in {m.family for m in MODELS.values()}:
        raise ValueError(f"aggnets.pretrained.list: no family {family!r}; families: "
                         f"{sorted({m.family for m in MODELS.values()})}")
    return [name for name, model in MODELS.items() if family is None or model.family == family]


def info(name: str) -> PretrainedModel:
    """The table entry of ``name``: URL or where to get the file, descriptor size, preprocessing, paper, reported
    numbers."""
    if name not in MODELS:
        close = closest(name, MODELS, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"aggnets.pretrained: no model {name!r}; {hint}aggnets.pretrained.list() gives all "
                         f"{len(MODELS)}")
    return MODELS[name]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, progress: bool = True) -> str:
    """The local path of ``name``'s file, downloaded into torch.hub's cache (``torch.hub.get_dir()/checkpoints``)
    the first time."""
    model = info(name)
    if model.url is None:
        raise ValueError(f"aggnets.pretrained: {name}'s weights have no direct download: {model.source}; download "
                         f"{model.filename!r} and pass it: aggnets.pretrained.load({name!r}, file='path/to/file')")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, model.filename or os.path.basename(model.url.split("?")[0]))
    if not os.path.isfile(path):
        torch.hub.download_url_to_file(model.url, path, progress=progress)
    return path


def load_checkpoint(path: str) -> Any:
    """A checkpoint file read without running code from it (``torch.load(weights_only=True)``, NumPy arrays allowed:
    cnnimageretrieval keeps its learned whitening in them). ValueError naming the file when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"aggnets.pretrained: no such file {path!r}")
    try:  # NumPy 2 (its arrays were pickled as numpy._core; NumPy 1's files say numpy.core)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    allowed: builtins.list = [np.ndarray, np.dtype, _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
                              (_reconstruct, "numpy._core.multiarray._reconstruct")]
    allowed += [type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.int32)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise ValueError(f"aggnets.pretrained: {path!r} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); a partial or corrupt download? delete "
                         "it and load again") from None


def load(name: str, *, file: Optional[str] = None, sha256: Optional[str] = None, progress: bool = True) -> Embedder:
    """The published model ``name`` as an :class:`aggnets.Embedder` in eval mode, with ``.preprocessing`` (a
    :class:`Preprocessing`) and ``.pretrained`` (its :class:`PretrainedModel`). ``file``: a local copy of the
    checkpoint (offline, or a Google-Drive-only release); otherwise the URL is downloaded once into torch.hub's
    cache. ``sha256`` (or the table's, where published): the file's checksum, checked before loading.
    Errors: an unknown name (with the closest), a file that is not a checkpoint (corrupt / partial download), a
    checksum mismatch, or a checkpoint of another layout (:class:`aggnets.convert.StateDictError` naming the key)."""
    model = info(name)
    path = os.fspath(file) if file is not None else download(name, progress)
    expected = sha256 or model.sha256
    if expected:
        found = _sha256(path)
        if not found.startswith(expected.lower()):
            raise ValueError(f"aggnets.pretrained: {path!r} has sha256 {found[:16]}…, expected {expected[:16]}…: a "
                             "corrupt download or another file; delete it and load again")
    checkpoint = load_checkpoint(path)
    try:
        embedder = model.build(checkpoint)
    except StateDictError as error:
        raise StateDictError(f"{error} (file {path!r} for {name!r})") from None
    embedder.preprocessing = model.preprocessing
    embedder.pretrained = model
    return embedder.eval()


def from_checkpoint(family: str, checkpoint: Any, **kwargs: Any) -> Embedder:
    """A checkpoint you trained with the authors' code (or any file in a family's layout), as an Embedder:
    ``checkpoint`` a path or the loaded object; ``kwargs`` what the layout does not say (``backbone="resnet50"``
    for cosplace / eigenplaces / boq / benchmark, ``aggregation="netvlad" | "crn" | "gem_fc"`` for benchmark,
    ``lw="ms" | "ss"`` for cirtorch). No preprocessing is attached: the training decides it."""
    if family not in BUILDERS:
        raise ValueError(f"aggnets.pretrained.from_checkpoint: no family {family!r}; families: {sorted(BUILDERS)}")
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint(os.fspath(checkpoint))
    return BUILDERS[family](checkpoint, **kwargs).eval()
