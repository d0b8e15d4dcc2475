"""Global-descriptor retrieval on a folder of images with a ``pairs.csv`` (:mod:`aggnets.retrieval.pairs`): the
offline ImageNet EfficientNet-Lite0 cut at ``--layer``, one pooling head at a time, multi-scale descriptors
(:func:`aggnets.retrieval.extract_descriptors`), every pair query ranked against the whole folder (itself
excluded), standard mAP and recall@k. Prints a markdown table and writes ``DATA/results.md`` (``--out``).

    python scripts/opencv_retrieval_set.py --out outputs/opencv_set      # real photos from opencv-doc
    python scripts/retrieval_check.py --data outputs/opencv_set
    python scripts/retrieval_check.py --data my_images --heads gem rmac --max-size 1024

No training: MAC / SPoC / GeM (p = 3) / R-MAC have no learned parameter; NetVLAD's codebook is fitted with k-means
(:meth:`NetVLAD.init_from_descriptors`, ``alpha="auto"``) on local descriptors sampled from the evaluated set's own
images (unsupervised, but transductive: the table says so). The chance row is the expected score of a random
ranking (:func:`aggnets.retrieval.chance_level`).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Optional, Sequence

import torch

from aggnets import heads
from aggnets.backbones import build_backbone
from aggnets.codebook import sample_descriptors
from aggnets.models import Embedder
from aggnets.retrieval import chance_level, evaluate_pairs, extract_descriptors, load_image, load_pairs_csv

HEADS = ("mac", "spoc", "gem", "rmac", "netvlad")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with the images and pairs.csv")
    parser.add_argument("--pairs", default=None, help="pairs CSV (default: DATA/pairs.csv)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--layer", default="blocks.5")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--max-size", type=int, default=512, help="longer image side at scale 1")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.707, 0.5])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), help=f"subset of {' '.join(HEADS)}")
    parser.add_argument("--clusters", type=int, default=64, help="NetVLAD codebook size")
    parser.add_argument("--per-image", type=int, default=None,
                        help="local descriptors sampled per image for the NetVLAD codebook (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for results.md (default: DATA; '' = do not write)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    unknown = [h for h in args.heads if h not in HEADS]
    if unknown:
        parser.error(f"unknown heads {unknown}; choose from {list(HEADS)}")
    return args


def make_head(name: str, in_channels: int, args: argparse.Namespace, paths: Sequence[str],
              backbone: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The head and a note for the table."""
    if name == "mac":
        return heads.MAC(in_channels), ""
    if name == "spoc":
        return heads.SPoC(in_channels), ""
    if name == "gem":
        return heads.GeM(in_channels, p=3.0), "p = 3"
    if name == "rmac":
        return heads.RMAC(in_channels), "3 levels"
    head = heads.NetVLAD(in_channels, args.clusters)
    loader = [load_image(path, args.max_size).unsqueeze(0) for path in paths]  # one image per batch: native sizes
    descriptors = sample_descriptors(backbone, loader, per_image=args.per_image, max_descriptors=None,
                                     device=args.device, seed=args.seed, progress=False)
    summary = head.init_from_descriptors(descriptors, alpha="auto", seed=args.seed)
    alpha = summary.get("alpha")
    alpha_text = f", alpha {alpha:.3g}" if isinstance(alpha, (int, float)) else ""
    return head, (f"K = {args.clusters}, k-means on {len(descriptors)} local descriptors of this set's own "
                  f"{len(paths)} images{alpha_text}")


def markdown(rows: list[dict], chance: dict, ks: Sequence[int], header: str) -> str:
    recall_cols = [f"R@{k}" for k in ks]
    lines = [header, "", "| head | dim | mAP | " + " | ".join(recall_cols) + " | seconds | note |",
             "|---|---:|---:|" + "---:|" * len(recall_cols) + "---:|---|"]
    for row in rows:
        lines.append(f"| {row['head']} | {row['dim']} | {row['mAP']:.1f} | "
                     + " | ".join(f"{row[c]:.1f}" for c in recall_cols) + f" | {row['seconds']:.1f} | {row['note']} |")
    lines.append("| chance (random ranking) | - | " + f"{chance['mAP']:.1f} | "
                 + " | ".join(f"{chance[c]:.1f}" for c in recall_cols) + " | - | expected value |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    pairs_csv = args.pairs or os.path.join(args.data, "pairs.csv")
    gt = load_pairs_csv(pairs_csv, root=args.data)
    paths = gt.paths
    ks = (1, 5)
    backbone = build_backbone(args.backbone, args.layer, weights=args.weights).to(args.device).eval()
    rows = []
    for name in args.heads:
        head_start = time.perf_counter()
        head, note = make_head(name, backbone.out_channels, args, paths, backbone)
        model = Embedder(backbone, head).to(args.device).eval()
        descriptors = extract_descriptors(model, paths, batch_size=args.batch_size, max_size=args.max_size,
                                          scales=args.scales, device=args.device, progress=args.progress)
        descriptors = descriptors.double()
        scores = descriptors[torch.as_tensor(gt.queries)] @ descriptors.T
        metrics = evaluate_pairs(scores, gt, ks=ks)
        row = {"head": name, "dim": int(descriptors.shape[1]), "mAP": metrics["mAP"],
               **{f"R@{k}": metrics[f"R@{k}"] for k in ks}, "seconds": time.perf_counter() - head_start,
               "note": note}
        rows.append(row)
        print(f"{name}: mAP {row['mAP']:.1f}  R@1 {row['R@1']:.1f}  R@5 {row['R@5']:.1f}  ({row['seconds']:.1f} s)",
              file=sys.stderr)
    chance = chance_level(gt, ks=ks)
    total = time.perf_counter() - start
    header = (f"Retrieval check on `{args.data}`: {gt.num_db} images, {gt.num_queries} queries (each ranked against "
              f"the other {gt.num_db - 1} images); {args.backbone} ({args.weights} weights) cut at `{args.layer}`, "
              f"max size {args.max_size}, scales {' '.join(f'{s:g}' for s in args.scales)}; standard mAP and "
              f"recall@k in %. {args.device} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), total {total:.1f} s.")
    table = markdown(rows, chance, ks, header)
    print(table)
    out = args.data if args.out is None else args.out
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.md"), "w") as handle:
            handle.write(table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
