"""Runs named parts of the GPU verification into one output folder and prints one table.

    python tools/gpu.py OUT tests step sharegpt-quick
    python tools/gpu.py OUT compare --compare-flags "" --compare-flags "--max-seqs 4096"
    python tools/gpu.py OUT ab --base build/base        # git archive REV toka workers | tar -x -C build/base
    python tools/gpu.py OUT sharegpt-full prefix-full-hydragen tp --side-by-side    # a 4-GPU host

Parts (their files under OUT/PART/; each run's log beside its result):
  tests                  pytest tests/gpu (--gpu-tests EXPR: those -k selects); tests/test_logprobs.py on
                         qwen3-0.6b and llama-3.2-1b written in bf16 with weights, once per --logprob-flags
                         set of launch flags (default: none)
  step                   bench_step.py on the llama-3.2-1b shape: decode steps (1..2,048 rows at 512
                         tokens), mixed steps (1,024 and 2,048 rows + 2,048 prompt tokens at 384) and
                         Hydragen steps (1,024 and 2,048 rows in two groups sharing 800 tokens, 192 their
                         own, at temperature 0.6; then 2,048 rows for 40 s, with the card's clock; then
                         the same over a cache of random values), each with its host and kernel profile
                         in the log
  sharegpt-quick, sharegpt-full, prefix-quick, prefix-full (Hydragen where groups form), and
  prefix-quick-hydragen, prefix-full-hydragen, prefix-quick-no-hydragen, prefix-full-no-hydragen
                         bench.py through the API, llama-3.2-1b shape, random weights (--flags adds
                         launch flags; the -hydragen and -no-hydragen parts force it either way)
  compare                the quick --compare-workload under each --compare-flags, one GPU each at
                         once (in turns when there are fewer GPUs), steps 1,200..1,239 traced
                         (TOKA_TRACE; the kernels' summary kept, the raw trace deleted)
  ab                     an earlier version's engine (--base) as A against this tree as B, quick
                         --ab-workload, alternating A B A B (--rounds, --b-first); one client measures both
  tp                     Llama-3.1-8B shape at each --tp-sizes: decode steps, sharegpt-like quick, and
                         greedy agreement with --tp 1 on written weights
  dp                     the full --dp-workload (sharegpt-like; shared-prefix: Hydragen) at --dp 1 and
                         --dp N (default: every GPU), and agreement of --dp N with one GPU (Llama-3.1-8B)
  batch                  sharegpt-like quick sent live, then the same requests as one batch job
                         (bench.py --via batch), and their ratio
  attention              bench_attention.py: decode kernels over a served-size cache (16 layers, 100 GiB)
                         and over one layer's pages, each layout and element type
  tune                   bench_attention.py: the Triton decode kernel's warps, stages, chunk sizes and
                         kernels (--triton-configs, default TRITON_CONFIGS) at sharegpt-like lengths,
                         Hydragen's own pages (1-256) and shared-prefix rows without Hydragen
                         (900-1,156), bf16 and FP8 pages
  sampling               bench_sampling.py: the fused sampler alone, 2,048 rows x 128,256 logits, greedy and at
                         temperature 0.6, under pieces a row and warps a program
  fp8                    Llama-3.1-8B shape, 2,048 sharegpt-like requests: bf16, --quantization fp8,
                         --kv-cache-dtype fp8_e4m3 and both (--fp8-runs: some of them), each against bf16
                         (an FP8 kernel FlashInfer has not prebuilt compiles at the first launch that needs it)
  pp                     Llama-3.1-8B shape sharegpt-like quick at --pp 1 and --pp N (--pp-tp K: also
                         --pp N --tp K against --tp N x K), and agreement of --pp N and --tp N with one
                         GPU on written weights

A workload's and each compare run's rows end with the engine's host figures a step, as its rank and
scheduler write them at their stop (TOKA_STOP_FIGURES): the rank launching, the device waiting for
plans and, from a step's end to the next one's forward, for the host; the scheduler planning and
taking results.

Models are written once into --models (random weights of real shapes, tools/make_model.py) and
reused. Parts run one after another on every visible GPU, or with --side-by-side at once, each on
GPUs of its own. Each tool run has the part's timeout (--timeout); its process group (the server
and everything it started) is stopped when it ends, at its timeout and on an interrupt (SIGTERM,
SIGINT: no other run starts, and the parts still table what their finished runs wrote). The table
(part, figure, value, unit, % of the floor) is also written to OUT/summary.json, and with the
traces' summaries and the step runs' profiles to OUT/report.txt (one file to bring back);
--report-to DIR writes both into DIR too, after every part, and --deadline SECONDS stops the runs
under way at that time as an interrupt does, so that a command killed at a time limit keeps what
finished before it. The exit code is 1 when a run failed, 130 when interrupted. A run that fails
(not one an interrupt stopped) prints the last lines of its log among the progress lines, so its
cause travels with stdout.

A flag set of one flag takes "=" (--compare-flags=--hydragen): argparse reads a lone value that
starts with "-" as an option; one with a space in it ("--max-seqs 4096") or "" passes either way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path, as -m from it has
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gpu_jobs import Models, Runner, say
from tools.gpu_parts import FP8_RUNS, PARTS, STEP_SWEEPS, TIMEOUTS, TREE, TRITON_CONFIGS, Part
from tools.gpu_results import Row, table


def timeouts(specs: list[str]) -> dict[str, float]:
    """--timeout SECONDS (every part) or PART=SECONDS, later ones over earlier ones."""
    out = dict(TIMEOUTS)
    for spec in specs:
        name, _, seconds = spec.rpartition("=")
        if name and name not in out:
            raise ValueError(f"--timeout {spec}: no part {name!r} (parts: {', '.join(out)})")
        for key in [name] if name else list(out):
            out[key] = float(seconds)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder: every part's files go under it")
    p.add_argument("parts", nargs="+", choices=list(PARTS), metavar="PART", help=f"one of: {', '.join(PARTS)}")
    p.add_argument("--models", type=Path, default=Path("/tmp/toka-models"), help="model folders, written once")
    p.add_argument("--timeout", action="append", default=[], metavar="[PART=]SECONDS",
                   help="seconds each tool run of a part may take (every part, or one; repeatable); "
                        f"defaults: {', '.join(f'{k} {v}' for k, v in TIMEOUTS.items())}")
    p.add_argument("--gpus", help="GPU ids to use, e.g. 0,1 (default: CUDA_VISIBLE_DEVICES, else every GPU)")
    p.add_argument("--side-by-side", action="store_true", help="run the parts at once, each on GPUs of its own")
    p.add_argument("--dry-run", action="store_true", help="print the command lines, run nothing")
    p.add_argument("--flops", type=float, help="bf16 matmul FLOP/s of one card for bench.py (default: measured)")
    p.add_argument("--bandwidth", type=float, help="device copy bytes/s, read + written (default: measured)")
    p.add_argument("--sweeps", type=lambda s: s.split(","), metavar="LIST",
                   help=f"step: only these sweeps (of {', '.join(STEP_SWEEPS)})")
    p.add_argument("--gpu-tests", metavar="EXPR", help="tests: only the tests/gpu tests pytest -k EXPR selects")
    p.add_argument("--logprob-flags", action="append", default=[], metavar="FLAGS",
                   help="tests: the logprob tests once with each set of launch flags (TOKA_ARGS; default: none)")
    p.add_argument("--flags", default="", help="launch flags added to the workload, tp, dp and pp servers")
    p.add_argument("--compare-workload", default="sharegpt-like", choices=["sharegpt-like", "shared-prefix"])
    p.add_argument("--compare-flags", action="append", default=[], metavar="FLAGS",
                   help='compare: a launch flag set (repeatable; "" for the defaults)')
    p.add_argument("--base", default=str(TREE / "build" / "base"),
                   help="ab: folder of A's toka/ and workers/ (git archive REV toka workers | tar -x -C DIR)")
    p.add_argument("--ab-workload", default="sharegpt-like", choices=["sharegpt-like", "shared-prefix"])
    p.add_argument("--ab-flags", default="", help="ab: launch flags of both sides")
    p.add_argument("--rounds", type=int, default=2, help="ab: rounds of A then B")
    p.add_argument("--b-first", action="store_true", help="ab: B then A in each round")
    p.add_argument("--tp-sizes", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2],
                   help="tp: tensor-parallel sizes, e.g. 1,2,4")
    p.add_argument("--dp", type=int, help="dp: replicas to set against one (default: every GPU)")
    p.add_argument("--dp-workload", default="sharegpt-like", choices=["sharegpt-like", "shared-prefix"],
                   help="dp: the full workload at --dp 1 and --dp N")
    p.add_argument("--triton-configs", default=TRITON_CONFIGS, metavar="LIST",
                   help="tune: the Triton decode settings to time (WARPS:STAGES:CHUNK_PAGES[:MAX_REGISTERS] and any "
                        "of :head, :lazy, :pbN; comma-separated; default: TRITON_CONFIGS)")
    p.add_argument("--pp", type=int, default=2, help="pp: stages (and the --tp size of its agreement check)")
    p.add_argument("--pp-tp", type=int, default=0, metavar="K",
                   help="pp: also --pp N --tp K against --tp N x K (N x K GPUs)")
    p.add_argument("--fp8-runs", type=lambda s: s.split(","), default=list(FP8_RUNS), metavar="LIST",
                   help=f"fp8: which of {','.join(FP8_RUNS)} to run (default: all; bf16 is the ratios' base)")
    p.add_argument("--engine-profile", action="store_true",
                   help="bench.py runs: every engine process under cProfile (TOKA_PROFILE; slows the host several "
                        "times, so not for figures), each summarized into report.txt")
    p.add_argument("--report-to", type=Path, metavar="DIR",
                   help="also write report.txt and summary.json into DIR after every part (what finished "
                        "survives the whole command being killed)")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="stop every run under way this long after the start, as an interrupt does; the parts "
                        "table what finished")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    args.parts = list(dict.fromkeys(args.parts))
    args.out, args.models = args.out.resolve(), args.models.resolve()
    try:
        args.timeouts = timeouts(args.timeout)
    except ValueError as e:
        p.error(str(e))
    if "compare" in args.parts and not args.compare_flags:
        p.error('compare needs --compare-flags (repeatable; "" for the defaults)')
    unknown = [name for name in args.sweeps or [] if name not in STEP_SWEEPS]
    if unknown:
        p.error(f"--sweeps {','.join(unknown)}: not a step sweep (of {', '.join(STEP_SWEEPS)})")
    unknown = [name for name in args.fp8_runs if name not in FP8_RUNS]
    if unknown:
        p.error(f"--fp8-runs {','.join(unknown)}: not an FP8 run (of {', '.join(FP8_RUNS)})")
    if "ab" in args.parts and not (Path(args.base) / "toka").is_dir():
        p.error(f"ab: {args.base} holds no toka/: git archive REV toka workers | tar -x -C {args.base}")
    if args.side_by_side and "dp" in args.parts and not args.dp:
        p.error("--side-by-side with dp needs --dp N")
    return args


def visible_gpus(args) -> list[str]:
    if args.gpus:
        return args.gpus.split(",")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    count = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True).stdout.strip()
    return [str(i) for i in range(int(count or 0))]


def assign(args, visible: list[str]) -> dict[str, list[str]]:
    """Each part's GPUs: all of them one part after another, or with --side-by-side consecutive
    slices of the visible GPUs. Raises ValueError naming a part that cannot have what it needs."""
    need = {name: PARTS[name].gpus(args, visible) for name in args.parts}
    for name, n in need.items():
        if n > len(visible) or (name in ("dp", "pp") and n < 2):
            raise ValueError(f"{name} needs {max(n, 2)} GPUs; {len(visible)} visible ({','.join(visible) or 'none'})")
    if not args.side_by_side:
        return {name: visible for name in args.parts}
    if sum(need.values()) > len(visible):
        raise ValueError(f"side by side, {' + '.join(f'{k} {v}' for k, v in need.items())} GPUs; {len(visible)} visible")
    out, first = {}, 0
    for name, n in need.items():
        out[name], first = visible[first : first + n], first + n
    return out


def rows_of(args, record: dict) -> list[Row]:
    return [r for name in ["models", *args.parts] if name in record for r in record[name]["rows"]]


_REPORTING = threading.Lock()  # parts side by side finish in threads of their own


def report(args, record: dict, interrupted: bool, into: Path) -> tuple[Path, Path]:
    """summary.json and report.txt of the parts recorded so far, written into `into`."""
    with _REPORTING:
        rows = rows_of(args, record)
        return write_summary(into, record, rows, interrupted), write_report(args.out, table(rows), into)


def run_part(name: str, gpus: list[str], args, runner: Runner, models: Models, record: dict) -> None:
    part = Part(name, args.out / name, gpus, args.timeouts[name], args, runner, models, [])
    say(f"=== {name} on GPU {','.join(gpus)}")
    start, rows = time.monotonic(), None
    try:
        rows = PARTS[name].run(part)
    except Exception as e:  # a result file of an unexpected shape: the other parts still report
        part.failed.append(f"{type(e).__name__}: {e}")
        rows = []
    finally:  # an interrupt is recorded too, then passes on
        if rows is None or runner.stopping:
            part.failed.append("interrupted: the runs under way were stopped")
        rows = (rows or []) + [Row(name, "failed", f) for f in part.failed]
        record[name] = dict(rows=rows, failed=part.failed, seconds=time.monotonic() - start, gpus=gpus)
        if args.report_to and not args.dry_run:
            report(args, record, runner.stopping, args.report_to)


def run_parts(args, gpus: dict[str, list[str]], runner: Runner, models: Models, record: dict) -> None:
    needed = [m for name in args.parts for m in PARTS[name].models]
    failed = models.write(needed, runner, args.timeouts["models"], args.out / "models", TREE)
    if failed:
        notes = [f"writing {name} failed: log {args.out / 'models' / name}.log" for name in failed]
        record["models"] = dict(rows=[Row("models", "failed", n) for n in notes], failed=notes, seconds=0, gpus=[])
        return
    if not args.side_by_side:
        for name in args.parts:
            run_part(name, gpus[name], args, runner, models, record)
        return
    threads = [threading.Thread(target=run_part, args=(n, gpus[n], args, runner, models, record), daemon=True)
               for n in args.parts]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():  # joined with a timeout, so that a signal reaches this thread
                t.join(0.5)
    finally:
        runner.stop_all()  # on an interrupt: the other parts start nothing more and end soon
        for t in threads:
            t.join(10)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    visible = visible_gpus(args)
    if not visible and args.dry_run:
        visible = ["0"]
        print("no GPU found: the dry run assumes one, GPU 0")
    try:
        gpus = assign(args, visible)
    except ValueError as e:
        sys.exit(f"gpu.py: {e}")
    runner, models = Runner(args.dry_run), Models(args.models)

    def interrupt(signum, frame):
        # the runs under way stop and no other starts; each part still tables what its finished
        # runs wrote (a timeout around the whole command keeps the figures measured before it)
        if not runner.stopping:
            say("gpu.py: interrupted; every run under way is stopped, the parts report what finished")
        runner.stop_all()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    if args.deadline and not args.dry_run:  # a budget for the whole command, kept inside it
        timer = threading.Timer(args.deadline, interrupt, (None, None))
        timer.daemon = True
        timer.start()
    record: dict[str, dict] = {}
    try:
        run_parts(args, gpus, runner, models, record)
    finally:
        interrupted = runner.stopping
        runner.stop_all()
    print(table(rows_of(args, record)))
    if not args.dry_run:
        for into in dict.fromkeys(d for d in (args.out, args.report_to) if d):
            summary, text = report(args, record, interrupted, into)
            print(f"summary: {summary}\nreport: {text}")
    return 130 if interrupted else 1 if any(r["failed"] for r in record.values()) else 0


def write_report(out: Path, text: str, into: Path | None = None) -> Path:
    """report.txt in `into` (default OUT): the table, then every traced run's summary (compare's
    *-steps.txt), every step run's log (its host and kernel profiles) and every engine profile's
    summary (--engine-profile) under OUT, in one file: what
    a GPU host that brings back few files, and none deep in folders, needs to bring back."""
    sections = [text]
    for f in sorted(out.rglob("*-steps.txt")) + sorted((out / "step").glob("*.log")) + sorted(out.rglob("*-profile.txt")):
        sections += ["", f"=== {f.relative_to(out)}", f.read_text(errors="replace").rstrip()]
    into = into or out
    into.mkdir(parents=True, exist_ok=True)
    path = into / "report.txt"
    path.write_text("\n".join(sections) + "\n")
    return path


def write_summary(out: Path, record: dict, rows: list[Row], interrupted: bool) -> Path:
    """OUT/summary.json: each part's failures, seconds and GPUs, and the table's rows."""
    summary = dict(parts={n: {k: v for k, v in r.items() if k != "rows"} for n, r in record.items()},
                   rows=[asdict(r) for r in rows], interrupted=interrupted)
    path = out / "summary.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
