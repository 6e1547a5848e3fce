"""Precision: the one setting (`--precision auto|fp32|bf16`) that says how every stage computes.

    fp32   everything in fp32: the reference the tests compare against.
    bf16   matrix products in bf16. What that means per kind of model:
             trained (pm, sft, ppo's policy and value network): fp32 master weights, AdamW state and
               gradients; the forward and backward under bf16 autocast (products in bf16, norms, softmax,
               log-softmax, losses and reductions in fp32).
             frozen beside a trained one (ppo's reference and preference model): the blocks' Linear
               layers stored in bf16; the embedding, norms, output head and scalar heads in fp32; run under
               the same autocast. Autocast rounds an fp32 weight to the same bf16 as the stored copy, and
               the residual stream, norms and RoPE are fp32 in both (as is the log-prob head, computed in
               fp32 on the CPU), so the reference at iteration 0 is the policy bit for bit: KL = 0 and the
               first ratio is 1 (an all-bf16 reference would differ from the policy by bf16 rounding of
               the residual stream).
             inference only (simulate, respond, compare, judge-agreement, pm-agreement, generate): every
               weight in bf16, half the bytes a decode step reads.
    auto   bf16 on CUDA and on a CPU with native bf16 arithmetic (AMX `amx_bf16` or `avx512_bf16`, read
           from /proc/cpuinfo), fp32 elsewhere, where bf16 would be emulated and slower (an AMD EPYC with
           AVX2 only: bf16 `F.linear` at 17-20 GFLOP/s against 129-154 in fp32, docs/PERFORMANCE.md).
           bf16 asked by name on such a CPU runs, and its record says it is emulated.

Each run records what `auto` resolved to and why (`Precision.describe()`). The environment variable
RLCD_CPU_BF16=0 declares the CPU to have no native bf16 (as MKL_ENABLE_INSTRUCTIONS declares lower
instruction sets): the test suite sets it so that `auto` is the fp32 reference on every processor, and tests
of the bf16 path ask for bf16 by name.

API
    PRECISIONS; resolve(setting, device) -> Precision; native_bf16_cpu() -> str | None
    Precision.name ("fp32" | "bf16"), .bf16, .autocast(device), .inference_dtype, .describe()
    freeze_for(model, precision) -> model      a frozen model in the regime of a trained one
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")       # in order of preference when reporting


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo, read once per process (empty where it is absent);
    resolve() runs at every autocast context, once per micro-batch."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def native_bf16_cpu() -> str | None:
    """The CPU flag that gives native bf16 arithmetic (amx_bf16 or avx512_bf16), or None: none, not Linux,
    or RLCD_CPU_BF16=0."""
    if os.environ.get("RLCD_CPU_BF16", "").strip() == "0":
        return None
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()), None)


@dataclass(frozen=True)
class Precision:
    name: str                 # fp32 or bf16
    setting: str              # what was asked: auto, fp32 or bf16
    reason: str               # why auto resolved as it did; for bf16 asked by name, that a CPU emulates it

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def inference_dtype(self) -> torch.dtype:
        """The weights' dtype of a model that is only run, never trained."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """bf16 autocast for trained models and the frozen ones beside them; nothing in fp32."""
        dev = torch.device(device).type
        return torch.autocast(dev, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def describe(self) -> str:
        return self.name + (f" ({self.setting}: {self.reason})" if self.reason else "")

    def record(self) -> dict:
        return {"precision": self.name, "precision_setting": self.setting, "precision_reason": self.reason}


def resolve(setting: str, device: torch.device | str = "cpu") -> Precision:
    """`setting` (auto, fp32, bf16) on `device`; ValueError naming the flag for anything else."""
    if setting not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "bf16" and torch.device(device).type == "cpu" and not native_bf16_cpu():
        return Precision("bf16", setting, "emulated: no native bf16 on this CPU, slower than fp32")
    if setting != "auto":
        return Precision(setting, setting, "")
    if torch.device(device).type == "cuda":
        return Precision("bf16", setting, "CUDA")
    flag = native_bf16_cpu()
    if flag:
        return Precision("bf16", setting, f"the CPU has {flag}")
    return Precision("fp32", setting, "no native bf16 on this CPU" +
                     (" (RLCD_CPU_BF16=0)" if os.environ.get("RLCD_CPU_BF16", "").strip() == "0" else ""))


def freeze_for(model: nn.Module, precision: Precision) -> nn.Module:
    """A frozen model (reference, preference model) made to compute as a trained model under the same
    autocast: in bf16 the Linear layers of its Transformer blocks (weights and biases) are stored in bf16;
    the embedding, norms, output head and any scalar head stay fp32 (see the module docstring). `model` is
    loaded in fp32; it is changed in place and returned."""
    from models.llama import Block

    if precision.bf16:
        for block in (m for m in model.modules() if isinstance(m, Block)):
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    m.to(torch.bfloat16)
    return model.requires_grad_(False).eval()
