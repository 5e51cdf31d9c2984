"""bench_serve.py - `python bench.py serve`: a running server under arrivals, measured like vLLM's
serving benchmark.

FastDecode's schedule exists for requests that arrive and finish at different times; this drives
a running `server.py` that way: `--num-prompts` streamed requests with seeded token-id prompts
(they work with random weights and no tokenizer), arrivals Poisson at `--request-rate`
(`--burstiness` < 1: gamma, burstier). It reports request and output throughput; mean, p50 and
p99 of time to first token (TTFT), time per output token after the first (TPOT), the gaps between
token events (ITL) and end-to-end latency (E2E); and, from the server's /metrics, the running
batch's KV tokens per decode step: the R-Part load the server's schedule kept.

    python server.py --model opt-125m --schedule naive &
    python bench.py serve --request-rate 4 --num-prompts 64 [--json]
"""
import json
import time

import numpy as np

# --- the workload ---


def serve_workload(args, vocab, rng):
    """Seeded token-id prompts (they work with random weights and no tokenizer), output lengths,
    and arrival times: gaps drawn from gamma(burstiness, 1 / (rate * burstiness)), Poisson at
    burstiness 1, burstier below it; all at t=0 for an infinite rate."""
    n, lo = args.num_prompts, 1.0 - args.range_ratio
    in_lens = rng.integers(max(1, int(args.input_len * lo)), args.input_len + 1, n)
    out_lens = rng.integers(max(1, int(args.output_len * lo)), args.output_len + 1, n)
    prompts = [rng.integers(4, vocab, k).tolist() for k in in_lens]
    gaps = (np.zeros(n) if args.request_rate == float("inf")
            else rng.gamma(args.burstiness, 1.0 / (args.request_rate * args.burstiness), n))
    return prompts, out_lens.tolist(), np.cumsum(gaps) - gaps[0]


# --- one streamed request ---


async def serve_one(client, args, prompt, max_tokens, start):
    """One streamed request at `start` s -> its ttft, the gaps between its token events, e2e."""
    import asyncio
    await asyncio.sleep(max(0.0, start - (time.perf_counter() - args.t0)))
    body = {"model": args.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    t, stamps, tokens, err = time.perf_counter(), [], 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj or r.status_code != 200:
                err = obj.get("error", obj)
                continue
            n = len(obj["choices"][0].get("token_ids", [])) if obj["choices"] else 0
            if n:
                stamps.append(time.perf_counter())
                tokens += n
    if err or not stamps:
        return {"error": err or f"HTTP {r.status_code}: no tokens"}
    return {"ttft": stamps[0] - t, "itl": np.diff(stamps).tolist(), "e2e": stamps[-1] - t, "tokens": tokens}


# --- the R-Part load, from the server's /metrics ---


def scrape_step_kv(client):
    """The server's per-step KV histogram: {bucket upper bound: count}, sum, count."""
    text, buckets, total = client.get("/metrics").text, {}, {}
    for line in text.splitlines():
        if line.startswith("fastdecode:engine_info"):
            total["engine"] = line[line.index("{"):line.rindex("}") + 1]
        elif line.startswith("fastdecode:step_kv_tokens_bucket"):
            buckets[float(line.split('le="')[1].split('"')[0])] = float(line.split()[-1])
        elif line.startswith(("fastdecode:step_kv_tokens_sum", "fastdecode:step_kv_tokens_count")):
            total[line.split()[0].rsplit("_", 1)[1]] = float(line.split()[-1])
    return buckets, total.get("sum", 0.0), total.get("count", 0.0), total.get("engine", "")


def step_kv_report(before, after):
    """Mean and (bucket upper bounds of) p50/p99 of the running batch's KV tokens per decode
    step over the run: the R-Part load the server's schedule kept."""
    steps = after[2] - before[2]
    if steps <= 0:
        return {"steps": 0, "engine": after[3]}
    cum = sorted((le, after[0][le] - before[0].get(le, 0.0)) for le in after[0])
    pct = lambda q: next(le for le, c in cum if c >= q * steps)
    return {"steps": int(steps), "mean": (after[1] - before[1]) / steps, "p50_le": pct(0.5), "p99_le": pct(0.99),
            "engine": after[3]}


# --- the run and its report ---


def latency_summary(xs):
    xs = np.array(xs or [np.nan]) * 1e3
    return {"mean_ms": float(np.mean(xs)), "p50_ms": float(np.percentile(xs, 50)), "p99_ms": float(np.percentile(xs, 99))}


async def serve_run(args):
    import asyncio

    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=None,
                                 limits=httpx.Limits(max_connections=None)) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        args.model = card["id"]
        prompts, outs, starts = serve_workload(args, card.get("vocab_size", 1000), np.random.default_rng(args.seed))
        with httpx.Client(base_url=args.url, headers=headers) as sync:
            before = scrape_step_kv(sync)
        args.t0 = time.perf_counter()
        results = await asyncio.gather(*(serve_one(client, args, p, o, s) for p, o, s in zip(prompts, outs, starts)))
        wall = time.perf_counter() - args.t0
        with httpx.Client(base_url=args.url, headers=headers) as sync:
            after = scrape_step_kv(sync)
    return results, wall, step_kv_report(before, after)


def bench_serve(args):
    import asyncio
    results, wall, kv = asyncio.run(serve_run(args))
    ok = [r for r in results if "error" not in r]
    out_tok = sum(r["tokens"] for r in ok)
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    rep = {"url": args.url, "model": args.model, "num_prompts": args.num_prompts, "request_rate": args.request_rate,
           "burstiness": args.burstiness, "completed": len(ok), "failed": len(results) - len(ok), "duration_s": wall,
           "request_throughput": len(ok) / wall, "output_tok_s": out_tok / wall,
           "ttft": latency_summary([r["ttft"] for r in ok]), "tpot": latency_summary(tpot),
           "itl": latency_summary([g for r in ok for g in r["itl"]]), "e2e": latency_summary([r["e2e"] for r in ok]),
           "step_kv_tokens": kv}
    print(f"{args.model} {kv['engine']}\n  at {args.request_rate} req/s (burstiness {args.burstiness}): {len(ok)}/{len(results)} "
          f"requests in {wall:.1f} s; {rep['request_throughput']:.2f} req/s, {rep['output_tok_s']:.1f} output tok/s")
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = rep[name]
        print(f"  {name.upper():5} mean {s['mean_ms']:8.1f} ms   p50 {s['p50_ms']:8.1f} ms   p99 {s['p99_ms']:8.1f} ms")
    if kv.get("steps"):
        print(f"  R-Part load: KV tokens per decode step mean {kv['mean']:.0f}, p50 <= {kv['p50_le']:.0f}, "
              f"p99 <= {kv['p99_le']:.0f} over {kv['steps']} steps")
    for r in results:
        if "error" in r:
            print(f"  failed: {r['error']}")
            break
    if args.json:
        print(json.dumps(rep))


def add_parser(sub):
    """The `serve` subcommand of bench.py."""
    v = sub.add_parser("serve", help="a running server (python server.py) under Poisson arrivals: TTFT, TPOT, ITL, E2E")
    v.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    v.add_argument("--api-key", default=None, help="bearer key, if the server wants one")
    v.add_argument("--num-prompts", type=int, default=64, help="requests to send")
    v.add_argument("--request-rate", type=float, default=float("inf"), help="mean arrivals per second (inf: all at once)")
    v.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 is Poisson, <1 burstier")
    v.add_argument("--input-len", type=int, default=64, help="prompt tokens at most")
    v.add_argument("--output-len", type=int, default=64, help="tokens to generate at most")
    v.add_argument("--range-ratio", type=float, default=0.5, help="lengths drawn from [len*(1-ratio), len]")
    v.add_argument("--seed", type=int, default=0, help="seed for lengths, prompts and arrivals")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
