"""Precision helpers: where half precision's range is too small for a product, and autocast's state."""
from typing import Optional

import torch
from torch import Tensor

__all__ = ["autocast_enabled", "autocast_dtype", "bmm_full_range"]


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument (CUDA), CPU separately
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts matmuls to on ``device_type``, or None when autocast is off there."""
    if not autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def bmm_full_range(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm``, but never in float16, whose range (65504) the logits and sums of large activations exceed
    (bfloat16 has float32's range and keeps autocast's speed)."""
    if torch.jit.is_scripting():  # TorchScript: no autocast context with a run-time device type
        if a.dtype == torch.float16:
            return torch.bmm(a.float(), b.float())
        return torch.bmm(a, b)
    if a.dtype == torch.float16 or autocast_dtype(a.device.type) == torch.float16:
        with torch.autocast(device_type=a.device.type, enabled=False):
            return torch.bmm(a.float(), b.float())
    return torch.bmm(a, b)
