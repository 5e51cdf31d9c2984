"""bench_kernel.py - the R-Part measured: the attention kernel, and a decode call through a worker.

`python bench.py kernel` runs attn_cpu.c beside torch's SDPA on the same data, beside the
memory's read bandwidth measured in the same rounds (the physical limit for data that does not
fit in cache), and beside the same call with every page of the rows mapping one block that stays
in L2 (its compute ceiling: calibrate.incache_gbs), so a row shows which one binds. `python bench.py rpc` times one decode call through a local worker
over loopback beside the kernel alone on the same q, K, V: the difference is the round trip.
"""
import json
import time

import numpy as np

import backend

backend.short_openmp_spin()  # as the engine runs (before torch loads libgomp): see there
import kvcache  # noqa: E402
import rpart  # noqa: E402
from calibrate import best_time, incache_gbs, int8_rows, kv_bytes  # noqa: E402  (imports torch)

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

SHAPES = {"opt-1.3b": (32, 32, 64), "llama-3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}  # Hq, Hkv, D


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
    Kb, Vb = [k.astype(kvcache.BFLOAT16) for k in K32], [v.astype(kvcache.BFLOAT16) for v in V32]
    K8, V8, sc = int8_rows(K32, V32)
    del K32, V32
    # The memory's read bandwidth drifts by 30% over minutes here (neighbours): measure it
    # interleaved with the kernels, so the fractions compare them at the same moments. Each
    # kernel runs twice per round: right after the probe's sweep it ran up to 8% slower.
    lib = rpart.load_kernel()
    fp16 = lambda: rpart.decode_attention(q, K16, V16, num_threads=threads)  # noqa: E731
    int8 = lambda: rpart.decode_attention(q, K8, V8, num_threads=threads, **sc)  # noqa: E731
    bf16 = lambda: rpart.decode_attention(q, Kb, Vb, num_threads=threads)  # noqa: E731
    t_read, *t = best_times_interleaved(
        [lambda: lib.fd_read_probe(probe_buf.ctypes.data, probe_buf.nbytes, threads), fp16, fp16, int8, int8, bf16, bf16])
    t16, t8, tb = min(t[:2]), min(t[2:4]), min(t[4:])
    row["read_gbs"] = probe_buf.nbytes / t_read / 1e9
    row["fp16_gbs"] = kv_bytes(K16, V16) / t16 / 1e9
    row["int8_gbs"] = kv_bytes(K8, V8, sc) / t8 / 1e9
    row["bf16_gbs"] = kv_bytes(Kb, Vb) / tb / 1e9
    row["fp16_incache_gbs"] = incache_gbs(q, K16, V16, threads)
    row["int8_incache_gbs"] = incache_gbs(q, K8, V8, threads, sc)
    row["bf16_incache_gbs"] = incache_gbs(q, Kb, Vb, threads)
    for dt in ("fp16", "int8", "bf16"):
        row[f"{dt}_frac_of_read"] = row[f"{dt}_gbs"] / row["read_gbs"]
    row["int8_tok_over_fp16"] = t16 / t8  # KV-tokens/s ratio on the same tokens
    row["bf16_tok_over_fp16"] = t16 / tb
    row["fp16_tok_over_torch_fp32"] = t_torch32 / t16
    return row


KV_COLS = ("fp16", "int8", "bf16")  # each with its in-cache twin ($)


def print_kernel_row(r):
    gbs = " ".join(f"{r[f'{dt}_gbs']:6.1f} {r[f'{dt}_incache_gbs']:6.1f}" for dt in KV_COLS)
    frac = " ".join(f"{r[f'{dt}_frac_of_read']:5.2f} {r[f'{dt}_incache_gbs'] / r['read_gbs']:5.2f}" for dt in KV_COLS)
    print(f"{r['model']:<11}{r['S']:>4}{r['L']:>6}{r['threads']:>4} | {r['read_gbs']:6.1f} {gbs} {r['fp32_gbs']:6.1f} "
          f"{r['torch_fp32_gbs']:6.1f} {r['torch_bf16_gbs']:6.1f} | {frac} | {r['int8_tok_over_fp16']:5.2f}x "
          f"{r['bf16_tok_over_fp16']:5.2f}x {r['fp16_tok_over_torch_fp32']:6.2f}x", flush=True)


def bench_kernel(args):
    info = rpart.kernel_info()
    all_threads = info["max_threads"]
    thread_counts = sorted({1, all_threads})
    lengths = [2048] if args.quick else [512, 2048, 8192]
    print(f"kernel: {info['simd']}, up to {all_threads} threads. torch SDPA needs dense [S, H, Lmax, D]: "
          "a ragged batch pads to Lmax (all lengths equal here, so torch pays no padding)")
    print("read: a STREAM-like sum over 256 MiB with the same threads, interleaved with the fp16, int8 and bf16 kernels; "
          "$: in cache (the same call, its rows' pages all mapping one 512 KiB block: the compute ceiling); int8 GB/s count the scales")
    cols = " ".join(f"{dt:>6} {dt + '$':>6}" for dt in KV_COLS)
    hdr = (f"{'model':<11}{'S':>4}{'L':>6}{'thr':>4} | {'read':>6} {cols} "
           f"{'fp32':>6} {'t-fp32':>6} {'t-bf16':>6} | {'fraction of read':^35} | {'tokens/s':^21}")
    sub = (f"{'':<25} | {'GB/s of KV read':^76} | " + " ".join(f"{dt:>5} {dt + '$':>5}" for dt in KV_COLS) + " | "
           f"{'i8/16':>6} {'bf/16':>6} {'16/t32':>7}")
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
