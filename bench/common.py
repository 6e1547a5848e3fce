"""What the benchmarks share: the settings of the model they time, and the processor (or GPU) they name
beside every figure.

platform.processor() is empty on these Linux machines, and the project's two CPU kinds (an Intel Xeon, an
AMD EPYC) differ 3-4x in speed, so the name comes from /proc/cpuinfo.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch


@dataclass
class BenchArgs:
    """Where and on which weights a benchmark runs (each benchmark's Args adds its own settings)."""
    device: str = "cpu"                    # cpu or cuda
    threads: int = 2                       # torch CPU threads (0 = leave as is)
    real: bool = False                     # the real default model instead of random weights of its shape
    model: str = "smollm2-135m-instruct"   # checkpoint for --real


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
