"""/metrics in the Prometheus text format: the server's own counters and latency histograms, and the
scheduler's latest Stats. Counters end in `_total`, as Prometheus names them."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toka.server.app import Choice, Server

# Upper bounds in seconds. Time to first token spans a cached short prompt on a GPU (milliseconds)
# to a long prompt queued behind others (minutes); a decode step takes a few ms on a GPU and up to a
# second on CPU or a loaded engine; a whole request up to the longest generations.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 240.0, 480.0, 960.0,
               1920.0, 7680.0)


class Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Records `value` `times` times (the inter-token gaps of a sequence, all at their mean)."""
        self.counts[bisect_left(self.bounds, value)] += times  # a bucket holds values <= its bound
        self.sum += value * times

    def samples(self) -> list[tuple[str, str, float]]:
        """(name suffix, labels, value) rows: cumulative buckets, then _sum and _count."""
        rows, total = [], 0
        for bound, count in zip([*self.bounds, "+Inf"], self.counts):
            total += count
            rows.append(("_bucket", f'{{le="{bound}"}}', total))
        return [*rows, ("_sum", "", self.sum), ("_count", "", total)]


class ServerMetrics:
    """What the server records per request, when the request ends (never per token)."""

    def __init__(self):
        self.errors: Counter[int] = Counter()  # error responses by HTTP status
        self.finished: Counter[str] = Counter()  # choices by how they ended for the client
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def record(self, arrival: float, choices: list[Choice]) -> None:
        """A request that arrived at `arrival` (time.monotonic()) ended with these choices."""
        now = time.monotonic()
        prompts = set()
        for c in choices:
            s = c.stream
            if id(c.req) not in prompts:  # n choices share one prompt
                prompts.add(id(c.req))
                self.prompt_tokens += len(c.req.prompt)
            self.generation_tokens += s.sampled
            self.finished[c.finish or ("error" if s.error else "abort")] += 1
            if c.finish is None or s.first_at is None:  # failed or abandoned, or nothing sampled
                continue
            end = s.end_at or now  # a stop string ends it in the server, before the engine does
            self.ttft.observe(s.first_at - arrival)
            self.e2e.observe(end - arrival)
            if s.sampled > 1:
                self.itl.observe((end - s.first_at) / (s.sampled - 1), s.sampled - 1)


def render(server: Server) -> str:
    """The scheduler's numbers come from its latest Stats message, sent every STATS_INTERVAL even
    while idle, so they settle once the engine does."""
    lines = []

    def metric(name, kind, help, values):
        lines.extend([f"# HELP toka_{name} {help}", f"# TYPE toka_{name} {kind}"])
        lines.extend(f"toka_{name}{labels} {value}" for labels, value in values)

    def histogram(name, help, h: Histogram):
        lines.extend([f"# HELP toka_{name} {help}", f"# TYPE toka_{name} histogram"])
        lines.extend(f"toka_{name}{suffix}{labels} {value}" for suffix, labels, value in h.samples())

    m, engine = server.metrics, server.engine
    metric("http_requests", "gauge", "generation requests in flight in the server", [("", server.active)])
    metric("http_streams", "gauge", "output sequences in flight in the server", [("", len(engine.streams))])
    metric("http_errors_total", "counter", "error responses, by status",
           [(f'{{status="{k}"}}', v) for k, v in sorted(m.errors.items())])
    metric("requests_finished_total", "counter", "choices (one output sequence each) returned or given up, by "
           "finish reason: stop, length, abort (the client left) or error (the engine failed)",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(m.finished.items())])
    metric("prompt_tokens_total", "counter", "prompt tokens of the requests served (once for a prompt's n "
           "choices)", [("", m.prompt_tokens)])
    metric("generation_tokens_total", "counter", "output tokens the requests served received",
           [("", m.generation_tokens)])
    runner = server.batches.runner
    metric("batches_running", "gauge", "batches whose lines the server is running",
           [("", len(runner.jobs) if runner else 0)])
    metric("batch_lines_in_flight", "gauge", "batch lines in the engine (their sequences count in http_streams)",
           [("", runner.lines_in_flight if runner else 0)])
    histogram("time_to_first_token_seconds", "from a request's arrival to each choice's first token", m.ttft)
    histogram("inter_token_latency_seconds", "between a choice's consecutive tokens (each choice's gaps "
              "counted at their mean)", m.itl)
    histogram("e2e_request_latency_seconds", "from a request's arrival to each choice's end", m.e2e)
    # the schedulers' figures: unlabelled for one replica, labelled replica="K" for several
    replicas = [(k if server.cfg.dp > 1 else None, s) for k, s in engine.replica_stats()]
    if replicas:
        def each(field):
            return [(_labels(k), getattr(s, field)) for k, s in replicas]

        metric("replicas_live", "gauge", "data-parallel replicas serving", [("", engine.live_count)])
        metric("running", "gauge", "sequences on the ranks", each("running"))
        metric("waiting", "gauge", "sequences waiting for a slot or pages", each("waiting"))
        metric("free_pages", "gauge", "free KV-cache pages", each("free_pages"))
        metric("total_pages", "gauge", "KV-cache pages", each("total_pages"))
        metric("kv_cache_tokens", "gauge", "KV-cache tokens (pages x --page-size)",
               [(_labels(k), s.total_pages * server.cfg.page_size) for k, s in replicas])
        metric("tokens_generated_total", "counter", "output tokens generated", each("tokens_generated"))
        metric("preemptions_total", "counter", "sequences preempted for pages", each("preemptions"))
        metric("steps_total", "counter", "steps completed", each("steps"))
        metric("cached_pages", "gauge", "free pages kept for the prefix cache (counted in free_pages)",
               each("cached_pages"))
        metric("prefix_hit_tokens_total", "counter", "prompt tokens found in the prefix cache",
               each("prefix_hit_tokens"))
        metric("grouped_rows_total", "counter", "decode rows that attended to a shared prefix once per group "
               "(Hydragen)", each("grouped_rows"))
        metric("finished_total", "counter", "sequences the scheduler finished, by reason (abort: a stop string, "
               "a client gone, a drain timeout)",
               [(_labels(k, reason=r), v) for k, s in replicas for r, v in sorted(s.finished.items())])
    return "\n".join(lines) + "\n"


def _labels(replica: int | None, **pairs) -> str:
    """A sample's labels: replica="K" first when the engine has several replicas."""
    items = ([f'replica="{replica}"'] if replica is not None else []) + [f'{k}="{v}"' for k, v in pairs.items()]
    return "{" + ",".join(items) + "}" if items else ""
