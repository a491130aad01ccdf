"""The rank's serve loop with a simulated device: the next step is launched before the running one
is finished when its plan arrives first, a finished step is published without waiting for a plan
that may never come, and the device's wait before a step counts as the host's only when that step's
plan came while the one before was still in flight."""

from __future__ import annotations

from toka.protocol import StepPlan, Stop
from workers.rank import serve


class FakeDevice:
    """A runner whose steps take `device_polls` looks at the device to finish, and a plan socket
    whose plans appear after `plan_delays[i]` polls; both clocks are the poll count."""

    def __init__(self, plan_delays: list[int], device_polls: int):
        self.clock = 0
        self.arrivals = []
        t = 0
        for d in plan_delays:
            t += d
            self.arrivals.append(t)
        self.plans = [StepPlan(i, [], [], [], [], [], 0, [], [], [], []) for i in range(len(plan_delays))]
        self.plans.append(Stop(len(plan_delays)))
        self.arrivals.append(self.arrivals[-1] + 1)
        self.device_polls = device_polls
        self.log: list[str] = []
        self.sent: list[int] = []

    # the plan socket
    def poll(self, timeout_ms: int = 0) -> bool:
        self.clock += 1
        return bool(self.arrivals) and self.arrivals[0] <= self.clock

    def recv(self):
        while not self.poll():
            pass
        self.arrivals.pop(0)
        return self.plans.pop(0)

    # the runner
    def launch(self, plan):
        self.log.append(f"launch {plan.step_id}")
        return (plan.step_id, self.clock + self.device_polls)

    def done(self, launched) -> bool:
        return self.clock >= launched[1]

    def finish(self, launched):
        self.log.append(f"finish {launched[0]}")
        self.clock = max(self.clock, launched[1])
        return launched[0]

    def close(self) -> None:
        self.log.append("close")

    def device_wait(self, launched) -> float:
        return 1.0  # a second a step, so the summary counts the steps it was asked for

    # the events socket
    def send(self, result) -> None:
        self.sent.append(result)

    def wait_subscribers(self, *args, **kwargs) -> None:
        pass


def test_next_step_is_launched_before_the_running_one_finishes_when_its_plan_comes_first():
    dev = FakeDevice(plan_delays=[1, 3, 3, 3], device_polls=10)  # plans come faster than the device
    summary = serve(dev, dev, dev)
    assert dev.log == ["launch 0", "launch 1", "finish 0", "launch 2", "finish 1", "launch 3", "finish 2", "finish 3",
                       "close"]
    assert dev.sent == [0, 1, 2, 3]
    assert summary["steps"] == 4 and summary["host_wait_s"] == 3.0  # steps 1-3 came while one was in flight


def test_a_finished_step_is_published_without_waiting_for_the_next_plan():
    dev = FakeDevice(plan_delays=[1, 50, 50], device_polls=5)  # the scheduler needs each result first
    summary = serve(dev, dev, dev)
    assert dev.log == ["launch 0", "finish 0", "launch 1", "finish 1", "launch 2", "finish 2", "close"]
    assert dev.sent == [0, 1, 2]
    # every plan came to an idle device: the waits are the scheduler's, not the host's launching
    assert summary["host_wait_s"] == 0.0 and summary["idle_s"] > 0
