"""tools/gpu.py without a GPU: its arguments, the command lines each part would run, the table it
builds from the files the tools write, and the process groups it stops."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import alive
from tools import gpu, gpu_parts, gpu_results
from tools.gpu_jobs import STOPPED, TIMED_OUT, Job, Models, Runner
from tools.gpu_results import NO_RESULT, table


class Recorder(Runner):
    """Runs nothing; keeps each call's jobs, so that a test sees which ran together."""

    def __init__(self):
        super().__init__(dry_run=True)
        self.batches: list[list[Job]] = []

    def run(self, jobs):
        self.batches.append(jobs)
        return [0] * len(jobs)


def part(name: str, tmp_path: Path, *argv: str, gpus=("0",)) -> gpu_parts.Part:
    args = gpu.parse([str(tmp_path / "out"), name, "--models", str(tmp_path / "models"), *argv])
    return gpu_parts.Part(name, args.out / name, list(gpus), args.timeouts[name], args, Recorder(), Models(args.models), [])


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def bench_result(workload="sharegpt-like", total=135_700.0, output=67_000.0, **more):
    rates = dict(flops=781e12, bandwidth=4.27e12, flops_from="measured", bandwidth_from="measured", device="H200")
    return dict(workload=workload, total_tok_s=total, output_tok_s=output, pct_of_speed_of_light=65.2, rates=rates,
                **more)


def test_parts_timeouts_and_refusals(tmp_path):
    args = gpu.parse([str(tmp_path), "tests", "step", "sharegpt-quick", "step", "--timeout", "300",
                      "--timeout", "ab=50"])
    assert args.parts == ["tests", "step", "sharegpt-quick"]
    assert args.timeouts["tests"] == 300 and args.timeouts["ab"] == 50
    assert gpu.parse([str(tmp_path), "tp"]).timeouts["tp"] == gpu_parts.TIMEOUTS["tp"]
    for bad in (["tests", "--timeout", "nope=3"], ["compare"], ["ab", "--base", str(tmp_path / "none")], ["bogus"]):
        with pytest.raises(SystemExit):
            gpu.parse([str(tmp_path), *bad])


def test_gpus_for_parts_one_after_another_or_side_by_side(tmp_path):
    visible = ["4", "5", "6", "7"]
    args = gpu.parse([str(tmp_path), "sharegpt-full", "prefix-full-hydragen", "tp", "--side-by-side"])
    assert gpu.assign(args, visible) == {"sharegpt-full": ["4"], "prefix-full-hydragen": ["5"], "tp": ["6", "7"]}
    args = gpu.parse([str(tmp_path), "sharegpt-full", "tp"])
    assert gpu.assign(args, visible) == {"sharegpt-full": visible, "tp": visible}
    with pytest.raises(ValueError, match="side by side"):
        gpu.assign(gpu.parse([str(tmp_path), "tp", "pp", "dp", "--dp", "2", "--side-by-side"]), visible)
    with pytest.raises(ValueError, match="dp needs 2 GPUs"):
        gpu.assign(gpu.parse([str(tmp_path), "dp"]), ["0"])


def test_workload_command_line_and_its_table(tmp_path):
    p = part("prefix-quick-hydragen", tmp_path, "--flags", "--max-seqs 4096", "--flops", "7.81e14")
    write(p.dir / "bench.json", bench_result("shared-prefix", output=117_000.0, pct_of_speed_of_light_shared=48.6))
    rows = gpu_parts.workload(p)
    (job,) = p.runner.batches[0]
    model = str(tmp_path / "models" / "llama-3.2-1b")
    assert job.argv[1:] == ["-m", "tools.bench", f"--launch=--model {model} --load-format random --hydragen "
                            "--max-seqs 4096", "--vocab", "128000", "--workload", "shared-prefix", "--quick",
                            "--flops=781000000000000.0", "--out", str(p.dir / "bench.json")]
    assert job.env == {"CUDA_VISIBLE_DEVICES": "0"} and job.timeout == gpu_parts.TIMEOUTS["prefix-quick-hydragen"]
    assert [(r.figure, r.value, r.unit, r.share) for r in rows] == [
        ("card's rates", "781 TFLOP/s, 4.27 TB/s", "measured, H200", None),
        ("shared-prefix quick, --hydragen --max-seqs 4096", 117_000.0, "output tok/s", 65.2),
        ("shared-prefix quick, --hydragen --max-seqs 4096: shared-read floor", 117_000.0, "output tok/s", 48.6)]


def test_a_workloads_host_figures_come_from_the_engines_stop_lines(tmp_path):
    p = part("prefix-quick", tmp_path)
    engine = dict(ranks=[dict(steps=4131, span_s=56.6, launching_ms=8.6, plan_wait_ms=0.04, host_wait_ms=1.25)],
                  schedulers=[dict(steps=4131, planning_ms=2.63, results_ms=0.55)])
    write(p.dir / "bench.json", bench_result("shared-prefix", engine=engine))
    (row,) = [r for r in gpu_parts.workload(p) if r.unit == "ms a step"]
    assert row.figure == "shared-prefix quick, defaults: host, 4,131 steps in 56.6 s"
    assert row.value == ("launching 8.60, device waiting for plans 0.04, from a step's end to the next forward 1.25, "
                         "planning 2.63, taking results 0.55")


CARD = dict(samples=120, sm_mhz_mean=1712.4, sm_mhz_min=1545.0, sm_mhz_max_card=1980.0, power_w_mean=688.2,
            temperature_c_max=71.0)


def test_the_cards_clock_over_a_run_and_over_sustained_steps(tmp_path):
    p = part("prefix-quick", tmp_path)
    write(p.dir / "bench.json", bench_result("shared-prefix", card=CARD))
    (row,) = [r for r in gpu_parts.workload(p) if r.figure.endswith("card over the run")]
    assert row.value == "SM 1,712 MHz mean, 1,545 min, 1,980 top; 688 W mean; 71 C max"
    step = part("step", tmp_path)
    assert gpu_parts.STEP_SWEEPS["hydragen"][-2:] == ["--sustain", "40"]
    write(step.dir / "hydragen.json", dict(rows=[dict(batch=2048, context=192, groups=2, shared=800, pipelined_ms=12.2,
                                                       pct_of_floor=83.0, prefill_tokens=0)],
                                           sustained=dict(batch=2048, seconds=40, steps=3000, first_ms=12.2, last_ms=13.6,
                                                          card=CARD)))
    rows = {r.figure: r.value for r in gpu_parts.step(step)}
    assert rows["hydragen 2,048 rows for 40 s: first tenth, last tenth"] == "12.20, 13.60"
    assert rows["hydragen: card over the run"].startswith("SM 1,712 MHz mean")


def test_why_the_clock_was_held_down_where_the_driver_says():
    held = dict(CARD, sm_mhz_busy=1650.0, busy_samples=100, sm_mhz_tenths=[1980, 1700, 1650], power_limit_w=700.0,
                reasons=dict(sw_power_cap=0.75, hw_slowdown=0.0))
    (_, why) = gpu_results.card_rows("prefix-quick", "shared-prefix quick", dict(card=held), Path("bench.json"))
    assert why.value == "1,650 MHz (100 samples); 1980 1700 1650; sw_power_cap 75 % (limit 700 W)"


def test_the_share_of_the_floor_at_the_served_clock_is_a_row_of_its_own(tmp_path):
    p = part("prefix-quick", tmp_path)
    write(p.dir / "bench.json", bench_result("shared-prefix", pct_of_speed_of_light_shared=60.4, served_clock=0.865,
                                             pct_of_speed_of_light_at_served_clock=67.2))
    (row,) = [r for r in gpu_parts.workload(p) if "served clock" in r.figure]
    assert row.figure == "shared-prefix quick, defaults: shared-read floor at the served clock (86 % of the top)"
    assert row.share == 67.2


def test_fp8_part_runs_each_option_on_the_8b_shape_against_bf16(tmp_path):
    p = part("fp8", tmp_path, "--flags", "--max-seqs 1024")
    for name, total in (("bf16", 27.6e3), ("fp8-weights", 35.4e3), ("fp8-both", 41.4e3)):
        write(p.dir / f"{name}.json", bench_result(total=total))
    rows = {r.figure: r.value for r in gpu_parts.fp8(p)}
    argvs = [b[0].argv for b in p.runner.batches]
    assert all(str(tmp_path / "models" / "llama-3.1-8b") in a[3] and a[-2:] == ["--requests", "2048"]
               for a in argvs)
    assert [a[3].split("random ")[1] for a in argvs] == [
        "--max-seqs 1024", "--quantization fp8 --max-seqs 1024", "--kv-cache-dtype fp8_e4m3 --max-seqs 1024",
        "--kv-cache-dtype fp8_e4m3 --quantization fp8 --max-seqs 1024"]
    assert rows["fp8-weights / bf16"] == pytest.approx(35.4 / 27.6)
    assert rows["fp8-both / bf16"] == pytest.approx(41.4 / 27.6)
    assert rows["llama-3.1-8b sharegpt-like 2048, --kv-cache-dtype fp8_e4m3 --max-seqs 1024"] == NO_RESULT
    assert "fp8-kv / bf16" not in rows


def test_fp8_runs_picks_the_options_the_fp8_part_runs(tmp_path):
    p = part("fp8", tmp_path, "--fp8-runs", "bf16,fp8-kv")
    write(p.dir / "fp8-kv.json", bench_result(total=33e3))
    write(p.dir / "bf16.json", bench_result(total=30e3))
    rows = {r.figure: r.value for r in gpu_parts.fp8(p)}
    assert [b[0].argv[3].endswith("random") or b[0].argv[3].split("random ")[1] for b in p.runner.batches] == [
        True, "--kv-cache-dtype fp8_e4m3"]
    assert rows["fp8-kv / bf16"] == pytest.approx(1.1)
    with pytest.raises(SystemExit):
        gpu.parse([str(tmp_path), "fp8", "--fp8-runs", "fp4"])


def test_compare_runs_one_lane_a_gpu_and_in_turns_on_fewer(tmp_path):
    flags = ["--compare-flags", "", "--compare-flags", "--max-seqs 4096", "--compare-flags=--hydragen"]
    p = part("compare", tmp_path, *flags, gpus=("2", "3"))
    write(p.dir / "run1.json", bench_result(total=140_100.0))
    (p.dir / "trace1").mkdir()
    (p.dir / "trace1" / "rank0-trace.json").write_text("{}")
    (p.dir / "trace1" / "rank0-steps.txt").write_text("steps 1200 .. 1239\n")
    rows = gpu_parts.compare(p)
    assert [[j.env["CUDA_VISIBLE_DEVICES"] for j in b] for b in p.runner.batches] == [["2", "3"], ["2"]]
    assert p.runner.batches[1][0].env["TOKA_TRACE"] == f"{p.dir / 'trace2'}:1200:40"
    assert not (p.dir / "trace1" / "rank0-trace.json").exists()  # the raw trace goes, its summary stays
    assert [(r.figure, r.value) for r in rows if r.figure != "card's rates"] == [
        ("defaults", NO_RESULT), ("--max-seqs 4096", 140_100.0),
        ("--max-seqs 4096: trace", "compare/trace1/rank0-steps.txt"), ("--hydragen", NO_RESULT)]


def test_ab_alternates_and_only_a_serves_the_base_code(tmp_path):
    base = tmp_path / "base"
    (base / "toka").mkdir(parents=True)
    p = part("ab", tmp_path, "--base", str(base), "--rounds", "2", "--b-first")
    for run, total in (("B1", 130e3), ("A1", 126e3), ("B2", 128e3), ("A2", 127e3)):
        write(p.dir / f"{run}.json", bench_result(total=total))
    rows = gpu_parts.ab(p)
    jobs = [b[0] for b in p.runner.batches]
    assert [j.name for j in jobs] == ["B1", "A1", "B2", "A2"]
    assert [("--server-code" in j.argv) for j in jobs] == [False, True, False, True]
    assert jobs[1].argv[jobs[1].argv.index("--server-code") + 1] == str(base)
    last = {r.figure.split(" (")[0]: r.value for r in rows[-3:]}
    assert last == {"A mean": 126.5e3, "B mean": 129e3, "B / A": pytest.approx(129 / 126.5)}


def test_tests_part_reads_junit_and_logprob_figures(tmp_path):
    p = part("tests", tmp_path)
    p.dir.mkdir(parents=True)
    (p.dir / "gpu.xml").write_text('<testsuites><testsuite tests="12" failures="1" errors="0" skipped="2"/>'
                                   '</testsuites>')
    write(p.dir / "logprobs-qwen3-0.6b.json", dict(tokens=240, token_match=0.975, mean_rel_diff=0.02, max_abs_diff=0.15))
    rows = gpu_parts.tests(p)
    jobs = [b[0] for b in p.runner.batches]
    assert jobs[1].env["MODEL"] == str(tmp_path / "models" / "qwen3-0.6b-weights")
    assert jobs[1].env[gpu_parts.LOGPROBS_ENV] == str(p.dir / "logprobs-qwen3-0.6b.json")
    values = {r.figure: r.value for r in rows}
    assert values["tests/gpu"] == "9 passed, 1 failed, 2 skipped"
    assert values["logprobs qwen3-0.6b: token match"] == 97.5
    assert values["logprobs llama-3.2-1b bf16"] == NO_RESULT


def test_tp_rows_from_step_bench_and_agreement_files(tmp_path):
    p = part("tp", tmp_path, "--tp-sizes", "1,2")
    step = dict(rows=[dict(batch=256, context=512, pipelined_ms=10.23, pct_of_floor=71.0, prefill_tokens=0)])
    write(p.dir / "step-tp2.json", step)
    write(p.dir / "bench-tp1.json", bench_result(total=12.2e3))
    write(p.dir / "bench-tp2.json", bench_result(total=22.4e3))
    write(p.dir / "agree.json", [dict(a="--tp 1", b="--tp 2", teacher_forced=dict(
        token_match=0.976, mean_abs_logprob_diff=0.018, max_abs_logprob_diff=0.18), free_running=dict(token_match=0.22))])
    rows = gpu_parts.tp(p)
    agree = p.runner.batches[-1][0]
    assert agree.argv[3:5] == ["--model", str(tmp_path / "models" / "llama-3.1-8b-weights")]
    assert "--a=--tp 1" in agree.argv and "--b=--tp 2" in agree.argv
    benches = [b[0].argv for b in p.runner.batches if "tools.bench" in b[0].argv]
    assert all(a[a.index("--workload") + 1] == "sharegpt-like" and "--quick" in a for a in benches)
    values = {r.figure: (r.value, r.share) for r in rows}
    assert values["tp 2 decode 256 rows at 512"] == (10.23, 71.0)
    assert values["tp 1 decode"] == (NO_RESULT, None)
    assert values["tp 2 / tp 1"][0] == pytest.approx(22.4 / 12.2)
    assert values["--tp 2 vs --tp 1: teacher-forced token match"][0] == pytest.approx(97.6)


def test_dp_part_runs_its_workload_at_one_and_n_and_checks_agreement(tmp_path):
    p = part("dp", tmp_path, "--dp", "8", "--dp-workload", "shared-prefix")
    write(p.dir / "dp1.json", bench_result("shared-prefix", output=140e3))
    write(p.dir / "dp8.json", bench_result("shared-prefix", output=1060e3))
    rows = gpu_parts.dp(p)
    bench, agree = p.runner.batches[0][0].argv, p.runner.batches[-1][0].argv
    assert bench[bench.index("--workload") + 1] == "shared-prefix" and "--quick" not in bench
    assert "--b=--dp 8" in agree and str(tmp_path / "models" / "llama-3.1-8b-weights") in agree
    values = {r.figure: r.value for r in rows}
    assert values["dp 8 / dp 1"] == pytest.approx(1060 / 140)
    assert gpu_parts.PARTS["dp"].models == ((gpu_parts.SMALL, False), (gpu_parts.LARGE, True))


def test_pp_part_sets_pp_with_tp_against_tp_alone(tmp_path):
    p = part("pp", tmp_path, "--pp", "2", "--pp-tp", "2", gpus=("0", "1", "2", "3"))
    write(p.dir / "pp2-tp2.json", bench_result(total=50e3))
    write(p.dir / "tp4.json", bench_result(total=45e3))
    rows = gpu_parts.pp(p)
    launches = [a[a.index("--launch") + 1] if "--launch" in a else next(x for x in a if x.startswith("--launch="))
                for a in (b[0].argv for b in p.runner.batches[:-1])]
    assert [x.split("random ", 1)[1] for x in launches] == ["--pp 1", "--pp 2", "--pp 2 --tp 2", "--tp 4"]
    values = {r.figure: r.value for r in rows}
    assert values["pp 2 tp 2 / tp 4"] == pytest.approx(50 / 45)
    assert gpu_parts.PARTS["pp"].gpus(p.args, ["0", "1", "2", "3"]) == 4


def test_table_and_summary(tmp_path):
    p = part("sharegpt-quick", tmp_path)
    write(p.dir / "bench.json", bench_result())
    rows = gpu_parts.workload(p)
    text = table(rows).splitlines()
    assert text[0].split() == ["part", "figure", "value", "unit", "%", "of", "floor"]
    assert text[-1].split() == ["sharegpt-quick", "sharegpt-like", "quick,", "defaults", "135.7k", "total", "tok/s",
                                "65", "%"]
    record = {"sharegpt-quick": dict(rows=rows, failed=[], seconds=1.0, gpus=["0"])}
    summary = json.loads(gpu.write_summary(tmp_path / "out", record, rows, False).read_text())
    assert summary["parts"]["sharegpt-quick"] == dict(failed=[], seconds=1.0, gpus=["0"])
    assert summary["rows"][-1]["value"] == 135_700.0 and summary["rows"][-1]["share"] == 65.2
    trace = tmp_path / "out" / "compare" / "trace0" / "rank0-steps.txt"
    trace.parent.mkdir(parents=True)
    trace.write_text("device: 24.64 ms a step\n")
    report = gpu.write_report(tmp_path / "out", table(rows)).read_text().splitlines()
    assert report[: len(text)] == text
    assert report[-2:] == ["=== compare/trace0/rank0-steps.txt", "device: 24.64 ms a step"]


@pytest.mark.parametrize("timeout", [30.0, 0.5])
def test_a_jobs_group_is_stopped_when_it_ends_and_at_its_timeout(tmp_path, timeout):
    # the job starts a child that would outlive it (as a server outlives a killed client)
    pid_file = tmp_path / "child"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w')"
              f".write(str(p.pid)); time.sleep({0 if timeout > 1 else 60})")
    stale = tmp_path / "result.json"  # an earlier run's result, which this run does not write
    stale.write_text("{}")
    job = Job("leaves-a-child", [sys.executable, "-c", script], tmp_path / "job.log", tmp_path, timeout,
              results=(stale,))
    start = time.monotonic()
    assert Runner().run([job]) == [0 if timeout > 1 else TIMED_OUT]
    assert time.monotonic() - start < 20
    assert not alive(int(pid_file.read_text()))
    assert not stale.exists()
    assert job.log.read_text().startswith("$ (cd ")


def test_a_stopped_runner_starts_nothing(tmp_path):
    runner = Runner()
    runner.stop_all()
    job = Job("late", [sys.executable, "-c", "pass"], tmp_path / "late.log", tmp_path, 10)
    assert runner.run([job]) == [STOPPED] and not job.log.exists()


def test_models_are_written_once_and_only_whole(tmp_path):
    models = Models(tmp_path)
    (tmp_path / "llama-3.2-1b").mkdir()
    (tmp_path / "llama-3.2-1b" / "config.json").write_text("{}")
    (tmp_path / "qwen3-0.6b-weights.partial").mkdir()  # an interrupted write does not count
    needed = [("llama-3.2-1b", False), ("qwen3-0.6b", True), ("qwen3-0.6b", True)]
    assert models.missing(needed) == [("qwen3-0.6b", True)]
    runner = Recorder()
    assert models.write(needed, runner, 60, tmp_path / "logs", Path(os.getcwd())) == []
    (job,) = runner.batches[0]
    assert job.argv[3:] == ["qwen3-0.6b", str(tmp_path / "qwen3-0.6b-weights.partial"), "--dtype", "bfloat16"]


SLEEPER = """
import sys
from tools import gpu, gpu_parts, gpu_results
from tools.gpu_jobs import py

def sleeper(p):  # a run that writes its figure, then one that leaves a child and waits far past the test
    figure = p.dir / "figure.txt"
    p.run([p.job("quick", [sys.executable, "-c", f"open({str(figure)!r}, 'w').write('42')"], (figure,))])
    script = "import subprocess, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)"
    p.run([p.job("sleeper", [sys.executable, "-c", script], ())])
    return [gpu_results.Row(p.name, "quick figure", float(figure.read_text()))]

def quick(p):  # a part that finishes at once
    return [gpu_results.Row(p.name, "tune figure", 7.0)]

gpu_parts.PARTS["step"] = gpu_parts.Spec(sleeper, (), lambda a, v: 1)
gpu_parts.PARTS["tune"] = gpu_parts.Spec(quick, (), lambda a, v: 1)
sys.exit(gpu.main(sys.argv[1:]))
"""


def test_sigterm_stops_the_runs_under_way_and_still_tables_what_finished(tmp_path):
    import signal
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, str(out), "step", "--gpus", "0"], cwd=Path.cwd(),
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    log = out / "step" / "sleeper.log"
    deadline = time.monotonic() + 20
    while not (log.exists() and len(log.read_text().splitlines()) > 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().splitlines()[1])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 130
    assert not alive(child)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"]
    assert [r["value"] for r in summary["rows"] if r["figure"] == "quick figure"] == [42.0]
    failed = summary["parts"]["step"]["failed"]
    assert any("sleeper: stopped by the interrupt" in f for f in failed) and "interrupted" in failed[-1]


def test_the_report_is_written_after_every_part_and_a_deadline_stops_the_runs(tmp_path):
    import subprocess

    out, into = tmp_path / "out", tmp_path / "into"
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, str(out), "tune", "step", "--gpus", "0", "--report-to",
                             str(into), "--deadline", "8"], cwd=Path.cwd(), stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    log = out / "step" / "sleeper.log"
    deadline = time.monotonic() + 20
    while not (log.exists() and len(log.read_text().splitlines()) > 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().splitlines()[1])
    # while the second part runs, the first one's figures are already in the report (a kill keeps them)
    early = json.loads((into / "summary.json").read_text())
    assert [r["figure"] for r in early["rows"]] == ["tune figure"] and (into / "report.txt").exists()
    assert proc.wait(30) == 130  # the deadline stopped the sleeper
    assert not alive(child)
    summary = json.loads((into / "summary.json").read_text())
    assert summary["interrupted"]
    assert [r["value"] for r in summary["rows"] if "figure" in r["figure"]] == [7.0, 42.0]
    assert (out / "summary.json").read_text() == (into / "summary.json").read_text()


def test_tests_part_runs_the_logprob_test_once_per_flag_set(tmp_path):
    p = part("tests", tmp_path, "--logprob-flags", "", "--logprob-flags", "--kv-cache-dtype fp8", "--gpu-tests", "fp8")
    p.dir.mkdir(parents=True)
    write(p.dir / "logprobs-llama-3.2-1b-1.json", dict(tokens=240, token_match=0.967, mean_rel_diff=0.05,
                                                       max_abs_diff=0.149))
    rows = gpu_parts.tests(p)
    jobs = [b[0] for b in p.runner.batches]
    assert jobs[0].argv[-3:-1] == ["-k", "fp8"]
    assert [j.env["TOKA_ARGS"] for j in jobs[1:]] == ["", "", "--kv-cache-dtype fp8", "--kv-cache-dtype fp8"]
    values = {r.figure: r.value for r in rows}
    assert values["logprobs llama-3.2-1b --kv-cache-dtype fp8: token match"] == 96.7
    assert values["logprobs qwen3-0.6b bf16 --kv-cache-dtype fp8"] == NO_RESULT


def test_attention_part_tables_every_kernel_of_both_runs(tmp_path):
    p = part("attention", tmp_path)
    p.dir.mkdir(parents=True)
    write(p.dir / "served.json", dict(results=[dict(kv="bf16", layout="NHD", kernel="cuda-cores", ms_a_layer=0.585,
                                                    pct_of_floor=65.0)]))
    rows = gpu_parts.attention(p)
    argv = [b[0].argv for b in p.runner.batches]
    assert "--cache-gib" in argv[0] and argv[1][argv[1].index("--layers") + 1] == "1"
    assert [(r.figure, r.value, r.share) for r in rows] == [("served: bf16 NHD cuda-cores", 0.585, 65.0),
                                                            ("one-layer", NO_RESULT, None)]


def test_tune_part_sweeps_the_triton_kernels_settings_at_three_lengths(tmp_path):
    p = part("tune", tmp_path)
    p.dir.mkdir(parents=True)
    write(p.dir / "own-pages.json", dict(results=[dict(kv="bf16", layout="NHD", kernel="triton 4:3:16",
                                                       ms_a_layer=0.15, pct_of_floor=84.0)]))
    rows = gpu_parts.tune(p)
    argv = [b[0].argv for b in p.runner.batches]
    assert [a[a.index("--lengths") + 1] for a in argv] == ["sharegpt", "1-256", "900-1156"]
    assert all(a[a.index("--triton-configs") + 1] == gpu_parts.TRITON_CONFIGS for a in argv)
    assert [(r.figure, r.value) for r in rows] == [("sharegpt", NO_RESULT), ("own-pages: bf16 NHD triton 4:3:16", 0.15),
                                                   ("long", NO_RESULT)]


def test_sampling_part_tables_each_config_and_temperature(tmp_path):
    p = part("sampling", tmp_path)
    p.dir.mkdir(parents=True)
    assert gpu_parts.sampling(p)[0].value == NO_RESULT
    write(p.dir / "bench_sampling.json", dict(bandwidth=4.1e12, results=[
        dict(rows=2048, vocab=128256, temperature=0.6, slices=2, warps=4, ms=0.61, pct_of_read=21.0)]))
    rows = gpu_parts.sampling(p)
    argv = p.runner.batches[-1][0].argv
    assert "tools.bench_sampling" in argv and argv[argv.index("--out") + 1] == str(p.dir)
    assert [(r.figure, r.value, r.share) for r in rows] == [
        ("2,048 x 128,256 at T 0.6, 2 pieces a row, 4 warps", 0.61, 21.0)]


def test_bench_sampling_refuses_malformed_configs():
    from tools import bench_sampling

    assert bench_sampling.configs("1:4,2:8") == [(1, 4), (2, 8)]
    for bad in ("1", "1:x", "0:4", ""):
        with pytest.raises(SystemExit, match="SLICES:WARPS"):
            bench_sampling.configs(bad)


class Failing(Recorder):
    """Each job's log says why it failed; every job exits 1."""

    def run(self, jobs):
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            job.log.write_text("".join(f"line {i}\n" for i in range(100)) + "Traceback: the cause\n")
        return [1] * len(jobs)


def test_a_failed_run_prints_the_end_of_its_log(tmp_path, capsys):
    p = part("sharegpt-quick", tmp_path)
    p.runner = Failing()
    gpu_parts.workload(p)
    out = capsys.readouterr().out
    assert "bench: exit 1; the end of its log:\n" in out and "    Traceback: the cause" in out
    assert "    line 71" in out and "line 70" not in out  # the last 30 lines
    assert p.failed == [f"bench: exit 1, log {p.dir / 'bench.log'}"]


def test_engine_profiles_are_summarized_into_the_report(tmp_path):
    import cProfile

    p = part("prefix-quick", tmp_path, "--engine-profile")
    gpu_parts.workload(p)
    (job,) = p.runner.batches[0]
    folder = Path(job.env["TOKA_PROFILE"])
    assert folder == p.dir / "bench-profile"
    folder.mkdir(parents=True)
    prof = cProfile.Profile()
    prof.runcall(sorted, range(1000))
    prof.dump_stats(str(folder / "rank0.prof"))
    summary = gpu_parts.profile_summary(folder)
    assert summary == p.dir / "bench-profile.txt" and "--- rank0" in summary.read_text()
    report = gpu.write_report(p.args.out, "table").read_text()
    assert "=== prefix-quick/bench-profile.txt" in report and "sorted" in report
