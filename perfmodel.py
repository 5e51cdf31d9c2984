"""perfmodel.py - predict FastDecode's step time and throughput, choose the batch, compare GPU-only.

FastDecode's answer to inter-device heterogeneity (He & Zhai, 2024, section 5): the S-Part's time
depends on the batch size (roofline: FLOPs over the GPU's rate, weight bytes over its memory
bandwidth), the R-Part's on the total KV tokens (KV bytes over the CPUs' memory bandwidth; int8
KV has about half of fp16's bytes, scales included), the transfer on q, k, v, o bytes over the
link. With two micro-batches of B/2 sequences, a step takes two stages, each as long as the
slower side: step = 2 * max(S(B/2), R(B/2) + X(B/2)).
A GPU-only server (vLLM-style) keeps the KV on the GPU: its batch is capped by free GPU memory.

    python perfmodel.py predict --model llama-2-7b --gpu a10 --cpu-nodes 4 --prompt-len 1024 --gen-len 256
    python perfmodel.py predict --model llama-2-7b --gpu a10 --sweep cpu-nodes --json

`calibrate` (calibrate.py) measures this machine (memory read bandwidth, the kernel's GB/s per KV
dtype from memory and in cache, the S-Part's time against batch size, loopback latency and bandwidth) into a JSON profile;
`host_step` predicts a step of the engine on it, and `plan` turns that into the engine's batch
size and KV cap.

    python perfmodel.py calibrate      # writes ~/.cache/fastdecode/profile.json ($FASTDECODE_PROFILE)
    python perfmodel.py predict --host --model opt-1.3b   # fastdecode.py on this calibrated machine
"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np

import backend

backend.short_openmp_spin()  # measure as the engine runs (before torch loads libgomp)
import calibrate as calib  # noqa: E402
import kvcache  # noqa: E402
import spart  # noqa: E402


def profile_path():
    """Where the calibration profile lives: $FASTDECODE_PROFILE, else ~/.cache/fastdecode/profile.json
    (read when asked, so a test or a user may point it elsewhere at any time)."""
    return os.environ.get("FASTDECODE_PROFILE") or os.path.join(os.path.expanduser("~"), ".cache", "fastdecode", "profile.json")

# --- hardware ---


@dataclasses.dataclass
class GPU:
    tflops: float        # dense fp16/bf16 matmul, TFLOP/s (datasheet)
    mem_gbs: float       # HBM/GDDR bandwidth, GB/s
    mem_gb: float        # capacity, GB


@dataclasses.dataclass
class CPUNode:
    cores: int
    mem_gb: float
    mem_gbs: float       # measured-style read bandwidth, GB/s


@dataclasses.dataclass
class Link:
    gbs: float           # GB/s
    latency_s: float


GPUS = {"t4": GPU(65, 320, 16), "a10": GPU(125, 600, 24), "l4": GPU(121, 300, 24),
        "a100-40gb": GPU(312, 1555, 40), "a100-80gb": GPU(312, 2039, 80), "h100": GPU(989, 3350, 80),
        "h200": GPU(989, 4800, 141)}
CPUS = {"epyc-2s": CPUNode(128, 512, 300), "xeon-1s": CPUNode(32, 256, 120), "desktop": CPUNode(8, 64, 50),
        "this-2core": CPUNode(2, 24, 45)}
LINKS = {"10gbe": Link(1.25, 30e-6), "25gbe": Link(3.125, 20e-6), "100gbe": Link(12.5, 10e-6),
         "loopback": Link(10.0, 15e-6)}
EFF = {"matmul": 0.6, "gpu_mem": 0.8, "cpu_mem": 0.8}   # achieved fraction of the datasheet figure

# --- the model ---


def kv_bytes_per_token(cfg, kv_dtype="float16"):
    """K and V of one token over all layers, as a worker's store counts them (llama-2-7b: fp16
    2*32*32*128*2 = 512 KiB; int8 2*32*32*(128 + 2) = 260 KiB with its float16 scales)."""
    return kvcache.KVConfig(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv_dtype).bytes_per_token


def s_time(cfg, b, gpu, w_bytes=2):
    """S-Part of one step for b sequences: the slower of compute and reading the weights."""
    flops = 2 * cfg.weight_count() * b
    return max(flops / (gpu.tflops * 1e12 * EFF["matmul"]), cfg.weight_count() * w_bytes / (gpu.mem_gbs * 1e9 * EFF["gpu_mem"]))


def r_time(cfg, kv_tokens, cpu, nodes, kv_dtype="float16", call_overhead_s=50e-6):
    """R-Part of one step over kv_tokens spread evenly on `nodes` CPU nodes."""
    read = kv_tokens * kv_bytes_per_token(cfg, kv_dtype) / (nodes * cpu.mem_gbs * 1e9 * EFF["cpu_mem"])
    return read + cfg.n_layers * call_overhead_s


def x_time(cfg, b, link, nodes, act_bytes=2):
    """Transfer of q, k, v out and o back for b sequences, every layer; nodes share the load."""
    per_layer = b * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * act_bytes
    return cfg.n_layers * (per_layer / nodes / (link.gbs * 1e9) + link.latency_s)


def fastdecode_step(cfg, b, mean_len, gpu, cpu, nodes, link):
    """Symmetric two-micro-batch pipeline: two stages of max(S, R + X) of B/2 each."""
    h = max(1, b // 2)
    s, r, x = s_time(cfg, h, gpu), r_time(cfg, h * mean_len, cpu, nodes), x_time(cfg, h, link, nodes)
    return 2 * max(s, r + x), ("S-Part (GPU)" if s >= r + x else ("R-Part (CPU memory)" if r >= x else "link"))


def predict(cfg, gpu, cpu, nodes, link, prompt, gen, max_batch=4096):
    """Choose FastDecode's batch (throughput-maximal within CPU memory) and predict both systems."""
    per_seq = kv_bytes_per_token(cfg) * (prompt + gen)
    mean_len = prompt + gen / 2                      # stabilized: ages spread evenly
    cap = int(nodes * cpu.mem_gb * 1e9 * 0.9 // per_seq)
    best = (0.0, 1, 0.0, "")
    b = 1
    while b <= min(cap, max_batch):
        step, neck = fastdecode_step(cfg, b, mean_len, gpu, cpu, nodes, link)
        if b / step > best[0] * 1.01:                # prefer the smaller batch on near-ties (latency)
            best = (b / step, b, step, neck)
        b *= 2 if b < 64 else 1.25
        b = int(b)
    fd_tok, fd_b, fd_step, neck = best
    free = gpu.mem_gb * 1e9 * 0.9 - cfg.weight_count() * 2
    g_b = max(0, int(free // per_seq))
    g_step = s_time(cfg, g_b, gpu) + g_b * mean_len * kv_bytes_per_token(cfg) / (gpu.mem_gbs * 1e9 * EFF["gpu_mem"]) if g_b else float("inf")
    g_tok = g_b / g_step if g_b else 0.0
    return {"batch_size": fd_b, "kv_cap_tokens": int(fd_b * mean_len), "kv_bytes_per_token": kv_bytes_per_token(cfg),
            "fastdecode_tok_s": fd_tok, "fastdecode_token_latency_ms": fd_step * 1e3,
            "gpu_only_batch": g_b, "gpu_only_tok_s": g_tok, "gpu_only_token_latency_ms": g_step * 1e3 if g_b else None,
            "ratio": fd_tok / g_tok if g_tok else float("inf"), "bottleneck": neck, "cpu_capacity_batch": cap}


def load_profile(path=None):
    """The calibration profile, or None when this machine has not been calibrated."""
    path = path or profile_path()
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# --- predicting the engine on a calibrated machine ---


def s_host_time(prof, cfg, b):
    """S-Part step time for b sequences: interpolated between the calibration's measurements of
    this model (small batches are not linear: matrix-vector and matrix-matrix kernels differ),
    else the fitted formula."""
    W, sp = cfg.weight_count(), prof["spart"]
    pts = sorted((pb, t) for w, n, pb, t in prof.get("spart_points", []) if w == W and n == cfg.n_layers)
    if len(pts) < 2:
        return W * (sp["per_weight_s"] + sp["per_weight_seq_s"] * b) + cfg.n_layers * sp["per_layer_s"]
    bs, ts = zip(*pts)
    if b <= bs[-1]:
        return float(np.interp(b, bs, ts))
    return ts[-1] + (b - bs[-1]) * (ts[-1] - ts[-2]) / (bs[-1] - bs[-2])  # linear beyond the last


def kernel_rates(prof, kv_dtype, cfg=None):
    """The kernel's GB/s for kv_dtype on this machine: (from memory, in cache or None), measured on
    cfg's own heads where the profile has them (the rate per byte depends on the head count).
    A profile from before int8, bf16 and in-cache rates were measured falls back: a missing dtype
    on fp16's GB/s, and no in-cache ceiling (the from-memory rate alone)."""
    kern = prof["kernel"]
    own = kern.get("shapes", {}).get(calib.shape_key(cfg)) if cfg is not None else None
    rates = own if own else kern
    return rates.get(kv_dtype, rates["float16"]), rates.get("incache", {}).get(kv_dtype)


def host_step(prof, cfg, b, mean_len, *, kv_dtype="float16", pipelined=False):
    """Predicted decode step (seconds) of fastdecode.py with b sequences of mean KV length
    mean_len, on the machine `prof` describes -> (seconds, parts {s, r, x}). Serial when the two
    sides share the cores: S + R + X, X with the cost of handing the cores over twice a layer;
    pipelined (a GPU, or workers on other hosts): two stages of max(S, R + X) of b/2 each.
    The R-Part reads its KV bytes at the kernel's calibrated rate, or at its in-cache rate
    (its compute ceiling) where that is the slower one: on a host whose cores are slow for its
    memory the instructions bind, not the bytes."""
    lo, n = prof["loopback"], cfg.n_layers
    from_mem, in_cache = kernel_rates(prof, kv_dtype, cfg)

    def parts(b):
        s = s_host_time(prof, cfg, b)
        kv = b * mean_len * kv_bytes_per_token(cfg, kv_dtype)
        r = max(kv / (from_mem * 1e9), kv / (in_cache * 1e9) if in_cache else 0.0) + n * prof["kernel"]["call_s"]
        wire = b * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * 4  # q, o fp32; k, v (upper bound)
        x = n * (wire / (lo["gbs"] * 1e9) + lo["rpc_call_s"] + lo["rpc_per_seq_s"] * b
                 + (0.0 if pipelined else lo.get("switch_s", 0.0)))  # sharing the cores: calibrate.switch_cost
        return s, r, x
    if not pipelined:
        s, r, x = parts(b)
        return s + r + x, {"s": s, "r": r, "x": x}
    s, r, x = parts(max(1, b // 2))
    return 2 * max(s, r + x), {"s": 2 * s, "r": 2 * r, "x": 2 * x}


def plan(prof, cfg, prompt, gen, *, kv_mem_bytes, workers=1, pipelined=False, kv_dtype="float16", max_batch=256):
    """The engine's batch size and KV cap on this machine: the smallest batch within 5% of the
    best predicted throughput that fits the workers' KV memory; pipelined, the KV cap is where a
    micro-batch's R-Part time meets its S-Part time (more KV would leave the S side idle)."""
    per_seq = (prompt + gen) * kv_bytes_per_token(cfg, kv_dtype)
    cap = max(1, min(max_batch, int(workers * kv_mem_bytes // per_seq)))
    mean_len = prompt + gen / 2
    tput = {b: b / host_step(prof, cfg, b, mean_len, kv_dtype=kv_dtype, pipelined=pipelined)[0]
            for b in sorted({min(cap, 2**i) for i in range(12)})}
    best = max(tput.values())
    batch = min(b for b, t in tput.items() if t >= 0.95 * best)
    kv_cap = int(batch * mean_len)
    if pipelined:
        _, p = host_step(prof, cfg, batch, mean_len, kv_dtype=kv_dtype, pipelined=True)
        kv_cap = int(kv_cap * max(1.0, p["s"] / max(p["r"], 1e-12)))  # R time grows with KV: balance
    step = host_step(prof, cfg, batch, mean_len, kv_dtype=kv_dtype, pipelined=pipelined)[0]
    return {"max_batch": batch, "kv_cap": kv_cap, "tok_s": tput[batch],
            "max_prefill_tokens": prefill_tokens(prof, cfg, step)}


def prefill_tokens(prof, cfg, step_s, lo=64, hi=8192):
    """The chunked-prefill cap: the most prompt tokens whose S-Part pass takes no longer than
    one decode step, so a running sequence waits at most about two steps for its next token
    while a prompt is prefilled (a prefill chunk costs about what a decode batch of as many
    tokens does: the same matmuls; prompt attention is small beside them at these lengths)."""
    t = lo
    while t * 2 <= hi and s_host_time(prof, cfg, t * 2) <= step_s:
        t *= 2
    return t


# --- main: one function per subcommand ---


def print_rows(res):
    for k, v in res.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")


def cmd_calibrate(a):
    prof = calib.calibrate(a.models, device=a.device)
    out = a.out or profile_path()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(prof, f, indent=1)
    k, s, lo = prof["kernel"], prof["spart"], prof["loopback"]
    print(f"memory read {prof['read_gbs']:.1f} GB/s; kernel fp16 {k['float16']:.1f} GB/s, fp32 {k['float32']:.1f} GB/s, "
          f"int8 {k['int8']:.1f} GB/s (scales counted), bf16 {k['bfloat16']:.1f} GB/s, {k['call_s'] * 1e6:.0f} us per "
          f"call; in cache (its compute ceiling) fp16 {k['incache']['float16']:.1f} GB/s, int8 "
          f"{k['incache']['int8']:.1f} GB/s, bf16 {k['incache']['bfloat16']:.1f} GB/s")
    for key, r in k.get("shapes", {}).items():
        print(f"  on heads {key} (Hq x Hkv x D): " + ", ".join(
            f"{dt} {r[dt]:.1f} GB/s (in cache {r['incache'][dt]:.1f})" for dt in ("float16", "int8", "bfloat16")))
    print(f"loopback: {lo['latency_s'] * 1e6:.0f} us round trip, {lo['gbs']:.2f} GB/s; a decode call costs "
          f"{lo['rpc_call_s'] * 1e6:.0f} us + {lo['rpc_per_seq_s'] * 1e6:.1f} us/sequence beyond the kernel, and "
          f"{lo['switch_s'] * 1e6:.0f} us per layer where it alternates with the S-Part on shared cores")
    print(f"S-Part on {prof['device']} ({prof['dtype']}): {s['per_weight_s'] * 1e12:.1f} ps/weight + "
          f"{s['per_weight_seq_s'] * 1e12:.1f} ps/weight/sequence + {s['per_layer_s'] * 1e6:.0f} us/layer")
    for w, n, b, t in prof["spart_points"]:
        fit = w * (s["per_weight_s"] + s["per_weight_seq_s"] * b) + n * s["per_layer_s"]
        print(f"  {w / 1e6:7.0f}M weights, batch {b:>3}: measured {t * 1e3:7.1f} ms, fit {fit * 1e3:7.1f} ms")
    print(f"profile written to {out}")
    return prof


def cmd_predict_host(a, cfg):
    """fastdecode.py on this calibrated machine."""
    prof = load_profile()
    if prof is None:
        raise ValueError(f"no profile at {profile_path()}: run `python perfmodel.py calibrate` first")
    res = plan(prof, cfg, a.prompt_len, a.gen_len, kv_mem_bytes=kvcache.parse_size(a.kv_mem), kv_dtype=a.kv_dtype)
    step, parts = host_step(prof, cfg, res["max_batch"], a.prompt_len + a.gen_len / 2, kv_dtype=a.kv_dtype)
    res.update({"step_ms": step * 1e3, **{f"{k}_ms": v * 1e3 for k, v in parts.items()},
                "kv_bytes_per_token": kv_bytes_per_token(cfg, a.kv_dtype)})
    print_rows(res)
    return res


def cmd_predict(a):
    if a.model not in spart.KNOWN:
        raise ValueError(f"--model {a.model!r}: not a known model ({', '.join(spart.KNOWN)})")
    cfg = spart.KNOWN[a.model][1]
    if a.host:
        return cmd_predict_host(a, cfg)
    run = lambda n: predict(cfg, GPUS[a.gpu], CPUS[a.cpu], n, LINKS[a.link], a.prompt_len, a.gen_len)
    if not a.sweep:
        res = run(a.cpu_nodes)
        print_rows(res)
        return res
    rows = [(n, run(n)) for n in (1, 2, 4, 8, 16, 32)]
    print(f"{'nodes':>5} {'batch':>6} {'FD tok/s':>9} {'GPU-only':>9} {'ratio':>6}  bottleneck")
    for n, r in rows:
        print(f"{n:>5} {r['batch_size']:>6} {r['fastdecode_tok_s']:>9.0f} {r['gpu_only_tok_s']:>9.0f} {r['ratio']:>6.2f}  {r['bottleneck']}")
    return {"sweep": [{"cpu_nodes": n, **r} for n, r in rows]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FastDecode performance model")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure this machine and write a profile")
    c.add_argument("--models", nargs="+", default=["opt-125m", "opt-1.3b"], help="models whose S-Part is timed")
    c.add_argument("--device", default=None, help="S-Part device (default: cuda if available, else cpu)")
    c.add_argument("--out", default=None, help="profile path (default $FASTDECODE_PROFILE, else ~/.cache/fastdecode/profile.json)")
    c.add_argument("--json", action="store_true", help="end with the profile as one JSON object")
    q = sub.add_parser("predict", help="predict throughput for a configuration")
    q.add_argument("--model", default="llama-2-7b", help="a known model name")
    q.add_argument("--gpu", default="a10", choices=sorted(GPUS), help="GPU preset")
    q.add_argument("--cpu", default="epyc-2s", choices=sorted(CPUS), help="CPU node preset")
    q.add_argument("--cpu-nodes", type=int, default=1, help="number of CPU nodes running workers")
    q.add_argument("--link", default="25gbe", choices=sorted(LINKS), help="network between GPU host and CPU nodes")
    q.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens")
    q.add_argument("--gen-len", type=int, default=256, help="generated tokens")
    q.add_argument("--sweep", choices=["cpu-nodes"], help="print throughput against the number of CPU nodes")
    q.add_argument("--host", action="store_true", help="predict fastdecode.py on this calibrated machine instead")
    q.add_argument("--kv-mem", default=kvcache.DEFAULT_KV_MEM, help="with --host: KV memory per worker")
    q.add_argument("--kv-dtype", default="float16", choices=kvcache.KV_DTYPES, help="with --host: the KV-cache dtype")
    q.add_argument("--json", action="store_true", help="end with one JSON object")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        res = {"calibrate": cmd_calibrate, "predict": cmd_predict}[a.cmd](a)
    except (ValueError, OSError, backend.WorkerStartError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
