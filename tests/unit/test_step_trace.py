"""TOKA_TRACE's step window: it records exactly the asked steps and writes what they held."""

from toka.protocol import StepPlan
from workers.step_trace import StepTrace


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
