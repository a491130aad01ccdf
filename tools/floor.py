"""The card's rates and the floor: the least time some work needs on it.

    python tools/floor.py      # measure this process's first CUDA device; prints JSON

One definition serves every tool: `floor_seconds` is 2 x matmul params FLOPs a token at the card's
bf16 matmul rate plus the bytes the work must read at its memory bandwidth. tools/bench.py applies
it to a whole workload (the KV bytes its decode steps read), tools/bench_step.py to one step (the
weights and the KV bytes it reads).

Bandwidth convention: a device-to-device copy of N bytes moves 2N (N read, N written), and the rate
is 2N over its time ("4.27 TB/s device copy" on an H200). A floor's bytes are bytes moved too (a
byte of KV cache read is one byte), so it charges each at 1 / bandwidth.

This file imports only torch and the standard library, so that it runs as a script from any folder
(tools/bench.py starts it in a subprocess before the server takes the GPU's memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

MATMUL = 8192  # the probe's square bf16 matmul
COPY_BYTES = 2**28  # the probe's copy: far beyond the L2 cache of any card


@dataclass(frozen=True)
class Rates:
    flops: float  # bf16 matmul FLOP/s
    bandwidth: float  # bytes read + written per second by a device copy
    flops_from: str  # "measured" or "given"
    bandwidth_from: str
    device: str = ""  # the measured card's name; "" when both rates were given

    def as_json(self) -> dict:
        return asdict(self)


def floor_seconds(tokens: float, params: float, bytes_read: float, rates: Rates) -> float:
    """Least time for `tokens` tokens through `params` matmul parameters (2 FLOPs each a token)
    while reading `bytes_read` bytes of device memory."""
    return 2 * params * tokens / rates.flops + bytes_read / rates.bandwidth


def measured_rates(device) -> tuple[float, float]:
    """(bf16 matmul FLOP/s on MATMUL^3, device copy bytes/s read + written) on `device`, each the
    mean over 20 runs after 3 warm-up runs."""
    import torch

    a = torch.randn(MATMUL, MATMUL, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL, MATMUL, device=device, dtype=torch.bfloat16)
    x = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)

    def timed(fn, reps=20, warmup=3):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    flops = 2 * MATMUL**3 / timed(lambda: a @ b)
    bandwidth = 2 * x.numel() / timed(lambda: y.copy_(x))
    return flops, bandwidth


def card_rates(flops: float | None = None, bandwidth: float | None = None) -> Rates:
    """The rates to take: those given, the others measured by a probe in a subprocess (so that
    its memory is freed before a server sizes its KV cache). Raises RuntimeError saying why when
    a rate is missing and there is no CUDA device to measure it on."""
    if flops is not None and bandwidth is not None:
        return Rates(flops, bandwidth, "given", "given")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True)
    try:
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        probe = {"error": f"the probe exited with {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    if "error" in probe:
        raise RuntimeError(f"cannot measure the card's rates ({probe['error']}); give --flops and --bandwidth")
    return Rates(flops if flops is not None else probe["flops"],
                 bandwidth if bandwidth is not None else probe["bandwidth"],
                 "given" if flops is not None else "measured", "given" if bandwidth is not None else "measured",
                 probe["device"])


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return
    flops, bandwidth = measured_rates(torch.device("cuda"))
    print(json.dumps({"flops": flops, "bandwidth": bandwidth, "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
