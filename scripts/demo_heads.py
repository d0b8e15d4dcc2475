"""Build every registered head on a random feature map; print its output size and forward time.

    python scripts/demo_heads.py [--batch 8 --channels 256 --size 28 --clusters 16 --repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch

import aggnets
from aggnets import heads

CODEBOOK_HEADS = {"netvlad", "vlad", "netbof", "bof", "netfv", "fisher_vector"}


def build(name: str, channels: int, clusters: int) -> torch.nn.Module:
    if name in CODEBOOK_HEADS:
        return aggnets.build_head(name, in_channels=channels, num_clusters=clusters)
    if name == "spatial_pyramid":
        return heads.SpatialPyramid(heads.BoF(channels, clusters), levels=(1, 2, 4))
    return aggnets.build_head(name, in_channels=channels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.relu(torch.randn(args.batch, args.channels, args.size, args.size))
    print(f"aggnets {aggnets.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"feature map {tuple(x.shape)}, K={args.clusters}")
    print(f"{'head':<16} {'out_dim':>8} {'output':>14} {'forward ms':>11}")
    for name in aggnets.list_heads():
        head = build(name, args.channels, args.clusters).eval()
        with torch.no_grad():
            y = head(x)
            start = time.perf_counter()
            for _ in range(args.repeats):
                head(x)
            elapsed = (time.perf_counter() - start) / args.repeats
        assert y.shape == (args.batch, head.out_dim) and torch.isfinite(y).all()
        print(f"{name:<16} {head.out_dim:>8} {str(tuple(y.shape)):>14} {1e3 * elapsed:>11.2f}")


if __name__ == "__main__":
    main()
