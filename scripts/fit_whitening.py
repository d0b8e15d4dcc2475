"""Fit a whitening from extracted descriptors (a file of scripts/extract.py) and save it for evaluate.py
(``post.whitening=``) or training (``task.whitening=``).

    python scripts/fit_whitening.py --descriptors train.npy --out pca.pt --dim 512             # PCA whitening
    python scripts/fit_whitening.py --descriptors train.npy --pairs pairs.csv --out lw.pt      # learned Lw

``--pairs``: a CSV with ``query,positive`` columns naming matching images of the descriptors file (the pairs format
of aggnets.retrieval.load_pairs_csv); with it the learned whitening of Radenović et al. is fitted, otherwise PCA.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggnets import retrieval as R  # noqa: E402


def read_pairs(path: str, names: Sequence[str]) -> torch.Tensor:
    """(M, 2) indices into ``names`` of the ``query,positive`` rows of a CSV."""
    index = {name: i for i, name in enumerate(names)}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"query", "positive"} <= set(rows[0]):
        raise ValueError(f"--pairs: {path} needs a header with columns query,positive and at least one row")
    unknown = [r[c] for r in rows for c in ("query", "positive") if r[c] not in index]
    if unknown:
        raise ValueError(f"--pairs: {len(unknown)} names are not in the descriptors file, e.g. {unknown[:3]}")
    return torch.tensor([[index[r["query"]], index[r["positive"]]] for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> torch.nn.Module:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptors", required=True, help="a .npy (+ .json) or .pt file of scripts/extract.py")
    parser.add_argument("--pairs", default=None, help="query,positive CSV of matching images: learned whitening")
    parser.add_argument("--dim", type=int, default=None, help="output dimensions (default: all)")
    parser.add_argument("--eps", type=float, default=1e-6, help="eigenvalue regularisation, x mean eigenvalue")
    parser.add_argument("--out", required=True, help="the whitening file to write (.pt)")
    args = parser.parse_args(argv)
    loaded = R.load_descriptors(args.descriptors)
    descriptors = torch.as_tensor(loaded[0]).double()
    if args.pairs:
        whitening = R.fit_learned_whitening(descriptors, read_pairs(args.pairs, list(loaded[1])), dim=args.dim,
                                            eps=args.eps)
    else:
        whitening = R.fit_pca_whitening(descriptors, dim=args.dim, eps=args.eps)
    whitening = whitening.float()
    R.save_whitening(whitening, args.out)
    kind = "learned (Lw)" if args.pairs else "PCA"
    print(f"{kind} whitening {whitening.in_features} -> {whitening.out_features} dims fitted on "
          f"{len(descriptors)} descriptors, written to {args.out}")
    return whitening


if __name__ == "__main__":
    main()
