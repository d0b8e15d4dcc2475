"""Forward + backward time and peak extra memory of every head, beside naive formulations and the GEMM floor.

    python scripts/bench_heads.py                      # CPU: B=8, C=1024, 28x28, K=64 (B=32 on CUDA)
    python scripts/bench_heads.py --device cuda
    python scripts/bench_heads.py --cases netvlad,netvlad_loop --repeats 3
    python scripts/bench_heads.py --cases netvlad,netfv,gem,rmac --compile   # + torch.compile (inductor) column

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
from bench_common import cpu_model, timed


# --- naive formulations kept for comparison (what the fast heads replace) ----------------------------------------

class NetVLADLoop(heads.NetVLAD):
    """NetVLAD with a Python loop over clusters (as in several public implementations)."""

    def pool(self, x, mask):
        descriptors = F.normalize(x.flatten(2), dim=1)
        assignment = AF.assign(descriptors, self.assign_weight, self.assign.bias)
        vlad = torch.stack([(assignment[:, k:k + 1, :] * (descriptors - self.centroids[k][None, :, None])).sum(-1)
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


def codebook_flops(batch: int, channels: int, clusters: int, positions: int, stacked: int = 1) -> float:
    """6 matrix products (2 forward, 4 backward) of 2 * B * K * (stacked * C) * N flops each."""
    return 6 * 2.0 * batch * clusters * stacked * channels * positions


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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(name: str, args: argparse.Namespace) -> dict:
    """Time one case in this process and return its measurements."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    head = CASES[name](args.channels, args.clusters).to(device)
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
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(head) (inductor, after warm-up; compile time reported apart)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 32 if args.device.startswith("cuda") else 8
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return

    rate = gemm_rate(args.device)
    positions = args.size * args.size
    floors = {"netvlad": codebook_flops(args.batch, args.channels, args.clusters, positions),
              "netfv": codebook_flops(args.batch, args.channels, args.clusters, positions, stacked=2)}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    print(f"# aggnets {aggnets.__version__} heads benchmark, {date.today()}, torch {torch.__version__}, "
          f"{args.device} ({device_name}, {torch.get_num_threads()} threads)")
    print(f"# x: ({args.batch}, {args.channels}, {args.size}, {args.size}), K={args.clusters}, forward+backward, "
          f"median of {args.repeats}; GEMM rate {rate / 1e9:.1f} GFLOP/s; "
          f"NetVLAD floor {1e3 * floors['netvlad'] / rate:.1f} ms, NetFV floor {1e3 * floors['netfv'] / rate:.1f} ms")
    if args.compile:
        print("| case | fwd+bwd ms | compiled ms | speed-up (median; min) | compile s | peak extra MB | out_dim | note |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
    else:
        print("| case | fwd+bwd ms | peak extra MB | out_dim | note |")
        print("|---|---:|---:|---:|---|")
    results = {}
    for name in args.cases.split(","):
        command = [sys.executable, __file__, "--case", name, "--device", args.device, "--batch", str(args.batch),
                   "--channels", str(args.channels), "--size", str(args.size), "--clusters", str(args.clusters),
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
        for fast, slow in (("netvlad", "netvlad_loop"), ("netvlad", "netvlad_broadcast"), ("rmac", "rmac_loop"),
                           ("gem", "gem_plain")):
            if name == slow and fast in results:
                note = f"{result['ms'] / results[fast]['ms']:.2f}x the time of {fast}"
        compiled = ""
        if args.compile:
            compiled = (f" {result['compiled_ms']:.1f} | {result['ms'] / result['compiled_ms']:.2f}x; "
                        f"{result['ms_min'] / result['compiled_ms_min']:.2f}x | "
                        f"{result['compile_s']:.1f} |")
        print(f"| {name} | {result['ms']:.1f} |{compiled} {result['peak_mb']:.0f} | {result['out_dim']} | {note} |",
              flush=True)


if __name__ == "__main__":
    main()
