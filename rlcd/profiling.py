"""Timing a training iteration by phase, and `--profile`: the machinery around PPO's iteration that measures
it and changes nothing it computes (`train.py ppo --profile`, bench/bench_ppo.py, the per-iteration t_<phase>
metrics). The phases themselves are the iteration's own (rlcd.ppo.PHASES); everything here takes them, or
the step to time, as an argument.

    PhaseTimer(device)                      `with timer("generate"): ...`, then timer.read() once per iteration
    timed_iterations(step, device, warmup, iters, after=None) -> mean seconds per phase, warm-up left out
    run_profile(step, device, out, phases, what, detail, ...)   --profile: a Chrome trace and the phase table
    phase_table(times, phases, peak_bytes, title="") -> str;  peak_memory(device) -> int

`step(it, timer)` runs iteration `it` with its phases inside `timer` and returns its metrics record.
"""
from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Callable

import torch

from rlcd import distributed


class PhaseTimer:
    """Seconds per phase without a host sync: CUDA events on a GPU (read after the iteration's one sync),
    perf_counter on a CPU, where ops run synchronously. Each phase is also a profiler range."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        with torch.profiler.record_function(name):
            t0 = self._now()
            yield
            self.marks.append((name, t0, self._now()))

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (synchronises on a GPU: call once per iteration)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, a, b in self.marks:
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        self.marks.clear()
        return out


Step = Callable[[int, PhaseTimer], dict]        # step(it, timer) -> the iteration's metrics record


def phase_table(times: dict[str, float], phases: tuple[str, ...], peak_bytes: int | None, title: str = "") -> str:
    """A markdown table of seconds per phase and their shares, the total and the peak memory."""
    total = sum(times.get(p, 0.0) for p in phases)
    lines = [title] if title else []
    lines += ["| phase | s | share |", "|---|---:|---:|"]
    lines += [f"| {p} | {times.get(p, 0.0):.2f} | {100 * times.get(p, 0.0) / max(total, 1e-9):.0f}% |"
              for p in phases]
    lines.append(f"| **iteration** | **{total:.2f}** | 100% |")
    if peak_bytes:
        lines.append(f"\npeak memory: {peak_bytes / 2**30:.2f} GiB")
    return "\n".join(lines)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux reports KiB


def timed_iterations(step: Step, device: torch.device, warmup: int, iters: int,
                     after: Callable[[dict], None] | None = None) -> dict[str, float]:
    """Iterations 0 .. warmup + iters - 1 of `step` (for PPO, rlcd.ppo.train_iteration: the KL controller
    adapts as in training); returns the mean seconds per phase of the last `iters` (the warm-up ones, which
    pay for allocation, packing and compilation, are left out). `after(record)` runs after each iteration."""
    timer = PhaseTimer(device)
    totals: dict[str, float] = {}
    for it in range(warmup + iters):
        record = step(it, timer)
        times = timer.read()
        if it >= warmup:
            for k, v in times.items():
                totals[k] = totals.get(k, 0.0) + v / iters
        if after is not None:
            after(record)
    return totals


def run_profile(step: Step, device: torch.device, out: Path, phases: tuple[str, ...], what: str, detail: str,
                wait: int = 1, warmup: int = 1, active: int = 2) -> int:
    """--profile: wait + warmup + active iterations under torch.profiler (its wait/warm-up/active
    schedule); writes OUT/profile/trace.json (chrome://tracing, Perfetto) and prints the phase table of
    the active iterations ("WHAT, mean of ACTIVE profiled (DETAIL)"). Nothing is checkpointed. Under torchrun each rank
    writes its own trace (trace.rank<r>.json: its collectives show as gloo/nccl ranges) and rank 0 prints
    its table."""
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace = out / "profile" / ("trace.json" if not distributed.active() else f"trace.rank{distributed.rank()}.json")
    trace.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=acts, schedule=schedule(wait=wait, warmup=warmup, active=active),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace)), profile_memory=False) as prof:
        totals = timed_iterations(step, device, wait + warmup, active, lambda record: prof.step())
    title = f"{what}, mean of {active} profiled ({detail})"
    distributed.print0(phase_table(totals, phases, peak_memory(device), title))
    distributed.print0(f"chrome trace: {trace}")
    return 0
