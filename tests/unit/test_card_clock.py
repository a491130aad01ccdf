"""tools/card_clock.py: nvidia-smi's samples summarized, and the sampler run against a stand-in
nvidia-smi on the PATH."""

import os
import time

import pytest

from tools.card_clock import ClockSampler, summarize


def test_samples_are_summarized_over_every_card_and_bad_lines_are_skipped():
    lines = ["1980, 1980, 650.5, 61", "1755, 1980, 700.0, 66", "[N/A], 1980, 700.0, 66", "1500, 1980", ""]
    assert summarize(lines) == dict(samples=2, sm_mhz_mean=1867.5, sm_mhz_min=1755.0, sm_mhz_max_card=1980.0,
                                    power_w_mean=675.25, temperature_c_max=66.0)
    assert summarize(["[N/A], [N/A], [N/A], [N/A]"]) is None


def test_the_sampler_reads_nvidia_smi_until_stopped(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    # one line a sample, as nvidia-smi -lms does, until it is stopped
    fake.write_text("#!/bin/sh\nwhile true; do echo '1700, 1980, 690.0, 70'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sampler = ClockSampler.start(interval_ms=50)
    time.sleep(0.5)
    figures = sampler.stop()
    assert figures["samples"] >= 2 and figures["sm_mhz_mean"] == pytest.approx(1700.0)
    assert sampler.proc.poll() is not None


def test_no_sampler_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ClockSampler.start() is None
