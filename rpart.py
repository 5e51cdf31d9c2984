"""rpart.py - the R-Part: CPU decode attention (ctypes binding of attn_cpu.c).

FastDecode splits a transformer layer into the S-Part (weights, on the GPU) and the R-Part
(the per-sequence KV-cache and the attention that reads it, on CPU workers). This module is the
R-Part: `decode_attention` calls the C kernel in attn_cpu.c over ragged sequences, zero-copy
(the slow, obvious reference it is tested against is `reference_attention`); `serve` is a worker
process holding a KV store (kvcache.py) behind a socket; `WorkerClient` and `RemoteBackend` are
what the engine uses to reach workers, with send and receive apart so the engine can overlap.

Wire protocol: length-prefixed binary frames, never pickle. A 20-byte header
    magic "FDR1" | version u8 | type u8 | reserved u16 | meta length u32 | payload length u64
then a fixed binary meta struct per type and raw little-endian array bytes. Every field is
checked against the configured model and the worker's state; a bad request gets an ERROR frame
and the worker serves on; a bad header (or an oversize frame) closes that connection. Each
connection starts with a challenge; a worker with a secret requires HMAC-SHA256(secret, nonce).

Legend: S sequences, Hq/Hkv query/KV heads, D head dim, L cached length of one sequence.

    python rpart.py --listen 127.0.0.1:7001 [--threads N] [--kv-mem 8GiB] [--secret-file F]
"""
import argparse
import ctypes
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_PATH = os.path.join(HERE, "attn_cpu.so")
SRC_PATH = os.path.join(HERE, "attn_cpu.c")

# --- loading the kernel ---

_lib = None
_lib_lock = threading.Lock()


def _build():
    """Run `make attn_cpu.so` next to this file; raise with the compiler's output on failure."""
    r = subprocess.run(["make", "-C", HERE, "attn_cpu.so"], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(LIB_PATH):
        raise RuntimeError(f"building attn_cpu.so failed; run `make` in {HERE}:\n{r.stdout}{r.stderr}")


def load_kernel():
    """The ctypes library, built first when missing or older than attn_cpu.c."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        stale = (not os.path.exists(LIB_PATH) or
                 (os.path.exists(SRC_PATH) and os.path.getmtime(SRC_PATH) > os.path.getmtime(LIB_PATH)))
        if stale:
            _build()
        lib = ctypes.CDLL(LIB_PATH)
        P = ctypes.c_void_p
        I = ctypes.c_int
        lib.fd_decode_attention.argtypes = [P, P, P, P, P, P, I, I, I, I, I, ctypes.c_float, I, P]
        lib.fd_decode_attention.restype = I
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
KERNEL_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 2}  # attn_cpu.c's codes


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
        ptrs[i] = a.__array_interface__["data"][0]
    return ptrs


def _check_kv(name, arrays, S, D):
    """Validate keys or values; return (pointer array, lengths, dtype, Hkv)."""
    first = arrays[0] if hasattr(arrays, "__len__") and len(arrays) else None
    dtype, hkv = getattr(first, "dtype", None), getattr(first, "shape", (0, 0))[1:2]

    def check(i, a):
        if a.ndim != 3:
            raise ValueError(f"{name}[{i}]: expected shape [L, Hkv, D], got {a.shape}")
        if a.dtype not in KERNEL_DTYPES or a.dtype != dtype:
            raise ValueError(f"{name}[{i}]: dtype {a.dtype}; all must be float16, all float32 or all int8")
        if a.shape[0] < 1:
            raise ValueError(f"{name}[{i}]: empty sequence (L = 0)")
        if a.shape[2] != D:
            raise ValueError(f"{name}[{i}]: head dim {a.shape[2]} != q's {D}")
        if a.shape[1:2] != hkv:
            raise ValueError(f"{name}[{i}]: {a.shape[1]} KV heads, earlier arrays have {hkv[0]}")
    ptrs = _pointers(name, arrays, S, check)
    return ptrs, np.array([a.shape[0] for a in arrays], dtype=np.int64), dtype, hkv[0]


def _check_scales(name, scales, rows):
    """int8 rows' scales: float32 [L_s, Hkv] per sequence, matching the rows; their pointers."""
    def check(i, a):
        if a.dtype != np.float32 or a.shape != rows[i].shape[:2]:
            raise ValueError(f"{name}[{i}]: expected float32 {rows[i].shape[:2]} (one per token and KV head), "
                             f"got {a.dtype} {a.shape}")
    return _pointers(name, scales, len(rows), check)


def decode_attention(q, keys, values, *, key_scales=None, value_scales=None, scale=None, num_threads=None, out=None):
    """o[s,h] = softmax(scale * q[s,h] . K_s[:, g]^T) . V_s[:, g] with g = h // (Hq/Hkv).

    q: float32 [S, Hq, D]; keys, values: S C-contiguous arrays [L_s, Hkv, D], all float16, all
    float32 or all int8. int8 rows need key_scales and value_scales: S float32 [L_s, Hkv] each,
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
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    if out is None:
        out = np.empty((S, Hq, D), dtype=np.float32)
    elif out.shape != (S, Hq, D) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected C-contiguous float32 {(S, Hq, D)}, got {out.dtype} {out.shape}")
    lib = load_kernel()
    rc = lib.fd_decode_attention(q.ctypes.data, kp.ctypes.data, vp.ctypes.data,
                                 None if ksp is None else ksp.ctypes.data, None if vsp is None else vsp.ctypes.data,
                                 klen.ctypes.data, S, Hq, hkv, D, KERNEL_DTYPES[kdt], float(scale),
                                 int(num_threads or 0), out.ctypes.data)
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


# --- wire protocol ---

MAGIC, VERSION = b"FDR1", 1
HEADER = struct.Struct("<4sBBHIQ")          # magic, version, type, reserved, meta len, payload len
MAX_META = 64
DEFAULT_MAX_FRAME = 256 * 2**20             # bytes of payload; prefill ships one layer per frame
(HELLO, AUTH, CONFIGURE, ADD, FILL, DECODE, DROP, STATS, SHUTDOWN, OK, ERROR, OUT, STATS_REPLY) = range(1, 14)
META = {  # fixed binary meta per message type
    HELLO: struct.Struct("<B32s"),          # needs_auth, nonce
    AUTH: struct.Struct("<32s"),            # HMAC-SHA256(secret, nonce), zeros without a secret
    CONFIGURE: struct.Struct("<IIIIB"),     # n_layers, Hkv, Hq, D, kv dtype (0 fp16, 1 fp32)
    ADD: struct.Struct("<QI"),              # seq id, capacity
    FILL: struct.Struct("<QII"),            # seq id, layer, L; payload K then V [L, Hkv, D]
    DECODE: struct.Struct("<II"),           # layer, S; payload ids u64[S], positions u32[S], q, k, v
    DROP: struct.Struct("<Q"),
    STATS: struct.Struct(""), SHUTDOWN: struct.Struct(""), OK: struct.Struct(""),
    ERROR: struct.Struct(""),               # payload: utf-8 message
    OUT: struct.Struct("<IQ"),              # S, kernel nanoseconds; payload o f32 [S, Hq, D]
    STATS_REPLY: struct.Struct("<6Q"),      # sequences, tokens, used, reserved, free, threads
}
KV_DTYPES = {0: np.float16, 1: np.float32}


class ProtocolError(Exception):  # the peer broke framing: the connection cannot continue
    pass


class WorkerLost(Exception):
    """A worker stopped answering (dead, reset, or past the timeout)."""

    def __init__(self, worker, why):
        super().__init__(f"worker {worker}: {why}")
        self.worker = worker


def recv_exact(sock, view):
    """Fill the memoryview from the socket with recv_into; EOF mid-frame is a ConnectionError."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("connection closed")
        got += n


def send_frame(sock, mtype, meta=(), payload=()):
    """payload: a sequence of bytes-like objects (numpy arrays are sent without a copy)."""
    m = META[mtype].pack(*meta)
    bufs = [memoryview(p).cast("B") for p in payload]
    sock.sendall(HEADER.pack(MAGIC, VERSION, mtype, 0, len(m), sum(len(b) for b in bufs)) + m)
    for b in bufs:
        sock.sendall(b)


class FrameReader:
    """Receives frames into one reusable buffer per connection (no allocation per frame)."""

    def __init__(self, sock, max_frame=DEFAULT_MAX_FRAME):
        self.sock, self.max_frame = sock, max_frame
        self.head = bytearray(HEADER.size + MAX_META)
        self.buf = np.empty(1 << 20, dtype=np.uint8)

    def read(self):
        """-> (type, meta tuple, payload memoryview valid until the next read)."""
        hv = memoryview(self.head)
        recv_exact(self.sock, hv[:HEADER.size])
        magic, ver, mtype, _, mlen, plen = HEADER.unpack_from(self.head)
        if magic != MAGIC or ver != VERSION:
            raise ProtocolError(f"bad magic/version {bytes(magic)!r}/{ver}")
        if mtype not in META or mlen != META[mtype].size:
            raise ProtocolError(f"unknown message type {mtype} or meta length {mlen}")
        if plen > self.max_frame:
            raise ProtocolError(f"payload of {plen} bytes exceeds the {self.max_frame}-byte frame cap")
        recv_exact(self.sock, hv[HEADER.size:HEADER.size + mlen])
        meta = META[mtype].unpack_from(self.head, HEADER.size)
        if plen > self.buf.nbytes:
            self.buf = np.empty(max(plen, 2 * self.buf.nbytes), dtype=np.uint8)
        payload = memoryview(self.buf)[:plen]
        recv_exact(self.sock, payload)
        return mtype, meta, payload


def split_payload(payload, parts):
    """Cut a payload into arrays: parts = [(dtype, shape), ...]; sizes must add up exactly."""
    out, off = [], 0
    for dtype, shape in parts:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if off + n > len(payload):
            raise ValueError(f"payload of {len(payload)} bytes is too short for {parts}")
        out.append(np.frombuffer(payload[off:off + n], dtype=dtype).reshape(shape))
        off += n
    if off != len(payload):
        raise ValueError(f"payload has {len(payload) - off} unexpected trailing bytes")
    return out


# --- the worker ---


class Worker:
    """One R-Part worker's state: the model dims it was configured with and its KV store."""

    def __init__(self, threads=None, kv_mem=8 * 2**30):
        import kvcache  # here, not at the top: kvcache imports this module for the kernel
        self.kvcache, self.threads, self.kv_mem = kvcache, threads, kv_mem
        self.cache = self.n_heads = None
        self.lock = threading.Lock()   # connections are threads; the store is shared

    def handle(self, mtype, meta, payload):
        """One request -> (reply type, meta, payload). Raises on bad requests (-> ERROR frame)."""
        if mtype == CONFIGURE:
            n_layers, hkv, hq, d, dt = meta
            if dt not in KV_DTYPES or hq < 1 or hkv < 1 or hq % hkv or d % 8 or not 8 <= d <= 256 or not 1 <= n_layers <= 1024:
                raise ValueError(f"bad configuration {meta}")
            cfg = self.kvcache.KVConfig(n_layers, hkv, d, np.dtype(KV_DTYPES[dt]).name, self.kv_mem)
            if self.cache is not None and self.cache.blocks and cfg != self.cache.cfg:
                raise ValueError("cannot reconfigure a worker that holds sequences")
            if self.cache is None or cfg != self.cache.cfg:
                self.cache = self.kvcache.KVCache(cfg)
            self.n_heads = hq
            return OK, (), ()
        if self.cache is None:
            raise ValueError("worker not configured")
        c = self.cache.cfg
        if mtype == ADD:
            self.cache.allocate(meta[0], meta[1])
            return OK, (), ()
        if mtype == FILL:
            seq, layer, L = meta
            K, V = split_payload(payload, [(c.dtype, (L, c.n_kv_heads, c.head_dim))] * 2)
            self.cache.fill(seq, layer, K, V)
            return OK, (), ()
        if mtype == DECODE:
            layer, S = meta
            if not 0 <= layer < c.n_layers or not 1 <= S <= 65536:
                raise ValueError(f"layer {layer} or batch {S} out of range")
            ids, pos, q, k, v = split_payload(payload, [
                (np.uint64, (S,)), (np.uint32, (S,)), (np.float32, (S, self.n_heads, c.head_dim)),
                (c.dtype, (S, c.n_kv_heads, c.head_dim)), (c.dtype, (S, c.n_kv_heads, c.head_dim))])
            if len(set(ids.tolist())) != S:
                raise ValueError("duplicate sequence ids in one decode call")
            t = time.perf_counter_ns()
            o = self.kvcache.attend_step(self.cache, layer, ids.tolist(), pos.tolist(), q, k, v, num_threads=self.threads)
            return OUT, (S, time.perf_counter_ns() - t), (o,)
        if mtype == DROP:
            self.cache.free(meta[0])
            return OK, (), ()
        if mtype == STATS:
            st = self.cache.stats()
            return STATS_REPLY, (st["sequences"], st["tokens"], st["bytes_used"], st["bytes_reserved"],
                                 st["bytes_free"], self.threads or 0), ()
        raise ValueError(f"unexpected message type {mtype}")


def _serve_connection(worker, conn, secret, max_frame, stop):
    """Handshake, then requests until the peer closes, breaks framing, or asks for shutdown."""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = FrameReader(conn, max_frame)
        try:
            nonce = secrets.token_bytes(32)
            send_frame(conn, HELLO, (int(secret is not None), nonce))
            mtype, meta, _ = reader.read()
            want = hmac.new(secret, nonce, hashlib.sha256).digest() if secret is not None else bytes(32)
            if mtype != AUTH or not hmac.compare_digest(meta[0], want):
                send_frame(conn, ERROR, (), (b"authentication failed",))
                return
            while True:
                mtype, meta, payload = reader.read()
                if mtype == SHUTDOWN:
                    send_frame(conn, OK)
                    stop.set()
                    return
                try:
                    with worker.lock:
                        reply = worker.handle(mtype, meta, payload)
                except Exception as e:  # any bad request: an ERROR frame, and serve on
                    reply = (ERROR, (), (f"{type(e).__name__}: {e}".encode(),))
                send_frame(conn, *reply)
        except (ProtocolError, ConnectionError, OSError, struct.error):
            return  # framing is lost or the peer is gone: drop this connection only


def check_bind(host, secret):
    """Loopback needs nothing; any other address needs a shared secret."""
    addr = ipaddress.ip_address(socket.gethostbyname(host))
    if not addr.is_loopback and secret is None:
        raise SystemExit(f"refusing to listen on {host} ({addr}) without --secret-file: "
                         "workers beyond loopback require a shared secret")


def serve(host="127.0.0.1", port=0, *, threads=None, kv_mem=8 * 2**30, secret=None,
          max_frame=DEFAULT_MAX_FRAME, ready=None, parent_pid=None):
    """Run a worker until SHUTDOWN. ready(port) is called once listening (port 0: any free one)."""
    check_bind(host, secret)
    load_kernel()
    worker, stop = Worker(threads, kv_mem), threading.Event()
    srv = socket.create_server((host, port))
    srv.settimeout(0.2)
    if ready:
        ready(srv.getsockname()[1])
    while not stop.is_set():
        if parent_pid and os.getppid() != parent_pid:
            break  # the engine that spawned us is gone: leave no orphan behind
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        threading.Thread(target=_serve_connection, args=(worker, conn, secret, max_frame, stop), daemon=True).start()
    srv.close()


def short_openmp_spin():
    """libgomp's threads spin for milliseconds after each parallel region; where the S-Part
    (torch, same libgomp) and local workers share cores, that steals the other side's time.
    Spin briefly instead. Only before libgomp loads; the user's OMP_* / GOMP_* settings win."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def _spawned_worker(port_queue, threads, kv_mem, parent_pid):
    short_openmp_spin()
    serve("127.0.0.1", 0, threads=threads, kv_mem=kv_mem, ready=port_queue.put, parent_pid=parent_pid)


def spawn_workers(n, *, threads=None, kv_mem=8 * 2**30):
    """Start n local workers on loopback -> (processes, [(host, port)]). They exit on SHUTDOWN
    or when this process is gone."""
    import multiprocess
    ctx = multiprocess.get_context("spawn")  # fork after OpenMP has started can hang the child
    procs, addrs = [], []
    for _ in range(n):
        q = ctx.Queue()
        p = ctx.Process(target=_spawned_worker, args=(q, threads, kv_mem, os.getpid()), daemon=True)
        p.start()
        procs.append(p)
        addrs.append(("127.0.0.1", q.get(timeout=120)))
    return procs, addrs


# --- the client the engine uses ---


class WorkerClient:
    """One connection to one worker. send_decode and recv_out are separate so the engine can go
    on with S-Part work in between; `pending` counts replies still to be received."""

    def __init__(self, host, port, *, secret=None, timeout=60.0, max_frame=DEFAULT_MAX_FRAME):
        self.addr = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader, self.pending = FrameReader(self.sock, max_frame), 0
        mtype, (needs_auth, nonce), _ = self.reader.read()
        if mtype != HELLO:
            raise ProtocolError(f"{self.addr}: expected HELLO")
        if needs_auth and secret is None:
            raise PermissionError(f"{self.addr}: worker requires a shared secret")
        send_frame(self.sock, AUTH, (hmac.new(secret, nonce, hashlib.sha256).digest() if needs_auth else bytes(32),))

    def _reply(self, expect=OK):
        mtype, meta, payload = self.reader.read()
        if mtype == ERROR:
            raise RuntimeError(f"worker {self.addr}: {bytes(payload).decode(errors='replace')}")
        if mtype != expect:
            raise ProtocolError(f"{self.addr}: expected reply {expect}, got {mtype}")
        return meta, payload

    def call(self, mtype, meta=(), payload=(), expect=OK):
        send_frame(self.sock, mtype, meta, payload)
        return self._reply(expect)

    def configure(self, kv_cfg, n_heads):
        dt = 0 if kv_cfg.dtype == "float16" else 1
        self.call(CONFIGURE, (kv_cfg.n_layers, kv_cfg.n_kv_heads, n_heads, kv_cfg.head_dim, dt))

    def add(self, seq, capacity, K, V):
        """Allocate and ship prefilled K, V [n_layers, L, Hkv, D]: all frames out, then all replies."""
        send_frame(self.sock, ADD, (seq, capacity))
        for layer in range(K.shape[0]):
            send_frame(self.sock, FILL, (seq, layer, K.shape[1]), (np.ascontiguousarray(K[layer]), np.ascontiguousarray(V[layer])))
        errors = []
        for _ in range(K.shape[0] + 1):
            try:
                self._reply()
            except RuntimeError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def send_decode(self, layer, seqs, positions, q, k, v):
        S = len(seqs)
        send_frame(self.sock, DECODE, (layer, S), (np.asarray(seqs, np.uint64), np.asarray(positions, np.uint32),
                                                   np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v)))
        self.pending += 1

    def recv_out(self, shape):
        """o [S, Hq, D] float32 (a view valid until the next receive), kernel seconds."""
        self.pending -= 1
        (S, ns), payload = self._reply(OUT)
        (o,) = split_payload(payload, [(np.float32, shape)])
        return o, ns * 1e-9

    def stats(self):
        keys = ("sequences", "tokens", "bytes_used", "bytes_reserved", "bytes_free", "threads")
        return dict(zip(keys, self.call(STATS, expect=STATS_REPLY)[0]))

    def close(self):
        self.sock.close()


class RemoteBackend:
    """The R-Part as the engine sees it: workers (spawned here, or at worker_hosts), placement,
    and decode calls fanned out to the workers that hold a micro-batch's sequences."""

    def __init__(self, kv_cfg, n_heads, *, n_local=1, hosts=None, threads=None, secret=None, timeout=60.0):
        self.kv_cfg, self.n_heads, self.procs, self.clients = kv_cfg, n_heads, [], []
        self.r_busy, self.free, self.where = 0.0, [], {}   # kernel seconds; free bytes; seq -> worker
        try:
            if hosts:
                addrs = [h.rsplit(":", 1) for h in hosts]
            else:
                self.procs, addrs = spawn_workers(n_local, threads=threads, kv_mem=kv_cfg.mem_bytes)
            for host, port in addrs:
                c = WorkerClient(host, port, secret=secret, timeout=timeout)
                c.configure(kv_cfg, n_heads)
                self.clients.append(c)
                self.free.append(c.stats()["bytes_free"])
        except BaseException:
            self.close()
            raise

    def free_bytes(self):  # per worker; -1 for a lost one
        return list(self.free)

    def add(self, worker, seq, K, V, capacity):
        try:
            self.clients[worker].add(seq, capacity, K, V)
        except (ConnectionError, OSError, ProtocolError) as e:
            raise WorkerLost(worker, repr(e)) from e
        self.where[seq] = worker
        self.free[worker] -= capacity * self.kv_cfg.bytes_per_token

    def drop(self, seq):
        w = self.where.pop(seq)
        if self.free[w] >= 0:
            try:
                self.clients[w].call(DROP, (seq,))
            except (ConnectionError, OSError, ProtocolError) as e:
                raise WorkerLost(w, repr(e)) from e
            self.free[w] = self.clients[w].stats()["bytes_free"]

    def submit(self, layer, seqs, positions, q, k, v):
        """Send each worker its share of the micro-batch; returns a handle for collect()."""
        by_worker = {}
        for i, s in enumerate(seqs):
            by_worker.setdefault(self.where[s], []).append(i)
        handle = []
        for w, idx in by_worker.items():
            idx = np.asarray(idx)
            try:
                self.clients[w].send_decode(layer, [seqs[i] for i in idx], [positions[i] for i in idx], q[idx], k[idx], v[idx])
            except (ConnectionError, OSError) as e:
                raise WorkerLost(w, repr(e)) from e
            handle.append((w, idx))
        return handle, q.shape

    def collect(self, handle):
        """Wait for every worker's part of o; -> o [S, Hq, D] float32 in the order submitted."""
        parts, shape = handle
        out = np.empty(shape, dtype=np.float32)
        for w, idx in parts:
            try:
                o, secs = self.clients[w].recv_out((len(idx),) + shape[1:])
            except (ConnectionError, OSError, ProtocolError) as e:
                raise WorkerLost(w, repr(e)) from e
            out[idx] = o
            self.r_busy += secs
        return out

    def remove_worker(self, w):
        """Forget a lost worker; drain replies in flight on the others. -> workers still alive."""
        self.free[w] = -1
        self.clients[w].close()
        if w < len(self.procs):
            self.procs[w].kill()
        for s in [s for s, x in self.where.items() if x == w]:
            del self.where[s]
        for i, c in enumerate(self.clients):
            while self.free[i] >= 0 and c.pending > 0:  # replies to a step that will be redone
                c.pending -= 1
                try:
                    c.reader.read()
                except (ConnectionError, OSError, ProtocolError):
                    self.free[i], c.pending = -1, 0
        return sum(f >= 0 for f in self.free)

    def stats(self):
        return [c.stats() if self.free[i] >= 0 else None for i, c in enumerate(self.clients)]

    def close(self):
        """Shut down spawned workers (SHUTDOWN, then kill if they linger); close connections."""
        for i, c in enumerate(self.clients):
            if i < len(self.procs) and self.free[i] >= 0:
                try:
                    c.call(SHUTDOWN)
                except (ConnectionError, OSError, ProtocolError, RuntimeError):
                    pass
            c.close()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.clients, self.procs = [], []


# --- main ---


def main(argv=None):
    p = argparse.ArgumentParser(description="Run one FastDecode R-Part worker.")
    p.add_argument("--listen", default="127.0.0.1:7001", help="HOST:PORT to listen on (default 127.0.0.1:7001)")
    p.add_argument("--threads", type=int, default=None, help="attention threads (default: all cores)")
    p.add_argument("--kv-mem", default="8GiB", help="KV-cache memory budget, e.g. 8GiB")
    p.add_argument("--secret-file", help="file holding the shared secret (required beyond loopback)")
    p.add_argument("--max-frame", default="256MiB", help="largest accepted frame payload")
    a = p.parse_args(argv)
    import kvcache
    host, port = a.listen.rsplit(":", 1) if ":" in a.listen else ("127.0.0.1", a.listen)
    secret = open(a.secret_file, "rb").read().strip() if a.secret_file else None
    print(f"R-Part worker on {host}:{port}, kernel {kernel_info()}", flush=True)
    serve(host, int(port), threads=a.threads, kv_mem=kvcache.parse_size(a.kv_mem), secret=secret,
          max_frame=kvcache.parse_size(a.max_frame))


if __name__ == "__main__":
    sys.exit(main())
