"""Ground truth of the retrieval and place-recognition protocols: the revisited Oxford / Paris pickles (read with a
restricted unpickler that refuses code) and UTM positions (from ``@utm_east@utm_north@`` file names or a CSV)."""
from __future__ import annotations

import csv
import functools
import importlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["REVISITED_SETTINGS", "RevisitedGroundTruth", "RefusedGlobalError", "load_revisited_gnd", "revisited_split",
           "parse_utm_from_filename", "positions_from_filenames", "load_utm_csv"]

REVISITED_SETTINGS = ("easy", "medium", "hard")
_GND_HINT = ("download it from http://cmp.felk.cvut.cz/revisitop/ (gnd_roxford5k.pkl / gnd_rparis6k.pkl, "
             "next to the jpg/ folder of the dataset)")


@dataclass
class RevisitedGroundTruth:
    """Ground truth of a revisited benchmark.

    ``imlist``: database image names (N); ``qimlist``: query image names (Q); ``gnd``: one dict per query with
    ``bbx`` (query box x1, y1, x2, y2, when present) and the index lists ``easy``, ``hard``, ``junk`` into
    ``imlist``; ``name``: the dataset (e.g. ``"roxford5k"``).
    """
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    name: str = ""

    @property
    def num_queries(self) -> int:
        return len(self.qimlist)

    @property
    def num_db(self) -> int:
        return len(self.imlist)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], name: str = "") -> "RevisitedGroundTruth":
        """Build from the dict stored in the official pickle; ``ValueError`` names what is missing or wrong."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"ground truth {name!r}: expected a dict, got {type(cfg).__name__}")
        missing = [key for key in ("imlist", "qimlist", "gnd") if key not in cfg]
        if missing:
            raise ValueError(f"ground truth {name!r}: missing key(s) {missing}; found {sorted(map(str, cfg))}")
        imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
        if len(gnd) != len(qimlist):
            raise ValueError(f"ground truth {name!r}: 'gnd' has {len(gnd)} entries but 'qimlist' has "
                             f"{len(qimlist)} queries")
        entries = [_check_gnd_entry(entry, i, len(imlist)) for i, entry in enumerate(gnd)]
        return cls(imlist=[str(s) for s in imlist], qimlist=[str(s) for s in qimlist], gnd=entries, name=name)


def _check_gnd_entry(entry: Any, i: int, num_db: int | None) -> dict[str, Any]:
    """A copy of one query's entry with ``easy``/``hard``/``junk`` as int64 arrays checked against ``num_db``."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"gnd[{i}] must be a dict with 'easy', 'hard', 'junk', got {type(entry).__name__}")
    missing = [key for key in ("easy", "hard", "junk") if key not in entry]
    if missing:
        raise ValueError(f"gnd[{i}] is missing key(s) {missing}; found {sorted(map(str, entry))}")
    out = dict(entry)
    for key in ("easy", "hard", "junk"):
        idx = np.asarray(entry[key]).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"gnd[{i}][{key!r}] must hold integer database indices, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or (num_db is not None and idx.max() >= num_db)):
            raise ValueError(f"gnd[{i}][{key!r}] holds indices in [{idx.min()}, {idx.max()}], outside the "
                             f"database [0, {num_db})")
        out[key] = idx
    return out


def _numpy_core(submodule: str) -> Any:
    """``numpy._core.<submodule>`` (numpy >= 2) or ``numpy.core.<submodule>`` (numpy 1.x)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a ground-truth pickle may name: containers/scalars and numpy array reconstruction."""
    allowed: dict[tuple[str, str], Any] = {
        ("builtins", name): getattr(__import__("builtins"), name)
        for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                     "complex", "bool")
    }
    allowed[("_codecs", "encode")] = __import__("codecs").encode  # protocol-2 pickles of bytes
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _numpy_core("multiarray")._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _numpy_core("multiarray").scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _numpy_core("numeric")._frombuffer
    return allowed


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list of :class:`_RestrictedUnpickler`."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :func:`_allowed_globals`: no import, no call of anything else.

    A pickle naming any other global (``os.system``, ``builtins.eval``, ``copyreg._reconstructor`` for arbitrary
    classes, ...) raises :class:`RefusedGlobalError` before that global is even looked up.
    """

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol < 3 (Python 2 names)
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise RefusedGlobalError(f"refusing to load global {module}.{name}: a ground-truth pickle holds "
                                     f"only dicts, lists and numpy arrays") from None


def _safe_load(data: bytes) -> Any:
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()  # latin1: Python 2 numpy pickles


def load_revisited_gnd(path: str | os.PathLike, name: str | None = None) -> RevisitedGroundTruth:
    """Load ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (Radenovic et al., CVPR 2018) without executing code.

    The file is a pickle of a dict ``{"imlist": [...], "qimlist": [...], "gnd": [{"bbx", "easy", "hard",
    "junk"}, ...]}``. It is read with a restricted unpickler that resolves only builtin containers and numpy
    array reconstruction (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``, ...); any
    other global (e.g. ``os.system`` behind a ``__reduce__``) is refused with :class:`RefusedGlobalError`.

    ``name`` defaults to the file stem without the ``gnd_`` prefix (``"roxford5k"``).

    Raises:
        FileNotFoundError: no file at ``path`` (with a hint where to download it).
        ValueError: not a pickle, or a malformed dict (missing keys, index lists out of range).
        RefusedGlobalError: (a ``pickle.UnpicklingError``) the pickle names a global that is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"revisited ground truth not found: {str(path)!r}; {_GND_HINT}")
    if name is None:
        name = path.stem[4:] if path.stem.startswith("gnd_") else path.stem
    try:
        cfg = _safe_load(path.read_bytes())
    except RefusedGlobalError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{str(path)!r} is not a readable ground-truth pickle: {err}") from err
    return RevisitedGroundTruth.from_dict(cfg, name=name)


def revisited_split(entry: Mapping[str, Any], setting: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) database indices of one query in a setting (Radenovic et al., CVPR 2018, Sec. 4).

    Easy: positives = easy, ignored = junk + hard. Medium: positives = easy + hard, ignored = junk.
    Hard: positives = hard, ignored = junk + easy.
    """
    parts = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
    if setting not in parts:
        raise ValueError(f"setting must be one of {REVISITED_SETTINGS}, got {setting!r}")
    pos_keys, ign_keys = parts[setting]
    pos = np.concatenate([np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in pos_keys])
    ign = np.concatenate([np.asarray(entry[key], dtype=np.int64).reshape(-1) for key in ign_keys])
    return pos, ign


def parse_utm_from_filename(name: str | os.PathLike) -> tuple[float, float]:
    """(utm_east, utm_north) from a VPR benchmark file name ``@utm_east@utm_north@zone_number@zone_letter@...``.

    The convention of the Pittsburgh / Tokyo 24/7 / SF-XL / MSLS files as reformatted by the VPR benchmarks
    (Berton et al., "Deep Visual Geo-localization Benchmark", CVPR 2022), e.g.
    ``@0543256.96@4178906.53@10@S@037.75683@-122.50737@...jpg`` -> ``(543256.96, 4178906.53)``.
    Only the base name is parsed, so a full path is accepted.
    """
    base = os.path.basename(os.fspath(name))
    fields = base.split("@")
    if len(fields) < 3:
        raise ValueError(f"name {base!r} does not follow the '@utm_east@utm_north@...' convention")
    try:
        return float(fields[1]), float(fields[2])
    except ValueError:
        raise ValueError(f"name {base!r}: cannot read utm_east={fields[1]!r}, utm_north={fields[2]!r} as "
                         f"numbers ('@utm_east@utm_north@...' convention)") from None


def positions_from_filenames(names: Sequence[str | os.PathLike]) -> np.ndarray:
    """(len(names), 2) float64 UTM positions parsed with :func:`parse_utm_from_filename`."""
    if len(names) == 0:
        raise ValueError("names is empty")
    return np.array([parse_utm_from_filename(n) for n in names], dtype=np.float64)


def load_utm_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a CSV with a header and columns ``name,utm_east,utm_north`` (others are ignored).

    Returns ``(names, positions)`` with positions (N, 2) float64 metres. Latitude/longitude columns are refused:
    recall@N thresholds are metres on a planar (UTM) projection, convert first (e.g. with the ``utm`` package).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"positions CSV not found: {str(path)!r}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        rows = list(reader)
    _check_csv_columns(fields, path)
    names, positions = [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): v for k, v in row.items()}
        try:
            positions.append((float(row["utm_east"]), float(row["utm_north"])))
        except (TypeError, ValueError):
            raise ValueError(f"{str(path)!r} line {line}: utm_east/utm_north are not numbers: {row}") from None
        names.append(row["name"])
    if not names:
        raise ValueError(f"{str(path)!r} has a header but no rows")
    return names, np.asarray(positions, dtype=np.float64)


def _check_csv_columns(fields: list[str], path: Path) -> None:
    if {"utm_east", "utm_north", "name"} <= set(fields):
        return
    if {"lat", "lon"} <= set(fields) or {"latitude", "longitude"} <= set(fields):
        raise ValueError(f"{str(path)!r} has latitude/longitude columns; recall@N needs metres: convert to UTM "
                         f"(columns name,utm_east,utm_north), e.g. with the 'utm' or 'pyproj' package")
    raise ValueError(f"{str(path)!r} must have the columns name,utm_east,utm_north; found {fields}")
