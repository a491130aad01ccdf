"""Shared test helpers: an in-process rank for parity tests and a launched server for e2e tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import requests
import torch

from toka.arith import cdiv
from toka.config import EngineConfig
from toka.protocol import SeqParams, StepPlan, StepResult
from workers.layers.parallel import PipelineStage
from workers.pipeline import Pipe

# the name tiny_server serves its model under: requests must use a served name (or none)
TINY_NAME = "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_runner(model: str, dtype: str = "float32", device: str = "cpu", kv_tokens: int = 8192, max_seqs: int = 16,
                 cuda_graphs: bool = False, max_model_len: int | None = None, decode_attention: str = "auto",
                 stages: int = 1, stage: int = 0, pipe=None, hydragen_min_group: int = 16,
                 piecewise_graphs: bool = False):
    """A rank's ModelRunner in this process, for driving step plans directly. `max_model_len` may
    exceed the model's context window, for rope extrapolation tests that plan longer sequences.
    `stages`, `stage`, `pipe`: one stage of a pipeline (see local_pipeline)."""
    from workers.rank import build

    cfg = EngineConfig(model=model, device=device, dtype=dtype, kv_cache_tokens=kv_tokens, max_seqs=max_seqs,
                       cuda_graphs=cuda_graphs, cuda_graph_max_batch=max_seqs, decode_attention=decode_attention,
                       hydragen_min_group=hydragen_min_group, piecewise_graphs=piecewise_graphs).resolve()
    cfg.max_model_len = max_model_len or cfg.max_model_len
    cfg.pp = stages  # after resolve(): the stages share this process and its device
    runner, _ = build(cfg, stage, pipe)
    return runner


class LocalPipe(Pipe):
    """Links between stages in one process: each link a queue of tensors."""

    def _send(self, tensor, link) -> None:
        link.append(tensor.clone())

    def _recv(self, tensor, link) -> None:
        tensor.copy_(link.popleft())


def local_pipeline(model: str, stages: int, **kw) -> list:
    """The runners of every stage of a pipeline, in this process (local_runner's arguments)."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(model).num_hidden_layers
    hidden, tokens = [deque() for _ in range(stages - 1)], deque()
    runners = []
    for s in range(stages):
        stage = PipelineStage.of(layers, s, stages)
        pipe = LocalPipe(stage, next=hidden[s] if not stage.last else None, prev=hidden[s - 1] if s else None,
                         to_first=tokens if stage.last else None, from_last=tokens if stage.first else None)
        runners.append(local_runner(model, stages=stages, stage=s, pipe=pipe, **kw))
    return runners


def run_pipelined(runners: list, plans: list[StepPlan]) -> list[StepResult]:
    """Runs the plans as the stages of a pipeline do: stage s launches step k when stage s - 1 has
    launched step k + 1, and finishes a step after launching the next, so the first stage runs
    ahead of the tokens coming back; returns the last stage's results."""
    pending = [deque() for _ in runners]
    results = []
    for tick in range(len(plans) + len(runners) - 1):
        for s, runner in enumerate(runners):
            if 0 <= tick - s < len(plans):
                pending[s].append(runner.launch(plans[tick - s]))
            while len(pending[s]) > 1 or (pending[s] and tick - s >= len(plans) - 1):
                if (result := runner.finish(pending[s].popleft())) is not None:
                    results.append(result)
    for runner in runners:
        runner.close()
    return results


def prefill_plan(step: int, prompts: list[list[int]], page_size: int, prompt_logprobs: int = -1,
                 temperature: float = 0.0, logprobs: int = 0) -> StepPlan:
    """One step that prefills every prompt whole, row r in slot r, pages laid out consecutively."""
    slots, cols, pages = [], [], []
    for r, p in enumerate(prompts):
        n = cdiv(len(p), page_size)
        slots += [r] * n
        cols += list(range(n))
        pages += list(range(len(pages), len(pages) + n))
    return StepPlan(
        step_id=step, rids=list(range(len(prompts))), slots=list(range(len(prompts))),
        q_lens=[len(p) for p in prompts], kv_lens=[len(p) for p in prompts], emit=[True] * len(prompts),
        num_prefill=len(prompts), prefill_tokens=[t for p in prompts for t in p],
        table_slots=slots, table_cols=cols, table_pages=pages,
        admit=[SeqParams(slot=r, temperature=temperature, logprobs=logprobs, prompt_logprobs=prompt_logprobs) for r in range(len(prompts))],
        prefill_next=[-1] * len(prompts) if prompt_logprobs >= 0 else [],
    )


class Launch:
    """`toka-launch` in a subprocess, its output in a file; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, *args: str, env: dict | None = None, log_name: str | None = None):
        folder = Path(os.environ.get("TMPDIR", "/tmp"))
        self.log = open(folder / log_name, "w+") if log_name else tempfile.NamedTemporaryFile(
            "w+", dir=folder, prefix="toka-test-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toka.launch", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Server(Launch):
    """A launch that serves HTTP on a free port; healthy once made, unless `wait` is False (then
    wait_healthy() waits, e.g. for the other nodes of an engine across hosts to join)."""

    def __init__(self, *args: str, timeout: float = 300.0, env: dict | None = None, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("--port", str(self.port), *args, env=env, log_name=f"toka-test-{self.port}.log")
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not healthy in {timeout}s:\n{self.output()}")
            time.sleep(0.25)


def compare_with_hf(url: str, path: str, dtype, prompts: list[str], max_tokens: int) -> dict:
    """Greedy chat completions with logprobs from the server at `url`, scored by transformers in
    `dtype` on the same tokens (teacher forcing). Returns token match, mean relative and max
    absolute logprob differences."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    client = OpenAI(base_url=url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    outputs = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        resp = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=max_tokens, logprobs=True, top_logprobs=5,
        )
        content = resp.choices[0].logprobs.content
        assert len(content) > 0 and resp.usage.completion_tokens >= len(content)
        ids = tokenizer.convert_tokens_to_ids([c.token for c in content])
        assert resp.choices[0].message.content.strip() == tokenizer.decode(ids, skip_special_tokens=True).strip()
        for c in content:  # the chosen token's logprob is at least its best alternative's (greedy)
            assert len(c.top_logprobs) == 5 and c.logprob >= c.top_logprobs[0].logprob - 1e-6
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        outputs.append((tokenizer(text, add_special_tokens=False).input_ids, ids, [c.logprob for c in content]))

    return score_with_hf(outputs, path, dtype)


def score_with_hf(outputs: list[tuple[list[int], list[int], list[float]]], path: str, dtype) -> dict:
    """(prompt ids, generated ids, their logprobs) of each prompt against transformers in `dtype` on
    the same tokens (teacher forcing): token match, mean relative and max absolute logprob differences."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    matches, diffs, rdiffs = [], [], []
    for prompt_ids, ids, ours in outputs:
        full = torch.tensor([prompt_ids + ids], device=device)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).logits[0].float(), dim=-1)[len(prompt_ids) - 1 : -1]
        target = torch.tensor(ids, device=device)
        ref = logprobs.gather(1, target[:, None])[:, 0].cpu()
        ours_t = torch.tensor(ours)
        matches += (logprobs.argmax(-1) == target).cpu().tolist()
        diff = (ours_t - ref).abs()
        diffs += diff.tolist()
        # per token, relative to the two values' mean magnitude (as Tokasaurus's test does)
        rdiffs += (2 * diff / (ours_t.abs() + ref.abs() + 1e-3)).tolist()
    return {
        "tokens": len(matches),
        "token_match": sum(matches) / len(matches),
        "mean_rel_diff": sum(rdiffs) / len(rdiffs),
        "max_abs_diff": max(diffs),
    }


def assert_within_tolerance(stats: dict, dtype) -> None:
    """float32: identical greedy tokens, logprobs within 1e-3; otherwise the public tolerances."""
    import torch

    if dtype == torch.float32:
        assert stats["token_match"] == 1.0 and stats["max_abs_diff"] <= 1e-3, stats
    else:
        assert stats["token_match"] >= 0.95 and stats["mean_rel_diff"] <= 0.1 and stats["max_abs_diff"] <= 0.2, stats


def batch_with_pages(runner, q_lens: list[int], kv_lens: list[int], row_pages: list[list[int]], num_prefill: int):
    """The runner's AttentionBatch for rows 0..n-1 in slots 0..n-1 whose page tables hold row_pages."""
    for r, pages in enumerate(row_pages):
        runner.page_table[r, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    batch, _ = runner._attention_batch(list(range(len(q_lens))), q_lens, kv_lens, num_prefill)
    return batch


PIPELINE_PROMPTS = [[5, 17, 3, 99, 41, 8, 250, 11, 2, 64], [300, 7, 7, 12, 480, 33]]


def interleaved_plans(page_size: int, steps: int, stages: int = 2) -> list[StepPlan]:
    """Two sequences for run_pipelined: sequence r (slot r, pages from 8r on) prefills at step r, then decodes every second step:
    each decode row reads the token its previous step sampled, `stages` steps back."""
    plans = []
    kv = [len(p) for p in PIPELINE_PROMPTS]
    for step in range(steps):
        r = step % 2
        if step < 2:
            plan = prefill_plan(step, [PIPELINE_PROMPTS[r]], page_size, logprobs=2)
            plan.slots, plan.rids = [r], [r]
            plan.admit = [SeqParams(slot=r, temperature=0.0, logprobs=2)]
            plan.table_slots = [r] * len(plan.table_slots)
            plan.table_pages = [8 * r + c for c in plan.table_cols]
        else:
            kv[r] += 1
            col = (kv[r] - 1) // page_size
            new = (kv[r] - 1) % page_size == 0
            plan = StepPlan(step, [r], [r], [1], [kv[r]], [True], 0, [], [r] * new, [col] * new,
                            [8 * r + col] * new, input_step=step - stages)
        plans.append(plan)
    return plans


def fp8_against_bf16(model: str, device: str, prompts: list[list[int]], **config) -> tuple[float, float, float]:
    """The model through the rank's build() in bfloat16 and with --quantization fp8, teacher-forced on the
    same prompts: the fraction of positions whose most likely next token is the same in both, and the mean
    and largest difference of that token's logprob where it is. The CPU runs FP8 through torch._scaled_mm's
    CPU kernel, which the launch refuses (slow): `quantization` is set after resolve()."""
    from workers.rank import build

    tops = []
    for quantization in (None, "fp8"):
        cfg = EngineConfig(model=model, device=device, dtype="bfloat16", **config).resolve()
        cfg.quantization = quantization
        runner, _ = build(cfg, 0)
        result = runner.step(prefill_plan(0, prompts, runner.page_size, prompt_logprobs=1))
        tops.append([t for p in result.prompt for t in p.top])
        runner.close()
    same = [abs(a.logprobs[0] - b.logprobs[0]) for a, b in zip(*tops) if a.ids[0] == b.ids[0]]
    return len(same) / len(tops[0]), sum(same) / len(same), max(same)
