"""Greedy agreement between two launch configurations (e.g. --tp 1 and --tp 2).

    python tools/compare_runs.py --model DIR --a "--tp 1" --b "--tp 2" --requests 64 --max-tokens 128

Both servers get the same greedy requests (random prompt tokens, ignore_eos). Reports the token
match rate (position by position, over all requests) and the largest logprob difference where the
tokens still agree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import aiohttp

from tools.bench import launch


async def generate(url: str, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[str], list[float]]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def one(prompt):
            body = dict(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
            async with session.post(url + "/v1/completions", json=body) as resp:
                lp = (await resp.json())["choices"][0]["logprobs"]
                return lp["tokens"], lp["token_logprobs"]

        return await asyncio.gather(*(one(p) for p in prompts))


def run(flags: str, prompts, max_tokens):
    proc, url = launch(flags)
    try:
        return asyncio.run(generate(url, prompts, max_tokens))
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--a", default="--tp 1")
    p.add_argument("--b", action="append", help="one or more configurations compared with --a (default: --tp 2)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out")
    args = p.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, args.vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    a = run(f"--model {args.model} {args.a}", prompts, args.max_tokens)
    results = [agreement(args.a, flags, a, run(f"--model {args.model} {flags}", prompts, args.max_tokens))
               for flags in args.b or ["--tp 2"]]
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def agreement(flags_a: str, flags_b: str, a, b) -> dict:
    same = total = 0
    prefix_same, max_diff = 0, 0.0
    for (ta, la), (tb, lb) in zip(a, b):
        total += len(ta)
        same += sum(x == y for x, y in zip(ta, tb))
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        prefix_same += n
        if n:
            max_diff = max(max_diff, max(abs(x - y) for x, y in zip(la[:n], lb[:n])))
    return dict(a=flags_a, b=flags_b, tokens=total, token_match=same / total,
                match_before_first_divergence=prefix_same / total, max_logprob_diff_while_agreeing=max_diff)


if __name__ == "__main__":
    main()
