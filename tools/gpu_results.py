"""tools/gpu.py's table: rows read from the files the tools write (bench.py's and bench_step.py's
JSON, compare_runs.py's JSON, pytest's JUnit XML, the logprob test's JSON), never from their logs.
A file that is missing or unreadable gives a row that says so."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

NO_RESULT = "no result"


@dataclass
class Row:
    part: str
    figure: str
    value: float | str
    unit: str = ""
    share: float | None = None  # percent of the floor the figure is measured against
    file: str = ""  # what it was read from


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def throughput(result: dict) -> tuple[float, str]:
    """A bench.py result's headline figure: total tok/s for sharegpt-like (prompt and output cost
    alike there), output tok/s for the others."""
    if result["workload"] == "sharegpt-like":
        return result["total_tok_s"], "total tok/s"
    return result["output_tok_s"], "output tok/s"


def rates_row(part: str, path: Path) -> list[Row]:
    """The card's rates a bench.py or bench_step.py result was costed with, and their source."""
    r = read_json(path)
    rates = r.get("rates") if isinstance(r, dict) else None
    if not rates:
        return []
    source = sorted({rates["flops_from"], rates["bandwidth_from"]})
    return [Row(part, "card's rates", f"{rates['flops'] / 1e12:.0f} TFLOP/s, {rates['bandwidth'] / 1e12:.2f} TB/s",
                f"{' and '.join(source)}{', ' + rates['device'] if rates.get('device') else ''}", file=str(path))]


def bench_rows(part: str, label: str, path: Path) -> list[Row]:
    r = read_json(path)
    if not isinstance(r, dict):
        return [Row(part, label, NO_RESULT, file=str(path))]
    value, unit = throughput(r)
    rows = [Row(part, label, value, unit, r.get("pct_of_speed_of_light"), str(path))]
    if "pct_of_speed_of_light_shared" in r:
        rows.append(Row(part, f"{label}: shared-read floor", value, unit, r["pct_of_speed_of_light_shared"], str(path)))
    if "pct_of_speed_of_light_at_served_clock" in r:  # the matmul rate at the clock the card kept while busy
        floor = "shared-read floor" if "pct_of_speed_of_light_shared" in r else "floor"
        rows.append(Row(part, f"{label}: {floor} at the served clock ({100 * r['served_clock']:.0f} % of the top)",
                        value, unit, r["pct_of_speed_of_light_at_served_clock"], str(path)))
    return rows + engine_rows(part, label, r, path) + card_rows(part, label, r, path)


def engine_rows(part: str, label: str, r: dict, path: Path) -> list[Row]:
    """The host figures the engine wrote at its stop (bench.py's `engine`), of the first rank 0 and
    scheduler: whether the host kept ahead of the device."""
    engine = r.get("engine") or {}
    ranks, schedulers = engine.get("ranks") or [], engine.get("schedulers") or []
    if not ranks:
        return []
    rank = ranks[0]
    figures = [f"launching {rank['launching_ms']:.2f}", f"device waiting for plans {rank['plan_wait_ms']:.2f}"]
    if rank.get("host_wait_ms") is not None:
        figures.append(f"from a step's end to the next forward {rank['host_wait_ms']:.2f}")
    if schedulers:
        figures += [f"planning {schedulers[0]['planning_ms']:.2f}", f"taking results {schedulers[0]['results_ms']:.2f}"]
    return [Row(part, f"{label}: host, {rank['steps']:,} steps in {rank['span_s']:.1f} s", ", ".join(figures),
                "ms a step", file=str(path))]


def card_rows(part: str, label: str, r: dict, path: Path) -> list[Row]:
    """The card's SM clock and power over the run (bench.py's `card`), where it was sampled."""
    card = r.get("card")
    if not card:
        return []
    rows = [Row(part, f"{label}: card over the run", f"SM {card['sm_mhz_mean']:,.0f} MHz mean, {card['sm_mhz_min']:,.0f} "
                f"min, {card['sm_mhz_max_card']:,.0f} top; {card['power_w_mean']:.0f} W mean; {card['temperature_c_max']:.0f} C max",
                "", file=str(path))]
    if card.get("reasons") is not None:  # drivers that name why the clock was held down
        busy = f"{card['sm_mhz_busy']:,.0f} MHz" if card["sm_mhz_busy"] else "none"
        held = ", ".join(f"{r} {100 * v:.0f} %" for r, v in card["reasons"].items() if v) or "none"
        rows.append(Row(part, f"{label}: card's clock when busy; by tenths; held down by",
                        f"{busy} ({card['busy_samples']} samples); {' '.join(map(str, card['sm_mhz_tenths']))}; "
                        f"{held} (limit {card['power_limit_w']:.0f} W)", "", file=str(path)))
    return rows


def ratio_row(part: str, figure: str, top: Path, bottom: Path) -> list[Row]:
    """top's headline figure over bottom's (e.g. tp 2 over tp 1), when both ran."""
    a, b = read_json(top), read_json(bottom)
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return []
    return [Row(part, figure, throughput(a)[0] / throughput(b)[0], "x")]


def mean_row(part: str, figure: str, paths: list[Path]) -> list[Row]:
    results = [r for r in map(read_json, paths) if isinstance(r, dict)]
    if not results:
        return []
    values = [throughput(r)[0] for r in results]
    return [Row(part, f"{figure} ({len(values)} runs, {min(values) / 1e3:.1f}k-{max(values) / 1e3:.1f}k)",
                sum(values) / len(values), throughput(results[0])[1])]


def attention_rows(part: str, label: str, path: Path) -> list[Row]:
    """bench_attention.py's kernels: time a layer against the KV bytes' floor."""
    r = read_json(path)
    if not isinstance(r, dict):
        return [Row(part, label, NO_RESULT, file=str(path))]
    return [Row(part, f"{label}: {k['kv']} {k['layout']} {k['kernel']}", k["ms_a_layer"], "ms a layer",
                k["pct_of_floor"], str(path)) for k in r["results"]]


def sampling_rows(part: str, path: Path) -> list[Row]:
    """bench_sampling.py's runs: the kernel's time against one read of the logits."""
    r = read_json(path)
    if not isinstance(r, dict):
        return [Row(part, "sampling kernel", NO_RESULT, file=str(path))]
    return [Row(part, f"{k['rows']:,} x {k['vocab']:,} at T {k['temperature']:g}, {k['slices']} pieces a row, "
                      f"{k['warps']} warps", k["ms"], "ms", k["pct_of_read"], str(path)) for k in r["results"]]


def step_rows(part: str, label: str, path: Path) -> list[Row]:
    """bench_step.py's sweep: each batch's time per step (steps overlapped as on the rank)."""
    r = read_json(path)
    if not isinstance(r, dict):
        return [Row(part, label, NO_RESULT, file=str(path))]
    rows = []
    for s in r["rows"]:
        prompt = f" + {s['prefill_tokens']:,} prompt tokens" if s.get("prefill_tokens") else ""
        at = f"{s['shared']} shared in {s['groups']} groups + {s['context']}" if s.get("groups") else s["context"]
        rows.append(Row(part, f"{label} {s['batch']:,} rows{prompt} at {at}", s["pipelined_ms"], "ms a step",
                        s["pct_of_floor"], str(path)))
    sustained = r.get("sustained")
    if sustained:
        rows.append(Row(part, f"{label} {sustained['batch']:,} rows for {sustained['seconds']:.0f} s: first tenth, "
                        "last tenth", f"{sustained['first_ms']:.2f}, {sustained['last_ms']:.2f}", "ms a step",
                        file=str(path)))
        rows += card_rows(part, label, sustained, path)
    return rows


def agree_rows(part: str, path: Path) -> list[Row]:
    """compare_runs.py: each configuration against the first, teacher-forced and free-running."""
    r = read_json(path)
    if not isinstance(r, list):
        return [Row(part, "agreement", NO_RESULT, file=str(path))]
    rows = []
    for c in r:
        who = f"{c['b']} vs {c['a']}"
        tf, fr = c["teacher_forced"], c["free_running"]
        rows += [Row(part, f"{who}: teacher-forced token match", 100 * tf["token_match"], "%", file=str(path)),
                 Row(part, f"{who}: mean |logprob diff|", tf["mean_abs_logprob_diff"], file=str(path)),
                 Row(part, f"{who}: max |logprob diff|", tf["max_abs_logprob_diff"], file=str(path)),
                 Row(part, f"{who}: free-running token match", 100 * fr["token_match"], "%", file=str(path))]
    return rows


def junit_row(part: str, label: str, path: Path) -> Row:
    """pytest's --junitxml report: how many tests passed, failed and were skipped."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return Row(part, label, NO_RESULT, file=str(path))
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = n["failures"] + n["errors"]
    return Row(part, label, f"{n['tests'] - failed - n['skipped']} passed, {failed} failed, {n['skipped']} skipped",
               "tests", file=str(path))


def logprob_rows(part: str, label: str, path: Path) -> list[Row]:
    """The logprob test's figures against transformers, if it wrote them: a dict or a list of
    dicts with token_match, mean_rel_diff and max_abs_diff (tests/helpers.compare_with_hf's)."""
    r = read_json(path)
    if r is None:
        return [Row(part, f"{label}: figures", "not written", file=str(path))]
    rows = []
    for stats in r if isinstance(r, list) else [r]:
        rows += [Row(part, f"{label}: token match", 100 * stats["token_match"], "%", file=str(path)),
                 Row(part, f"{label}: mean relative logprob diff", stats["mean_rel_diff"], file=str(path)),
                 Row(part, f"{label}: max |logprob diff|", stats["max_abs_diff"], file=str(path))]
    return rows


def shown(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if abs(value) >= 10_000:
        return f"{value / 1e3:,.1f}k"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(rows: list[Row]) -> str:
    """part, figure, value, unit and share of the floor, in aligned columns."""
    cells = [("part", "figure", "value", "unit", "% of floor")]
    cells += [(r.part, r.figure, shown(r.value), r.unit, "" if r.share is None else f"{r.share:.0f} %") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths))).rstrip()
             for cell in cells]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])
