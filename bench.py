"""bench.py - side-by-side measurements, each contender on the same data in one process.

This machine is shared and noisy, so absolute times drift: read the ratios, and the fraction
of the physical limit (GB/s of KV read over the memory read bandwidth measured here).

    python bench.py kernel [--quick] [--json]   # attn_cpu.c vs torch SDPA vs memory bandwidth
    python bench.py rpc                         # a decode call through a worker vs the kernel
    python bench.py e2e                         # the engine vs transformers generate()
    python bench.py model                       # the performance model vs measured throughput
"""
import argparse
import json
import os
import sys
import time

import numpy as np

import rpart

# --- timing helpers ---


def best_time(fn, reps=5, min_time=0.3):
    """Best of `reps` calls (and at least `min_time` seconds of calls): the least-disturbed run."""
    fn()  # warm up: page faults, thread pool start
    best, spent, n = float("inf"), 0.0, 0
    while n < reps or spent < min_time:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def read_bandwidth(threads, nbytes=1 << 28):
    """STREAM-like read over `threads` threads of a buffer far larger than the caches, in GB/s."""
    buf = np.ones(nbytes, dtype=np.uint8)
    lib = rpart.load_kernel()
    return nbytes / best_time(lambda: lib.fd_read_probe(buf.ctypes.data, nbytes, threads), 7) / 1e9


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


def kernel_row(model, S, L, threads, read_gbs, rng):
    Hq, Hkv, D = SHAPES[model]
    q = rng.standard_normal((S, Hq, D), dtype=np.float32)
    K32 = [rng.standard_normal((L, Hkv, D), dtype=np.float32) for _ in range(S)]
    V32 = [rng.standard_normal((L, Hkv, D), dtype=np.float32) for _ in range(S)]
    kv_elems = 2 * S * L * Hkv * D
    row = {"model": model, "S": S, "L": L, "threads": threads, "read_gbs": read_gbs}
    row["fp32_gbs"] = kv_elems * 4 / best_time(lambda: rpart.decode_attention(q, K32, V32, num_threads=threads)) / 1e9
    t_torch32 = torch_sdpa_timer(q, K32, V32, __import__("torch").float32, threads)
    row["torch_fp32_gbs"] = kv_elems * 4 / t_torch32 / 1e9
    row["torch_bf16_gbs"] = kv_elems * 2 / torch_sdpa_timer(q, K32, V32, __import__("torch").bfloat16, threads) / 1e9
    K16, V16 = [k.astype(np.float16) for k in K32], [v.astype(np.float16) for v in V32]
    del K32, V32
    t16 = best_time(lambda: rpart.decode_attention(q, K16, V16, num_threads=threads))
    row["fp16_gbs"] = kv_elems * 2 / t16 / 1e9
    row["fp16_frac_of_read"] = row["fp16_gbs"] / read_gbs
    row["fp16_tok_over_torch_fp32"] = t_torch32 / t16  # KV-tokens/s ratio on the same tokens
    return row


def bench_kernel(args):
    info = rpart.kernel_info()
    all_threads = info["max_threads"]
    thread_counts = sorted({1, all_threads})
    lengths = [2048] if args.quick else [512, 2048, 8192]
    print(f"kernel: {info['simd']}, up to {all_threads} threads. torch SDPA needs dense [S, H, Lmax, D]: "
          "a ragged batch pads to Lmax (all lengths equal here, so torch pays no padding)")
    read = {t: read_bandwidth(t) for t in thread_counts}
    for t in thread_counts:
        print(f"memory read bandwidth, {t} thread(s): {read[t]:.1f} GB/s")
    hdr = (f"{'model':<11}{'S':>4}{'L':>6}{'thr':>4} | {'fp16':>6} {'fp32':>6} {'t-fp32':>6} {'t-bf16':>6}"
           f"  GB/s | {'fp16/read':>9} {'fp16 tok/s / torch fp32':>24}")
    print(hdr + "\n" + "-" * len(hdr))
    rng, rows = np.random.default_rng(0), []
    for model in SHAPES:
        for L in lengths:
            for t in thread_counts:
                r = kernel_row(model, 32, L, t, read[t], rng)
                rows.append(r)
                print(f"{model:<11}{32:>4}{L:>6}{t:>4} | {r['fp16_gbs']:6.1f} {r['fp32_gbs']:6.1f} "
                      f"{r['torch_fp32_gbs']:6.1f} {r['torch_bf16_gbs']:6.1f}       | "
                      f"{r['fp16_frac_of_read']:9.2f} {r['fp16_tok_over_torch_fp32']:23.2f}x", flush=True)
    key = next(r for r in rows if r["model"] == "opt-1.3b" and r["L"] == 2048 and r["threads"] == all_threads)
    summary = {k: round(v, 3) if isinstance(v, float) else v for k, v in key.items()}
    summary["simd"] = info["simd"]
    summary["rows"] = rows if args.json else len(rows)
    print(json.dumps(summary))


# --- main ---


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel", help="attn_cpu.c vs torch SDPA vs memory read bandwidth")
    k.add_argument("--quick", action="store_true", help="length 2048 only")
    k.add_argument("--json", action="store_true", help="put every row in the closing JSON line")
    args = p.parse_args(argv)
    {"kernel": bench_kernel}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
