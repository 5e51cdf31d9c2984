"""client.py - the engine's end of one worker: a connection with one verb per message, and
starting workers on this machine.

`WorkerClient` speaks wire.py's frames to one worker (rpart.py): configure, add, fill, decode
(send and receive apart, so the engine can work while the worker attends), drop, stats,
shutdown. backend.RemoteBackend holds one per worker; the benches and the performance model
use it directly to time a worker.

Local workers are started as `python rpart.py --listen 127.0.0.1:0`, exactly as a remote one
is, and report the port they bound on their first line of output. Nothing imports the user's
main module again (as multiprocessing's spawn would), so `LLM(...)` works from a plain script
without a `__main__` guard, and a worker that cannot start fails within seconds with its own
error text.

Legend: S sequences, Hq/Hkv heads, D head dim, L cached length.
"""
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import kvcache
import rpart
import wire

HERE = os.path.dirname(os.path.abspath(__file__))


class WorkerStartError(RuntimeError):
    """A local worker exited (or hung) before it listened; the message carries its own error."""


# --- one connection to one worker ---


class WorkerClient:
    """One connection to one worker, one method per request. send_decode and recv_out are
    apart so the engine can go on with S-Part work while the worker attends; `pending` counts
    the replies still to be received."""

    def __init__(self, host, port, *, secret=None, timeout=60.0, max_frame=wire.DEFAULT_MAX_FRAME):
        self.addr = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader, self.pending = wire.FrameReader(self.sock, max_frame), 0
        wire.answer_challenge(self.sock, self.reader, secret, self.addr)

    def _reply(self, expect=wire.OK):
        mtype, meta, payload = self.reader.read()
        if mtype == wire.ERROR:
            raise RuntimeError(f"worker {self.addr}: {bytes(payload).decode(errors='replace')}")
        if mtype != expect:
            raise wire.ProtocolError(f"{self.addr}: expected reply {expect}, got {mtype}")
        return meta, payload

    def call(self, mtype, meta=(), payload=(), expect=wire.OK):
        """Any request, raw: the verbs below are what the engine uses; tests fuzz with this."""
        wire.send_frame(self.sock, mtype, meta, payload)
        return self._reply(expect)

    def configure(self, kv_cfg, n_heads, q_dtype="float32"):
        """The model's shape and the store's dtype; q_dtype is what DECODE's q arrives in."""
        self.call(wire.CONFIGURE, (kv_cfg.n_layers, kv_cfg.n_kv_heads, n_heads, kv_cfg.head_dim,
                                   wire.KV_CODES[kv_cfg.dtype], wire.KV_CODES[q_dtype]))

    def add(self, seq, capacity):
        self.call(wire.ADD, (seq, capacity))

    def fill(self, seq, layer, K, V):
        """K, V [L, Hkv, D] of one layer, in the cache's row dtype (float16 for int8)."""
        self.call(wire.FILL, (seq, layer, K.shape[0]), (np.ascontiguousarray(K), np.ascontiguousarray(V)))

    def add_filled(self, seq, capacity, K, V):
        """add, then fill every layer of K, V [n_layers, L, Hkv, D]: all frames out first, then
        all replies, so the round trips overlap. Raises the first ERROR after reading them all."""
        wire.send_frame(self.sock, wire.ADD, (seq, capacity))
        for layer in range(K.shape[0]):
            wire.send_frame(self.sock, wire.FILL, (seq, layer, K.shape[1]),
                            (np.ascontiguousarray(K[layer]), np.ascontiguousarray(V[layer])))
        errors = []
        for _ in range(K.shape[0] + 1):
            try:
                self._reply()
            except RuntimeError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def send_decode(self, layer, seqs, positions, q, k, v):
        wire.send_frame(self.sock, wire.DECODE, (layer, len(seqs)),
                        (np.asarray(seqs, np.uint64), np.asarray(positions, np.uint32), np.ascontiguousarray(q),
                         np.ascontiguousarray(k), np.ascontiguousarray(v)))
        self.pending += 1

    def recv_out(self, shape):
        """o [S, Hq, D] float32 (a view valid until the next receive), kernel seconds."""
        self.pending -= 1
        (S, ns), payload = self._reply(wire.OUT)
        (o,) = wire.split_payload(payload, [(np.float32, shape)])
        return o, ns * 1e-9

    def drain(self):
        """Read and discard the replies still in flight (to a step that will be redone)."""
        while self.pending > 0:
            self.pending -= 1
            self.reader.read()

    def drop(self, seq):
        self.call(wire.DROP, (seq,))

    def stats(self):
        return dict(zip(wire.STATS_FIELDS, self.call(wire.STATS, expect=wire.STATS_REPLY)[0]))

    def shutdown(self):
        self.call(wire.SHUTDOWN)

    def close(self):
        self.sock.close()


# --- starting local workers ---


def build_kernel_in_background():
    """Build attn_cpu.so if it is missing or stale, and load it, on a thread -> the thread. The
    engine starts it before it loads the S-Part, so a fresh checkout compiles the kernel while
    the weights load (a compile takes 5-6 s here, making opt-1.3b's random S-Part 1-2 s). A
    failure is left for start_local_workers (or the in-process backend) to raise with its message."""
    def build():
        try:
            rpart.load_kernel()
        except (RuntimeError, OSError):
            pass
    thread = threading.Thread(target=build, name="build-kernel", daemon=True)
    thread.start()
    return thread


def start_local_workers(n, *, threads=None, kv_mem=kvcache.DEFAULT_KV_MEM, timeout=60.0):
    """Start n workers on loopback, each `python rpart.py --listen 127.0.0.1:0` -> (processes,
    [(host, port)]). They exit on SHUTDOWN or when this process is gone. A worker that exits
    before it listens raises WorkerStartError with its own error text."""
    try:
        rpart.load_kernel()  # build once here, not n times in parallel, and fail early if it cannot
    except (RuntimeError, OSError) as e:
        raise WorkerStartError(f"the attention kernel is not usable: {e}") from e
    procs = []
    try:
        for _ in range(n):
            cmd = [sys.executable, os.path.join(HERE, "rpart.py"), "--listen", "127.0.0.1:0",
                   "--kv-mem", str(kv_mem), "--parent-pid", str(os.getpid())]
            cmd += ["--threads", str(threads)] if threads else []
            err = tempfile.TemporaryFile()  # read only if it fails: a pipe nobody reads could fill up
            # its own session: a Ctrl-C in the terminal reaches the engine, which shuts it down
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True, cwd=HERE))
            procs[-1].err_file = err
        return procs, [_wait_listening(p, timeout) for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
            p.err_file.close()
        raise


def _wait_listening(proc, timeout):
    """The (host, port) from the worker's 'listening on HOST:PORT' line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline().decode(errors="replace")
            if " listening on " in line:
                host, port = line.split(" listening on ", 1)[1].split(",", 1)[0].rsplit(":", 1)
                return host, int(port)
        if proc.poll() is not None:
            proc.err_file.seek(0)
            err = proc.err_file.read().decode(errors="replace").strip()
            raise WorkerStartError(f"local R-Part worker exited with code {proc.returncode} before listening: "
                               f"{err[-2000:] or 'no output'}")
    raise WorkerStartError(f"local R-Part worker did not listen within {timeout:.0f} s")
