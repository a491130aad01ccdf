"""TOKA_TRACE's step window: it records exactly the asked steps and writes what they held."""

from toka.protocol import StepPlan
from workers.step_trace import StepTrace, device_lines, kind_of


def plan(step: int, decode: int, prompt: int) -> StepPlan:
    n = decode + 1
    return StepPlan(step, list(range(n)), list(range(n)), [prompt] + [1] * decode, [prompt] + [100] * decode,
                    [True] * n, 1, [0] * prompt, [], [], [])


def test_window_writes_its_steps(tmp_path):
    trace = StepTrace("rank0", f"{tmp_path}:2:3")
    for step in range(7):
        trace.before_launch(plan(step, decode=10 * step, prompt=5))
    text = (tmp_path / "rank0-steps.txt").read_text()
    assert text.startswith("steps 2 .. 4 (rank0)")
    # steps 2, 3, 4: 20, 30, 40 decode rows of 100 cached tokens each
    assert "decode rows 30 / 40, prefill rows 1.0 / 1, prompt tokens 5 / 5, cached tokens decode rows read 3000 / 4000" in text


def test_a_run_shorter_than_the_window_writes_its_steps_at_close(tmp_path):
    trace = StepTrace("rank0", f"{tmp_path}:1:100")
    for step in range(3):
        trace.before_launch(plan(step, decode=10, prompt=5))
    trace.close()
    text = (tmp_path / "rank0-steps.txt").read_text()
    assert text.startswith("steps 1 .. 2 (rank0)") and "decode rows 10 / 10" in text


def test_a_run_that_ends_before_the_window_says_so(tmp_path, caplog):
    trace = StepTrace("rank0", f"{tmp_path}:50:10")
    trace.before_launch(plan(0, decode=1, prompt=1))
    trace.close()
    assert not list(tmp_path.iterdir()) and "stopped before step 50" in caplog.text


def test_off_without_spec(tmp_path):
    trace = StepTrace("rank0", "")
    for step in range(3):
        trace.before_launch(plan(step, decode=1, prompt=1))
    trace.close()
    assert not list(tmp_path.iterdir())


def test_device_lines_put_idle_time_down_to_the_kernels_around_it():
    # two steps' kernels (µs): gaps of 4 µs between "a" and "b", 60 between "b" and "c" and 200 between
    # "c" and "a" (the second step's first kernel); the overlapping "b" kernels count once in the busy
    # time, and the later-ending one is the kernel before the next gap
    kernels = [(0, 100, "a"), (104, 200, "b"), (150, 210, "b"), (270, 300, "c"), (500, 600, "a"), (600, 700, "b")]
    lines = device_lines(kernels, steps=2)
    assert lines[0] == "device: 0.35 ms a step, busy 0.22, idle 0.13 (37.7 %)"
    assert lines[1] == "by kind, ms a step: matmul 0.00, attention 0.00, copy 0.00, other 0.24"  # sums of durations
    at = next(i for i, line in enumerate(lines) if line.startswith("idle a step"))
    assert lines[at].startswith("idle a step in gaps of < 10 µs, 10-100 µs, > 100 µs: 0.00, 0.03, 0.10 ms")
    assert [line.split() for line in lines[at + 2:]] == [["0.100", "0.5", "c", "->", "a"],
                                                        ["0.030", "0.5", "b", "->", "c"],
                                                        ["0.002", "0.5", "a", "->", "b"]]


def test_kernels_are_put_down_to_their_kind():
    names = {"nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_TNT": "matmul", "_chunk_kernel": "attention",
             "void flashinfer::PrefillWithKVCacheKernel<...>": "attention", "Memcpy HtoD (Pinned -> Device)": "copy",
             "void flashinfer::PrefillWithKVCacheKernel<flashinfer::SparseCollectiveMainloop<cutlass::bfloat16_t>>":
                 "attention",
             "void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>": "other", "_sample_rows": "other"}
    assert {n: kind_of(n) for n in names} == names
    kernels = [(0, 10, "nvjet_x"), (10, 30, "_chunk_kernel"), (30, 33, "Memset (Device)"), (33, 40, "_sample_rows")]
    assert device_lines(kernels, steps=1)[1] == "by kind, ms a step: matmul 0.01, attention 0.02, copy 0.00, other 0.01"


def test_device_lines_of_no_kernels_are_none():
    assert device_lines([], steps=3) == []
