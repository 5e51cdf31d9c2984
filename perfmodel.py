"""perfmodel.py - predict FastDecode's step time and throughput, choose the batch, compare GPU-only.

FastDecode's answer to inter-device heterogeneity (He & Zhai, 2024, section 5): the S-Part's time
depends on the batch size (roofline: FLOPs over the GPU's rate, weight bytes over its memory
bandwidth), the R-Part's on the total KV tokens (KV bytes over the CPUs' memory bandwidth), the
transfer on q, k, v, o bytes over the link. With two micro-batches of B/2 sequences, a step takes
two stages, each as long as the slower side: step = 2 * max(S(B/2), R(B/2) + X(B/2)).
A GPU-only server (vLLM-style) keeps the KV on the GPU: its batch is capped by free GPU memory.

    python perfmodel.py predict --model llama-2-7b --gpu a10 --cpu-nodes 4 --prompt-len 1024 --gen-len 256
    python perfmodel.py predict --model llama-2-7b --gpu a10 --sweep cpu-nodes --json

Not yet here: `calibrate` (measuring this machine into a profile) - see the README's status.
"""
import argparse
import dataclasses
import json

import spart

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


def kv_bytes_per_token(cfg, kv_bytes=2):
    """K and V of one token over all layers (llama-2-7b, fp16: 2*32*32*128*2 = 512 KiB)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_bytes


def s_time(cfg, b, gpu, w_bytes=2):
    """S-Part of one step for b sequences: the slower of compute and reading the weights."""
    flops = 2 * cfg.weight_count() * b
    return max(flops / (gpu.tflops * 1e12 * EFF["matmul"]), cfg.weight_count() * w_bytes / (gpu.mem_gbs * 1e9 * EFF["gpu_mem"]))


def r_time(cfg, kv_tokens, cpu, nodes, kv_bytes=2, call_overhead_s=50e-6):
    """R-Part of one step over kv_tokens spread evenly on `nodes` CPU nodes."""
    read = kv_tokens * kv_bytes_per_token(cfg, kv_bytes) / (nodes * cpu.mem_gbs * 1e9 * EFF["cpu_mem"])
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


# --- main ---


def main(argv=None):
    p = argparse.ArgumentParser(description="FastDecode performance model")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("predict", help="predict throughput for a configuration")
    q.add_argument("--model", default="llama-2-7b", help="a known model name")
    q.add_argument("--gpu", default="a10", choices=sorted(GPUS), help="GPU preset")
    q.add_argument("--cpu", default="epyc-2s", choices=sorted(CPUS), help="CPU node preset")
    q.add_argument("--cpu-nodes", type=int, default=1, help="number of CPU nodes running workers")
    q.add_argument("--link", default="25gbe", choices=sorted(LINKS), help="network between GPU host and CPU nodes")
    q.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens")
    q.add_argument("--gen-len", type=int, default=256, help="generated tokens")
    q.add_argument("--sweep", choices=["cpu-nodes"], help="print throughput against the number of CPU nodes")
    q.add_argument("--json", action="store_true", help="end with one JSON object")
    a = p.parse_args(argv)
    cfg = spart.KNOWN[a.model][1]
    run = lambda n: predict(cfg, GPUS[a.gpu], CPUS[a.cpu], n, LINKS[a.link], a.prompt_len, a.gen_len)
    if a.sweep:
        rows = [(n, run(n)) for n in (1, 2, 4, 8, 16, 32)]
        print(f"{'nodes':>5} {'batch':>6} {'FD tok/s':>9} {'GPU-only':>9} {'ratio':>6}  bottleneck")
        for n, r in rows:
            print(f"{n:>5} {r['batch_size']:>6} {r['fastdecode_tok_s']:>9.0f} {r['gpu_only_tok_s']:>9.0f} {r['ratio']:>6.2f}  {r['bottleneck']}")
        res = {"sweep": [{"cpu_nodes": n, **r} for n, r in rows]}
    else:
        res = run(a.cpu_nodes)
        for k, v in res.items():
            print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
