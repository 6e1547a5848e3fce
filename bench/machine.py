"""What every benchmark prints beside its figures: the processor (or GPU) that produced them.

platform.processor() is empty on these Linux machines, and the project's two CPU kinds (an Intel Xeon, an
AMD EPYC) differ 3-4x in speed, so the name comes from /proc/cpuinfo.
"""
from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    """e.g. "AMD EPYC (AuthenticAMD, family 25 model 17)"; platform.machine() where /proc/cpuinfo is absent."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break                                      # the first processor is enough
    except OSError:
        return platform.processor() or platform.machine()
    return (f"{fields.get('model name', platform.machine())} ({fields.get('vendor_id', '?')}, "
            f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')})")


def describe(device: torch.device | str) -> str:
    """The GPU's name on CUDA; the processor and torch's thread count on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"
