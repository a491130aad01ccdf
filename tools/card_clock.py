"""The card's SM clock and power while a benchmark runs, sampled by nvidia-smi every half second:
a card's matmul rate is measured in a burst of a few seconds, while a served workload keeps it at
full power for a minute or more, where it may clock lower (power or heat), and then every kernel
is slower than its floor at the burst's rate says.

    sampler = ClockSampler.start()      # None where nvidia-smi is missing
    ...                                 # the run
    figures = sampler.stop()            # {"sm_mhz_mean": ..., ...}
"""

from __future__ import annotations

import shutil
import subprocess
import threading

FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "temperature.gpu")


def summarize(lines: list[str]) -> dict | None:
    """nvidia-smi's csv,noheader,nounits lines (FIELDS, one line per card per sample) -> the SM clock's
    mean and minimum, the card's top SM clock, mean power and the highest temperature, over every
    card's samples; None without a readable sample."""
    samples = []
    for line in lines:
        try:
            samples.append([float(v) for v in line.split(",")])
        except ValueError:  # "[N/A]", a torn line at the stop
            continue
    samples = [s for s in samples if len(s) == len(FIELDS)]
    if not samples:
        return None
    clock, top, power, temp = zip(*samples)
    return dict(samples=len(samples), sm_mhz_mean=sum(clock) / len(clock), sm_mhz_min=min(clock),
                sm_mhz_max_card=max(top), power_w_mean=sum(power) / len(power), temperature_c_max=max(temp))


class ClockSampler:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @classmethod
    def start(cls, interval_ms: int = 500) -> ClockSampler | None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        proc = subprocess.Popen([exe, f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
                                 f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return cls(proc)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def stop(self) -> dict | None:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(5)
        return summarize(self.lines)
