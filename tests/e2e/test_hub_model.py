"""Hub ids: `--model ORG/NAME` resolves once, in the launcher, to the snapshot folder in the hub cache,
and the API serves it under the id as given. Offline (HF_HUB_OFFLINE=1) against a cache written here:
huggingface_hub reads HF_HOME when imported, so everything that resolves runs in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import Server, free_port

REPO = "toka-test/tiny-llama"
COMMIT, OTHER = "1" * 40, "2" * 40  # refs/main points at COMMIT; OTHER is reachable only by --revision


@pytest.fixture(scope="module")
def hub_home(tiny_models, tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds REPO at two commits, laid out as huggingface_hub writes it."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    for commit in (COMMIT, OTHER):
        shutil.copytree(tiny_models["tiny-llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def offline(home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def resolve(home: Path, *args: str) -> dict:
    """EngineConfig.resolve() of these flags in a fresh interpreter: what every child would get."""
    code = ("import json, sys; from toka.config import parse_args; c = parse_args(sys.argv[1:]).resolve(); "
            "print(json.dumps({'model': c.model, 'tokenizer': c.tokenizer_path, 'names': c.served_names}))")
    out = subprocess.run([sys.executable, "-c", code, "--device", "cpu", *args], env=offline(home),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cached_hub_id_resolves_to_its_snapshot_folder(hub_home):
    snapshots = hub_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots"
    got = resolve(hub_home, "--model", REPO)
    assert got == {"model": str(snapshots / COMMIT), "tokenizer": str(snapshots / COMMIT), "names": [REPO]}
    got = resolve(hub_home, "--model", REPO, "--revision", OTHER, "--tokenizer", REPO)
    assert got == {"model": str(snapshots / OTHER), "tokenizer": str(snapshots / COMMIT), "names": [REPO]}


def test_an_uncached_hub_id_offline_fails_fast_naming_it(hub_home):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "toka.launch", "--model", "toka-test/absent", "--port",
                          str(free_port())], env=offline(hub_home), capture_output=True, text=True, timeout=60)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("toka-launch: error: --model 'toka-test/absent'"), out.stderr
    assert "HF_HUB_OFFLINE" in last and "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 30


def test_a_launched_server_serves_a_hub_id_under_that_name(hub_home):
    server = Server("--model", REPO, "--max-tokens-per-forward", "128", "--kv-cache-tokens", "4096",
                    env={"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"})
    try:
        assert [m["id"] for m in requests.get(server.url + "/v1/models").json()["data"]] == [REPO]
        r = requests.post(server.url + "/v1/completions", json={"model": REPO, "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == REPO, r.text
        snapshot = hub_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
        assert f"ready: serving {REPO} from {snapshot} on" in server.output()
    finally:
        assert server.stop() == 0, server.output()
