"""How many rows a step samples at once: the fused kernel's batches in larger chunks than those
that materialize float32 logits."""

import numpy as np
import torch

from workers import sampling_kernel
from workers.runner import FUSED_CHUNK, LOGIT_CHUNK, ModelRunner


def test_batches_the_fused_kernel_samples_take_larger_chunks(monkeypatch):
    runner = ModelRunner(None, None, 64, 16, torch.device("cpu"), scratch_page=0, max_pages_per_seq=4)
    slots = np.arange(8)
    assert runner._logit_chunk(slots, 0) == LOGIT_CHUNK  # on the CPU: the torch path
    runner.cuda = True
    monkeypatch.setattr(sampling_kernel, "sample_partials", lambda *a, **k: None)  # as if Triton were there
    assert runner._logit_chunk(slots, 0) == FUSED_CHUNK > LOGIT_CHUNK
    assert runner._logit_chunk(slots, 2) == LOGIT_CHUNK  # alternatives asked for
    runner.filtered[3] = True  # a row with top-p, top-k or min-p
    assert runner._logit_chunk(slots, 0) == LOGIT_CHUNK
    assert runner._logit_chunk(slots[4:], 0) == FUSED_CHUNK
    runner.filtered[3] = False
    runner.processor.active[5] = True  # a row with penalties, logit_bias or min_tokens
    assert runner._logit_chunk(slots, 0) == LOGIT_CHUNK
    runner.processor.active[5] = False
    monkeypatch.setattr(sampling_kernel, "sample_partials", None)  # no Triton
    assert runner._logit_chunk(slots, 0) == LOGIT_CHUNK
