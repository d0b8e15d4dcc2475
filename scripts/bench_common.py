"""What the benchmark scripts share: the machine's CPU model (benchmark tables name it) and repeated timing."""
from __future__ import annotations

import time
from typing import Callable


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (e.g. "AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz")."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


def timed(step: Callable[[], None], sync: Callable[[], None], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step``, synchronised with the device before and after."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times
