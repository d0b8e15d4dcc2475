"""The seed guide's classical pipeline on real data: frozen pretrained backbone + layer -> sampled local descriptors
-> k-means / GMM codebook -> encode every image with BoF, VLAD, Fisher vector (and a BoF spatial pyramid) -> a
linear classifier (scikit-learn) -> test accuracy. Writes ``results.md`` / ``results.json`` to ``--out``.

    python scripts/bof_baseline.py                                   # Fashion-MNIST, offline EfficientNet-Lite0
    python scripts/bof_baseline.py --train-per-class 100 --test-per-class 50 --ks 16,64 --encodings bof,vlad
    python scripts/bof_baseline.py --backbone resnet50 --layer layer3 --weights DEFAULT   # needs internet once

Feature maps are computed once (float16, in RAM) and every codebook / encoding reuses them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aggnets import heads
from aggnets.backbones import build_backbone
from aggnets.codebook import fit_gmm, fit_kmeans, sample_descriptors
from aggnets.data import FashionMNIST, load_fashion_mnist, stratified_indices

ENCODINGS = ("mean", "bof", "bof_pyramid", "vlad", "fv")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files (default: search "
                        "the Debian package folder and $FASHION_MNIST_DIR; torchvision's FashionMNIST/raw works too)")
    parser.add_argument("--train-per-class", type=int, default=None, help="stratified subset (default: all 6000)")
    parser.add_argument("--test-per-class", type=int, default=None, help="stratified subset (default: all 1000)")
    parser.add_argument("--image-size", type=int, default=96, help="images are resized to this square size")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--layer", default="blocks.4", help="backbone layer whose positions are the descriptors")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--ks", default="16,64,256", help="codebook sizes, comma-separated")
    parser.add_argument("--encodings", default=",".join(ENCODINGS), help=f"subset of {','.join(ENCODINGS)}")
    parser.add_argument("--pca", type=int, default=64, help="PCA-reduce descriptors to this dimension before VLAD "
                        "and FV (0 = off), as in the Fisher-vector literature; BoF uses the raw descriptors")
    parser.add_argument("--per-image", type=int, default=200, help="descriptors sampled per image for the codebook")
    parser.add_argument("--max-descriptors", type=int, default=500_000)
    parser.add_argument("--engine", default="torch", help="k-means / GMM engine (torch, faiss, sklearn)")
    parser.add_argument("--classifier", default="logreg", choices=("logreg", "linear_svm"),
                        help="logreg: multinomial logistic regression (L-BFGS); linear_svm: LinearSVC (one-vs-rest; "
                        "slow to converge on the 8k+-dim Fisher vectors)")
    parser.add_argument("--cache", default=None, help="folder to cache the extracted feature maps in (reruns skip "
                        "the backbone)")
    parser.add_argument("-C", "--C", type=float, default=0.1, help="inverse regularisation of the classifier")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/bof_baseline")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def fashion_subset(split: str, per_class: Optional[int], args: argparse.Namespace) -> FashionMNIST:
    indices = None
    if per_class is not None:
        _, labels = load_fashion_mnist(split, args.data_root)
        indices = stratified_indices(labels, per_class, seed=args.seed)
    return FashionMNIST(split, args.data_root, image_size=args.image_size, channels=3, indices=indices)


@torch.no_grad()
def extract_maps(backbone: nn.Module, dataset, args: argparse.Namespace, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's feature map (float16, CPU) and label."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0)
    maps, labels = [], []
    for images, targets in progress(loader, desc, args):
        maps.append(backbone(images.to(args.device)).to("cpu", torch.float16))
        labels.append(targets)
    return torch.cat(maps), torch.cat(labels)


def cached_maps(backbone: nn.Module, dataset, args: argparse.Namespace, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not args.cache:
        return extract_maps(backbone, dataset, args, f"{split} feature maps")
    per_class = args.train_per_class if split == "train" else args.test_per_class
    name = f"{args.backbone}_{args.layer}_{args.weights}_{args.image_size}px_{split}_{per_class}_{args.seed}.pt"
    path = os.path.join(args.cache, name.replace("/", "_").replace(":", "_"))
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        return saved["maps"], saved["labels"]
    maps, labels = extract_maps(backbone, dataset, args, f"{split} feature maps")
    os.makedirs(args.cache, exist_ok=True)
    torch.save({"maps": maps, "labels": labels}, path)
    return maps, labels


def progress(iterable, desc: str, args: argparse.Namespace):
    if args.no_progress:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False)


@torch.no_grad()
def encode(head: nn.Module, maps: torch.Tensor, args: argparse.Namespace,
           project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> np.ndarray:
    head = head.to(args.device).eval()
    outputs = []
    for chunk in maps.split(args.batch_size):
        x = chunk.to(args.device, torch.float32)
        if project is not None:
            x = project(x)
        outputs.append(head(x).cpu())
    return torch.cat(outputs).double().numpy()


def fit_pca(descriptors: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and the top-``dim`` principal directions (dim, C) of the descriptors."""
    mean = descriptors.double().mean(0)
    centred = descriptors.double() - mean
    _, _, v = torch.linalg.svd(centred.T @ centred)
    return mean.float(), v[:dim].float()


def classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             args: argparse.Namespace) -> float:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if args.classifier == "linear_svm":
        from sklearn.svm import LinearSVC
        model = LinearSVC(C=args.C, max_iter=2000, random_state=args.seed)
    else:
        from sklearn.linear_model import LogisticRegression
        model = LogisticRegression(C=args.C, max_iter=300)
    pipeline = make_pipeline(StandardScaler(), model)
    pipeline.fit(train_x, train_y)
    return float((pipeline.predict(test_x) == test_y).mean())


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    encodings = [e for e in args.encodings.split(",") if e]
    unknown = set(encodings) - set(ENCODINGS)
    if unknown:
        raise SystemExit(f"unknown encodings {sorted(unknown)}; choose from {', '.join(ENCODINGS)}")
    ks = [int(k) for k in args.ks.split(",") if k]
    backbone = build_backbone(args.backbone, args.layer, weights=args.weights, freeze=True).to(args.device).eval()
    train_set = fashion_subset("train", args.train_per_class, args)
    test_set = fashion_subset("test", args.test_per_class, args)
    t0 = time.perf_counter()
    train_maps, train_y = cached_maps(backbone, train_set, args, "train")
    test_maps, test_y = cached_maps(backbone, test_set, args, "test")
    extract_seconds = time.perf_counter() - t0
    _, channels, height, width = train_maps.shape
    print(f"[bof] {args.backbone}@{args.layer}: {len(train_maps)} train / {len(test_maps)} test images, maps "
          f"{channels}x{height}x{width}, extracted in {extract_seconds:.1f} s", flush=True)

    map_loader = DataLoader(TensorDataset(train_maps), batch_size=args.batch_size)
    descriptors = sample_descriptors(nn.Identity(), map_loader, per_image=args.per_image,
                                     max_descriptors=args.max_descriptors, seed=args.seed,
                                     progress=not args.no_progress).float().to(args.device)
    project = None
    reduced = descriptors
    if args.pca and args.pca < channels:
        mean, components = fit_pca(descriptors, args.pca)
        mean, components = mean.to(args.device), components.to(args.device)
        reduced = (descriptors - mean) @ components.T

        def project(x: torch.Tensor) -> torch.Tensor:  # a 1x1 convolution: (B, C, H, W) -> (B, pca, H, W)
            return torch.einsum("bchw,dc->bdhw", x - mean.view(1, -1, 1, 1), components)

    rows: list[dict] = []

    def evaluate(encoding: str, k: Optional[int], head: nn.Module, fit_seconds: float,
                 projector: Optional[Callable] = None) -> None:
        t = time.perf_counter()
        train_x = encode(head, train_maps, args, projector)
        test_x = encode(head, test_maps, args, projector)
        encode_seconds = time.perf_counter() - t
        t = time.perf_counter()
        accuracy = classify(train_x, train_y.numpy(), test_x, test_y.numpy(), args)
        rows.append({"encoding": encoding, "K": k, "dim": int(train_x.shape[1]), "accuracy": accuracy,
                     "fit_s": round(fit_seconds, 2), "encode_s": round(encode_seconds, 2),
                     "classifier_s": round(time.perf_counter() - t, 2)})
        print(f"[bof] {encoding:12s} K={str(k):>5s} dim={train_x.shape[1]:6d} accuracy={accuracy:.4f}", flush=True)

    if "mean" in encodings:
        evaluate("mean", None, heads.SPoC(channels), 0.0)
    for k in ks:
        needs_kmeans = {"bof", "bof_pyramid"} & set(encodings)
        if needs_kmeans:
            t = time.perf_counter()
            centroids = fit_kmeans(descriptors, k, engine=args.engine, seed=args.seed).centroids
            fit_seconds = time.perf_counter() - t
            if "bof" in encodings:
                evaluate("bof", k, heads.BoF.from_centroids(centroids), fit_seconds)
            if "bof_pyramid" in encodings:
                pyramid = heads.SpatialPyramid(heads.BoF.from_centroids(centroids), levels=(1, 2))
                evaluate("bof_pyramid", k, pyramid, fit_seconds)
        if "vlad" in encodings:
            t = time.perf_counter()
            centroids = fit_kmeans(reduced, k, engine=args.engine, seed=args.seed).centroids
            vlad = heads.VLAD.from_centroids(centroids, intra_norm=True, power=0.5)
            evaluate("vlad", k, vlad, time.perf_counter() - t, project)
        if "fv" in encodings:
            t = time.perf_counter()
            gmm = fit_gmm(reduced, k, engine="torch", seed=args.seed)
            fisher = heads.FisherVector.from_gmm(gmm.weights, gmm.means, gmm.variances)
            evaluate("fv", k, fisher, time.perf_counter() - t, project)
    summary = {"backbone": args.backbone, "layer": args.layer, "image_size": args.image_size,
               "train_images": len(train_maps), "test_images": len(test_maps), "map": [channels, height, width],
               "pca": args.pca, "classifier": args.classifier, "extract_s": round(extract_seconds, 1),
               "total_s": round(time.perf_counter() - started, 1), "machine": platform_summary(), "results": rows}
    write_results(summary, args.out)
    return rows


def platform_summary() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"


def write_results(summary: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    lines = [f"Backbone {summary['backbone']} @ {summary['layer']} (map {'x'.join(map(str, summary['map']))}), "
             f"images {summary['image_size']}px, {summary['train_images']} train / {summary['test_images']} test, "
             f"PCA {summary['pca']} for VLAD/FV, classifier {summary['classifier']}; {summary['machine']}; "
             f"total {summary['total_s']} s.", "",
             "| encoding | K | dim | test accuracy | codebook fit (s) | encode (s) | classifier (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary["results"]:
        lines.append(f"| {row['encoding']} | {row['K'] or '-'} | {row['dim']} | {100 * row['accuracy']:.2f} % | "
                     f"{row['fit_s']} | {row['encode_s']} | {row['classifier_s']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as handle:
        handle.write(text)
    print(text)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
