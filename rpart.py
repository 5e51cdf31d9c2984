"""rpart.py - the R-Part as one worker runs it: the CPU attention kernel and the worker process.

FastDecode splits a transformer layer into the S-Part (weights, on the GPU: spart.py) and the
R-Part (the per-sequence KV-cache and the attention that reads it, on CPU workers). This module
is what a worker runs:

- `decode_attention`: the ctypes binding of attn_cpu.c, attention over ragged sequences without
  copying the KV (`reference_attention` is its slow, obvious float64 twin, for tests), and
  `store_int8`, its writer of quantized rows into an int8 KV store (kvcache.py);
- `attend_step`: one layer of a decode step on a KV store: write this step's k, v, then attend;
- the worker process: a `Worker` (one handler per message type) behind a socket speaking the
  frames of wire.py, one thread per connection. The engine's side of it is backend.py.

A bad request gets an ERROR frame and the worker serves on; broken framing closes that
connection only. Beyond loopback a worker requires a shared secret (wire.challenge).

Legend: S sequences, Hq/Hkv query/KV heads, D head dim, L cached length of one sequence.

    python rpart.py --listen 127.0.0.1:7001 [--threads N] [--kv-mem 8GiB] [--secret-file F]
"""
import argparse
import ctypes
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np

import kvcache
import wire

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_PATH = os.path.join(HERE, "attn_cpu.so")
SRC_PATHS = [os.path.join(HERE, f) for f in (
    "attn_cpu.c", "attn_common.h", "attn_avx512.h", "attn_portable.h", "attn_gqa.h", "attn_store.h")]

# --- loading the kernel ---

_lib = None
_lib_lock = threading.Lock()


def _build():
    """Run `make attn_cpu.so` next to this file; raise with the compiler's output on failure."""
    r = subprocess.run(["make", "-C", HERE, "attn_cpu.so"], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(LIB_PATH):
        raise RuntimeError(f"building attn_cpu.so failed; run `make` in {HERE}:\n{r.stdout}{r.stderr}")


def load_kernel():
    """The ctypes library, built first when missing or older than its sources. $FASTDECODE_KERNEL
    names another build to load as it is (`make debug` makes attn_cpu_debug.so)."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        path = os.environ.get("FASTDECODE_KERNEL")
        if not path:
            path = LIB_PATH
            stale = not os.path.exists(LIB_PATH) or any(
                os.path.exists(p) and os.path.getmtime(p) > os.path.getmtime(LIB_PATH) for p in SRC_PATHS)
            if stale:
                _build()
        lib = ctypes.CDLL(path)
        P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.fd_decode_attention.argtypes, lib.fd_decode_attention.restype = [P] * 6 + [I] * 5 + [F, I, P], I
        lib.fd_store_int8.argtypes, lib.fd_store_int8.restype = [P, P, I, I, I, P, P, I, I], I
        lib.fd_decode_step.argtypes, lib.fd_decode_step.restype = [P, I] + [P] * 4 + [I] * 7 + [F, I, P, P], I
        lib.fd_read_probe.argtypes, lib.fd_read_probe.restype = [P, ctypes.c_size_t, ctypes.c_int], ctypes.c_uint64
        lib.fd_simd.argtypes, lib.fd_simd.restype = [], ctypes.c_char_p
        lib.fd_max_threads.argtypes, lib.fd_max_threads.restype = [], ctypes.c_int
        _lib = lib
        return lib


def kernel_info():  # {'simd': 'avx512+vnni' | 'avx512' | 'avx2+f16c' | 'scalar', 'max_threads': n}
    lib = load_kernel()
    return {"simd": lib.fd_simd().decode(), "max_threads": lib.fd_max_threads()}


# --- decode attention ---

_KERNEL_ERRORS = {-1: "bad dimensions", -2: "bad sequence length or pointer", -3: "out of memory"}


def _ptr(a):
    """The address of an array's data (2x cheaper than a.ctypes.data, which builds an object)."""
    return a.__array_interface__["data"][0]


KERNEL_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 2, kvcache.BFLOAT16: 3}  # attn_cpu.c's
Q_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), kvcache.BFLOAT16)   # what attend_step's q may come in


def _pointers(name, arrays, S, check):
    """Check each of S arrays with check(i, a) and return their data pointers."""
    if not hasattr(arrays, "__len__") or len(arrays) != S:
        raise ValueError(f"{name}: expected {S} arrays (one per sequence), got "
                         f"{len(arrays) if hasattr(arrays, '__len__') else type(arrays).__name__}")
    ptrs = np.empty(S, dtype=np.uintp)
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{name}[{i}]: expected a numpy array, got {type(a).__name__}")
        check(i, a)
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}[{i}]: not C-contiguous (the kernel reads it without a copy)")
        ptrs[i] = _ptr(a)
    return ptrs


def _check_kv(name, arrays, S, D):
    """Validate keys or values; return (pointer array, lengths, dtype, Hkv)."""
    first = arrays[0] if hasattr(arrays, "__len__") and len(arrays) else None
    dtype, hkv = getattr(first, "dtype", None), getattr(first, "shape", (0, 0))[1:2]

    def check(i, a):
        if a.ndim != 3:
            raise ValueError(f"{name}[{i}]: expected shape [L, Hkv, D], got {a.shape}")
        if a.dtype not in KERNEL_DTYPES or a.dtype != dtype:
            raise ValueError(f"{name}[{i}]: dtype {a.dtype}; all must be float16, all float32, all int8 or all bfloat16")
        if a.shape[0] < 1:
            raise ValueError(f"{name}[{i}]: empty sequence (L = 0)")
        if a.shape[2] != D:
            raise ValueError(f"{name}[{i}]: head dim {a.shape[2]} != q's {D}")
        if a.shape[1:2] != hkv:
            raise ValueError(f"{name}[{i}]: {a.shape[1]} KV heads, earlier arrays have {hkv[0]}")
    ptrs = _pointers(name, arrays, S, check)
    return ptrs, np.array([a.shape[0] for a in arrays], dtype=np.int64), dtype, hkv[0]


def _check_scales(name, scales, rows):
    """int8 rows' scales: float16 [L_s, Hkv] per sequence, matching the rows; their pointers."""
    def check(i, a):
        if a.dtype != np.float16 or a.shape != rows[i].shape[:2]:
            raise ValueError(f"{name}[{i}]: expected float16 {rows[i].shape[:2]} (one per token and KV head), "
                             f"got {a.dtype} {a.shape}")
    return _pointers(name, scales, len(rows), check)


def decode_attention(q, keys, values, *, key_scales=None, value_scales=None, scale=None, num_threads=None, out=None):
    """o[s,h] = softmax(scale * q[s,h] . K_s[:, g]^T) . V_s[:, g] with g = h // (Hq/Hkv).

    q: float32 [S, Hq, D]; keys, values: S C-contiguous arrays [L_s, Hkv, D], all float16, all
    float32 or all int8. int8 rows need key_scales and value_scales: S float16 [L_s, Hkv] each,
    K_s = key_scales[s][..., None] * keys[s] (and so for V). Returns float32 [S, Hq, D] (written
    into `out` when given). No copy of keys, values or scales is made.
    """
    if not isinstance(q, np.ndarray) or q.dtype != np.float32 or q.ndim != 3:
        raise ValueError(f"q: expected float32 [S, Hq, D], got "
                         f"{getattr(q, 'dtype', type(q).__name__)} {getattr(q, 'shape', '')}")
    S, Hq, D = q.shape
    if S < 1 or D % 8 or not 8 <= D <= 256:
        raise ValueError(f"q: need S >= 1 and D a multiple of 8 in [8, 256], got shape {q.shape}")
    q = np.ascontiguousarray(q)
    kp, klen, kdt, hkv = _check_kv("keys", keys, S, D)
    vp, vlen, vdt, vhkv = _check_kv("values", values, S, D)
    if vdt != kdt or vhkv != hkv or not np.array_equal(klen, vlen):
        raise ValueError("values: dtype, KV heads and lengths must match keys'")
    if Hq % hkv:
        raise ValueError(f"keys: Hq={Hq} is not a multiple of Hkv={hkv}")
    ksp = vsp = None
    if kdt == np.int8:
        ksp, vsp = _check_scales("key_scales", key_scales, keys), _check_scales("value_scales", value_scales, values)
    elif key_scales is not None or value_scales is not None:
        raise ValueError(f"key_scales: only int8 keys and values have scales, these are {kdt}")
    out = np.empty((S, Hq, D), dtype=np.float32) if out is None else out
    if out.shape != (S, Hq, D) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected C-contiguous float32 {(S, Hq, D)}, got {out.dtype} {out.shape}")
    rc = load_kernel().fd_decode_attention(
        _ptr(q), _ptr(kp), _ptr(vp), None if ksp is None else _ptr(ksp), None if vsp is None else _ptr(vsp),
        _ptr(klen), S, Hq, hkv, D, KERNEL_DTYPES[kdt], float(1.0 / np.sqrt(D) if scale is None else scale),
        int(num_threads or 0), _ptr(out))
    if rc != 0:
        raise RuntimeError(f"fd_decode_attention: {_KERNEL_ERRORS.get(rc, rc)}")
    return out


def reference_attention(q, keys, values, *, key_scales=None, value_scales=None, scale=None):
    """The slow, obvious float64 version of decode_attention (int8 rows times their scales), for tests."""
    S, Hq, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.empty((S, Hq, D), dtype=np.float64)
    for s in range(S):
        K = keys[s].astype(np.float64)    # [L, Hkv, D]
        V = values[s].astype(np.float64)  # [L, Hkv, D]
        if key_scales is not None:
            K *= key_scales[s][..., None]
            V *= value_scales[s][..., None]
        G = Hq // K.shape[1]
        for h in range(Hq):
            scores = scale * (K[:, h // G, :] @ q[s, h].astype(np.float64))  # [L]
            p = np.exp(scores - scores.max())
            out[s, h] = (p / p.sum()) @ V[:, h // G, :]
    return out


# --- one layer of a decode step on a KV store ---


def store_int8(k, v, where, pos, layer, n_layers):
    """An int8 KV store's writer (kvcache.KVCache(write_int8=)): float16 rows k, v [n, Hkv, D],
    row i quantized to position pos[i] (int64) of layer in the block where[i] (uint64 [n, 4])."""
    if rc := load_kernel().fd_store_int8(_ptr(k), _ptr(v), *k.shape, _ptr(where), _ptr(pos), layer, n_layers):
        raise RuntimeError(f"fd_store_int8: {_KERNEL_ERRORS.get(rc, rc)}")


def attend_step(cache, layer, seqs, positions, q, k, v, *, num_threads=None):
    """One layer of a decode step on a KV store in one C call (fd_decode_step): every sequence is
    checked first, so a bad request changes nothing; each new k, v [Hkv, D] is written at its
    position of `layer` (quantized for int8), then attended over rows [0, position]. That is
    cache.write_batch, then decode_attention on the views (the tests hold it to both), without a
    Python loop over the sequences. q [S, Hq, D] float32, bfloat16 or float16 (the S-Part's dtype,
    widened in C) -> o [S, Hq, D] float32."""
    c, S = cache.cfg, len(seqs)
    q = np.ascontiguousarray(q if getattr(q, "dtype", None) in Q_DTYPES else np.asarray(q, dtype=np.float32))
    k, v = (np.ascontiguousarray(x, dtype=c.row_dtype) for x in (k, v))
    if q.ndim != 3 or q.shape[0] != S or q.shape[2] != c.head_dim or q.shape[1] % c.n_kv_heads:
        raise ValueError(f"q: expected [{S}, k * {c.n_kv_heads}, {c.head_dim}], got {q.shape}")
    if k.shape != (S, c.n_kv_heads, c.head_dim) or v.shape != k.shape:
        raise ValueError(f"k, v: expected [{S}, {c.n_kv_heads}, {c.head_dim}], got {k.shape}, {v.shape}")
    if not 0 <= layer < c.n_layers:
        raise ValueError(f"layer {layer} out of range [0, {c.n_layers})")
    where, pos, bad = cache.where_of(seqs), np.asarray(positions, dtype=np.int64), np.zeros(1, np.int64)
    out = np.empty(q.shape, dtype=np.float32)
    rc = load_kernel().fd_decode_step(
        _ptr(q), KERNEL_DTYPES[q.dtype], _ptr(k), _ptr(v), _ptr(where), _ptr(pos), S, q.shape[1], c.n_kv_heads,
        c.head_dim, KERNEL_DTYPES[np.dtype(c.dtype)], layer, c.n_layers, float(1.0 / np.sqrt(c.head_dim)),
        int(num_threads or 0), _ptr(out), _ptr(bad))
    if rc in (-4, -5):   # a hole or past capacity: the store says which, in its own words
        cache.check_position(seqs[bad[0]], layer, int(pos[bad[0]]))
    if rc != 0:
        raise RuntimeError(f"fd_decode_step: {_KERNEL_ERRORS.get(rc, rc)}")
    return out


# --- the worker ---


class Worker:
    """One worker's state: the model dims it was configured with and its KV store. `handle`
    dispatches a request to the handler of its message type; a handler raises on a bad request
    (the connection turns that into an ERROR frame) and returns (reply type, meta, payload)."""

    def __init__(self, threads=None, kv_mem=kvcache.parse_size(kvcache.DEFAULT_KV_MEM)):
        self.threads, self.kv_mem = threads, kv_mem
        self.cache = self.n_heads = self.q_dtype = None
        self.lock = threading.Lock()   # connections are threads; the store is shared
        self.handlers = {wire.CONFIGURE: self.configure, wire.ADD: self.add, wire.FILL: self.fill,
                         wire.DECODE: self.decode, wire.DROP: self.drop, wire.STATS: self.stats}

    def handle(self, mtype, meta, payload):
        if mtype not in self.handlers:
            raise ValueError(f"unexpected message type {mtype}")
        if mtype != wire.CONFIGURE and self.cache is None:
            raise ValueError("worker not configured")
        return self.handlers[mtype](meta, payload)

    def configure(self, meta, payload):
        n_layers, hkv, hq, d, code, q_code = meta
        if code not in wire.KV_DTYPES or wire.KV_DTYPES.get(q_code, "int8") == "int8" or hq < 1 or hkv < 1 \
                or hq % hkv or d % 8 or not 8 <= d <= 256 or not 1 <= n_layers <= 1024:
            raise ValueError(f"bad configuration {meta}")
        cfg = kvcache.KVConfig(n_layers, hkv, d, wire.KV_DTYPES[code], self.kv_mem)
        if self.cache is not None and self.cache.blocks and cfg != self.cache.cfg:
            raise ValueError("cannot reconfigure a worker that holds sequences")
        if self.cache is None or cfg != self.cache.cfg:
            self.cache = kvcache.KVCache(cfg, write_int8=store_int8)
        self.n_heads, self.q_dtype = hq, wire.KV_DTYPES[q_code]
        return wire.OK, (), ()

    def add(self, meta, payload):
        self.cache.allocate(*meta)                      # seq id, capacity
        return wire.OK, (), ()

    def fill(self, meta, payload):
        seq, layer, L = meta
        c = self.cache.cfg
        K, V = wire.split_payload(payload, [(c.row_dtype, (L, c.n_kv_heads, c.head_dim))] * 2)
        self.cache.fill(seq, layer, K, V)
        return wire.OK, (), ()

    def decode(self, meta, payload):
        layer, S = meta
        c = self.cache.cfg
        if not 1 <= S <= 65536:   # (the layer: attend_step checks it)
            raise ValueError(f"batch {S} out of range")
        ids, pos, q, k, v = wire.split_payload(payload, wire.decode_parts(S, self.n_heads, c.n_kv_heads,
                                                                         c.head_dim, c.row_dtype, self.q_dtype))
        if len(set(ids.tolist())) != S:
            raise ValueError("duplicate sequence ids in one decode call")
        t = time.perf_counter_ns()
        o = attend_step(self.cache, layer, ids.tolist(), pos, q, k, v, num_threads=self.threads)
        return wire.OUT, (S, time.perf_counter_ns() - t), (o,)

    def drop(self, meta, payload):
        self.cache.free(meta[0])
        return wire.OK, (), ()

    def stats(self, meta, payload):
        st = {**self.cache.stats(), "threads": self.threads or 0}
        return wire.STATS_REPLY, tuple(st[k] for k in wire.STATS_FIELDS), ()


def _serve_connection(worker, conn, secret, max_frame, stop):
    """Handshake, then requests until the peer closes, breaks framing, or asks for shutdown."""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = wire.FrameReader(conn, max_frame)
        try:
            if not wire.challenge(conn, reader, secret):
                return
            while True:
                mtype, meta, payload = reader.read()
                if mtype == wire.SHUTDOWN:
                    wire.send_frame(conn, wire.OK)
                    stop.set()
                    return
                try:
                    with worker.lock:
                        reply = worker.handle(mtype, meta, payload)
                except Exception as e:  # any bad request: an ERROR frame, and serve on
                    reply = (wire.ERROR, (), (f"{type(e).__name__}: {e}".encode(),))
                wire.send_frame(conn, *reply)
        except (wire.ProtocolError, ConnectionError, OSError, struct.error):
            return  # framing is lost or the peer is gone: drop this connection only


def serve(srv, worker, *, secret=None, max_frame=wire.DEFAULT_MAX_FRAME, parent_pid=None):
    """Accept connections on the listening socket `srv` until a SHUTDOWN, or until the process
    `parent_pid` (the engine that started this worker) is gone: no orphan is left behind."""
    stop = threading.Event()
    srv.settimeout(0.2)
    while not stop.is_set():
        if parent_pid and os.getppid() != parent_pid:
            break
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        threading.Thread(target=_serve_connection, args=(worker, conn, secret, max_frame, stop), daemon=True).start()
    srv.close()


# --- main ---


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run one FastDecode R-Part worker.")
    p.add_argument("--listen", default="127.0.0.1:7001", help="HOST:PORT to listen on; port 0 picks a free one")
    p.add_argument("--threads", type=int, default=None, help="attention threads (default: all cores)")
    p.add_argument("--kv-mem", default=kvcache.DEFAULT_KV_MEM, help="KV-cache memory budget, e.g. 8GiB")
    p.add_argument("--secret-file", help="file holding the shared secret (required beyond loopback)")
    p.add_argument("--max-frame", default="256MiB", help="largest accepted frame payload")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone (local workers)")
    return p.parse_args(argv)


def setup(a):
    """Check the arguments, load the kernel, bind -> (listening socket, Worker, secret, max frame).
    Every problem is a ValueError, OSError or RuntimeError with a message a user can act on."""
    host, port = a.listen.rsplit(":", 1) if ":" in a.listen else ("127.0.0.1", a.listen)
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {a.listen!r}: expected HOST:PORT with a port in 0-65535")
    kv_mem, max_frame = kvcache.parse_size(a.kv_mem), kvcache.parse_size(a.max_frame)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if kv_mem > total:
        raise ValueError(f"--kv-mem {a.kv_mem} exceeds this machine's memory ({total / 2**30:.1f} GiB)")
    if a.threads is not None and a.threads < 1:
        raise ValueError(f"--threads {a.threads}: must be >= 1")
    secret = wire.read_secret(a.secret_file)
    wire.check_bind(host, secret)
    load_kernel()
    try:
        srv = socket.create_server((host, int(port)))
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return srv, Worker(a.threads, kv_mem), secret, max_frame


def main(argv=None):
    a = parse_args(argv)
    try:
        srv, worker, secret, max_frame = setup(a)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    host, port = srv.getsockname()[:2]
    # backend.start_local_workers reads this line to learn the port: keep its form
    print(f"R-Part worker listening on {host}:{port}, kernel {kernel_info()}", flush=True)
    serve(srv, worker, secret=secret, max_frame=max_frame, parent_pid=a.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
