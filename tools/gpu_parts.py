"""The parts tools/gpu.py runs: for each, the tool runs it makes (bench.py, bench_step.py, pytest,
compare_runs.py, bench_attention.py, bench_sampling.py) and the table rows it reads from the files
they write. gpu.py's docstring says what each part measures; a part is a function of its `Part`
(folder, GPUs, timeout, the command's arguments) returning its rows, named in PARTS with the model
shapes it needs written first and the GPUs it takes.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tools.gpu_jobs import STOPPED, TIMED_OUT, Job, Models, Runner, py, say
from tools.gpu_results import (
    Row,
    agree_rows,
    attention_rows,
    bench_rows,
    junit_row,
    logprob_rows,
    mean_row,
    rates_row,
    ratio_row,
    sampling_rows,
    step_rows,
)

TREE = Path(__file__).resolve().parents[1]
SMALL, LARGE = "llama-3.2-1b", "llama-3.1-8b"  # the shapes benchmarks run; the vocabulary below is theirs
VOCAB = "128000"
LOGPROB_MODELS = ["qwen3-0.6b", "llama-3.2-1b"]
# tests/test_logprobs.py writes its figures (compare_with_hf's dict) to the file this names
LOGPROBS_ENV = "TOKA_LOGPROBS_OUT"
STEP_SWEEPS = {"decode": ["--batches", "1,64,256,1024,2048", "--context", "512"],
               "mixed": ["--batches", "1024,2048", "--context", "384", "--prefill-tokens", "2048"],
               # shared-prefix's steady Hydragen step: two groups of n samples of an 800-token prompt,
               # ~190 tokens of their own (traced), sampled at its temperature
               "hydragen": ["--batches", "1024,2048", "--context", "192", "--groups", "2", "--shared", "800",
                            "--temperature", "0.6", "--sustain", "40"],
               # the same step over a cache of random values, as a served one holds: the power it draws
               "hydragen-filled": ["--batches", "2048", "--context", "192", "--groups", "2", "--shared", "800",
                                   "--temperature", "0.6", "--fill-cache", "--sustain", "40"]}
WORKLOADS = {  # part -> (bench.py workload, quick, launch flags)
    "sharegpt-quick": ("sharegpt-like", True, ""),
    "sharegpt-full": ("sharegpt-like", False, ""),
    "prefix-quick": ("shared-prefix", True, ""),
    "prefix-full": ("shared-prefix", False, ""),
    "prefix-quick-hydragen": ("shared-prefix", True, "--hydragen"),
    "prefix-full-hydragen": ("shared-prefix", False, "--hydragen"),
    "prefix-quick-no-hydragen": ("shared-prefix", True, "--no-hydragen"),
    "prefix-full-no-hydragen": ("shared-prefix", False, "--no-hydragen"),
}
TAIL_LINES = 30  # of a failed run's log, printed with the progress lines
PROFILE_ENV = "TOKA_PROFILE"  # --engine-profile: the folder each engine process writes its cProfile into
TRACE_STEPS = "1200:40"  # compare's traced steps: past the ramp-up of either workload's quick run
TIMEOUTS = {"models": 1200, "tests": 1800, "step": 600, "sharegpt-quick": 600, "sharegpt-full": 1200,
            "prefix-quick": 600, "prefix-full": 1500, "prefix-quick-hydragen": 600, "prefix-full-hydragen": 1200,
            "prefix-quick-no-hydragen": 600, "prefix-full-no-hydragen": 1500,
            "compare": 600, "ab": 400, "tp": 900, "dp": 1200, "pp": 1200, "batch": 400, "attention": 900,
            "tune": 600, "sampling": 300, "fp8": 900}


@dataclass
class Part:
    """One part's run: where its files go, the GPUs it may use, its timeout."""

    name: str
    dir: Path
    gpus: list[str]
    timeout: float
    args: argparse.Namespace
    runner: Runner
    models: Models
    failed: list[str]

    def job(self, name: str, argv: list[str], results: tuple[Path, ...], env: dict | None = None,
            gpus: list[str] | None = None) -> Job:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus or self.gpus), **(env or {})}
        return Job(name, argv, self.dir / f"{name}.log", TREE, self.timeout, env, results)

    def run(self, jobs: list[Job], together: bool = False) -> None:
        """The jobs one after another, or at once (each on GPUs of its own)."""
        for batch in [jobs] if together else [[j] for j in jobs]:
            for job, rc in zip(batch, self.runner.run(batch)):
                if rc:
                    why = {TIMED_OUT: "timed out", STOPPED: "stopped by the interrupt"}.get(rc, f"exit {rc}")
                    self.failed.append(f"{job.name}: {why}, log {job.log}")
                    if rc != STOPPED:  # the log may stay on the GPU host: its end comes back with stdout
                        say(log_tail(job.log, f"{job.name}: {why}; the end of its log:"))
                if PROFILE_ENV in job.env:
                    profile_summary(Path(job.env[PROFILE_ENV]))

    def bench(self, name: str, workload: str, flags: str, quick: bool, model: str = SMALL, extra: tuple = (),
              env: dict | None = None, gpus: list[str] | None = None, results: tuple[Path, ...] = ()) -> Job:
        """bench.py on random weights of `model`'s shape, its result in NAME.json; `extra`: more
        bench.py flags; `results`: more files the run writes."""
        launch = shlex.join(["--model", str(self.models.path(model)), "--load-format", "random"])
        rates = [f"--{k}={getattr(self.args, k)}" for k in ("flops", "bandwidth") if getattr(self.args, k)]
        out = self.dir / f"{name}.json"
        if self.args.engine_profile:  # every engine process's cProfile, summarized after the run
            env = {**(env or {}), PROFILE_ENV: str(self.dir / f"{name}-profile")}
        return self.job(name, py("tools.bench", f"--launch={launch} {flags}".strip(), "--vocab", VOCAB,
                                 "--workload", workload, *(["--quick"] if quick else []), *rates, "--out", out,
                                 *extra), (out, *results), env, gpus)

    def agree(self, name: str, others: list[str]) -> Job:
        """compare_runs.py: each launch flag set of `others` against one GPU, on written weights."""
        out = self.dir / f"{name}.json"
        return self.job(name, py("tools.compare_runs", "--model", self.models.path(LARGE, weights=True), "--a=--tp 1",
                                 *[f"--b={o}" for o in others], "--vocab", VOCAB, "--requests", "64",
                                 "--max-tokens", "128", "--out", out), (out,))

    def step(self, name: str, model: str, *flags) -> Job:
        """bench_step.py on random weights of `model`'s shape, its result in NAME.json."""
        out = self.dir / f"{name}.json"
        return self.job(name, py("tools.bench_step", self.models.path(model), *flags, "--out", out), (out,))


def profile_summary(folder: Path, lines: int = 25) -> Path | None:
    """FOLDER.txt: each engine process's cProfile (TOKA_PROFILE's FOLDER/<process>.prof), its
    functions by their own time."""
    import io
    import pstats

    profiles = sorted(folder.glob("*.prof"))
    if not profiles:
        return None
    out = io.StringIO()
    for prof in profiles:
        out.write(f"--- {prof.stem}\n")
        pstats.Stats(str(prof), stream=out).sort_stats("tottime").print_stats(lines)
    path = folder.with_name(folder.name + ".txt")
    path.write_text(out.getvalue())
    return path


def log_tail(log: Path, heading: str) -> str:
    """The heading, then the last TAIL_LINES lines of a run's log, indented."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    except OSError as e:
        tail = [f"(unreadable: {e})"]
    return "\n".join([heading, *(f"    {line}" for line in tail)])


def with_flags(*flags: str) -> str:
    return " ".join(f for f in flags if f)


def tests(p: Part) -> list[Row]:
    select = ["-k", p.args.gpu_tests] if p.args.gpu_tests else []
    jobs = [p.job("gpu", py("pytest", "-q", "tests/gpu", *select, f"--junitxml={p.dir / 'gpu.xml'}"),
                  (p.dir / "gpu.xml",))]
    runs = [(f"{shape}{f'-{i}' if i else ''}", shape, flags)
            for i, flags in enumerate(p.args.logprob_flags or [""]) for shape in LOGPROB_MODELS]
    for name, shape, flags in runs:
        xml, figures = p.dir / f"logprobs-{name}.xml", p.dir / f"logprobs-{name}.json"
        env = {"MODEL": str(p.models.path(shape, weights=True)), LOGPROBS_ENV: str(figures), "TOKA_ARGS": flags}
        jobs.append(p.job(f"logprobs-{name}", py("pytest", "tests/test_logprobs.py", "-k", "test_logprobs", "-s", "-q",
                                                 f"--junitxml={xml}"), (xml, figures), env))
    p.run(jobs)
    rows = [junit_row(p.name, "tests/gpu" + (f" -k {p.args.gpu_tests}" if p.args.gpu_tests else ""),
                      p.dir / "gpu.xml")]
    for name, shape, flags in runs:
        suffix = f" {flags}" if flags else ""
        rows.append(junit_row(p.name, f"logprobs {shape} bf16{suffix}", p.dir / f"logprobs-{name}.xml"))
        rows += logprob_rows(p.name, f"logprobs {shape}{suffix}", p.dir / f"logprobs-{name}.json")
    return rows


def step(p: Part) -> list[Row]:
    sweeps = p.args.sweeps or list(STEP_SWEEPS)
    p.run([p.step(name, SMALL, *STEP_SWEEPS[name], "--profile") for name in sweeps])
    rows = rates_row(p.name, p.dir / f"{sweeps[0]}.json")
    for name in sweeps:
        rows += step_rows(p.name, name, p.dir / f"{name}.json")
    return rows


def workload(p: Part) -> list[Row]:
    kind, quick, flags = WORKLOADS[p.name]
    flags = with_flags(flags, p.args.flags)
    p.run([p.bench("bench", kind, flags, quick)])
    label = f"{kind}{' quick' if quick else ''}, {flags or 'defaults'}"
    return rates_row(p.name, p.dir / "bench.json") + bench_rows(p.name, label, p.dir / "bench.json")


def compare(p: Part) -> list[Row]:
    configs = p.args.compare_flags
    lanes = len(p.gpus)
    for first in range(0, len(configs), lanes):  # one GPU a configuration, as many at once as there are GPUs
        p.run([p.bench(f"run{i}", p.args.compare_workload, configs[i], True,
                       env={"TOKA_TRACE": f"{p.dir / f'trace{i}'}:{TRACE_STEPS}"}, gpus=[p.gpus[i - first]],
                       results=(p.dir / f"trace{i}",))
               for i in range(first, min(first + lanes, len(configs)))], together=True)
    rows = rates_row(p.name, p.dir / "run0.json")
    for i, flags in enumerate(configs):
        rows += bench_rows(p.name, flags or "defaults", p.dir / f"run{i}.json")
        for trace in sorted((p.dir / f"trace{i}").glob("*-trace.json")):
            trace.unlink()  # tens of MB each; the steps summary beside it is what is kept
        for steps in sorted((p.dir / f"trace{i}").glob("*-steps.txt")):
            rows.append(Row(p.name, f"{flags or 'defaults'}: trace", str(steps.relative_to(p.dir.parent))))
    return rows


def ab(p: Part) -> list[Row]:
    base = str(Path(p.args.base).resolve())
    order = ["B", "A"] if p.args.b_first else ["A", "B"]
    runs = [f"{side}{r}" for r in range(1, p.args.rounds + 1) for side in order]
    p.run([p.bench(run, p.args.ab_workload, p.args.ab_flags, True, SMALL,
                   ("--server-code", base) if run[0] == "A" else ()) for run in runs])
    rows = rates_row(p.name, p.dir / f"{runs[0]}.json")
    for run in runs:
        rows += bench_rows(p.name, f"{run}: {'A ' + base if run[0] == 'A' else 'B this tree'}", p.dir / f"{run}.json")[:1]
    means = {side: mean_row(p.name, f"{side} mean", [p.dir / f"{r}.json" for r in runs if r[0] == side])
             for side in "AB"}
    rows += means["A"] + means["B"]
    if means["A"] and means["B"]:
        rows.append(Row(p.name, "B / A", means["B"][0].value / means["A"][0].value, "x"))
    return rows


def tp(p: Part) -> list[Row]:
    sizes = p.args.tp_sizes
    p.run([p.step(f"step-tp{n}", LARGE, "--tp", n, "--batches", "64,256,768", "--context", "512") for n in sizes])
    p.run([p.bench(f"bench-tp{n}", "sharegpt-like", with_flags(f"--tp {n}", p.args.flags), True, LARGE)
           for n in sizes])
    others = [f"--tp {n}" for n in sizes if n != 1]
    if others:
        p.run([p.agree("agree", others)])
    rows = []
    for n in sizes:
        rows += step_rows(p.name, f"tp {n} decode", p.dir / f"step-tp{n}.json")
    for n in sizes:
        rows += bench_rows(p.name, f"tp {n} sharegpt-like quick", p.dir / f"bench-tp{n}.json")
        if n != 1 and 1 in sizes:
            rows += ratio_row(p.name, f"tp {n} / tp 1", p.dir / f"bench-tp{n}.json", p.dir / "bench-tp1.json")
    return rows + (agree_rows(p.name, p.dir / "agree.json") if others else [])


def dp(p: Part) -> list[Row]:
    """--dp-workload's full run (shared-prefix with Hydragen, as the default launch picks it) at --dp 1
    and --dp N, then greedy agreement of --dp N with one GPU on written weights."""
    n, workload = p.args.dp or len(p.gpus), p.args.dp_workload
    p.run([p.bench(f"dp{k}", workload, with_flags(f"--dp {k}", p.args.flags), False) for k in (1, n)])
    p.run([p.agree("agree", [f"--dp {n}"])])
    rows = []
    for k in (1, n):
        rows += bench_rows(p.name, f"{workload} full, --dp {k}", p.dir / f"dp{k}.json")
    return (rows + ratio_row(p.name, f"dp {n} / dp 1", p.dir / f"dp{n}.json", p.dir / "dp1.json")
            + agree_rows(p.name, p.dir / "agree.json"))


def batch(p: Part) -> list[Row]:
    """sharegpt-like quick sent live, then as one batch job (its own data folder under the part's)."""
    flags = with_flags(f"--data-dir {p.dir / 'data'}", p.args.flags)
    p.run([p.bench(via, "sharegpt-like", flags, True, extra=("--via", via)) for via in ("live", "batch")])
    rows = rates_row(p.name, p.dir / "live.json")
    for via in ("live", "batch"):
        rows += bench_rows(p.name, f"sharegpt-like quick, {via}", p.dir / f"{via}.json")
    return rows + ratio_row(p.name, "batch / live", p.dir / "batch.json", p.dir / "live.json")


ATTENTION_RUNS = {  # bench_attention.py: 2,048 rows of sharegpt-like lengths, every layout and element type
    "served": ["--layers", "16", "--cache-gib", "100"],  # a cache of the card's size, 16 layers in turn
    "one-layer": ["--layers", "1"],  # one layer's pages read again and again (the H100 figure's setting)
}


def attention(p: Part) -> list[Row]:
    """Decode attention alone, as served and over one layer's pages: which of the two explains the
    served step's share of the copy bandwidth (docs/performance.md)."""
    p.run([p.job(name, py("tools.bench_attention", "--batch", "2048", "--lengths", "sharegpt", *flags,
                          "--out", p.dir / f"{name}.json"), (p.dir / f"{name}.json",))
           for name, flags in ATTENTION_RUNS.items()])
    return [row for name in ATTENTION_RUNS for row in attention_rows(p.name, name, p.dir / f"{name}.json")]


# the Triton decode kernel's settings timed by `tune` (WARPS:STAGES:CHUNK_PAGES[:MAX_REGISTERS] and any
# of head: a program per (item, kv head); lazy: lazy rescaling; pbN: N pages a tile): the engine's
# first (2:2:16 over bf16 pages, 1:2:16:head over FP8 ones), each with lazy rescaling, the
# per-kv-head kernel with two pages a tile too (the kernel of all kv heads spills at two: 228 local
# loads and stores on sm90) and with longer items
TRITON_CONFIGS = ("2:2:16,2:2:16:lazy,1:2:16:head,1:2:16:head:lazy,1:2:16:head:pb2,"
                  "1:2:16:head:pb2:lazy,1:2:32:head,1:2:32:head:pb2")
TUNE_LENGTHS = {"sharegpt": "sharegpt", "own-pages": "1-256", "long": "900-1156"}  # the workloads' decode rows


def tune(p: Part) -> list[Row]:
    """The Triton decode kernel under each of --triton-configs, over a served-size cache, at the decode
    rows' lengths of sharegpt-like, of Hydragen's own pages and of shared-prefix without Hydragen."""
    runs = {name: ["--lengths", spec, "--layers", "16", "--cache-gib", "100", "--kernels", "triton", "--layouts", "NHD",
                   "--triton-configs", p.args.triton_configs] for name, spec in TUNE_LENGTHS.items()}
    p.run([p.job(name, py("tools.bench_attention", "--batch", "2048", *flags, "--out", p.dir / f"{name}.json"),
                 (p.dir / f"{name}.json",)) for name, flags in runs.items()])
    return [row for name in runs for row in attention_rows(p.name, name, p.dir / f"{name}.json")]


def sampling(p: Part) -> list[Row]:
    """The fused sampler alone at a served step's 2,048 rows, under pieces a row and warps a program."""
    p.run([p.job("sampling", py("tools.bench_sampling", "--out", p.dir), (p.dir / "bench_sampling.json",))])
    return sampling_rows(p.name, p.dir / "bench_sampling.json")


def pp(p: Part) -> list[Row]:
    """sharegpt-like quick at --pp 1 and --pp N, and with --pp-tp K also --pp N --tp K against --tp N x K;
    then greedy agreement of --pp N and --tp N with one GPU on written weights."""
    n, k = p.args.pp, p.args.pp_tp
    runs = {f"pp{m}": f"--pp {m}" for m in (1, n)}
    if k:
        runs |= {f"pp{n}-tp{k}": f"--pp {n} --tp {k}", f"tp{n * k}": f"--tp {n * k}"}
    p.run([p.bench(name, "sharegpt-like", with_flags(flags, p.args.flags), True, LARGE) for name, flags in runs.items()])
    p.run([p.agree("agree", [f"--pp {n}", f"--tp {n}"])])
    rows = []
    for name, flags in runs.items():
        rows += bench_rows(p.name, f"{LARGE} sharegpt-like quick, {flags}", p.dir / f"{name}.json")
    rows += ratio_row(p.name, f"pp {n} / pp 1", p.dir / f"pp{n}.json", p.dir / "pp1.json")
    if k:
        rows += ratio_row(p.name, f"pp {n} tp {k} / tp {n * k}", p.dir / f"pp{n}-tp{k}.json", p.dir / f"tp{n * k}.json")
    return rows + agree_rows(p.name, p.dir / "agree.json")


# the FP8 options on the Llama-3.1-8B shape, each against bf16 (docs/fp8.md's table)
FP8_RUNS = {"bf16": "", "fp8-weights": "--quantization fp8", "fp8-kv": "--kv-cache-dtype fp8_e4m3",
            "fp8-both": "--kv-cache-dtype fp8_e4m3 --quantization fp8"}
FP8_REQUESTS = "2048"


def fp8(p: Part) -> list[Row]:
    """Llama-3.1-8B shape, FP8_REQUESTS sharegpt-like requests, bf16 and each FP8 option (--fp8-runs
    picks them; --flags adds launch flags to every run), and each against bf16."""
    runs = {name: FP8_RUNS[name] for name in p.args.fp8_runs}
    p.run([p.bench(name, "sharegpt-like", with_flags(flags, p.args.flags), False, LARGE,
                   extra=("--requests", FP8_REQUESTS)) for name, flags in runs.items()])
    rows = rates_row(p.name, p.dir / f"{next(iter(runs))}.json")
    for name, flags in runs.items():
        rows += bench_rows(p.name, f"{LARGE} sharegpt-like {FP8_REQUESTS}, {with_flags(flags, p.args.flags) or 'defaults'}",
                           p.dir / f"{name}.json")
    for name in runs:
        if name != "bf16":
            rows += ratio_row(p.name, f"{name} / bf16", p.dir / f"{name}.json", p.dir / "bf16.json")
    return rows


@dataclass(frozen=True)
class Spec:
    run: Callable[[Part], list[Row]]
    models: tuple[tuple[str, bool], ...]  # (shape, with weights), written before any part runs
    gpus: Callable[[argparse.Namespace, list[str]], int]  # (args, visible GPUs) -> GPUs the part needs


def _one(args, visible):
    return 1


PARTS = {
    "tests": Spec(tests, tuple((s, True) for s in LOGPROB_MODELS), _one),
    "step": Spec(step, ((SMALL, False),), _one),
    **{name: Spec(workload, ((SMALL, False),), _one) for name in WORKLOADS},
    "compare": Spec(compare, ((SMALL, False),), lambda a, v: min(len(a.compare_flags), len(v))),
    "ab": Spec(ab, ((SMALL, False),), _one),
    "tp": Spec(tp, ((LARGE, False), (LARGE, True)), lambda a, v: max(a.tp_sizes)),
    "dp": Spec(dp, ((SMALL, False), (LARGE, True)), lambda a, v: a.dp or len(v)),
    "batch": Spec(batch, ((SMALL, False),), _one),
    "attention": Spec(attention, (), _one),
    "tune": Spec(tune, (), _one),
    "sampling": Spec(sampling, (), _one),
    "pp": Spec(pp, ((LARGE, False), (LARGE, True)), lambda a, v: a.pp * max(1, a.pp_tp)),
    "fp8": Spec(fp8, ((LARGE, False),), _one),
}
