"""backend.py - the R-Part as the engine sees it: one interface, two backends.

The engine (fastdecode.py) never talks to a KV store or a socket itself. It asks a backend,
which answers the same questions whether the KV lives in this process or on workers:

    add(seq, K, V, capacity)      place a prefilled sequence (K, V [n_layers, L, Hkv, D]) and
                                  reserve KV room for `capacity` tokens; -> the worker chosen
    drop(seq)                     forget a finished sequence and free its KV
    submit(layer, seqs, positions, q, k, v) -> Pending
                                  hand one micro-batch's q [S, Hq, D], k, v [S, Hkv, D] to
                                  the R-Part of `layer`; returns at once for workers
    collect(pending) -> o         wait for that micro-batch's o [S, Hq, D] float32
    can_place(capacities)         could sequences of these capacities all be placed now?
    budgets()                     each worker's whole KV budget in bytes (what fits when empty)
    holds(seq), worker_of(seq), alive (a set of workers), free_bytes(), kv_usage(),
    stats(), r_busy (kernel seconds), close()

`LocalBackend` keeps one KVCache here and attends at submit (the reference loop, workers=0).
`RemoteBackend` reaches workers through `WorkerClient`s (client.py: one verb per message),
places each sequence on the worker with the most free KV memory, fans a micro-batch out to
the workers holding its sequences, and turns a dead worker into `WorkerLost`: the engine then
calls `remove_worker`, which returns the sequences to re-prefill on the survivors. The backend
is the one owner of where each sequence lives and which workers are alive.

Local workers are started by client.start_local_workers, exactly as a remote one is started.

Legend: S sequences in a micro-batch, Hq/Hkv heads, D head dim, L cached length.
"""
import dataclasses
import os
import subprocess
import time

import numpy as np

import kvcache
import rpart
import scheduler as sched
import wire
from client import (WorkerClient, WorkerStartError, build_kernel_in_background,  # noqa: F401  (part of this API)
                    start_local_workers)

NETWORK_ERRORS = (ConnectionError, OSError, wire.ProtocolError)  # the worker is gone or unreadable


def short_openmp_spin():
    """libgomp's threads spin for milliseconds after each parallel region; where the S-Part
    (torch, same libgomp) and local workers share cores, that steals the other side's time.
    Spin briefly instead: long enough to bridge the gaps between one layer's torch calls (a
    thread that has gone to sleep costs a wake-up, tens of us on this VM, at every matmul), short
    enough to stop during the wait for a worker. 5000 against 1000: SmolLM2 batch-1 step 31-37
    ms against 35-42, opt-125m batch-16 decode 431-458 tok/s against 364-485 (median 441 vs 395).
    Call before torch loads; local workers inherit it; the user's OMP_* / GOMP_* settings win."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "5000")


class WorkerLost(Exception):
    """A worker stopped answering (dead, reset, or past the timeout)."""

    def __init__(self, worker, why):
        super().__init__(f"worker {worker}: {why}")
        self.worker = worker


@dataclasses.dataclass
class Pending:
    """One micro-batch's attention in flight, as submit() returns it for collect()."""
    shape: tuple                # (S, Hq, D) of o
    parts: list                 # [(worker, rows)]: rows (an index array [S_w], or all) each worker answers
    o: np.ndarray = None        # [S, Hq, D] float32, already computed (LocalBackend)

    @property
    def workers(self):
        return [w for w, _ in self.parts]


# --- in process: the reference the workers are tested against ---


class LocalBackend:
    """The R-Part in this process: one KVCache, attention run synchronously at submit."""

    def __init__(self, kv_cfg, threads=None):
        self.cache, self.threads, self.r_busy = kvcache.KVCache(kv_cfg, write_int8=rpart.store_int8), threads, 0.0
        self.alive = {0}

    def can_place(self, capacities):
        return self.cache.can_allocate(sum(capacities))

    def budgets(self):
        return [self.cache.cfg.mem_bytes]

    def free_bytes(self):
        return [self.cache.free_bytes()]

    def kv_usage(self):
        return [1 - self.cache.free_bytes() / self.cache.cfg.mem_bytes]

    def holds(self, seq):
        return seq in self.cache.blocks

    def worker_of(self, seq):
        return 0

    def add(self, seq, K, V, capacity):
        self.cache.allocate(seq, capacity)
        for layer in range(K.shape[0]):
            self.cache.fill(seq, layer, K[layer], V[layer])
        return 0

    def drop(self, seq):
        self.cache.free(seq)

    def submit(self, layer, seqs, positions, q, k, v):
        t = time.perf_counter()
        o = rpart.attend_step(self.cache, layer, seqs, positions, q, k, v, num_threads=self.threads)
        self.r_busy += time.perf_counter() - t
        return Pending(o.shape, [(0, np.arange(len(seqs)))], o)

    def collect(self, pending):
        return pending.o

    def stats(self):
        return [self.cache.stats()]

    def close(self):
        pass


# --- workers, as one R-Part ---


class RemoteBackend:
    """The R-Part on workers: started here (n_local) or already running (hosts "h:p")."""

    def __init__(self, kv_cfg, n_heads, *, q_dtype="float32", n_local=1, hosts=None, threads=None, secret=None,
                 timeout=60.0):
        self.kv_cfg, self.n_heads, self.procs, self.clients = kv_cfg, n_heads, [], []
        self.r_busy = 0.0          # kernel seconds, summed over workers
        self.free = []             # per worker: KV bytes not yet promised to a sequence
        self.budget = []           # per worker: its whole KV budget
        self.where = {}            # seq id -> worker: the one record of where a sequence lives
        self.alive = set()         # workers still answering
        try:
            if hosts:
                addrs = [h.rsplit(":", 1) for h in hosts]
            else:
                self.procs, addrs = start_local_workers(n_local, threads=threads, kv_mem=kv_cfg.mem_bytes)
            for w, (host, port) in enumerate(addrs):
                c = WorkerClient(host, port, secret=secret, timeout=timeout)
                self.clients.append(c)
                c.configure(kv_cfg, n_heads, q_dtype)
                st = c.stats()
                self.free.append(st["bytes_free"])
                self.budget.append(st["bytes_free"] + st["bytes_reserved"])
                self.alive.add(w)
        except BaseException:
            self.close()
            raise

    def _lost(self, w, e):
        return WorkerLost(w, repr(e))

    def can_place(self, capacities):
        """Place them one after another, as add() would, on a copy of the free bytes."""
        free = self.free_bytes()
        for cap in capacities:
            w = sched.place(free, cap * self.kv_cfg.bytes_per_token)
            if w < 0:
                return False
            free[w] -= cap * self.kv_cfg.bytes_per_token
        return True

    def _place(self, capacity):
        """The live worker with the most free KV bytes that can hold `capacity` tokens, or -1."""
        return sched.place(self.free_bytes(), capacity * self.kv_cfg.bytes_per_token)

    def budgets(self):
        return [self.budget[w] if w in self.alive else 0 for w in range(len(self.clients))]

    def free_bytes(self):  # per worker; 0 for a lost one
        return [self.free[w] if w in self.alive else 0 for w in range(len(self.clients))]

    def kv_usage(self):  # per worker, the fraction of its budget promised to sequences; 0 for a lost one
        return [1 - self.free[w] / self.budget[w] if w in self.alive else 0.0 for w in range(len(self.clients))]

    def holds(self, seq):
        return seq in self.where

    def worker_of(self, seq):
        return self.where[seq]

    def add(self, seq, K, V, capacity):
        w = self._place(capacity)
        if w < 0:
            raise kvcache.KVCacheFull(f"sequence {seq}: no worker has room for {capacity} tokens")
        try:
            self.clients[w].add_filled(seq, capacity, K, V)
        except NETWORK_ERRORS as e:
            raise self._lost(w, e) from e
        self.where[seq] = w
        self.free[w] -= capacity * self.kv_cfg.bytes_per_token
        return w

    def drop(self, seq):
        w = self.where.pop(seq)
        if w in self.alive:
            try:
                self.clients[w].drop(seq)
                self.free[w] = self.clients[w].stats()["bytes_free"]
            except NETWORK_ERRORS as e:
                raise self._lost(w, e) from e

    def submit(self, layer, seqs, positions, q, k, v):
        """Send each worker its share of the micro-batch; returns at once."""
        by_worker = {}
        for i, s in enumerate(seqs):
            by_worker.setdefault(self.where[s], []).append(i)
        if len(by_worker) == 1:  # one worker holds them all: send the arrays as they are, no gather
            by_worker = {w: None for w in by_worker}
        parts = []
        for w, idx in by_worker.items():
            sel = slice(None) if idx is None else np.asarray(idx)
            try:
                self.clients[w].send_decode(layer, seqs if idx is None else [seqs[i] for i in idx],
                                            positions if idx is None else [positions[i] for i in idx],
                                            q[sel], k[sel], v[sel])
            except NETWORK_ERRORS as e:
                raise self._lost(w, e) from e
            parts.append((w, sel))
        return Pending(q.shape, parts)

    def collect(self, pending):
        """Wait for every worker's part of o -> o [S, Hq, D] float32 in the order submitted."""
        out = np.empty(pending.shape, dtype=np.float32)
        for w, sel in pending.parts:
            try:
                o, secs = self.clients[w].recv_out(out[sel].shape)
            except NETWORK_ERRORS as e:
                raise self._lost(w, e) from e
            out[sel] = o  # a copy: o is a view of the connection's receive buffer
            self.r_busy += secs
        return out

    def remove_worker(self, w):
        """Forget a lost worker and drain the replies in flight on the others (their step will
        be redone) -> the sequences it held, to be re-prefilled on the survivors."""
        self.alive.discard(w)
        self.clients[w].close()
        if w < len(self.procs):
            self.procs[w].kill()
        lost = sorted(s for s, x in self.where.items() if x == w)
        for s in lost:
            del self.where[s]
        for i in sorted(self.alive):
            try:
                self.clients[i].drain()
            except NETWORK_ERRORS:  # dead too: closed, so that its next call raises WorkerLost
                self.clients[i].close()
                self.clients[i].pending = 0
        return lost

    def stats(self):
        return [self.clients[w].stats() if w in self.alive else None for w in range(len(self.clients))]

    def close(self):
        """Shut down the workers started here (SHUTDOWN, then kill if they linger); close connections."""
        for w, c in enumerate(self.clients):
            if w < len(self.procs) and w in self.alive:
                try:
                    c.shutdown()
                except (*NETWORK_ERRORS, RuntimeError):
                    pass
            c.close()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            p.stdout.close()
            p.err_file.close()
        self.clients, self.procs, self.alive = [], [], set()
