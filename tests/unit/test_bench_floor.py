"""tools/floor.py and tools/bench.py's speed of light: one floor function, given rates, a launch's
GPUs; the client's connections; the engine's stop figures."""

import pytest
import torch

from tools.bench import engine_figures, flag, launch_gpus, model_costs, speed_of_light, speed_of_light_seconds
from tools.floor import Rates, card_rates, floor_seconds
from tools.make_model import make_model

GIVEN = Rates(1e12, 1e9, "given", "given")


def test_floor_is_flop_time_plus_bytes_at_the_copy_bandwidth():
    # 2 FLOPs a parameter a token; a byte read costs 1 / bandwidth
    assert floor_seconds(100, 5e8, 2e9, GIVEN) == pytest.approx(2 * 5e8 * 100 / 1e12 + 2.0)


def test_workload_floor_counts_prompt_once_and_each_sequences_decode_reads():
    reqs = [dict(prompt=[1] * 10, max_tokens=4, n=2)]
    # tokens: 10 prompt + 2 x 4 output; decode step i of a sequence reads 10 + i cached tokens
    unshared = 2 * (4 * 10 + 0 + 1 + 2 + 3)
    shared = 4 * 10 + 2 * (0 + 1 + 2 + 3)  # the prompt read once a step for both sequences
    assert speed_of_light_seconds(reqs, 1e9, 1000, GIVEN) == pytest.approx(2 * 1e9 * 18 / 1e12 + unshared * 1000 / 1e9)
    assert speed_of_light_seconds(reqs, 1e9, 1000, GIVEN, shared=True) == pytest.approx(
        2 * 1e9 * 18 / 1e12 + shared * 1000 / 1e9)


def test_costs_of_a_config_and_the_floor_split_over_a_launchs_gpus(tmp_path):
    model = str(make_model("tiny-llama", tmp_path / "m", weights=False))
    params, kv_bytes = model_costs(model)
    # 2 layers of q, k, v, o (4 heads + 2 KV heads of 16 over hidden 64) and the MLP, plus the LM head
    assert params == 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128) + 512 * 64
    assert kv_bytes == 2 * 2 * 2 * 16 * 2  # layers x (k, v) x KV heads x head_dim x 2 bytes
    reqs = [dict(prompt=[1] * 8, max_tokens=4)]
    one = speed_of_light(reqs, model, GIVEN, 1, seconds=1.0)
    two = speed_of_light(reqs, model, GIVEN, 2, seconds=1.0)
    assert two["speed_of_light_s"] == pytest.approx(one["speed_of_light_s"] / 2)
    assert one["pct_of_speed_of_light"] == pytest.approx(100 * one["speed_of_light_s"])
    assert "speed_of_light_shared_s" not in one  # n = 1: no shared-read floor
    assert "pct_of_speed_of_light_at_served_clock" not in one  # no clock figures: no served-clock share


def test_the_floor_at_the_served_clock_scales_the_matmul_rate_alone(tmp_path):
    model = str(make_model("tiny-llama", tmp_path / "m", weights=False))
    params, kv_bytes = model_costs(model)
    reqs = [dict(prompt=[1] * 8, max_tokens=4, n=2)]
    card = dict(sm_mhz_busy=1500.0, sm_mhz_max_card=2000.0)
    r = speed_of_light(reqs, model, GIVEN, 1, seconds=1.0, card=card)
    # the shared-read floor (n > 1) at three quarters of the matmul rate, the bandwidth as measured
    slow = Rates(GIVEN.flops * 0.75, GIVEN.bandwidth, "given", "given")
    assert r["served_clock"] == 0.75
    assert r["pct_of_speed_of_light_at_served_clock"] == pytest.approx(
        100 * speed_of_light_seconds(reqs, params, kv_bytes, slow, shared=True))
    assert r["pct_of_speed_of_light_at_served_clock"] > r["pct_of_speed_of_light_shared"]
    assert "served_clock" not in speed_of_light(reqs, model, GIVEN, 1, 1.0, dict(card, sm_mhz_busy=None))


def test_launch_flags_read_as_argparse_reads_them():
    flags = ["--model", "/m", "--tp=2", "--pp", "2", "--dp", "3"]
    assert flag(flags, "--model") == "/m" and flag(flags, "--tp") == "2" and flag(flags, "--hydragen") is None
    assert launch_gpus(flags) == 12 and launch_gpus([]) == 1
    assert flag(["--tp", "2", "--tp", "4"], "--tp") == "4"


def test_given_rates_skip_the_probe_and_without_cuda_a_missing_one_says_what_to_give():
    assert card_rates(2e14, 3e12) == Rates(2e14, 3e12, "given", "given")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device measures the missing rate")
    with pytest.raises(RuntimeError, match="no CUDA device.*--flops and --bandwidth"):
        card_rates(flops=2e14)


def test_clients_share_half_the_local_port_range_in_connections(monkeypatch):
    # the client's connections to one server come from one address: 65,536 of them at once cannot all
    # get a local port, so each of the clients keeps within its share of half the range
    import tools.bench_client as bench

    monkeypatch.setattr(bench, "raise_open_files_limit", lambda: 1 << 20)
    monkeypatch.setattr(bench.Path, "read_text", lambda self: "32768\t60999\n")
    assert bench.connection_limit(65536 // 8, 8) == (60999 - 32768 + 1) // 16
    assert bench.connection_limit(100, 8) == 100  # fewer requests than that: one connection each
    monkeypatch.setattr(bench, "raise_open_files_limit", lambda: 1000)
    assert bench.connection_limit(65536, 1) == 1000 - 256  # and within the open-files limit


def test_the_engines_stop_figures_give_rank_0_and_the_scheduler_of_each_replica(tmp_path, monkeypatch):
    from toka.fabric import STOP_FIGURES_ENV, write_stop_figures

    monkeypatch.setenv(STOP_FIGURES_ENV, str(tmp_path))
    rank = dict(steps=4000, span_s=56.6, launching_s=34.4, idle_s=0.16, host_wait_s=5.0)
    write_stop_figures("rank0", rank)
    write_stop_figures("rank1", dict(rank, launching_s=1.0))  # another tensor-parallel rank: not rank 0's
    write_stop_figures("scheduler", dict(steps=4000, planning_s=10.52, results_s=2.2))
    write_stop_figures("replica1.rank0", dict(rank, steps=0))  # a replica that ran nothing
    assert engine_figures(str(tmp_path)) == dict(
        ranks=[dict(steps=4000, span_s=56.6, launching_ms=pytest.approx(8.6), plan_wait_ms=pytest.approx(0.04),
                    host_wait_ms=pytest.approx(1.25))],
        schedulers=[dict(steps=4000, planning_ms=pytest.approx(2.63), results_ms=pytest.approx(0.55))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank1.json", "replica1.rank0.json",
                                                          "scheduler.json"]  # no half-written files left
    assert engine_figures(str(tmp_path / "none")) == dict(ranks=[], schedulers=[])  # an engine that wrote none
