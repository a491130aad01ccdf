"""tools/sim_schedule.py: the scheduler replays a workload to its end, and the model costs it."""

from tools.sim_schedule import simulate


def test_every_request_runs_to_its_end_under_both_orders():
    costs = dict(kv_tokens=80000, max_seqs=64, ms_per_token=0.01, ms_per_cached_token=0.0, ms_per_step=1.0)
    runs = [simulate(300, order, **costs) for order in ("arrival", "longest-output-first")]
    for r in runs:
        # 300 requests of up to 512 output tokens, at most 64 at once: at least 512 steps, each >= 1 ms
        assert r["steps"] >= 512 and r["seconds"] >= r["steps"] * 1e-3
    # a cache that never preempts and no cost per cached token: both orders compute the same tokens
    assert abs(runs[0]["seconds"] - runs[0]["steps"] * 1e-3 - (runs[1]["seconds"] - runs[1]["steps"] * 1e-3)) < 1e-6
