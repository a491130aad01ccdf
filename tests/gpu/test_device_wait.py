"""The runner's device_wait on CUDA: the device's time from a step's end to the next one's forward,
small when the next step is enqueued while the last one still runs, and at least the host's delay
when it is enqueued after the device went idle (CUDA only)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.helpers import local_runner
from tools.bench_step import step_plan
from tools.make_model import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_device_wait_is_what_the_host_kept_the_device_waiting(tmp_path):
    path = make_model("small-llama", tmp_path / "m", dtype="bfloat16")
    runner = local_runner(str(path), dtype="bfloat16", device="cuda", kv_tokens=4096, max_seqs=16, cuda_graphs=True)

    def plan(i):
        return step_plan(i, batch=16, context=64, page_size=16)

    runner.finish(runner.launch(plan(0)))
    torch.cuda._sleep(100_000_000)  # ~50 ms of device work ahead of the next two steps
    first = runner.launch(plan(1))
    ahead = runner.launch(plan(2))  # enqueued while the device is still busy
    runner.finish(first)
    runner.finish(ahead)
    late = runner.launch(plan(3))
    runner.finish(late)
    time.sleep(0.03)  # the device has gone idle: the host enqueues the next step 30 ms late
    behind = runner.launch(plan(4))
    runner.finish(behind)
    assert 0.0 <= runner.device_wait(ahead) < 0.002
    assert runner.device_wait(behind) >= 0.03
