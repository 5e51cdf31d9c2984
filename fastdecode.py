"""fastdecode.py - FastDecode's front door: the public API and the command line.

FastDecode (He & Zhai, 2024) serves an LLM with the S-Part (the weights: spart.py) on the GPU
and the R-Part (the KV-cache and attention: rpart.py, kvcache.py) on CPU worker processes that
the engine reaches through backend.py. Per token per layer only q, k, v go to the workers and
o comes back. The engine (engine.py) takes requests one step at a time; `LLM.generate` runs a
list of prompts to the end; server.py serves it over HTTP.

    from fastdecode import LLM
    with LLM("opt-1.3b", workers=1) as llm:
        print(llm.generate(["The capital of France is"], max_new_tokens=8)[0].text)

    python fastdecode.py --model opt-1.3b             # synthetic throughput workload + report
    python fastdecode.py --model DIR --prompt "Hello" # completions

Legend: V vocabulary.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

import numpy as np

from engine import DEFAULT_PREFILL_TOKENS, LLM, NeverFits, Output, RequestOutput, SamplingParams  # noqa: F401  (the public API)
from pipeline import StepStats  # noqa: F401
from sampling import sample  # noqa: F401
from tracer import Tracer  # noqa: F401

import backend  # noqa: E402
import kvcache  # noqa: E402
import perfmodel  # noqa: E402
import wire  # noqa: E402
import torch  # noqa: E402  (engine has set the OpenMP spin before torch loaded)

# --- the CLI: a synthetic throughput workload, or completions ---


def gen_lengths(spec, n, rng):
    """'64' -> [64]*n; '32-128' -> uniform integers in [32, 128]."""
    if "-" in str(spec):
        lo, hi = (int(x) for x in str(spec).split("-"))
        return rng.integers(lo, hi + 1, n).tolist()
    return [int(spec)] * n


def predicted_decode_tok_s(llm, prof):
    """What the performance model predicts for the decode steps that ran (their batch sizes and
    KV lengths), on the machine the profile describes; None without a profile."""
    st = llm.stats
    if prof is None or not st.batch_per_step:
        return None
    secs = sum(perfmodel.host_step(prof, llm.spart.cfg, b, kv / b, kv_dtype=llm.kv_cfg.dtype, pipelined=llm.pipeline)[0]
               for b, kv in zip(st.batch_per_step, st.kv_per_step))
    return sum(st.batch_per_step) / secs


def step_breakdown(llm, prof):
    """Milliseconds per decode step: S-Part work, waiting for the R-Part (its kernel, and the
    rest: the round trip), and what is left (sampling, bookkeeping). The S-Part's fixed cost per
    layer (Python and dispatch) is the calibrated one (calibrate.layer_fixed_time), when the
    profile has one: older profiles fitted it, and a fit that put it below 0 left a 0 there,
    which means "not resolved", not "free"."""
    st = llm.stats
    n = max(1, len(st.step_ms))
    kernel = llm.backend.r_busy / max(1, len(llm.backend.free_bytes()))
    s_part, r_wait = st.s_busy, st.r_wait
    if isinstance(llm.backend, backend.LocalBackend):  # attention ran inside submit, in the S-Part's spans
        s_part, r_wait = s_part - kernel, kernel
    out = {"s_part": s_part, "r_wait": r_wait, "kernel": kernel, "other": st.decode_wall - st.s_busy - st.r_wait}
    out = {k: 1e3 * v / n for k, v in out.items()}
    if prof is not None and prof["spart"]["per_layer_s"] > 0:
        out["s_fixed"] = 1e3 * prof["spart"]["per_layer_s"] * llm.spart.cfg.n_layers
    return out


def report(llm, outs, wall, args, prof=None):
    st, n_workers = llm.stats, len(llm.backend.free_bytes())
    gen = sum(len(o.token_ids) for o in outs)
    steps = np.array(st.step_ms or [0.0])
    r_busy = llm.backend.r_busy / max(1, n_workers)   # average per worker: they run in parallel
    rep = {
        "model": args.model, "requests": len(outs), "generated_tokens": gen, "workers": n_workers,
        "pipeline": llm.pipeline, "schedule": llm.sched_cfg.policy, "dtype": str(llm.spart.dtype).replace("torch.", ""),
        "kv_dtype": llm.kv_cfg.dtype, "kv_bytes_per_token": llm.kv_cfg.bytes_per_token, "decode_tok_s": st.decode_tokens / max(1e-9, st.decode_wall),
        "prefill_tok_s": st.prefill_tokens / max(1e-9, st.prefill_wall), "total_tok_s": gen / max(1e-9, wall),
        "wall_s": wall, "prefill_s": st.prefill_wall, "decode_s": st.decode_wall,
        "step_ms_p50": float(np.percentile(steps, 50)), "step_ms_p99": float(np.percentile(steps, 99)),
        "step_ms_breakdown": step_breakdown(llm, prof), "s_busy_s": st.s_busy, "r_busy_s": r_busy,
        "overlap_efficiency": max(st.s_busy, r_busy) / max(1e-9, st.decode_wall),
        "kv_tokens_peak_per_worker": {str(k): v for k, v in sorted(st.kv_peak.items())},
        "predicted_decode_tok_s": predicted_decode_tok_s(llm, prof),
        "tokens_sha256": hashlib.sha256(np.array([t for o in outs for t in o.token_ids], np.int64).tobytes()).hexdigest(),
    }
    print_report(llm, rep)
    return rep


def print_report(llm, rep):
    st, b = llm.stats, rep["step_ms_breakdown"]
    print(f"\n{rep['model']}: {rep['requests']} requests, {rep['generated_tokens']} tokens in {rep['wall_s']:.1f} s "
          f"({rep['workers']} worker(s), {'pipelined' if llm.pipeline else 'serial'}, {rep['schedule']})")
    print(f"  S-Part       {llm.spart.device.type} {rep['dtype']} ({getattr(llm.spart, 'dtype_why', '')}); "
          f"KV {rep['kv_dtype']} ({rep['kv_bytes_per_token']} bytes per token{', scales included' if llm.kv_cfg.quantized else ''})")
    print(f"  throughput   decode {rep['decode_tok_s']:.1f} tok/s, prefill {rep['prefill_tok_s']:.0f} tok/s, "
          f"total {rep['total_tok_s']:.1f} tok/s")
    print(f"  time         prefill {st.prefill_wall:.1f} s, decode {st.decode_wall:.1f} s; "
          f"step p50 {rep['step_ms_p50']:.0f} ms, p99 {rep['step_ms_p99']:.0f} ms")
    fixed = f" (of it {b['s_fixed']:.1f} the layers' fixed cost, Python and dispatch: calibrated)" if "s_fixed" in b else ""
    print(f"  step (ms)    S-Part {b['s_part']:.1f}{fixed}; waiting for the R-Part {b['r_wait']:.1f} "
          f"(attention kernel {b['kernel']:.1f}, round trip and overlap {b['r_wait'] - b['kernel']:.1f}); "
          f"sampling and bookkeeping {b['other']:.1f}")
    print(f"  busy         S-Part {st.s_busy:.1f} s, R-Part {rep['r_busy_s']:.1f} s (per worker); "
          f"overlap efficiency {rep['overlap_efficiency']:.2f}{'' if llm.pipeline else ' (serial: nothing to overlap)'}")
    print(f"  KV held      peak tokens per worker {rep['kv_tokens_peak_per_worker']}")
    if rep["predicted_decode_tok_s"] is None:
        print(f"  model        no calibration profile ({perfmodel.profile_path()}): run `python perfmodel.py calibrate`")
    else:
        print(f"  model        predicted decode {rep['predicted_decode_tok_s']:.1f} tok/s for these steps "
              f"(measured/predicted {rep['decode_tok_s'] / rep['predicted_decode_tok_s']:.2f})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FastDecode: S-Part on the GPU (or CPU), R-Part on CPU workers.")
    a = p.add_argument
    a("--model", default="opt-1.3b", help="short name (opt-1.3b), hub repo id, or checkpoint directory")
    a("--workers", type=int, default=1, help="local R-Part worker processes to spawn (0: in-process)")
    a("--worker-hosts", default=None, help="comma-separated host:port of running workers (instead of spawning)")
    a("--secret-file", default=None, help="shared secret for workers beyond loopback")
    a("--num-requests", type=int, default=32, help="synthetic workload: number of requests")
    a("--prompt-len", type=int, default=64, help="synthetic workload: prompt tokens per request")
    a("--gen-len", default="32", help="synthetic workload: tokens to generate, a number or a range LO-HI")
    a("--max-batch", type=int, default=None, help="most sequences running at once (default: from the perf model, else 32)")
    a("--kv-cap", type=int, default=None, help="cap on the running batch's KV tokens (default: from the perf model, else none)")
    a("--max-prefill-tokens", type=int, default=None,
      help=f"prompt tokens prefilled per step at most (default: from the perf model, else {DEFAULT_PREFILL_TOKENS})")
    a("--kv-dtype", default=None, choices=kvcache.KV_DTYPES,
      help="KV-cache element type; int8: per-token, per-head float16 scales, half fp16's bytes; "
           "bfloat16: fp16's bytes, half its arithmetic where the CPU has AVX512-BF16 (default: bfloat16 "
           "when the S-Part runs in bfloat16, else float16)")
    a("--kv-mem", default=kvcache.DEFAULT_KV_MEM, help="KV memory budget per worker")
    a("--device", default=None, help="S-Part device (default: cuda if available, else cpu)")
    a("--dtype", default=None, help="S-Part dtype (default: fp16/bf16 on CUDA; on a CPU bf16 where it has bf16 instructions, else float32)")
    a("--worker-threads", type=int, default=None, help="attention threads per local worker")
    a("--pipeline", dest="pipeline", action="store_true", default=None,
      help="two micro-batches (default where the S-Part has a GPU or workers are remote)")
    a("--no-pipeline", dest="pipeline", action="store_false", help="run one batch serially")
    a("--schedule", default="stabilized", choices=["stabilized", "naive"], help="admission policy")
    a("--trace", default=None, help="write a Chrome/Perfetto trace JSON here")
    a("--prompt", action="append", default=None, help="a text prompt (repeatable): print completions")
    a("--prompt-ids", default=None, help="a prompt as comma-separated token ids: print the completion")
    a("--max-new-tokens", type=int, default=64, help="tokens to generate for --prompt/--prompt-ids")
    a("--temperature", type=float, default=0.0, help="0: greedy")
    a("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    a("--seed", type=int, default=0, help="seed for the workload and for sampling")
    a("--json", action="store_true", help="print the report as one JSON object on the last line")
    return p.parse_args(argv)


def default_threads(args, device):
    """Worker threads. On a CPU-only machine the S-Part and local workers share the cores: run
    serially, each side gets them all; pipelined, they are split between the two sides."""
    cores = os.cpu_count() or 1
    if args.worker_hosts or args.workers == 0:
        return args.worker_threads
    if device == "cpu" and args.pipeline:
        wt = args.worker_threads or max(1, cores // (args.workers + 1))
        torch.set_num_threads(max(1, cores - args.workers * wt))
        return wt
    return args.worker_threads or max(1, cores // args.workers)


def apply_plan(llm, prof, args, mean_gen):
    """Batch size and KV cap from the performance model, where the command line left them open."""
    p = perfmodel.plan(prof, llm.spart.cfg, args.prompt_len, mean_gen, kv_mem_bytes=llm.kv_cfg.mem_bytes,
                       workers=len(llm.backend.free_bytes()), pipelined=llm.pipeline, kv_dtype=llm.kv_cfg.dtype)
    llm.sched_cfg = dataclasses.replace(llm.sched_cfg, max_batch=args.max_batch or p["max_batch"],
                                        kv_cap=p["kv_cap"] if args.kv_cap is None else args.kv_cap)
    llm.max_prefill_tokens = args.max_prefill_tokens or p["max_prefill_tokens"]
    print(f"perf model plan: max batch {llm.sched_cfg.max_batch}, KV cap {llm.sched_cfg.kv_cap} tokens, "
          f"prefill {llm.max_prefill_tokens} tokens a step (predicted {p['tok_s']:.1f} tok/s at batch {p['max_batch']})")


def parse_ids(text):
    """'1,2,3' -> [1, 2, 3], or a ValueError a user can read."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers such as 1,2,3") from None


def run_prompts(llm, args):
    """--prompt / --prompt-ids: print each completion -> (outputs, wall seconds)."""
    prompts = (args.prompt or []) + ([parse_ids(args.prompt_ids)] if args.prompt_ids else [])
    t = time.perf_counter()
    outs = llm.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, progress=False)
    wall = time.perf_counter() - t
    for p, o in zip(prompts, outs):
        print(f"--- {p!r}\n{o.text if o.text is not None else o.token_ids}")
    return outs, wall


def run_workload(llm, args, prof):
    """The synthetic throughput workload: random prompts, EOS ignored -> (outputs, wall seconds)."""
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(4, llm.spart.cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.num_requests)]
    gens = gen_lengths(args.gen_len, args.num_requests, rng)
    print(f"workload: {args.num_requests} requests, prompt {args.prompt_len}, gen {args.gen_len} tokens (ignore EOS)")
    if prof is not None and None in (args.max_batch, args.kv_cap, args.max_prefill_tokens):
        apply_plan(llm, prof, args, float(np.mean(gens)))
    t = time.perf_counter()
    outs = llm.generate(prompts, max_new_tokens=gens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, ignore_eos=True, progress=True)
    return outs, time.perf_counter() - t


def run(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    wt = default_threads(args, device)
    secret = wire.read_secret(args.secret_file)
    tracer = Tracer() if args.trace else None
    prof = perfmodel.load_profile()
    hosts = args.worker_hosts.split(",") if args.worker_hosts else None
    with LLM(args.model, workers=args.workers, worker_hosts=hosts, device=args.device, dtype=args.dtype,
             kv_dtype=args.kv_dtype, kv_mem=args.kv_mem, worker_threads=wt, pipeline=args.pipeline,
             schedule=args.schedule, max_batch=args.max_batch, kv_cap=args.kv_cap or 0, secret=secret,
             max_prefill_tokens=args.max_prefill_tokens or DEFAULT_PREFILL_TOKENS, trace=tracer) as llm:
        outs, wall = run_prompts(llm, args) if args.prompt or args.prompt_ids else run_workload(llm, args, prof)
        rep = report(llm, outs, wall, args, prof)
        if tracer:
            tracer.save(args.trace, len(llm.backend.free_bytes()))
            print(f"  trace        {args.trace} (open in https://ui.perfetto.dev)")
    return rep


def main(argv=None):
    args = parse_args(argv)
    try:
        rep = run(args)
    except (ValueError, MemoryError, OSError, backend.WorkerStartError) as e:  # bad input: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
