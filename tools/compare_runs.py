"""Greedy agreement between launch configurations (e.g. --tp 1 and --tp 2).

    python -m tools.compare_runs --model DIR --a "--tp 1" --b "--tp 2" --b "--tp 4" --requests 64

Every server gets the same greedy requests (random prompt tokens, ignore_eos). For each --b it
reports two agreements with --a:
  free-running   b generates on its own: the token match rate position by position (one flipped
                 near-tie changes everything after it, so this compounds) and the largest logprob
                 difference while the outputs still agree;
  teacher-forced b scores a's outputs (echo with prompt logprobs): how often b's most likely token
                 is a's token, and the mean and largest difference of the logprobs of a's tokens,
                 as tests/test_logprobs.py measures against transformers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import aiohttp

from tools.bench import launch


async def post_all(url: str, bodies: list[dict]) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def one(body):
            async with session.post(url + "/v1/completions", json=body) as resp:
                return (await resp.json())["choices"][0]["logprobs"]

        return await asyncio.gather(*(one(b) for b in bodies))


def ids(names: list[str]) -> list[int]:
    return [int(n.removeprefix("token_id:")) for n in names]


def generate(url: str, prompts, max_tokens: int) -> list[tuple[list[int], list[float]]]:
    bodies = [dict(prompt=p, max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True,
                   return_tokens_as_token_ids=True) for p in prompts]
    return [(ids(lp["tokens"]), lp["token_logprobs"]) for lp in asyncio.run(post_all(url, bodies))]


def score(url: str, prompts, outputs) -> list[tuple[list[int], list[float]]]:
    """b's most likely token and the logprob of a's token at each of a's output positions."""
    bodies = [dict(prompt=p + out, max_tokens=0, temperature=0, echo=True, logprobs=1, return_tokens_as_token_ids=True)
              for p, (out, _) in zip(prompts, outputs)]
    scored = []
    for p, lp in zip(prompts, asyncio.run(post_all(url, bodies))):
        tops = lp["top_logprobs"][len(p):]
        scored.append(([ids(list(t))[0] for t in tops], lp["token_logprobs"][len(p):]))
    return scored


def served(flags: str, work):
    proc, url = launch(flags)
    try:
        return work(url)
    finally:
        proc.terminate()
        proc.wait(120)


def free_running(a, b) -> dict:
    same = total = prefix_same = 0
    max_diff = 0.0
    for (ta, la), (tb, lb) in zip(a, b):
        total += len(ta)
        same += sum(x == y for x, y in zip(ta, tb))
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        prefix_same += n
        if n:
            max_diff = max(max_diff, max(abs(x - y) for x, y in zip(la[:n], lb[:n])))
    return dict(token_match=same / total, match_before_first_divergence=prefix_same / total,
                max_logprob_diff_while_agreeing=max_diff)


def teacher_forced(a, scored) -> dict:
    same = total = 0
    diffs = []
    for (ta, la), (best, lb) in zip(a, scored):
        total += len(ta)
        same += sum(x == y for x, y in zip(ta, best))
        diffs += [abs(x - y) for x, y in zip(la, lb)]
    return dict(token_match=same / total, mean_abs_logprob_diff=sum(diffs) / len(diffs),
                max_abs_logprob_diff=max(diffs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--a", default="--tp 1")
    p.add_argument("--b", action="append", help="a configuration compared with --a; repeatable (default: --tp 2)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out")
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, args.vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    a = served(f"--model {args.model} {args.a}", lambda url: generate(url, prompts, args.max_tokens))
    results = []
    for flags in args.b or ["--tp 2"]:
        b, scored = served(f"--model {args.model} {flags}",
                           lambda url: (generate(url, prompts, args.max_tokens), score(url, prompts, a)))
        results.append(dict(a=args.a, b=flags, tokens=sum(len(t) for t, _ in a),
                            free_running=free_running(a, b), teacher_forced=teacher_forced(a, scored)))
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
