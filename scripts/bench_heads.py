"""Forward + backward time and peak extra memory of every head, beside naive formulations and the GEMM floor.

    python scripts/bench_heads.py                      # CPU: B=8, C=1024, 28x28, K=64 (B=32 on CUDA)
    python scripts/bench_heads.py --device cuda
    python scripts/bench_heads.py --cases netvlad,netvlad_loop --repeats 3
    python scripts/bench_heads.py --cases netvlad,netfv,gem,rmac --compile   # + torch.compile (inductor) column
    python scripts/bench_heads.py --suite field        # the place-recognition heads at their papers' map sizes

``--suite field``: MixVPR and CRN on ResNet-50 layer3 at 320 px (C = 1024, 20 x 20), ConvAP on layer4 (C = 2048,
10 x 10), CosPlace on layer4 at 512 px (C = 2048, 16 x 16), GhostVLAD / SuperVLAD at 20 x 20, each beside its
published formulation (``scripts/published/``: the authors' module structure, re-written) on the same weights, and
NetVLAD at 20 x 20 for CRN's target (<= 1.3x NetVLAD).

Each case runs in its own subprocess so that CPU peak memory can be read from the process high-water mark
(ru_maxrss minus the resident size just before the first forward pass); on CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated before. The floor of a codebook head is the FLOP count of
the matrix products it needs (forward and backward) divided by the GEMM rate measured here on a square matmul.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from typing import Callable

import torch
import torch.nn.functional as F

import aggnets
from aggnets import functional as AF
from aggnets import heads
from aggnets.functional.crn import CRN_FILTERS
from bench_common import cpu_model, timed
from published import convap as published_convap
from published import cosplace as published_cosplace
from published import crn as published_crn
from published import mixvpr as published_mixvpr
from published import boq as published_boq
from published import salad as published_salad


# --- naive formulations kept for comparison (what the fast heads replace) ----------------------------------------

class NetVLADLoop(heads.NetVLAD):
    """NetVLAD with a Python loop over clusters (as in several public implementations). With ``ghost_clusters`` the
    soft-max runs over K + G rows and the loop over the K real clusters (GhostVLAD as published); with
    ``residual=False`` each cluster sums its weighted descriptors (SuperVLAD as published)."""

    def pool(self, x, mask):
        descriptors = F.normalize(x.flatten(2), dim=1)
        assignment = AF.assign(descriptors, self.assign_weight, self.assign.bias)
        vlad = torch.stack([(assignment[:, k:k + 1, :] * (descriptors if self.centroids is None else
                                                          descriptors - self.centroids[k][None, :, None])).sum(-1)
                            for k in range(self.num_clusters)], dim=1)
        return F.normalize(F.normalize(vlad, dim=-1).flatten(1), dim=-1)


class NetVLADBroadcast(heads.NetVLAD):
    """NetVLAD through a (B, K, C, N) residual tensor."""

    def pool(self, x, mask):
        descriptors = F.normalize(x.flatten(2), dim=1)
        assignment = AF.assign(descriptors, self.assign_weight, self.assign.bias)
        residual = descriptors.unsqueeze(1) - self.centroids[None, :, :, None]
        vlad = (residual * assignment.unsqueeze(2)).sum(-1)
        return F.normalize(F.normalize(vlad, dim=-1).flatten(1), dim=-1)


class RMACLoop(heads.RMAC):
    """R-MAC with a Python loop over regions."""

    def pool(self, x, mask):
        total = 0
        for top, left, size in AF.rmac_regions(x.shape[-2], x.shape[-1], self.levels, self.overlap):
            total = total + F.normalize(x[:, :, top:top + size, left:left + size].amax(dim=(-2, -1)), dim=-1)
        return F.normalize(total, dim=-1)


class GeMPlain(heads.GeM):
    """GeM as the plain one-liner ``x.clamp(eps).pow(p).mean((-2, -1)).pow(1/p)``, without aggnets' checks."""

    def forward(self, x, mask=None):
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class Published(torch.nn.Module):
    """A published formulation built from an aggnets head's weights (``scripts/published``), called as a head."""

    def __init__(self, module: torch.nn.Module, out_dim: int) -> None:
        super().__init__()
        self.module, self.out_dim = module, out_dim

    def forward(self, x, mask=None):
        return self.module(x)


class PublishedWithToken(Published):
    """A published formulation that takes ``(map, token)``; the token is the map's mean, what an aggnets head
    substitutes on a backbone without one (the benchmark's random maps have no class token)."""

    def forward(self, x, mask=None):
        return self.module((x, x.mean(dim=(2, 3))))


def published(head: torch.nn.Module, module) -> Published:
    return Published(module.from_head(head), head.out_dim)


def codebook_flops(batch: int, channels: int, clusters: int, positions: int, stacked: int = 1) -> float:
    """6 matrix products (2 forward, 4 backward) of 2 * B * K * (stacked * C) * N flops each."""
    return 6 * 2.0 * batch * clusters * stacked * channels * positions


def crn_context_flops(batch: int, channels: int, size: int) -> float:
    """CRN's context convolutions (3x3 x 32, 5x5 x 32, 7x7 x 20 on the (size // 2)^2 pooled map): forward, gradient of
    the input and of the weights, 3 x 2 * B * h * w * C * sum_f F_f k_f^2 flops."""
    pooled = (size // 2) ** 2
    return 3 * 2.0 * batch * pooled * channels * sum(count * kernel * kernel for kernel, count in CRN_FILTERS)


CASES: dict[str, Callable[[int, int], torch.nn.Module]] = {
    "mac": lambda c, k: heads.MAC(c),
    "spoc": lambda c, k: heads.SPoC(c),
    "gem": lambda c, k: heads.GeM(c),
    "gem_plain": lambda c, k: GeMPlain(c),
    "gem_per_channel": lambda c, k: heads.GeM(c, per_channel=True),
    "crow": lambda c, k: heads.CroW(c),
    "rmac": lambda c, k: heads.RMAC(c),
    "rmac_gem": lambda c, k: heads.RMAC(c, pool="gem"),
    "rmac_loop": lambda c, k: RMACLoop(c),
    "netvlad": lambda c, k: heads.NetVLAD(c, k),
    "netvlad_loop": lambda c, k: NetVLADLoop(c, k),
    "netvlad_broadcast": lambda c, k: NetVLADBroadcast(c, k),
    "vlad": lambda c, k: heads.VLAD(c, k),
    "netbof": lambda c, k: heads.NetBoF(c, k),
    "bof": lambda c, k: heads.BoF(c, k),
    "netfv": lambda c, k: heads.NetFV(c, k),
    "fisher_vector": lambda c, k: heads.FisherVector(c, k),
    "spatial_pyramid_netbof": lambda c, k: heads.SpatialPyramid(heads.NetBoF(c, k), levels=(1, 2, 4)),
}

# --suite field: (factory, channels, map size); K = --clusters where the head has clusters
FIELD_CASES: dict[str, tuple[Callable[[int, int], torch.nn.Module], int, int]] = {
    "mixvpr": (lambda c, k: heads.MixVPR(c, 20, 20), 1024, 20),
    "mixvpr_published": (lambda c, k: published(heads.MixVPR(c, 20, 20), published_mixvpr), 1024, 20),
    "convap": (lambda c, k: heads.ConvAP(c), 2048, 10),
    "convap_published": (lambda c, k: published(heads.ConvAP(c), published_convap), 2048, 10),
    "cosplace": (lambda c, k: heads.CosPlace(c), 2048, 16),
    "cosplace_published": (lambda c, k: published(heads.CosPlace(c), published_cosplace), 2048, 16),
    "netvlad_20": (lambda c, k: heads.NetVLAD(c, k), 1024, 20),
    "crn": (lambda c, k: heads.CRN(c, k), 1024, 20),
    "crn_published": (lambda c, k: published(heads.CRN(c, k), published_crn.PublishedCRN), 1024, 20),
    "ghostvlad": (lambda c, k: heads.NetVLAD(c, k, ghost_clusters=1), 1024, 20),
    "ghostvlad_loop": (lambda c, k: NetVLADLoop(c, k, ghost_clusters=1), 1024, 20),
    "supervlad": (lambda c, k: heads.NetVLAD(c, 4, ghost_clusters=1, residual=False), 1024, 20),
    "supervlad_loop": (lambda c, k: NetVLADLoop(c, 4, ghost_clusters=1, residual=False), 1024, 20),
    # SALAD on DINOv2 ViT-B/14 at 322 px (C = 768, 23 x 23; m = 64, l = 128, g = 256); BoQ on ResNet-50 layer3 at 320 px
    "salad": (lambda c, k: heads.SALAD(c), 768, 23),
    "salad_published": (lambda c, k: PublishedWithToken(published_salad.from_head(heads.SALAD(c)), 8448), 768, 23),
    "boq": (lambda c, k: heads.BoQ(c), 1024, 20),
    "boq_published": (lambda c, k: published(heads.BoQ(c), published_boq), 1024, 20),
}
# (fast, slow): the note of the slow row gives its time over the fast one's
COMPARED = (("netvlad", "netvlad_loop"), ("netvlad", "netvlad_broadcast"), ("rmac", "rmac_loop"), ("gem", "gem_plain"),
            ("mixvpr", "mixvpr_published"), ("convap", "convap_published"), ("cosplace", "cosplace_published"),
            ("crn", "crn_published"), ("ghostvlad", "ghostvlad_loop"), ("supervlad", "supervlad_loop"),
            ("salad", "salad_published"), ("boq", "boq_published"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(name: str, args: argparse.Namespace) -> dict:
    """Time one case in this process and return its measurements."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    head = {**CASES, **{n: spec[0] for n, spec in FIELD_CASES.items()}}[name](args.channels, args.clusters).to(device)
    x = torch.relu(torch.randn(args.batch, args.channels, args.size, args.size, device=device)).requires_grad_()
    grad = None

    differentiable = head(x[:1]).requires_grad  # False for hard-assignment BoF: no gradient to time

    def step() -> None:
        nonlocal grad
        y = head(x)
        if differentiable:
            y.backward(torch.ones_like(y) if grad is None else grad)
        x.grad = None
        head.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(); sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = timed(step, sync, args.repeats)
    result = {"case": name, "ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times),
              "peak_mb": max(peak, 0) / 2**20, "out_dim": head.out_dim, "backward": differentiable}
    if args.compile:
        result.update(time_compiled(head, x, differentiable, args.repeats, sync))
    return result


def time_compiled(head: torch.nn.Module, x: torch.Tensor, differentiable: bool, repeats: int,
                  sync: Callable[[], None]) -> dict:
    """Forward + backward of ``torch.compile(head)`` (inductor), timed after warm-up (compilation excluded).

    Measured after the eager run in the same process, so the eager peak memory above is unaffected.
    """
    compiled = torch.compile(head, backend="inductor")

    def step() -> None:
        y = compiled(x)
        if differentiable:
            y.backward(torch.ones_like(y))
        x.grad = None
        head.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step(); sync()  # compiles the forward and backward graphs
    compile_s = time.perf_counter() - start
    step(); sync()  # warm-up
    times = timed(step, sync, repeats)
    return {"compiled_ms": 1e3 * statistics.median(times), "compiled_ms_min": 1e3 * min(times), "compile_s": compile_s}


def gemm_rate(device: str, n: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n float32 matmul (best of ``repeats``)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b; sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b; sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 32 on CUDA")
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--suite", choices=("seed", "field"), default="seed",
                        help="seed: every seed head at --channels / --size; field: the place-recognition heads, each "
                             "at its paper's map size (--channels / --size ignored)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: the suite's)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(head) (inductor, after warm-up; compile time reported apart)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 32 if args.device.startswith("cuda") else 8
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    suite = FIELD_CASES if args.suite == "field" else CASES
    args.cases = args.cases or ",".join(suite)

    rate = gemm_rate(args.device)
    positions = args.size * args.size
    floors = {"netvlad": codebook_flops(args.batch, args.channels, args.clusters, positions),
              "netfv": codebook_flops(args.batch, args.channels, args.clusters, positions, stacked=2)}
    if args.suite == "field":  # CRN at its case's size: NetVLAD's GEMMs + the context convolutions
        channels, size = FIELD_CASES["crn"][1:]
        floors = {"netvlad_20": codebook_flops(args.batch, channels, args.clusters, size * size)}
        floors["crn"] = floors["netvlad_20"] + crn_context_flops(args.batch, channels, size)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    print(f"# aggnets {aggnets.__version__} heads benchmark, {date.today()}, torch {torch.__version__}, "
          f"{args.device} ({device_name}, {torch.get_num_threads()} threads)")
    shape = "C x H x W per row" if args.suite == "field" else f"{args.channels}, {args.size}, {args.size}"
    print(f"# x: ({args.batch}, {shape}), K={args.clusters}, forward+backward, "
          f"median of {args.repeats}; GEMM rate {rate / 1e9:.1f} GFLOP/s"
          + (f"; floors (matrix-product / convolution FLOPs / GEMM rate): NetVLAD at 20 x 20 "
             f"{1e3 * floors['netvlad_20'] / rate:.1f} ms, CRN {1e3 * floors['crn'] / rate:.1f} ms "
             f"({floors['crn'] / floors['netvlad_20']:.2f}x NetVLAD's)"
             if args.suite == "field" else f"; NetVLAD floor {1e3 * floors['netvlad'] / rate:.1f} ms, "
                                              f"NetFV floor {1e3 * floors['netfv'] / rate:.1f} ms"))
    column = "| C x H x W " if args.suite == "field" else ""
    if args.compile:
        print(f"| case {column}| fwd+bwd ms | compiled ms | speed-up (median; min) | compile s | peak extra MB | out_dim "
              "| note |")
        print("|---" + "|---" * bool(column) + "|---:|---:|---:|---:|---:|---:|---|")
    else:
        print(f"| case {column}| fwd+bwd ms | peak extra MB | out_dim | note |")
        print("|---" + "|---" * bool(column) + "|---:|---:|---:|---|")
    results = {}
    for name in args.cases.split(","):
        channels, size = (FIELD_CASES[name][1:] if name in FIELD_CASES else (args.channels, args.size))
        command = [sys.executable, __file__, "--case", name, "--device", args.device, "--batch", str(args.batch),
                   "--channels", str(channels), "--size", str(size), "--clusters", str(args.clusters),
                   "--repeats", str(args.repeats)] + (["--compile"] if args.compile else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {name} | failed | | | {done.stderr.strip().splitlines()[-1] if done.stderr else ''} |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results[name] = result
        note = "" if result["backward"] else "forward only (piecewise-constant output, no gradient)"
        if name in floors:
            note = f"{result['ms'] / (1e3 * floors[name] / rate):.2f}x floor"
        if name == "netfv" and "netvlad" in results:
            note += f", {result['ms'] / results['netvlad']['ms']:.2f}x NetVLAD"
        for fast, slow in COMPARED:
            if name == slow and fast in results:
                note = f"{result['ms'] / results[fast]['ms']:.2f}x the time of {fast}"
        if name == "crn" and "netvlad_20" in results:
            note += f", {result['ms'] / results['netvlad_20']['ms']:.2f}x NetVLAD (netvlad_20)"
        compiled = ""
        if args.compile:
            compiled = (f" {result['compiled_ms']:.1f} | {result['ms'] / result['compiled_ms']:.2f}x; "
                        f"{result['ms_min'] / result['compiled_ms_min']:.2f}x | "
                        f"{result['compile_s']:.1f} |")
        cell = f" {channels} x {size} x {size} |" if column else ""
        print(f"| {name} |{cell} {result['ms']:.1f} |{compiled} {result['peak_mb']:.0f} | {result['out_dim']} | {note} |",
              flush=True)


if __name__ == "__main__":
    main()
