"""bench.py - side-by-side measurements, each contender on the same data in one process.

This machine is shared and noisy, so absolute times drift: read the ratios, and the fraction
of the physical limit (GB/s of KV read over the memory read bandwidth measured here).

    python bench.py kernel [--quick] [--json]   # attn_cpu.c vs torch SDPA vs memory bandwidth
    python bench.py rpc                         # a decode call through a worker vs the kernel
    python bench.py e2e                         # the engine vs transformers generate()
    python bench.py model                       # the performance model vs measured throughput
    python bench.py trace FILE                  # text picture of one step of a --trace file
    python bench.py serve --request-rate 4      # a running server.py under Poisson arrivals
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

import backend

backend.short_openmp_spin()  # as the engine runs (before torch loads libgomp): see there
import bench_serve  # noqa: E402
import rpart  # noqa: E402
from perfmodel import best_time  # noqa: E402  (imports torch)

# --- timing helpers ---


def best_times_interleaved(fns, reps=9):
    """Best time of each of `fns`, called in turn round after round, so that a noisy neighbour
    slows all contenders alike instead of whichever ran during the disturbance."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


# --- bench kernel ---

SHAPES = {"opt-1.3b": (32, 32, 64), "llama-3-8b": (32, 8, 128)}  # Hq, Hkv, D


def torch_sdpa_timer(q, K, V, dtype, threads):
    """Time torch SDPA on the same data in the layout it needs: dense [S, H, Lmax, D] (a ragged
    batch must be padded to Lmax and masked; here all lengths are equal, so no padding)."""
    import torch
    torch.set_num_threads(threads)
    tq = torch.from_numpy(q).to(dtype).unsqueeze(2)                           # [S, Hq, 1, D]
    tk = torch.from_numpy(np.stack(K)).to(dtype).transpose(1, 2).contiguous()  # [S, Hkv, L, D]
    tv = torch.from_numpy(np.stack(V)).to(dtype).transpose(1, 2).contiguous()
    gqa = tq.shape[1] != tk.shape[1]
    f = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        return best_time(lambda: f(tq, tk, tv, enable_gqa=gqa))


def int8_rows(K, V):
    """int8 copies of K, V and the decode_attention keywords that carry their scales."""
    import kvcache
    (K8, ks), (V8, vs) = zip(*map(kvcache.quantize_int8, K)), zip(*map(kvcache.quantize_int8, V))
    return list(K8), list(V8), {"key_scales": list(ks), "value_scales": list(vs)}


def kv_bytes(K, V, scales=None):
    """Bytes the kernel reads for these rows: K and V, and the int8 rows' scales."""
    return sum(a.nbytes for a in (*K, *V, *(scales or {}).get("key_scales", ()), *(scales or {}).get("value_scales", ())))


def incache_gbs(q, K, V, threads, scales=None, budget=512 * 2**10):
    """The kernel's compute ceiling: GB/s of KV on rows that stay in L2. Every sequence of the
    batch points at the same few tokens (K and V together within `budget` bytes), so the call is
    as long as a real one but reads memory only once."""
    L = max(1, budget // (2 * K[0][0].nbytes))
    K1, V1 = [K[0][:L].copy()] * len(K), [V[0][:L].copy()] * len(V)
    sc = None if scales is None else {n: [a[0][:L].copy()] * len(a) for n, a in scales.items()}
    t = best_time(lambda: rpart.decode_attention(q, K1, V1, num_threads=threads, **(sc or {})))
    return kv_bytes(K1, V1, sc) / t / 1e9


def kernel_row(model, S, L, threads, probe_buf, rng):
    Hq, Hkv, D = SHAPES[model]
    q = rng.standard_normal((S, Hq, D), dtype=np.float32)
    K32 = [rng.standard_normal((L, Hkv, D), dtype=np.float32) for _ in range(S)]
    V32 = [rng.standard_normal((L, Hkv, D), dtype=np.float32) for _ in range(S)]
    row = {"model": model, "S": S, "L": L, "threads": threads}
    row["fp32_gbs"] = kv_bytes(K32, V32) / best_time(lambda: rpart.decode_attention(q, K32, V32, num_threads=threads)) / 1e9
    t_torch32 = torch_sdpa_timer(q, K32, V32, __import__("torch").float32, threads)
    row["torch_fp32_gbs"] = kv_bytes(K32, V32) / t_torch32 / 1e9
    row["torch_bf16_gbs"] = kv_bytes(K32, V32) / 2 / torch_sdpa_timer(q, K32, V32, __import__("torch").bfloat16, threads) / 1e9
    K16, V16 = [k.astype(np.float16) for k in K32], [v.astype(np.float16) for v in V32]
    K8, V8, sc = int8_rows(K32, V32)
    del K32, V32
    # The memory's read bandwidth drifts by 30% over minutes here (neighbours): measure it
    # interleaved with the kernels, so the fractions compare them at the same moments. Each
    # kernel runs twice per round: right after the probe's sweep it ran up to 8% slower.
    lib = rpart.load_kernel()
    fp16 = lambda: rpart.decode_attention(q, K16, V16, num_threads=threads)  # noqa: E731
    int8 = lambda: rpart.decode_attention(q, K8, V8, num_threads=threads, **sc)  # noqa: E731
    t_read, *t = best_times_interleaved(
        [lambda: lib.fd_read_probe(probe_buf.ctypes.data, probe_buf.nbytes, threads), fp16, fp16, int8, int8])
    t16, t8 = min(t[:2]), min(t[2:])
    row["read_gbs"] = probe_buf.nbytes / t_read / 1e9
    row["fp16_gbs"] = kv_bytes(K16, V16) / t16 / 1e9
    row["int8_gbs"] = kv_bytes(K8, V8, sc) / t8 / 1e9
    row["fp16_incache_gbs"] = incache_gbs(q, K16, V16, threads)
    row["int8_incache_gbs"] = incache_gbs(q, K8, V8, threads, sc)
    row["fp16_frac_of_read"] = row["fp16_gbs"] / row["read_gbs"]
    row["int8_frac_of_read"] = row["int8_gbs"] / row["read_gbs"]
    row["int8_tok_over_fp16"] = t16 / t8  # KV-tokens/s ratio on the same tokens
    row["fp16_tok_over_torch_fp32"] = t_torch32 / t16
    return row


def print_kernel_row(r):
    print(f"{r['model']:<11}{r['S']:>4}{r['L']:>6}{r['threads']:>4} | {r['read_gbs']:6.1f} {r['fp16_gbs']:6.1f} "
          f"{r['fp16_incache_gbs']:6.1f} {r['int8_gbs']:6.1f} {r['int8_incache_gbs']:6.1f} {r['fp32_gbs']:6.1f} "
          f"{r['torch_fp32_gbs']:6.1f} {r['torch_bf16_gbs']:6.1f} | {r['fp16_frac_of_read']:5.2f} "
          f"{r['fp16_incache_gbs'] / r['read_gbs']:5.2f} {r['int8_frac_of_read']:5.2f} "
          f"{r['int8_incache_gbs'] / r['read_gbs']:5.2f} | {r['int8_tok_over_fp16']:5.2f}x "
          f"{r['fp16_tok_over_torch_fp32']:6.2f}x", flush=True)


def bench_kernel(args):
    info = rpart.kernel_info()
    all_threads = info["max_threads"]
    thread_counts = sorted({1, all_threads})
    lengths = [2048] if args.quick else [512, 2048, 8192]
    print(f"kernel: {info['simd']}, up to {all_threads} threads. torch SDPA needs dense [S, H, Lmax, D]: "
          "a ragged batch pads to Lmax (all lengths equal here, so torch pays no padding)")
    print("read: a STREAM-like sum over 256 MiB with the same threads, interleaved with the fp16 and int8 kernels; "
          "$: in cache (the same kernel on rows that fit in L2: its compute ceiling); int8 GB/s count the scales")
    hdr = (f"{'model':<11}{'S':>4}{'L':>6}{'thr':>4} | {'read':>6} {'fp16':>6} {'fp16$':>6} {'int8':>6} {'int8$':>6} "
           f"{'fp32':>6} {'t-fp32':>6} {'t-bf16':>6} | {'fraction of read':^23} | {'tokens/s':^14}")
    sub = (f"{'':<25} | {'GB/s of KV read':^62} | {'fp16':>5} {'fp16$':>5} {'int8':>5} {'int8$':>5} | "
           f"{'i8/16':>6} {'16/t32':>7}")
    print(hdr + "\n" + sub + "\n" + "-" * len(sub))
    rng, rows, buf = np.random.default_rng(0), [], np.ones(1 << 28, np.uint8)
    for model in SHAPES:
        for L in lengths:
            for t in thread_counts:
                rows.append(kernel_row(model, 32, L, t, buf, rng))
                print_kernel_row(rows[-1])
    key = next(r for r in rows if r["model"] == "opt-1.3b" and r["L"] == 2048 and r["threads"] == all_threads)
    summary = {k: round(v, 3) if isinstance(v, float) else v for k, v in key.items()}
    summary["simd"] = info["simd"]
    summary["rows"] = rows if args.json else len(rows)
    print(json.dumps(summary))


# --- bench rpc ---


def rpc_row(client, S, L, threads, rng, next_id):
    """One decode call through the worker vs the kernel alone on the same K, V, q."""
    Hq, Hkv, D = SHAPES["opt-1.3b"]
    q = rng.standard_normal((S, Hq, D), dtype=np.float32)
    K = [rng.standard_normal((L, Hkv, D), dtype=np.float32).astype(np.float16) for _ in range(S)]
    V = [rng.standard_normal((L, Hkv, D), dtype=np.float32).astype(np.float16) for _ in range(S)]
    ids = list(range(next_id, next_id + S))
    for i, s in enumerate(ids):  # the worker holds L-1 tokens; the call appends token L-1 and attends
        client.add_filled(s, L, K[i][None, :L - 1], V[i][None, :L - 1])
    k, v = np.stack([x[L - 1] for x in K]), np.stack([x[L - 1] for x in V])
    pos, worker_s = [L - 1] * S, []

    def call():
        client.send_decode(0, ids, pos, q, k, v)
        o, secs = client.recv_out((S, Hq, D))
        worker_s.append(secs)
        return o
    t_rpc, t_kernel = best_times_interleaved([call, lambda: rpart.decode_attention(q, K, V, num_threads=threads)])
    err = float(np.abs(call() - rpart.decode_attention(q, K, V, num_threads=threads)).max())
    for s in ids:
        client.drop(s)
    wire = q.nbytes + k.nbytes + v.nbytes + S * (8 + 4) + q.nbytes  # q, k, v, ids, positions out; o back
    kv_bytes = 2 * S * L * Hkv * D * 2
    return {"S": S, "L": L, "rpc_ms": t_rpc * 1e3, "kernel_ms": t_kernel * 1e3, "worker_kernel_ms": min(worker_s) * 1e3,
            "overhead": t_rpc / t_kernel - 1, "payload_mb": wire / 1e6,
            "payload_gbs": wire / max(t_rpc - min(worker_s), 1e-9) / 1e9,
            "kv_gbs": kv_bytes / t_rpc / 1e9, "max_abs_diff": err}


def bench_rpc(args):
    """A decode call over loopback (OPT-1.3b shapes, fp16 KV) beside the kernel's own time."""
    import kvcache
    Hq, Hkv, D = SHAPES["opt-1.3b"]
    threads = rpart.kernel_info()["max_threads"]
    batches = [1, 8, 32] if args.quick else [1, 4, 16, 32, 64, 128]
    L = args.length
    kv = kvcache.KVConfig(1, Hkv, D, "float16", 2 * max(batches) * L * Hkv * D * 2 + 2**26)
    procs, addrs = backend.start_local_workers(1, threads=threads, kv_mem=kv.mem_bytes)
    print(f"one local worker ({threads} threads) over loopback; OPT-1.3b shapes Hq=Hkv={Hq}, D={D}, fp16 KV, "
          f"length {L}; rpc = send q,k,v + append + attend + receive o; best of 9 calls each, interleaved")
    hdr = (f"{'S':>4} | {'rpc ms':>8} {'kernel ms':>9} {'in worker':>9} | {'overhead':>8} | "
           f"{'payload MB':>10} {'GB/s':>6} | {'KV GB/s':>7}")
    print(hdr + "\n" + "-" * len(hdr))
    rows, rng, next_id = [], np.random.default_rng(0), 0
    try:
        client = backend.WorkerClient(*addrs[0])
        client.configure(kv, Hq)
        for S in batches:
            r = rpc_row(client, S, L, threads, rng, next_id)
            next_id += S
            assert r["max_abs_diff"] < 1e-3, r  # the worker computed what the kernel computes
            rows.append(r)
            print(f"{S:>4} | {r['rpc_ms']:8.2f} {r['kernel_ms']:9.2f} {r['worker_kernel_ms']:9.2f} | "
                  f"{100 * r['overhead']:7.1f}% | {r['payload_mb']:10.2f} {r['payload_gbs']:6.2f} | {r['kv_gbs']:7.1f}", flush=True)
        client.shutdown()
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
    key = next((r for r in rows if r["S"] == 32), rows[-1])
    print(json.dumps({"S": key["S"], "L": L, "overhead_32": round(key["overhead"], 4),
                      "rpc_ms": round(key["rpc_ms"], 3), "kernel_ms": round(key["kernel_ms"], 3),
                      "payload_gbs": round(key["payload_gbs"], 3), "rows": rows if args.json else len(rows)}))


# --- bench e2e ---

E2E_CONFIGS = [("opt-125m", 16, 128), ("opt-125m", 16, 1024), ("opt-1.3b", 16, 128), ("opt-1.3b", 8, 1024)]


def hf_twin(sp):
    """A transformers OPT model that shares the S-Part's (random) weights, without copies."""
    import spart
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    c = sp.cfg
    hc = OPTConfig(vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.n_layers, ffn_dim=c.ffn,
                   num_attention_heads=c.n_heads, max_position_embeddings=c.max_pos, word_embed_proj_dim=c.embed_dim,
                   do_layer_norm_before=c.pre_ln, bos_token_id=c.bos_id, eos_token_id=c.eos_id, pad_token_id=1)
    with torch.device("meta"):
        hf = OPTForCausalLM(hc)
    tied = {"lm_head.weight": "embed_tokens.weight"}
    hf.load_state_dict({n: sp.w[tied.get(n, spart.canonical_name(n))] for n in hf.state_dict()},
                       assign=True, strict=True)
    return hf.eval()


def run_hf(hf, prompts, gen):
    """transformers generate(), greedy, exactly `gen` tokens. Decode time runs from the first
    token (after prefill) to the last, timed by a logits processor called once per token."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores
    ids, clock = torch.tensor(prompts), Clock()
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
                          do_sample=False, logits_processor=LogitsProcessorList([clock]))
    wall = time.perf_counter() - t
    B = len(prompts)
    return {"decode_tok_s": B * (gen - 1) / (clock.times[-1] - clock.times[0]), "total_tok_s": B * gen / wall,
            "tokens": out[:, ids.shape[1]:].tolist()}


def workload(llm, B, P):
    """Run the engine's batches at B and make B random prompts of P tokens (seeded by P)."""
    llm.sched_cfg = dataclasses.replace(llm.sched_cfg, max_batch=B)
    rng = np.random.default_rng(P)
    return [rng.integers(4, llm.spart.cfg.vocab_size, P).tolist() for _ in range(B)]


def engine_per_model(configs):
    """(llm, model, B, P, prompts) for each (model, B, P) config: one engine per model (one local
    worker, naive admission so a whole batch runs at once), closed when done with."""
    import fastdecode
    llm, loaded = None, None
    try:
        for model, B, P in configs:
            if loaded != model:
                if llm:
                    llm.close()
                llm, loaded = fastdecode.LLM(model, workers=1, schedule="naive", quiet=True), model
            yield llm, model, B, P, workload(llm, B, P)
    finally:
        if llm:
            llm.close()


def run_engine(llm, prompts, gen):
    t = time.perf_counter()
    outs = llm.generate(prompts, max_new_tokens=gen, ignore_eos=True, progress=False)
    wall, st = time.perf_counter() - t, llm.stats
    return {"decode_tok_s": st.decode_tokens / st.decode_wall, "total_tok_s": len(prompts) * gen / wall,
            "tokens": [o.token_ids for o in outs]}


def bench_e2e(args):
    """The engine (S-Part on this CPU, one local worker, naive admission so the whole batch runs
    at once as in generate()) against transformers generate() on the same weights and prompts."""
    import torch
    cores = os.cpu_count()
    configs = [c for c in E2E_CONFIGS if c[0] in args.models]
    print(f"engine: S-Part on cpu (float32), 1 local worker, fp16 KV, serial (both sides share {cores} cores); "
          f"transformers {__import__('transformers').__version__}: float32, DynamicCache, {cores} threads. "
          f"gen {args.gen_len} tokens, greedy; best of {args.rounds} alternating rounds")
    hdr = (f"{'model':<9}{'B':>3}{'prompt':>7} | {'decode tok/s':>12} {'hf':>7} {'ratio':>6} | "
           f"{'total tok/s':>11} {'hf':>7} {'ratio':>6} | {'same tokens':>11}")
    print(hdr + "\n" + "-" * len(hdr))
    torch.set_num_threads(cores)  # HF's setting; the engine's prefill restores it after use
    rows, hf, hf_of = [], None, None
    for llm, model, B, P, prompts in engine_per_model(configs):
        if hf_of is not llm:
            hf, hf_of = hf_twin(llm.spart), llm
        eng, ref = [], []
        for _ in range(args.rounds):
            eng.append(run_engine(llm, prompts, args.gen_len))
            ref.append(run_hf(hf, prompts, args.gen_len))
        best = lambda runs, k: max(r[k] for r in runs)
        same = np.mean([a == b for x, y in zip(eng[0]["tokens"], ref[0]["tokens"]) for a, b in zip(x, y)])
        row = {"model": model, "batch": B, "prompt": P, "gen": args.gen_len,
               "decode_tok_s": best(eng, "decode_tok_s"), "hf_decode_tok_s": best(ref, "decode_tok_s"),
               "total_tok_s": best(eng, "total_tok_s"), "hf_total_tok_s": best(ref, "total_tok_s"),
               "same_tokens": float(same)}
        row["decode_ratio"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
        row["total_ratio"] = row["total_tok_s"] / row["hf_total_tok_s"]
        rows.append(row)
        print(f"{model:<9}{B:>3}{P:>7} | {row['decode_tok_s']:12.1f} {row['hf_decode_tok_s']:7.1f} "
              f"{row['decode_ratio']:5.2f}x | {row['total_tok_s']:11.1f} {row['hf_total_tok_s']:7.1f} "
              f"{row['total_ratio']:5.2f}x | {100 * same:10.1f}%", flush=True)
    summary = {f"decode_ratio_p{P}": round(min(r["decode_ratio"] for r in rows if r["prompt"] == P), 3)
               for P in sorted({r["prompt"] for r in rows})}
    print(json.dumps({**summary, "rows": rows}))


# --- bench model ---

MODEL_CONFIGS = [("opt-125m", 16, 128), ("opt-125m", 16, 1024), ("opt-1.3b", 4, 128), ("opt-1.3b", 16, 256)]


def bench_model(args):
    """The performance model's predicted decode throughput beside fastdecode's measured one."""
    import perfmodel
    prof = perfmodel.load_profile()
    if prof is None:
        raise SystemExit(f"no profile at {perfmodel.profile_path()}: run `python perfmodel.py calibrate` first")
    print(f"profile {perfmodel.profile_path()}: read {prof['read_gbs']:.1f} GB/s, kernel fp16 {prof['kernel']['float16']:.1f} GB/s, "
          f"S-Part on {prof['device']}. Engine: 1 local worker, serial, naive admission, gen {args.gen_len}")
    hdr = f"{'model':<9}{'B':>3}{'prompt':>7} | {'predicted':>9} {'measured':>9} tok/s | {'error':>6} | {'S':>6} {'R':>6} {'X':>6} ms (pred)"
    print(hdr + "\n" + "-" * len(hdr))
    rows = []
    for llm, model, B, P, prompts in engine_per_model(MODEL_CONFIGS):
        measured = max(run_engine(llm, prompts, args.gen_len)["decode_tok_s"] for _ in range(args.rounds))
        step, parts = perfmodel.host_step(prof, llm.spart.cfg, B, P + args.gen_len / 2)
        row = {"model": model, "batch": B, "prompt": P, "predicted_tok_s": B / step, "measured_tok_s": measured}
        row["rel_error"] = abs(row["predicted_tok_s"] - measured) / measured
        rows.append(row)
        print(f"{model:<9}{B:>3}{P:>7} | {row['predicted_tok_s']:9.1f} {measured:9.1f}       | {100 * row['rel_error']:5.1f}% | "
              f"{parts['s'] * 1e3:6.1f} {parts['r'] * 1e3:6.1f} {parts['x'] * 1e3:6.1f}", flush=True)
    print(json.dumps({"max_rel_error": round(max(r["rel_error"] for r in rows), 4),
                      "rows": rows if args.json else len(rows)}))


# --- bench trace: a text picture of the pipeline from a --trace file ---


def bench_trace(args):
    """One decode step of a `fastdecode.py --trace` file as text: a row per track, a letter per
    micro-batch (A, B; h: LM head), '.' idle."""
    ev = json.load(open(args.file))["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M"}
    spans = [e for e in ev if e["ph"] == "X" and e["args"]["step"] == args.step and e["args"]["layer"] < args.layers]
    if not spans:
        raise SystemExit(f"no spans for step {args.step} in {args.file}")
    t0, t1 = min(e["ts"] for e in spans), max(e["ts"] + e["dur"] for e in spans)
    col = lambda t: min(args.width - 1, int((t - t0) / (t1 - t0) * args.width))
    print(f"step {args.step}, layers 0-{args.layers - 1}: {(t1 - t0) / 1e3:.1f} ms, {(t1 - t0) / 1e3 / args.width:.2f} ms per column")
    for tid in sorted(tracks):
        row = ["."] * args.width
        for e in (e for e in spans if e["tid"] == tid):
            mark = e["args"].get("micro_batch") or e["name"].split()[-1]
            for c in range(col(e["ts"]), col(e["ts"] + e["dur"]) + 1):
                row[c] = {"A": "A", "B": "B", "all": "S"}.get(mark, "h")
        print(f"{tracks[tid]:>16} |{''.join(row)}|")


# --- main ---


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel", help="attn_cpu.c vs torch SDPA vs memory read bandwidth")
    k.add_argument("--quick", action="store_true", help="length 2048 only")
    k.add_argument("--json", action="store_true", help="put every row in the closing JSON line")
    r = sub.add_parser("rpc", help="a decode call through a worker over loopback vs the kernel alone")
    r.add_argument("--quick", action="store_true", help="batches 1, 8, 32 only")
    r.add_argument("--length", type=int, default=2048, help="KV length per sequence (default 2048)")
    r.add_argument("--json", action="store_true", help="put every row in the closing JSON line")
    e = sub.add_parser("e2e", help="the engine vs transformers generate() on the same random weights")
    e.add_argument("--models", nargs="+", default=["opt-125m", "opt-1.3b"], help="models to run")
    e.add_argument("--gen-len", type=int, default=32, help="tokens generated per request")
    e.add_argument("--rounds", type=int, default=1, help="alternating rounds per contender (best kept)")
    m = sub.add_parser("model", help="the performance model's prediction vs measured throughput")
    m.add_argument("--gen-len", type=int, default=16, help="tokens generated per request")
    m.add_argument("--rounds", type=int, default=2, help="runs per configuration (best kept)")
    m.add_argument("--json", action="store_true", help="put every row in the closing JSON line")
    t = sub.add_parser("trace", help="a text picture of the pipeline from a fastdecode.py --trace file")
    t.add_argument("file", help="trace JSON written by fastdecode.py --trace")
    t.add_argument("--step", type=int, default=3, help="decode step to draw")
    t.add_argument("--layers", type=int, default=3, help="draw layers 0..N-1 of it")
    t.add_argument("--width", type=int, default=96, help="columns")
    bench_serve.add_parser(sub)
    args = p.parse_args(argv)
    {"kernel": bench_kernel, "rpc": bench_rpc, "e2e": bench_e2e, "model": bench_model, "trace": bench_trace,
     "serve": bench_serve.bench_serve}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
