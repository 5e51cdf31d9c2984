"""bench.py - side-by-side measurements, each contender on the same data in one process.

This machine is shared and noisy, so absolute times drift: read the ratios, and the fraction
of the physical limit (GB/s of KV read over the memory read bandwidth measured here).

    python bench.py kernel [--quick] [--json]   # attn_cpu.c vs torch SDPA vs memory bandwidth
    python bench.py rpc                         # a decode call through a worker vs the kernel
    python bench.py e2e                         # the engine vs transformers generate()
    python bench.py model                       # the performance model vs measured throughput
    python bench.py trace FILE                  # text picture of one step of a --trace file
    python bench.py serve --request-rate 4      # a running server.py under Poisson arrivals
    python bench.py kv-accuracy                 # int8, bf16 vs float16 KV on real text: logits, greedy tokens
"""
import argparse
import json
import sys

import backend

backend.short_openmp_spin()  # as the engine runs (before torch loads libgomp): see there
import bench_accuracy  # noqa: E402
import bench_e2e  # noqa: E402
import bench_kernel  # noqa: E402
import bench_serve  # noqa: E402

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
    e = sub.add_parser("e2e", help="the engine vs transformers generate() on the same random weights, in the same dtype")
    e.add_argument("--models", nargs="+", default=["opt-125m", "opt-1.3b"], help="models to run")
    e.add_argument("--gen-len", type=int, default=32, help="tokens generated per request")
    e.add_argument("--rounds", type=int, default=1, help="alternating rounds per contender after the first (best of all kept)")
    e.add_argument("--quick", action="store_true", help="prompt 128 only")
    e.add_argument("--no-real", action="store_true", help="skip the SmolLM2-135M rows (batch 1 vs weight read)")
    e.add_argument("--only-real", action="store_true", help="only the SmolLM2-135M rows (and llama.cpp's, when installed)")
    e.add_argument("--json", action="store_true", help="put every row in the closing JSON line")
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
    bench_accuracy.add_parser(sub)
    args = p.parse_args(argv)
    {"kernel": bench_kernel.bench_kernel, "rpc": bench_kernel.bench_rpc, "e2e": bench_e2e.bench_e2e,
     "model": bench_e2e.bench_model, "trace": bench_trace,
     "serve": bench_serve.bench_serve, "kv-accuracy": bench_accuracy.bench_kv_accuracy}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
