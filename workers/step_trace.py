"""Where a served step's device time goes. With TOKA_TRACE=DIR:FIRST:COUNT in the environment, each
rank records the device's kernels while it runs steps FIRST .. FIRST + COUNT - 1, or up to the
engine's stop if that comes first (torch.profiler, device activity only, so the host keeps its
pace), and writes DIR/<rank>-steps.txt: how long the device was busy and idle over those steps,
the kernels by total time, and what the steps held (rows, prompt tokens, cached tokens read).
bench_step.py measures synthetic steps; this measures the steps a real workload makes, with its
mix of lengths."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

import numpy as np
import torch

from toka.protocol import StepPlan

log = logging.getLogger("toka.rank")


class StepTrace:
    def __init__(self, name: str, spec: str | None = None):
        spec = os.environ.get("TOKA_TRACE", "") if spec is None else spec
        self.name = name
        self.folder, self.first, self.count = None, 0, 0
        if spec:
            folder, first, count = spec.rsplit(":", 2)
            self.folder, self.first, self.count = folder, int(first), int(count)
        self.prof = None
        self.plans: list[tuple[int, int, int, int]] = []

    def before_launch(self, plan: StepPlan) -> None:
        if self.folder is None:
            return
        step = plan.step_id
        if step == self.first + self.count:
            self.close()
            return
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile

            # device activity only: recording host ops would slow the host that launches the steps
            device = torch.cuda.is_available()
            self.prof = profile(activities=[ProfilerActivity.CUDA if device else ProfilerActivity.CPU])
            self.prof.start()
        if self.prof is not None:
            kv = np.asarray(plan.kv_lens[plan.num_prefill :], dtype=np.int64)
            prompt = int(np.sum(plan.q_lens[: plan.num_prefill]))
            self.plans.append((len(plan.slots) - plan.num_prefill, plan.num_prefill, prompt, int(kv.sum())))

    def close(self) -> None:
        """Ends the window (at its last step, or at the engine's stop if the run was shorter) and
        writes what it recorded."""
        if self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.stop()
            self._write()
        elif self.folder is not None:
            log.warning("TOKA_TRACE: the engine stopped before step %d; nothing was traced", self.first)
        self.prof, self.folder = None, None

    def _write(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        trace = os.path.join(self.folder, f"{self.name}-trace.json")
        self.prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
        kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                         if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
        n = len(self.plans)
        lines = [f"steps {self.first} .. {self.first + n - 1} ({self.name})", *device_lines(kernels, n)]
        a = np.asarray(self.plans, dtype=np.float64).reshape(-1, 4)
        lines.append("a step (mean / max): decode rows %.0f / %.0f, prefill rows %.1f / %.0f, prompt tokens "
                     "%.0f / %.0f, cached tokens decode rows read %.0f / %.0f" %
                     tuple(v for col in a.T for v in (col.mean(), col.max())))
        with open(os.path.join(self.folder, f"{self.name}-steps.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


# kernel kinds by name, first match wins: a step's matmuls alone come as dozens of cuBLAS kernels
# (one a tile shape), most below the top of the list. Attention first: FlashInfer's Hopper prefill
# kernel names CUTLASS types among its template arguments
KINDS = (("attention", ("_chunk_kernel", "_merge_kernel", "Prefill", "Decode", "kernel_mha", "MergeState",
                        "AppendPagedKV")),
         ("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
         ("copy", ("Memcpy", "Memset", "copy_kernel", "CatArray")))
SHOWN_KINDS = ("matmul", "attention", "copy", "other")


def kind_of(name: str) -> str:
    return next((kind for kind, marks in KINDS if any(m in name for m in marks)), "other")


def device_lines(kernels: list[tuple[float, float, str]], steps: int) -> list[str]:
    """What the device did over `steps` steps, from its kernels' (start, end, name) in µs sorted by
    start: busy and idle time a step, the kernels' time by kind (KINDS) and by kernel, and where the
    idle time fell: each gap is put down to the kernel before it and the one that ended it (the one
    the device waited to start), so a wait for the host shows as the first kernel of what the host had
    not yet launched, and the kernel before says where in the step the host fell behind."""
    if not kernels:
        return []
    span = kernels[-1][1] - kernels[0][0]
    busy, end, last = 0.0, kernels[0][0], kernels[0][2]
    gaps: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    sizes = np.zeros(3)  # idle in gaps under 10 µs, 10-100 µs, over 100 µs
    for lo, hi, name in kernels:  # union of the kernels' intervals
        if lo > end:
            gap = gaps[f"{last[:50]} -> {name[:55]}"]
            gap[0] += lo - end
            gap[1] += 1
            sizes[np.searchsorted([10.0, 100.0], lo - end)] += lo - end
        busy += max(0.0, hi - max(lo, end))
        if hi >= end:
            end, last = hi, name
    ms = 1e3 * steps
    lines = [f"device: {span / ms:.2f} ms a step, busy {busy / ms:.2f}, idle {(span - busy) / ms:.2f} "
             f"({100 * (span - busy) / span:.1f} %)"]
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for lo, hi, name in kernels:
        by_name[name][0] += hi - lo
        by_name[name][1] += 1
    kinds: dict[str, float] = defaultdict(float)
    for name, (t, _) in by_name.items():
        kinds[kind_of(name)] += t
    lines.append("by kind, ms a step: " + ", ".join(f"{k} {kinds[k] / ms:.2f}" for k in SHOWN_KINDS))
    lines.append(f"{'ms a step':>10} {'calls':>6}  kernel")
    for name, (t, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:20]:
        lines.append(f"{t / ms:10.3f} {calls / steps:6.1f}  {name[:110]}")
    if gaps:
        lines.append("idle a step in gaps of < 10 µs, 10-100 µs, > 100 µs: " + ", ".join(f"{v / ms:.2f}" for v in sizes)
                     + " ms; by the kernels before and after the gap:")
        lines.append(f"{'ms a step':>10} {'gaps':>6}  kernel before -> kernel after")
        for name, (t, count) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:8]:
            lines.append(f"{t / ms:10.3f} {count / steps:6.1f}  {name}")
    return lines
