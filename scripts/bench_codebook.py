"""Codebook fitting engines side by side: time and quality on the same synthetic CNN-like descriptors.

    python scripts/bench_codebook.py                    # 200000x256 and 1000000x1024, K = 64 and 1024 (long)
    python scripts/bench_codebook.py --quick            # a tiny run (a minute)
    python scripts/bench_codebook.py --sizes 200000x256 --ks 64 --max-seconds 120 --out /tmp/b.md

k-means: aggnets "torch" (defaults: random seeding, <= 25 Lloyd iterations on 256 K descriptors, tol 1e-4) against
faiss.Kmeans (its defaults: random seeding, 25 iterations on 256 K descriptors), scikit-learn MiniBatchKMeans (its
defaults) and KMeans (n_init=1, 25 iterations on all descriptors). Quality: inertia (mean squared distance to the
nearest centroid) over ALL descriptors, computed by the same function for every engine, inside the timed call.

Diagonal GMM: end to end with each library's normal settings (aggnets: k-means start + EM; scikit-learn:
GaussianMixture(covariance_type="diag"), its own k-means start, max_iter=100, tol=1e-3), and, separately, the cost of
an EM iteration from the same start (the torch engine's k-means, one M-step from its hard assignment) on the first
--per-iter-rows descriptors. Quality: mean log-likelihood over all (resp. those) descriptors, same function.
scikit-learn gets a float64 copy (made outside the timing): on float32 input it multiplies mixed float32/float64
arrays and is slower.

Every engine run is a fresh subprocess (clean thread pools, its own peak memory) with a wall-clock limit
(--max-seconds): a run that does not finish is reported as "skipped (> N s)"; a run whose estimate (measured
per-iteration time x iterations, or memory) is clearly over the limit is skipped up front and says why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

GMM_MAX_ITER = 100  # scikit-learn's GaussianMixture default, used by both engines end to end


# --- data -----------------------------------------------------------------------------------------------------

def synthetic_descriptors(n: int, c: int, seed: int = 0, components: int = 256, rank: int = 16,
                          chunk: int = 65536) -> torch.Tensor:
    """Deterministic CNN-like descriptors: a 256-component mixture with anisotropic components (a shared rank-16
    basis scaled per component and dimension, plus per-dimension noise), through ReLU(x - 0.5): non-negative,
    ~64 % exact zeros, clustered. Generated chunk by chunk: the (n, c) float32 output is the largest allocation."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, c, generator=g)
    basis = torch.randn(rank, c, generator=g) / math.sqrt(rank)
    scales = torch.rand(components, c, generator=g) * 1.5 + 0.25
    noise = torch.rand(components, c, generator=g) * 0.4 + 0.1
    weights = torch.randn(components, generator=g).softmax(0)
    out = torch.empty(n, c)
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        gi = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
        comp = torch.multinomial(weights, m, replacement=True, generator=gi)
        x = torch.randn(m, rank, generator=gi) @ basis
        x.mul_(scales[comp]).add_(means[comp]).add_(torch.randn(m, c, generator=gi).mul_(noise[comp]))
        out[start:start + m] = x.sub_(0.5).clamp_min_(0)
    return out


# --- one engine run, in its own process ---------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    from aggnets.codebook import fit_gmm, fit_kmeans, gmm_log_likelihood
    from aggnets.codebook.gmm import _fit_sklearn, _fit_torch, _initial_parameters

    x = torch.from_numpy(np.load(spec["data"]))
    if spec.get("rows"):
        x = x[:spec["rows"]]
    if spec["engine"] == "faiss":
        import faiss
        faiss.omp_set_num_threads(spec["threads"])
    if spec["task"] != "kmeans" and spec["engine"] == "sklearn":
        x = x.double()  # scikit-learn's fast path (see the module docstring); not timed
    k, base = spec["k"], _rss()
    out: dict = {}
    if spec["task"] == "kmeans":
        engine, init = spec["engine"], "random"
        if engine == "torch-kmeans++":
            engine, init = "torch", "kmeans++"
        r = fit_kmeans(x, k, engine=engine, init=init, seed=spec["seed"])
        if spec.get("save"):
            np.save(spec["save"], r.centroids.numpy())
        out = dict(seconds=r.seconds, quality=r.inertia, n_iter=r.n_iter)
    elif spec["task"] == "gmm":
        r = fit_gmm(x, k, engine=spec["engine"], iters=GMM_MAX_ITER, tol=1e-3, seed=spec["seed"])
        out = dict(seconds=r.seconds, quality=r.log_likelihood, n_iter=r.n_iter, converged=r.converged)
    else:  # EM iterations from the same start; only the EM loop is timed
        centroids = torch.from_numpy(np.load(spec["centroids"])).to(x.dtype)
        params = _initial_parameters(x, centroids, _chunk(x, k), 1e-6, False)
        start = time.perf_counter()
        if spec["engine"] == "torch":
            params = _fit_torch(x, params, spec["iters"], -1.0, 1e-6, _chunk(x, k), False, False, x.shape[0])[0]
        else:
            params = _fit_sklearn(x, k, params, spec["iters"], 0.0, 1e-6, spec["seed"], False)[0]
        seconds = time.perf_counter() - start
        out = dict(seconds=seconds, per_iter=seconds / spec["iters"], n_iter=spec["iters"],
                   quality=gmm_log_likelihood(x, *params))
    out["peak_gb"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30
    return out


def _chunk(x: torch.Tensor, k: int) -> int:
    from aggnets.codebook._common import default_chunk_size
    return default_chunk_size(x.shape[0], k, x.shape[1], width=2)


def run(spec: dict, limit: float) -> dict:
    """Run one engine in a subprocess; {"skipped": reason} when it does not finish within ``limit`` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), OPENBLAS_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        # the limit is on the fit; loading the descriptors from disk gets a little slack
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit + 30, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"skipped (> {limit:.0f} s)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"skipped": f"failed (rc {proc.returncode}: {tail[0][:120]})"}
    result = json.loads(lines[-1][len("RESULT "):])
    if result["seconds"] > limit:
        result["note"] = f"over the {limit:.0f} s limit"
    return result


# --- the benchmark ------------------------------------------------------------------------------------------------

def fmt(v: float | None, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def machine_note(threads: int) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")) / 2**20
    versions = [f"torch {torch.__version__}", f"numpy {np.__version__}"]
    for mod in ("faiss", "sklearn"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} not installed")
    return (f"{date.today()}, {cpu}, {len(os.sched_getaffinity(0))} cores available, {mem:.0f} GiB RAM, "
            f"{threads} thread(s) per engine (torch.set_num_threads, faiss.omp_set_num_threads, OMP/OpenBLAS/MKL "
            f"env), Python {platform.python_version()}, {', '.join(versions)}")


def bench(args: argparse.Namespace) -> str:
    threads = args.threads or len(os.sched_getaffinity(0))
    lines = [f"Machine: {machine_note(threads)}.", f"Load average at start: {os.getloadavg()[0]:.2f}.", ""]
    km_rows, e2e_rows, it_rows = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_codebook_"))
    try:
        for size in args.sizes.split(","):
            n, c = map(int, size.lower().split("x"))
            start = time.perf_counter()
            data = tmp / f"x_{n}x{c}.npy"
            x = synthetic_descriptors(n, c, seed=args.seed)
            zeros = float((x == 0).float().mean())
            np.save(data, x.numpy())
            del x
            print(f"# {n}x{c}: generated in {time.perf_counter() - start:.1f} s ({zeros:.0%} zeros)", flush=True)
            for k in map(int, args.ks.split(",")):
                common = dict(data=str(data), n=n, k=k, threads=threads, seed=args.seed)
                label = f"{n}x{c}, K={k}"
                km_rows += bench_kmeans(args, common, label, tmp)
                per_iter = bench_gmm_iterations(args, common, label, n, tmp, it_rows)
                e2e_rows += bench_gmm(args, common, label, n, c, per_iter)
            data.unlink()
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    lines += ["### k-means (reference: faiss)", "",
              "| descriptors, K | engine | time (s) | iterations | inertia (all descriptors) | time / faiss "
              "| inertia / faiss | peak extra memory (GiB) |", "|---|---|---|---|---|---|---|---|"]
    lines += km_rows
    lines += ["", f"### Diagonal GMM end to end (reference: scikit-learn; max_iter={GMM_MAX_ITER}, tol=1e-3)", "",
              "| descriptors, K | engine | time (s) | EM iterations | converged | mean log-likelihood (all) "
              "| speed-up vs sklearn | log-lik. difference vs sklearn | peak extra memory (GiB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += e2e_rows
    lines += ["", f"### Diagonal GMM, one EM iteration from the same start ({args.per_iter_iters} iterations "
              f"on the first {args.per_iter_rows} descriptors)", "",
              "| descriptors, K | engine | rows | s / iteration | mean log-likelihood after the iterations "
              "| speed-up vs sklearn | log-lik. difference vs sklearn |", "|---|---|---|---|---|---|---|"]
    lines += it_rows
    lines += ["", f"Load average at end: {os.getloadavg()[0]:.2f}. Timings on a shared 2-core machine are noisy "
              "(±40 % between runs; several-fold when another process holds a core, which also hurts "
              "multi-threaded runs most)."]
    return "\n".join(lines) + "\n"


def bench_kmeans(args, common: dict, label: str, tmp: Path) -> list[str]:
    results: dict = {}
    n, k = common["n"], common["k"]
    for engine in filter(None, args.kmeans_engines.split(",")):
        spec = dict(common, task="kmeans", engine=engine)
        if engine == "torch":
            spec["save"] = str(tmp / "centroids.npy")
        torch_run = results.get("torch", {})
        if engine == "sklearn-full" and "seconds" in torch_run:
            # KMeans iterates on all N descriptors: scale the torch engine's time by the distance computations
            work = n * 25 / (min(n, 256 * k) * torch_run["n_iter"] + n)
            if torch_run["seconds"] * work > 2 * args.max_seconds:
                results[engine] = {"skipped": f"skipped (> {args.max_seconds:.0f} s: ~{torch_run['seconds'] * work:.0f}"
                                              " s estimated from the torch time x the distance computations)"}
                continue
        print(f"  k-means {label} {engine} ...", end=" ", flush=True)
        results[engine] = run(spec, args.max_seconds)
        print(results[engine], flush=True)
    ref = results.get("faiss", {})
    rows = []
    for engine, r in results.items():
        if "skipped" in r:
            rows.append(f"| {label} | {engine} | {r['skipped']} | | | | | |")
            continue
        t_ratio = r["seconds"] / ref["seconds"] if "seconds" in ref else None
        q_ratio = r["quality"] / ref["quality"] if "quality" in ref else None
        rows.append(f"| {label} | {engine} | {r['seconds']:.2f} | {r['n_iter']} | {r['quality']:.5g} | "
                    f"{fmt(t_ratio, '.2f')} | {fmt(q_ratio, '.4f')} | {r['peak_gb']:.2f} |")
    return rows


def bench_gmm_iterations(args, common: dict, label: str, n: int, tmp: Path, rows: list[str]) -> dict:
    results = {}
    centroids = tmp / "centroids.npy"
    for engine in filter(None, args.gmm_engines.split(",")):
        if not centroids.exists():
            results[engine] = {"skipped": "skipped (no torch k-means start)"}
            continue
        spec = dict(common, task="gmm-iter", engine=engine, rows=min(n, args.per_iter_rows),
                    iters=args.per_iter_iters, centroids=str(centroids))
        print(f"  GMM per-iteration {label} {engine} ...", end=" ", flush=True)
        results[engine] = run(spec, args.max_seconds)
        print(results[engine], flush=True)
    ref = results.get("sklearn", {})
    for engine, r in results.items():
        if "skipped" in r:
            rows.append(f"| {label} | {engine} | | {r['skipped']} | | | |")
            continue
        speed = ref["per_iter"] / r["per_iter"] if "per_iter" in ref else None
        diff = (r["quality"] - ref["quality"]) / abs(ref["quality"]) * 100 if "quality" in ref else None
        rows.append(f"| {label} | {engine} | {min(n, args.per_iter_rows)} | {r['per_iter']:.3g} | {r['quality']:.6g} "
                    f"| {fmt(speed, '.2f')}x | {fmt(diff, '+.3f')} % |")
    if centroids.exists():
        centroids.unlink()
    return results


def bench_gmm(args, common: dict, label: str, n: int, c: int, per_iter: dict) -> list[str]:
    results = {}
    available = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemAvailable")) * 1024
    for engine in filter(None, args.gmm_engines.split(",")):
        measured = per_iter.get(engine, {})
        estimate = None
        if "per_iter" in measured:
            estimate = measured["per_iter"] * n / min(n, args.per_iter_rows) * GMM_MAX_ITER
        # scikit-learn holds a float64 copy, X**2, and about four (N, K) float64 arrays at once
        need = 8 * n * (2 * c + 4 * common["k"]) if engine == "sklearn" else 0
        if need > 0.8 * available:
            results[engine] = {"skipped": f"skipped (needs ~{need / 2**30:.0f} GiB > {available / 2**30:.0f} GiB "
                                          "available)"}
        elif estimate is not None and estimate > 2 * args.max_seconds:
            results[engine] = {"skipped": f"skipped (> {args.max_seconds:.0f} s: ~{estimate:.0f} s estimated from "
                                          f"the measured s/iteration x {GMM_MAX_ITER} iterations)"}
        else:
            print(f"  GMM end-to-end {label} {engine} ...", end=" ", flush=True)
            results[engine] = run(dict(common, task="gmm", engine=engine), args.max_seconds)
            print(results[engine], flush=True)
    ref = results.get("sklearn", {})
    rows = []
    for engine, r in results.items():
        if "skipped" in r:
            rows.append(f"| {label} | {engine} | {r['skipped']} | | | | | | |")
            continue
        speed = ref["seconds"] / r["seconds"] if "seconds" in ref else None
        diff = (r["quality"] - ref["quality"]) / abs(ref["quality"]) * 100 if "quality" in ref else None
        rows.append(f"| {label} | {engine} | {r['seconds']:.1f} | {r['n_iter']} | {r['converged']} | "
                    f"{r['quality']:.6g} | {fmt(speed, '.2f')}x | {fmt(diff, '+.3f')} % | {r['peak_gb']:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200000x256,1000000x1024", help="NxC[,NxC...]")
    parser.add_argument("--ks", default="64,1024")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: 20000x64, K=16,64")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="wall-clock limit of one engine run")
    parser.add_argument("--threads", type=int, default=0, help="threads per engine (default: available cores)")
    parser.add_argument("--kmeans-engines", default="torch,faiss,sklearn,sklearn-full",
                        help="also: torch-kmeans++ (the torch engine with k-means++ seeding)")
    parser.add_argument("--gmm-engines", default="torch,sklearn")
    parser.add_argument("--per-iter-rows", type=int, default=50000, help="descriptors of the per-iteration runs")
    parser.add_argument("--per-iter-iters", type=int, default=3, help="EM iterations of the per-iteration runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_codebook.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.quick:
        args.sizes, args.ks = "20000x64", "16,64"
    table = bench(args)
    print(table)
    Path(args.out).write_text(table)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
