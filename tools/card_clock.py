"""The card's SM clock and power while a benchmark runs, sampled by nvidia-smi every half second:
a card's matmul rate is measured in a burst of a few seconds, while a served workload keeps it at
full power for a minute or more, where it may clock lower (power or heat), and then every kernel
is slower than its floor at the burst's rate says.

    sampler = ClockSampler.start()      # None where nvidia-smi is missing
    ...                                 # the run
    figures = sampler.stop()            # {"sm_mhz_mean": ..., ...}

Where the driver names them, the samples also say why the clock was held down (the share of
samples with each of the driver's clock-event reasons active), the enforced power limit and the
clock over the busy samples alone (utilization at least 90 %), and in tenths of the run.
"""

from __future__ import annotations

import shutil
import subprocess
import threading

FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "temperature.gpu")
REASONS = ("sw_power_cap", "hw_slowdown", "hw_power_brake_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown")
EXTRA = ("utilization.gpu", "enforced.power.limit") + tuple(f"clocks_event_reasons.{r}" for r in REASONS)
BUSY = 90  # % utilization: a sample of a card running kernels, not one waiting for work


def _value(v: str) -> float:
    v = v.strip()
    if v in ("Active", "Not Active"):
        return float(v == "Active")
    return float(v)


def summarize(lines: list[str], fields: tuple[str, ...] = FIELDS) -> dict | None:
    """nvidia-smi's csv,noheader,nounits lines (`fields`, one line per card per sample) -> the SM
    clock's mean and minimum, the card's top SM clock, mean power and the highest temperature over
    every card's samples, and with EXTRA the busy samples' clock, the clock in tenths of the run, the
    power limit and each reason's share of samples; None without a readable sample."""
    samples = []
    for line in lines:
        try:
            samples.append([_value(v) for v in line.split(",")])
        except ValueError:  # "[N/A]", a torn line at the stop
            continue
    samples = [s for s in samples if len(s) == len(fields)]
    if not samples:
        return None
    cols = dict(zip(fields, zip(*samples)))
    clock = cols["clocks.sm"]
    out = dict(samples=len(samples), sm_mhz_mean=sum(clock) / len(clock), sm_mhz_min=min(clock),
               sm_mhz_max_card=max(cols["clocks.max.sm"]), power_w_mean=sum(cols["power.draw"]) / len(samples),
               temperature_c_max=max(cols["temperature.gpu"]))
    if "utilization.gpu" not in cols:
        return out
    busy = [c for c, u in zip(clock, cols["utilization.gpu"]) if u >= BUSY]
    n = len(clock)
    tenths = [clock[i * n // 10:(i + 1) * n // 10] for i in range(10)]
    out.update(sm_mhz_busy=sum(busy) / len(busy) if busy else None, busy_samples=len(busy),
               sm_mhz_tenths=[round(sum(t) / len(t)) for t in tenths if t],
               power_limit_w=max(cols["enforced.power.limit"]),
               reasons={r: sum(cols[f"clocks_event_reasons.{r}"]) / n for r in REASONS})
    return out


class ClockSampler:
    def __init__(self, proc: subprocess.Popen, fields: tuple[str, ...]):
        self.proc = proc
        self.fields = fields
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @classmethod
    def start(cls, interval_ms: int = 500) -> ClockSampler | None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None

        def query(fields):
            return [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]

        fields = FIELDS + EXTRA
        # an older driver refuses the whole query for one field it does not know
        try:
            known = subprocess.run(query(fields), capture_output=True, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            known = False
        if not known:
            fields = FIELDS
        proc = subprocess.Popen(query(fields) + [f"-lms={interval_ms}"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        return cls(proc, fields)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def stop(self) -> dict | None:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(5)
        return summarize(self.lines, self.fields)
