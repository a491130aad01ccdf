"""Launching a step only enqueues work: with the device busy for half a second, the host enqueues
the next step of each kind (eager mixed, decode in a CUDA graph, decode with Hydragen groups in one)
at once. A copy from pageable memory, a read of a device value or a wait on an event behind the
busy work would hold the launch until the device is done (CUDA only)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import local_runner
from tools.bench_step import step_plan
from tools.make_model import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BUSY_CYCLES = 1_000_000_000  # torch.cuda._sleep: ~0.5 s at an H200's clock
SHAPES = {"mixed": dict(prefill_rows=2, prefill_len=40), "decode": {}, "grouped": dict(groups=1, shared=64)}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = make_model("small-llama", tmp_path_factory.mktemp("m") / "m", dtype="bfloat16")
    # 16 decode rows in slots 0-15 and the mixed step's prefill rows in the next two; the captured size
    # of 16 rows holds one Hydragen group (of at least 16)
    return local_runner(str(path), dtype="bfloat16", device="cuda", kv_tokens=8192, max_seqs=32, cuda_graphs=True)


@pytest.mark.parametrize("kind", SHAPES)
def test_launching_a_step_does_not_wait_for_the_device(runner, kind):
    def plan(i):
        return step_plan(i, batch=16, context=48, page_size=16, **SHAPES[kind])

    for i in range(2):  # the first enters the page tables; kernels compile and buffers fill before timing
        runner.finish(runner.launch(plan(i)))
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(BUSY_CYCLES)
    end.record()
    t0 = time.perf_counter()
    launched = runner.launch(plan(2))
    host = time.perf_counter() - t0
    runner.finish(launched)
    busy = start.elapsed_time(end) / 1e3
    assert busy > 0.2, busy
    assert host < busy / 4, f"the launch took {host:.3f} s of host time behind {busy:.3f} s of device work"
