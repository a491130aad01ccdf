"""tools/card_clock.py: nvidia-smi's samples summarized, and the sampler run against a stand-in
nvidia-smi on the PATH."""

import os
import time

import pytest

from tools.card_clock import EXTRA, FIELDS, REASONS, ClockSampler, summarize


def test_samples_are_summarized_over_every_card_and_bad_lines_are_skipped():
    lines = ["1980, 1980, 650.5, 61", "1755, 1980, 700.0, 66", "[N/A], 1980, 700.0, 66", "1500, 1980", ""]
    assert summarize(lines) == dict(samples=2, sm_mhz_mean=1867.5, sm_mhz_min=1755.0, sm_mhz_max_card=1980.0,
                                    power_w_mean=675.25, temperature_c_max=66.0)
    assert summarize(["[N/A], [N/A], [N/A], [N/A]"]) is None


def test_the_reasons_the_power_limit_and_the_busy_clock_are_summarized():
    # clock, top, power, temperature, utilization, limit, then each reason
    idle = "1980, 1980, 120.0, 40, 0, 700.00, " + ", ".join(["Not Active"] * len(REASONS))
    capped = "1500, 1980, 699.0, 65, 100, 700.00, Active, " + ", ".join(["Not Active"] * (len(REASONS) - 1))
    full = "1980, 1980, 650.0, 60, 95, 700.00, " + ", ".join(["Not Active"] * len(REASONS))
    figures = summarize([idle] * 2 + [capped] * 6 + [full] * 2, FIELDS + EXTRA)
    assert figures["sm_mhz_busy"] == pytest.approx((6 * 1500 + 2 * 1980) / 8) and figures["busy_samples"] == 8
    assert figures["sm_mhz_tenths"] == [1980, 1980] + [1500] * 6 + [1980, 1980]
    assert figures["power_limit_w"] == 700.0
    assert figures["reasons"]["sw_power_cap"] == pytest.approx(0.6) and figures["reasons"]["hw_slowdown"] == 0


def fake_nvidia_smi(tmp_path, monkeypatch, line: str, refuse_extra: bool) -> None:
    """An nvidia-smi on the PATH that prints `line` once, or a sample with -lms until it is stopped; with
    `refuse_extra` it fails a query naming the clock-event reasons, as an older driver does."""
    fake = tmp_path / "nvidia-smi"
    refuse = 'case "$*" in *clocks_event_reasons*) exit 2;; esac\n' if refuse_extra else ""
    sample = f"echo '{line}'"
    loop = f'case "$*" in *-lms*) while true; do {sample}; sleep 0.05; done;; esac\n'
    fake.write_text(f"#!/bin/sh\n{refuse}{loop}{sample}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("refuse_extra", [False, True])
def test_the_sampler_reads_nvidia_smi_until_stopped(tmp_path, monkeypatch, refuse_extra):
    extra = "" if refuse_extra else ", 100, 700.00, " + ", ".join(["Not Active"] * len(REASONS))
    fake_nvidia_smi(tmp_path, monkeypatch, "1700, 1980, 690.0, 70" + extra, refuse_extra)
    sampler = ClockSampler.start(interval_ms=50)
    time.sleep(0.5)
    figures = sampler.stop()
    assert figures["samples"] >= 2 and figures["sm_mhz_mean"] == pytest.approx(1700.0)
    assert ("reasons" in figures) == (not refuse_extra)
    assert sampler.proc.poll() is not None


def test_no_sampler_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ClockSampler.start() is None
