"""calibrate.py - measuring this machine for the performance model (perfmodel.py).

The model predicts a decode step from a few rates; this module measures them here, the way the
engine runs: the memory's read bandwidth (the R-Part's physical limit), the attention kernel's
GB/s of KV read and its fixed cost per call, a local worker's round trip over loopback and what
a decode call costs beyond the kernel, and the S-Part's step time against the batch size: a
fixed cost per layer, measured on a shrunken layer, plus the weights' read and the FLOPs,
fitted. `python perfmodel.py calibrate` writes the result as a JSON profile.
"""
import dataclasses
import os
import time

import numpy as np

import backend

backend.short_openmp_spin()  # measure as the engine runs (before torch loads libgomp)
import kvcache  # noqa: E402
import rpart  # noqa: E402
import spart  # noqa: E402

# --- timing ---


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


def median_time(fn, reps=7):
    """Median of `reps` calls after a warm-up: what a long run sees on a shared, noisy machine
    (the engine's measured throughput averages over every step, disturbed or not)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# --- the kernel's rows, bytes and in-cache rate (bench_kernel.py shares these) ---


def int8_rows(K, V):
    """int8 copies of K, V and the decode_attention keywords that carry their scales."""
    (K8, ks), (V8, vs) = zip(*map(kvcache.quantize_int8, K)), zip(*map(kvcache.quantize_int8, V))
    return list(K8), list(V8), {"key_scales": list(ks), "value_scales": list(vs)}


def kv_bytes(K, V, scales=None):
    """Bytes the kernel reads for these rows: K and V, and the int8 rows' scales."""
    return sum(a.nbytes for a in (*K, *V, *(scales or {}).get("key_scales", ()), *(scales or {}).get("value_scales", ())))


class RepeatedBytes:
    """A long virtual array whose pages all map the same `period` bytes of physical memory (one
    memfd mapped again and again, side by side): the kernel walks as many addresses as on real
    rows, but every byte comes from a block that stays in cache. Unmapped on close()."""

    def __init__(self, nbytes, period):
        import ctypes
        import mmap
        page = mmap.PAGESIZE
        self.period = -(-period // page) * page
        self.size = -(-nbytes // self.period) * self.period
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                   ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._libc, fd = libc, os.memfd_create("fd-incache")
        try:
            os.ftruncate(fd, self.period)
            # reserve the range (PROT_NONE = 0), then map the block over it piece by piece (MAP_FIXED)
            self.addr = libc.mmap(None, self.size, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            if self.addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap reserve failed")
            for off in range(0, self.size, self.period):
                got = libc.mmap(self.addr + off, self.period, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_SHARED | 0x10, fd, 0)  # 0x10: MAP_FIXED
                if got != self.addr + off:
                    self.close()
                    raise OSError(ctypes.get_errno(), "mmap of the repeated block failed")
        finally:
            os.close(fd)
        self.bytes = np.ctypeslib.as_array((ctypes.c_uint8 * self.size).from_address(self.addr))

    def array(self, shape, dtype, fill):
        """A C-contiguous view [shape] of dtype; its first `period` bytes (and so all) from `fill`."""
        a = self.bytes[:int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
        flat, src = a.reshape(-1), np.asarray(fill, dtype).reshape(-1)
        n = min(self.period // a.itemsize, flat.size)
        flat[:n] = np.resize(src, n)
        return a

    def close(self):
        if self.addr is not None:
            self.bytes = None
            self._libc.munmap(self.addr, self.size)
            self.addr = None


def incache_gbs(q, K, V, threads, scales=None, budget=512 * 2**10):
    """The kernel's compute ceiling: GB/s of KV when the bytes come from cache. The call is the
    real one (the same S, L and shapes, so the same work items and blocks), but every array's
    pages map one small block (RepeatedBytes), K, V and scales together within `budget` bytes,
    which stays in L2. Earlier versions pointed every sequence at a few real tokens instead:
    items of 64 tokens, whose fixed costs a 2048-token item does not pay, understated it."""
    arrays = [("K", K), ("V", V)] + [(n, a) for n, a in (scales or {}).items()]
    per = budget // len(arrays)
    maps, views = [], {}
    try:
        for name, a in arrays:
            rb = RepeatedBytes(a[0].nbytes, min(per, a[0].nbytes))
            maps.append(rb)
            views[name] = [rb.array(a[0].shape, a[0].dtype, a[0])] * len(a)
        sc = {n: views[n] for n, _ in arrays[2:]}
        t = best_time(lambda: rpart.decode_attention(q, views["K"], views["V"], num_threads=threads, **sc))
        return kv_bytes(views["K"], views["V"], sc or None) / t / 1e9
    finally:
        views.clear()
        for rb in maps:
            rb.close()


# --- measuring ---


def read_bandwidth(threads, nbytes=1 << 28):
    """STREAM-like read over `threads` threads of a buffer far larger than the caches, in GB/s."""
    buf = np.ones(nbytes, dtype=np.uint8)
    lib = rpart.load_kernel()
    return nbytes / best_time(lambda: lib.fd_read_probe(buf.ctypes.data, nbytes, threads), 7) / 1e9


def shape_key(cfg):
    """A model's attention shape as the profile names it: "Hq x Hkv x D", e.g. "12x12x64"."""
    return f"{cfg.n_heads}x{cfg.n_kv_heads}x{cfg.head_dim}"


KERNEL_FP16_BYTES = 128 * 2**20  # fp16 K and V of measure_kernel at least: 4x this host's 32 MiB L3


def measure_kernel(threads, S=16, L=None, Hkv=32, D=64, Hq=None, dtypes=("float16", "float32", "int8", "bfloat16")):
    """The kernel's GB/s of KV read from memory (fp16, fp32, int8 with its scales, bf16), its GB/s
    on bytes that come from L2 (`incache`, all but fp32: its compute ceiling, which binds on a host
    whose cores are slow for its memory), and the fixed cost of one call. Hq defaults to Hkv.
    L defaults to enough tokens that the fp16 rows do not stay in L3: with a fixed 1024, opt-125m's
    12 heads made 25 MB of int8 rows, which L3 held, and its "from memory" rate passed the read."""
    L = L or max(1024, -(-KERNEL_FP16_BYTES // (S * Hkv * D * 2 * 2)))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((S, Hq or Hkv, D), dtype=np.float32)
    K32, V32 = ([rng.standard_normal((L, Hkv, D), dtype=np.float32) for _ in range(S)] for _ in "KV")
    out = {"incache": {}}
    for dt in dtypes:
        if dt == "int8":
            K, V, sc = int8_rows(K32, V32)
        else:
            K, V, sc = [a.astype(dt) for a in K32], [a.astype(dt) for a in V32], {}
        t = median_time(lambda: rpart.decode_attention(q, K, V, num_threads=threads, **sc), 15)
        out[dt] = kv_bytes(K, V, sc) / t / 1e9
        if dt != "float32":
            out["incache"][dt] = incache_gbs(q, K, V, threads, sc or None)
    k1 = [np.ones((1, Hkv, D), np.float16)]
    out["call_s"] = best_time(lambda: rpart.decode_attention(q[:1], k1, k1, num_threads=threads), 50)
    return out


def measure_kernel_shape(threads, cfg):
    """fp16, int8 and bf16 rates (from memory and in cache) on one model's heads. Per byte the kernel
    is slower with few heads, where the per-row and per-head costs weigh more: opt-125m's 12
    against opt-1.3b's 32 ran at about 0.7x with one thread here, in cache and from memory."""
    dts = ("float16", "int8", "bfloat16")
    k = measure_kernel(threads, Hq=cfg.n_heads, Hkv=cfg.n_kv_heads, D=cfg.head_dim, dtypes=dts)
    return {**{dt: k[dt] for dt in dts}, "incache": k["incache"]}


def s_step_time(sp, b):
    """One decode step of the S-Part alone for b sequences: every layer's pre_attn and post_attn
    (with o = 0 in place of the R-Part's answer) and the LM head."""
    import torch
    from pipeline import to_host  # the engine's own conversion (pipeline imports torch)
    c, dev = sp.cfg, sp.device
    toks, pos = torch.full((b,), 5, device=dev), torch.full((b,), 64, device=dev)
    o = np.zeros((b, c.n_heads, c.head_dim), np.float32)

    def step():  # with the engine's conversions to and from NumPy around the R-Part
        with torch.inference_mode():
            h, rot = sp.embed(toks, pos), sp.rotary(pos)
            for layer in range(c.n_layers):
                q, k, v = sp.pre_attn(layer, h, rot)
                to_host(q, np.float32), to_host(k, np.float16), to_host(v, np.float16)
                h = sp.post_attn(layer, h, torch.from_numpy(o).to(dev))
            sp.lm_head(h)[0, 0].item()  # waits for the device
    return median_time(step, 5)


def layer_fixed_time(cfg, device=None, dtype=None, depths=(4, 20)):
    """Seconds per layer that do not grow with the weights (Python, torch's dispatch, the
    engine's conversions to and from NumPy): the same layer's calls at batch 1, on a model of
    cfg's family shrunk to a width where their arithmetic is nothing (H 64, one head, F 256, a
    vocabulary of 256), timed at two depths so that the embedding and the LM head cancel.
    Measured, not fitted: on this host a least-squares fit of the real models' step times put
    it below 0 (the layers' calls overlap the weights' reads), and a 0 then hid it from the report."""
    t = []
    for n in depths:
        c = dataclasses.replace(cfg, hidden=64, n_heads=1, n_kv_heads=1, head_dim=64, ffn=256, vocab_size=256,
                                embed_dim=64, n_layers=n)
        t.append(s_step_time(spart.SPart.random(c, device=device, dtype=dtype), 1))
    return max(0.0, (t[1] - t[0]) / (depths[1] - depths[0]))


def fit_spart(points, per_layer=None):
    """Least squares over (weight_count, n_layers, b, seconds): t = W*(a + c*b) + layers*g.
    a: seconds per weight read, c: per weight per sequence (FLOPs), g: per-layer fixed cost,
    fitted, or given (`per_layer`, as layer_fixed_time measures it) and the rest fitted to t - layers*g."""
    A = np.array([[w, w * b, n] for w, n, b, _ in points], dtype=np.float64)
    t = np.array([s for *_, s in points]) - (0.0 if per_layer is None else A[:, 2] * per_layer)
    scale, keep, x = A.max(axis=0), [0, 1] if per_layer is not None else [0, 1, 2], np.zeros(3)
    while keep:  # a term that fits negative is dropped and the rest refitted (clamping it to 0 after
        x[:] = 0  # the fit would leave the others fitted to its negative share)
        x[keep] = np.linalg.lstsq(A[:, keep] / scale[keep], t, rcond=None)[0] / scale[keep]
        if (x >= 0).all():
            break
        keep.remove(int(np.argmin(x)))
    if per_layer is not None:
        x[2] = per_layer
    return {"per_weight_s": x[0], "per_weight_seq_s": x[1], "per_layer_s": x[2]}


def measure_loopback(threads):
    """One local worker over loopback: round-trip latency, bandwidth, and what a decode call
    costs beyond the kernel (framing, Python on both sides), fixed and per sequence."""
    procs, addrs = backend.start_local_workers(1, threads=threads, kv_mem=2**28)
    try:
        c = backend.WorkerClient(*addrs[0])
        c.configure(kvcache.KVConfig(1, 32, 64, "float16", 2**28), 32)
        out = {"latency_s": best_time(lambda: c.stats(), 50)}
        c.add(0, 1024)
        K = np.ones((1024, 32, 64), np.float16)  # 4 MiB each of K and V per FILL
        fill = best_time(lambda: c.fill(0, 0, K, K), 10)
        out["gbs"] = 2 * K.nbytes / max(fill - out["latency_s"], 1e-9) / 1e9
        c.drop(0)
        over = {S: decode_overhead(c, S, threads) for S in (1, 16)}
        out["rpc_per_seq_s"] = max(0.0, (over[16] - over[1]) / 15)
        out["rpc_call_s"] = max(0.0, over[1] - out["rpc_per_seq_s"])
        out["switch_s"] = switch_cost(c, threads)
        c.shutdown()
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
    return out


def decode_call(c, S, threads, L=64, first_id=100):
    """S sequences at length L on worker c -> (a decode call of them through c, the kernel alone
    on the same data, a function that drops them)."""
    rng = np.random.default_rng(S)
    Ks, Vs = (rng.standard_normal((S, L, 32, 64), dtype=np.float32).astype(np.float16) for _ in "KV")
    for i in range(S):
        c.add_filled(first_id + i, L, Ks[i][None, :L - 1], Vs[i][None, :L - 1])
    q, ids = rng.standard_normal((S, 32, 64), dtype=np.float32), list(range(first_id, first_id + S))

    def call():
        c.send_decode(0, ids, [L - 1] * S, q, Ks[:, L - 1], Vs[:, L - 1])
        c.recv_out((S, 32, 64))
    return (call, lambda: rpart.decode_attention(q, list(Ks), list(Vs), num_threads=threads),
            lambda: [c.drop(i) for i in ids])


def decode_overhead(c, S, threads):
    """Seconds a decode call of S sequences at length 64 costs beyond the kernel on the same data."""
    call, kernel, drop = decode_call(c, S, threads)
    try:
        return best_time(call, 30) - best_time(kernel, 30)
    finally:
        drop()


def switch_cost(c, threads, S=16, n=5, reps=20):
    """Seconds per layer that alternating with the S-Part adds to a decode call and the S-Part
    together, beyond each run back to back. On cores both sides share, each hands them to the
    other once per layer (the other's threads wake; L1, L2 and the TLBs hold the other's data).
    A torch burst of a layer's size stands in for the S-Part. Both sides cycle through n sets of
    data (84 MB of KV, 47 MB of weights), as the engine's layers do, so neither finds its data in
    L3 alone or alternated: with one set each, the 8 MB of KV that back-to-back calls kept in L3
    made the switch 0.4-1.0 ms, cold both ways 0.27-0.66 ms. The median of three rounds of
    medians (the noise here is of the same size)."""
    import torch
    torch.set_num_threads(threads)
    x, ws = torch.randn(S, 768), [torch.randn(3072, 768) for _ in range(n)]
    calls = [decode_call(c, S, threads, L=128, first_id=1000 * (j + 1)) for j in range(n)]
    turn = [0]

    def burst():
        with torch.inference_mode():
            for _ in range(2):
                torch.nn.functional.linear(x, ws[turn[0] % n])
                turn[0] += 1

    def call():
        calls[turn[0] % n][0]()
        turn[0] += 1

    def alternate():
        burst()
        call()
    try:
        return max(0.0, float(np.median([median_time(alternate, reps) - median_time(burst, reps) - median_time(call, reps)
                                         for _ in range(3)])))
    finally:
        for _, _, drop in calls:
            drop()


def calibrate(models=("opt-125m", "opt-1.3b"), batches=(1, 4, 8, 16, 32, 64), device=None, progress=True):
    """Measure this machine -> profile dict (see PROFILE)."""
    import torch
    from tqdm import tqdm
    info = rpart.kernel_info()
    threads = info["max_threads"]
    bar = tqdm(total=3 + len(models) * len(batches), desc="calibrate", disable=not progress)
    prof = {"cores": os.cpu_count(), "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "threads": threads, "simd": info["simd"]}
    prof["read_gbs"] = read_bandwidth(threads)
    bar.update()
    prof["kernel"] = measure_kernel(threads)
    bar.update()
    prof["loopback"] = measure_loopback(threads)
    bar.update()
    points, fixed = [], None
    for m in models:
        sp = spart.SPart.load(m, device=device, quiet=True)
        if fixed is None:
            torch.set_num_threads(threads)
            fixed = layer_fixed_time(sp.cfg, sp.device, sp.dtype)
        shapes = prof["kernel"].setdefault("shapes", {})
        if shape_key(sp.cfg) not in shapes:
            shapes[shape_key(sp.cfg)] = measure_kernel_shape(threads, sp.cfg)
        torch.set_num_threads(threads)
        for b in batches:
            points.append((sp.cfg.weight_count(), sp.cfg.n_layers, b, s_step_time(sp, b)))
            bar.update()
        prof["device"], prof["dtype"] = str(sp.device), str(sp.dtype).replace("torch.", "")
        del sp
    bar.close()
    prof["spart_points"] = points
    prof["spart"] = fit_spart(points, fixed)
    return prof
