"""What fine-tuning the last blocks of a vision transformer costs: forward + backward time, the activations autograd
keeps for the backward, and peak memory, for a DINOv2 backbone trained whole or with a frozen prefix.

    python scripts/bench_vit.py                                  # CPU: DINOv2 ViT-B/14, 322 px, B=8 (SALAD's setting)
    python scripts/bench_vit.py --model timm:vit_small_patch14_dinov2 --size 224 --batch 4
    python scripts/bench_vit.py --device cuda --batch 32 --dtype bf16

Random weights (time and memory do not depend on the values). Each case runs in its own process: CPU peak memory is
the process high-water mark (ru_maxrss) minus the resident size before the first forward; on CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated before. "kept for backward" adds the bytes of every tensor
autograd saves during the forward (torch.autograd.graph.saved_tensors_hooks): the activation memory of training.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from datetime import date

import torch

import aggnets
from aggnets.backbones import build_backbone
from bench_common import cpu_model, timed

# name -> freeze spec, as a function of the depth
CASES = {
    "all blocks trained": lambda depth: False,
    "last 4 blocks (SALAD)": lambda depth: f"blocks.{depth - 5}",
    "last 2 blocks (BoQ)": lambda depth: f"blocks.{depth - 3}",
    "frozen (inference)": lambda depth: True,
}


def run_case(case: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    backbone = build_backbone(args.model, weights=None)
    depth = len(backbone.body.blocks)
    backbone = backbone.freeze(CASES[case](depth)).to(device).train()
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    def step(count: bool = False) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if count:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = backbone(images)
            else:
                out = backbone(images)
        loss = out.float().square().mean()
        if loss.requires_grad:
            loss.backward()
        backbone.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(count=True)
    sync()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = timed(step, sync, args.repeats)
    return {"ms": 1e3 * statistics.median(times), "saved_mb": saved / 2 ** 20, "peak_mb": peak / 2 ** 20,
            "trainable_m": trainable / 1e6, "depth": depth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:vit_base_patch14_dinov2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=322)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    print(f"# aggnets {aggnets.__version__} ViT fine-tuning benchmark, {date.today()}, torch {torch.__version__}, "
          f"{args.device} ({device}, {torch.get_num_threads()} threads)")
    print(f"# {args.model}, {args.batch} x 3 x {args.size} x {args.size} ({(args.size // 14) ** 2} patches), "
          f"{args.dtype}, forward + backward, median of {args.repeats}")
    print("| trained | trainable params | fwd+bwd ms | kept for backward MB | peak extra MB |")
    print("|---|---:|---:|---:|---:|")
    for case in CASES:
        command = [sys.executable, __file__, "--case", case, "--model", args.model,
                   "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--size",
                   str(args.size), "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {case} | failed: {done.stderr.strip().splitlines()[-1] if done.stderr else ''} | | | |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {case} | {result['trainable_m']:.1f} M | {result['ms']:.0f} | {result['saved_mb']:.0f} | "
              f"{result['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
