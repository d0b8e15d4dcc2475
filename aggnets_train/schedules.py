"""Learning-rate schedules of the place-recognition recipes that torch.optim does not have as one object."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_multistep"]


def warmup_multistep(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, milestones: Sequence[int] = (),
                     gamma: float = 0.1, warmup_steps: int = 0, warmup_epochs: float = 0.0) -> LambdaLR:
    """A linear warm-up over the first steps, then ``MultiStepLR`` over epochs, stepped every batch: at step s
    (0-based) the factor is ``min(1, (s + 1) / W) * gamma ** #{m in milestones: m <= s // steps_per_epoch}`` with
    W = ``warmup_steps`` + ``warmup_epochs * steps_per_epoch`` (0: no warm-up). MixVPR (650 steps, milestones
    5, 10, 15, 25, 45, gamma 0.3), gsv-cities' ConvAP (600 steps; 5, 10, 15, 25; 0.3) and BoQ (10 epochs; 10, 20; 0.1)
    schedule so. ``steps_per_epoch`` is filled in by the training task from the run."""
    if steps_per_epoch < 1:
        raise ValueError(f"warmup_multistep: steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup = int(warmup_steps) + int(round(float(warmup_epochs) * steps_per_epoch))
    marks = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        scale = float(gamma) ** sum(1 for m in marks if m <= epoch)
        return scale * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)

    return LambdaLR(optimizer, factor)
