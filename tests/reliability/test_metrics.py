"""/metrics: Prometheus text with the engine's state, which settles to the truth once the engine is
idle (the scheduler keeps sending its stats while idle, not only while busy)."""

from __future__ import annotations

import time

import requests

from tests.reliability.conftest import metrics, settled

REQUIRED = ["http_requests", "http_streams", "http_errors_total", "requests_finished_total", "running", "waiting",
            "free_pages", "total_pages", "kv_cache_tokens", "tokens_generated_total", "finished_total", "prompt_tokens_total",
            "generation_tokens_total"]


def test_metrics_are_prometheus_text_and_settle_while_idle(shared):
    url = shared.url
    before = settled(url)
    body = {"prompt": "count my tokens", "max_tokens": 7, "ignore_eos": True, "n": 2}
    assert requests.post(url + "/v1/completions", json=body).status_code == 200
    deadline = time.monotonic() + 5
    while (m := metrics(url))["tokens_generated_total"] != before["tokens_generated_total"] + 14:  # no traffic since
        assert time.monotonic() < deadline, (before, m)
        time.sleep(0.1)
    delta = {k: m.get(k, 0) - before.get(k, 0) for k in m}
    assert delta['finished_total{reason="length"}'] == 2 and delta['requests_finished_total{reason="length"}'] == 2
    assert delta["steps_total"] >= 7 and m["free_pages"] == m["total_pages"] and m["running"] == m["waiting"] == 0
    assert m["kv_cache_tokens"] == m["total_pages"] * 16  # the default page size
    text = requests.get(url + "/metrics").text
    for name in REQUIRED:
        assert f"# TYPE toka_{name} " in text and f"# HELP toka_{name} " in text, name


def test_unknown_route_is_an_openai_error(shared):
    resp = requests.post(shared.url + "/v1/embeddings", json={"input": "x"})
    assert resp.status_code == 404 and resp.json()["error"]["message"]
    resp = requests.get(shared.url + "/v1/completions")
    assert resp.status_code == 405 and resp.json()["error"]["message"]
