"""R-Part workers over sockets: equality with the in-process loop, fuzzing, secrets, faults."""
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import backend
import fastdecode
import kvcache
import rpart
import wire

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[2, 17, 45, 99, 3, 200, 7], [2, 80], [2, 5, 6, 7, 8, 9, 10, 11], [2, 9, 9], [2, 31, 41, 59, 26]]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("pipeline", [True, False])
def test_tokens_through_workers_equal_in_process(checkpoint, workers, pipeline):
    d, _ = checkpoint("llama-gqa")
    with fastdecode.LLM(d, workers=0, quiet=True) as ref:
        want = [o.token_ids for o in ref.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]
    with fastdecode.LLM(d, workers=workers, pipeline=pipeline, quiet=True) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]
        if workers == 2:
            stats = llm.backend.stats()
            assert all(st["sequences"] == 0 for st in stats), "finished sequences are dropped"
            assert all(st["bytes_spare"] > 0 for st in stats), "and their memory is kept for the next ones"
    assert got == want


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16", "int8"])
def test_attend_step_is_write_batch_then_the_kernel_on_views(dtype):
    """attend_step's one C call (fd_decode_step) against the long way on a twin store: NumPy's
    write_batch (its own int8 rounding), then decode_attention on views it checks one by one. The
    stores must end up the same bit for bit (rows, scales, rows written) and the outputs equal, for
    every layer, ragged lengths included; then bad steps fail as write_batch's do and change nothing."""
    cfg = kvcache.KVConfig(3, 2, 16, dtype, 2**22)
    fused, slow, rng = kvcache.KVCache(cfg, write_int8=rpart.store_int8), kvcache.KVCache(cfg), np.random.default_rng(1)
    lens = {4: 5, 9: 1, 2: 12}
    for s, L in lens.items():
        for layer in range(3):
            K, V = (rng.standard_normal((L, 2, 16)).astype(cfg.row_dtype) for _ in "KV")
            for c in (fused, slow):
                if layer == 0:
                    c.allocate(s, L + 3)
                c.fill(s, layer, K, V)
    seqs = list(lens)
    for layer in range(3):
        k, v = (rng.standard_normal((3, 2, 16)).astype(cfg.row_dtype) for _ in "kv")
        q = rng.standard_normal((3, 6, 16)).astype(np.float32)
        got = rpart.attend_step(fused, layer, seqs, [lens[s] for s in seqs], q, k, v)
        slow.write_batch(layer, seqs, [lens[s] for s in seqs], k, v)
        views = [slow.views(s, layer, lens[s] + 1) for s in seqs]
        scales = {}
        if dtype == "int8":
            sv = [slow.scale_views(s, layer, lens[s] + 1) for s in seqs]
            scales = {"key_scales": [a for a, _ in sv], "value_scales": [b for _, b in sv]}
        assert np.array_equal(got, rpart.decode_attention(q, [a for a, _ in views], [b for _, b in views], **scales))
    for s in seqs:                               # the rows written (the rest is memory never written)
        assert np.array_equal(fused.lengths[s], slow.lengths[s])
        for layer, n in enumerate(slow.lengths[s]):
            for kv in (0, 1):
                assert np.array_equal(fused.blocks[s][kv, layer, :n].view(np.uint8),
                                      slow.blocks[s][kv, layer, :n].view(np.uint8)), f"sequence {s}: rows differ"
                if dtype == "int8":
                    assert np.array_equal(fused.scales[s][kv, layer, :n].view(np.uint16),
                                          slow.scales[s][kv, layer, :n].view(np.uint16))
    fused.allocate(7, 4)                          # full: 4 rows of 4
    fused.fill(7, 0, *(rng.standard_normal((2, 4, 2, 16)).astype(cfg.row_dtype)))
    before = {s: fused.blocks[s].view(np.uint8).copy() for s in seqs}   # as bytes: unwritten memory may hold NaNs
    bad_steps = [(ValueError, "q: expected", 0, seqs, [6, 2, 13], q[:, :, :8], k),       # wrong head dim
                 (ValueError, "k, v: expected", 0, seqs, [6, 2, 13], q, k[:2]),
                 (ValueError, "layer 3 out of range", 3, seqs, [6, 2, 13], q, k),
                 (KeyError, "unknown sequence 5", 0, [4, 5, 2], [6, 0, 13], q, k),
                 (ValueError, "sequence 9 layer 1: position 3 but 2 rows written", 1, seqs, [6, 3, 13], q, k),  # a hole
                 (kvcache.KVCacheFull, "sequence 7: position 4 exceeds capacity 4", 0, [4, 7], [6, 4], q[:2], k[:2])]
    for exc, match, layer, ids, pos, q_, k_ in bad_steps:
        with pytest.raises(exc, match=match):
            rpart.attend_step(fused, layer, ids, pos, q_, k_, k_)
    assert all(np.array_equal(fused.blocks[s].view(np.uint8), before[s]) for s in seqs), "a bad step wrote rows"
    assert all(np.array_equal(fused.lengths[s], slow.lengths[s]) for s in seqs), "a bad step moved a length"


@pytest.mark.parametrize("q_dtype", ["bfloat16", "float16"])
def test_attend_step_widens_a_16_bit_q_exactly(q_dtype):
    """q arrives in the S-Part's dtype (wire.py); the C step widens it. The same q handed over
    already widened to float32 must give the same output, bit for bit."""
    cfg = kvcache.KVConfig(2, 2, 16, "bfloat16", 2**22)
    rng, stores = np.random.default_rng(4), [kvcache.KVCache(cfg), kvcache.KVCache(cfg)]
    K = rng.standard_normal((2, 9, 2, 16)).astype(kvcache.BFLOAT16)
    for c in stores:
        c.allocate(3, 12)
        c.fill(3, 1, K[0], K[1])
    q = (rng.standard_normal((1, 4, 16)) * 3).astype(q_dtype)
    k, v = (rng.standard_normal((1, 2, 16)).astype(kvcache.BFLOAT16) for _ in "kv")
    narrow = rpart.attend_step(stores[0], 1, [3], [9], q, k, v)
    wide = rpart.attend_step(stores[1], 1, [3], [9], q.astype(np.float32), k, v)
    assert np.array_equal(narrow, wide)


def test_freed_memory_is_reused_within_the_budget():
    """A freed sequence's buffer serves the next one that fits in it (at most 1/8 larger), so its
    pages are not faulted in again, and shows nothing of what it held; spares are let go, oldest
    first, when new memory must fit in the budget beside them."""
    cfg = kvcache.KVConfig(2, 2, 16, "int8")
    cfg = dataclasses.replace(cfg, mem_bytes=200 * cfg.bytes_per_token)
    rng, cache = np.random.default_rng(3), kvcache.KVCache(cfg)
    junk = rng.standard_normal((100, 2, 16)).astype(np.float16) * 50
    cache.allocate(1, 100)
    cache.fill(1, 0, junk, junk)
    first = cache.where[1][0]
    cache.free(1)
    assert cache.stats()["bytes_spare"] == 100 * cfg.bytes_per_token and cache.stats()["bytes_reserved"] == 0
    q, k, v = (rng.standard_normal(shape).astype(dt) for shape, dt in
               (((1, 4, 16), np.float32), ((1, 2, 16), np.float16), ((1, 2, 16), np.float16)))
    K3, V3 = (rng.standard_normal((3, 2, 16)).astype(np.float16) for _ in "KV")
    outs = []
    for c in (cache, kvcache.KVCache(cfg)):        # reused memory, then new memory
        c.allocate(2, 95)
        c.fill(2, 0, K3, V3)
        outs.append(rpart.attend_step(c, 0, [2], [3], q, k, v))
    assert cache.where[2][0] == first and cache.stats()["bytes_spare"] == 0
    assert np.array_equal(*outs), "a reused buffer's old rows leaked into attention"
    cache.free(2)
    cache.allocate(3, 50)                           # half the spare's size: new memory, the spare kept
    assert cache.where[3][0] != first and cache.stats()["bytes_spare"] == 100 * cfg.bytes_per_token
    cache.allocate(4, 150)                          # no spare fits, and 100 + 50 + 150 > 200: let go
    assert cache.stats()["bytes_spare"] == 0 and cache.held == cfg.mem_bytes


# --- a worker under fuzz ---


def valid_client(addr, kv):
    c = backend.WorkerClient(*addr, timeout=10)
    c.configure(kv, 4)
    return c


KV = kvcache.KVConfig(n_layers=2, n_kv_heads=2, head_dim=16, dtype="float16", mem_bytes=2**26)
KV8 = kvcache.KVConfig(n_layers=2, n_kv_heads=2, head_dim=16, dtype="int8", mem_bytes=2**26)  # float16 travels


def decode_payload(S, ids=None, pos=None, hq=4, hkv=2, d=16, kdt=np.float16):
    ids = np.arange(S, dtype=np.uint64) if ids is None else np.asarray(ids, np.uint64)
    pos = np.zeros(S, np.uint32) if pos is None else np.asarray(pos, np.uint32)
    return [ids, pos, np.ones((S, hq, d), np.float32), np.ones((S, hkv, d), kdt), np.ones((S, hkv, d), kdt)]


def malformed_requests(rng):
    """(type, meta, payload) that are well framed but wrong: each must get an ERROR reply."""
    yield wire.DECODE, (0, 1), decode_payload(1, ids=[999])                   # unknown sequence
    yield wire.DECODE, (0, 2), decode_payload(2, ids=[7, 7])                  # duplicate ids
    yield wire.DECODE, (5, 1), decode_payload(1, ids=[7])                     # layer out of range
    yield wire.DECODE, (0, 1), decode_payload(1, ids=[7], pos=[10_000])       # past capacity
    yield wire.DECODE, (0, 1), decode_payload(1, ids=[7], hq=3)               # wrong shape
    yield wire.DECODE, (0, 1), decode_payload(1, ids=[7], kdt=np.float32)     # wrong dtype
    yield wire.DECODE, (0, 3), decode_payload(1, ids=[7])                     # S disagrees with payload
    yield wire.DECODE, (0, 0), []                                             # empty batch
    yield wire.ADD, (7, 10), []                                               # duplicate sequence
    yield wire.ADD, (8, 10**9), []                                            # capacity exceeded
    yield wire.FILL, (7, 0, 20), [np.ones((20, 2, 16), np.float16)] * 2       # more than capacity
    yield wire.FILL, (7, 0, 3), [np.ones((3, 2, 16), np.float16)]             # V missing
    yield wire.DROP, (12345,), []                                             # unknown sequence
    yield wire.CONFIGURE, (2, 3, 4, 16, 0, 1), []                             # Hq % Hkv
    yield wire.CONFIGURE, (2, 2, 4, 12, 0, 1), []                             # D % 8
    yield wire.CONFIGURE, (2, 2, 4, 16, 9, 1), []                             # dtype code
    yield wire.CONFIGURE, (2, 2, 4, 16, 0, 2), []                             # an int8 q
    yield wire.CONFIGURE, (2, 2, 4, 16, 0, 7), []                             # no such q dtype
    yield wire.FILL, (7, 0, 3), [np.ones((3, 2, 16), np.int8)] * 2            # int8 rows: only float16 travels
    yield wire.OK, (), [rng.bytes(int(rng.integers(0, 64)))]                  # not a request


def raw_connect(addr):
    s = socket.create_connection(addr, timeout=5)
    hello = s.recv(wire.HEADER.size + wire.META[wire.HELLO].size)
    assert hello[:4] == wire.MAGIC
    return s


@pytest.mark.parametrize("kv", [KV, KV8], ids=["float16", "int8"])
def test_fuzz_2000_malformed_frames_then_serves_correctly(worker, kv):
    proc, addr = worker
    rng = np.random.default_rng()
    c = valid_client(addr, kv)
    c.call(wire.ADD, (7, 12))
    sent = errors = closed = 0
    for rnd in range(125):
        for mtype, meta, payload in malformed_requests(rng):   # framed: ERROR and the connection lives on
            with pytest.raises(RuntimeError, match="worker"):
                c.call(mtype, meta, payload)
            sent, errors = sent + 1, errors + 1
        s = raw_connect(addr)
        wire.send_frame(s, wire.AUTH, (bytes(32),))
        kind = rnd % 5
        if kind == 0:
            s.sendall(rng.bytes(int(rng.integers(1, 4096))))                    # random bytes
        elif kind == 1:
            s.sendall(wire.HEADER.pack(wire.MAGIC, 1, wire.DECODE, 0, 8, 100)[:int(rng.integers(1, 19))])  # truncated
        elif kind == 2:
            s.sendall(wire.HEADER.pack(b"XXXX", 1, wire.STATS, 0, 0, 0))       # wrong magic
        elif kind == 3:
            s.sendall(wire.HEADER.pack(wire.MAGIC, 99, wire.STATS, 0, 0, 0))  # wrong version
        else:
            s.sendall(wire.HEADER.pack(wire.MAGIC, 1, wire.FILL, 0, 16, 2**40))  # oversize
        try:
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            data = s.recv(1 << 16)
        except OSError:  # already closed or reset by the worker
            data = b""
        s.close()
        # the worker closes the connection, or answers an ERROR frame first (random bytes that
        # happened to form a valid header); never anything else
        assert data == b"" or (data[:4] == wire.MAGIC and data[5] == wire.ERROR), data[:32]
        sent, closed = sent + 1, closed + 1
    assert sent >= 2000, sent
    assert proc.poll() is None, "the worker died"
    check_valid_decode(addr, kv)


def check_valid_decode(addr, kv=KV):
    """A fresh client gets correct attention from the worker after all that (an int8 worker:
    against the reference on the rows as it quantized them)."""
    c = valid_client(addr, kv)
    rng = np.random.default_rng(1)
    K, V = (rng.standard_normal((2, 5, 2, 16)).astype(np.float16) for _ in range(2))
    c.add_filled(100, 8, K, V)
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 16)).astype(np.float16) for _ in range(2))
    c.send_decode(1, [100], [5], q, k, v)
    o, _ = c.recv_out((1, 4, 16))
    Kc, Vc = np.concatenate([K[1], k]), np.concatenate([V[1], v])
    if kv.quantized:
        (Kc, ks), (Vc, vs) = kvcache.quantize_int8(Kc), kvcache.quantize_int8(Vc)
        want = rpart.reference_attention(q, [Kc], [Vc], key_scales=[ks], value_scales=[vs])
    else:
        want = rpart.reference_attention(q, [Kc], [Vc])
    assert np.abs(o - want).max() < (2e-2 if kv.quantized else 2e-3)  # int8: q rounded per head (test_kernel)
    c.call(wire.DROP, (100,))


# --- secrets and binding ---


def run_worker_cli(*args):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "rpart.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listening_beyond_loopback_without_secret_is_refused():
    p = run_worker_cli("--listen", "0.0.0.0:0")
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "shared secret" in err


def test_an_empty_or_missing_secret_file_is_refused(tmp_path):
    """An empty file would be a secret anyone knows; a missing one a typo. Both stop the worker
    with the file named, before it listens."""
    (tmp_path / "empty").write_text("  \n")
    for path, says in ((tmp_path / "empty", "is empty"), (tmp_path / "missing", "No such file")):
        p = run_worker_cli("--listen", "0.0.0.0:0", "--secret-file", str(path))
        out, err = p.communicate(timeout=60)
        assert p.returncode == 2 and says in err and str(path) in err, err


def test_wrong_secret_is_refused_right_one_works(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple")
    port = free_port()
    p = run_worker_cli("--listen", f"127.0.0.1:{port}", "--secret-file", str(secret), "--kv-mem", "64MiB")
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with pytest.raises(PermissionError):
            backend.WorkerClient("127.0.0.1", port, timeout=5)
        bad = backend.WorkerClient("127.0.0.1", port, secret=b"wrong", timeout=5)
        with pytest.raises((RuntimeError, ConnectionError)):
            bad.configure(KV, 4)
        good = backend.WorkerClient("127.0.0.1", port, secret=b"correct horse battery staple", timeout=5)
        good.configure(KV, 4)
        assert good.stats()["sequences"] == 0
        good.call(wire.SHUTDOWN)
        p.wait(timeout=10)
    finally:
        p.kill()
        p.communicate()


# --- faults ---


def kill_when(llm, worker, after_tokens):
    def run():
        while llm.stats.decode_tokens < after_tokens:
            time.sleep(0.001)
        os.kill(llm.backend.procs[worker].pid, signal.SIGKILL)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigkill_mid_generation_loses_no_token(checkpoint):
    """float32 S-Part and KV: a re-prefilled sequence's K/V then agree with the ones its decode
    steps wrote to ~1e-7, so the tokens must be those of a run without the failure (in bf16, or
    rounded to fp16 KV, the two computations can differ in a last bit and flip a near-tie)."""
    d, _ = checkpoint("opt-preln")
    prompts = PROMPTS * 2
    with fastdecode.LLM(d, workers=0, dtype="float32", kv_dtype="float32", quiet=True) as ref:
        want = [o.token_ids for o in ref.generate(prompts, max_new_tokens=40, ignore_eos=True)]
    with fastdecode.LLM(d, workers=2, dtype="float32", kv_dtype="float32", quiet=True) as llm:
        procs = list(llm.backend.procs)
        t = kill_when(llm, 0, 60)
        start = time.time()
        got = [o.token_ids for o in llm.generate(prompts, max_new_tokens=40, ignore_eos=True)]
        t.join(1)
        assert time.time() - start < 60
        assert 0 not in llm.backend.alive, "the kill happened during generation"
    assert got == want
    time.sleep(0.5)
    assert not any(p.poll() is None for p in procs), "a worker process was left behind"


def test_no_survivor_is_a_clear_error(checkpoint):
    d, _ = checkpoint("opt-preln")
    with fastdecode.LLM(d, workers=1, quiet=True) as llm:
        kill_when(llm, 0, 5)
        with pytest.raises(RuntimeError, match="no worker survives"):
            llm.generate(PROMPTS, max_new_tokens=200, ignore_eos=True)


def test_full_kv_cache_is_refused_at_admission(checkpoint):
    d, _ = checkpoint("opt-preln")
    with fastdecode.LLM(d, workers=1, kv_mem="100KB", quiet=True) as llm:
        with pytest.raises(MemoryError, match="fit on no worker"):
            llm.generate([[2] * 100], max_new_tokens=100)
        # small requests still run, one at a time as the budget allows
        out = llm.generate([[2, 3]] * 3, max_new_tokens=4, ignore_eos=True)
        assert all(len(o.token_ids) == 4 for o in out)


# --- several hosts: a worker in its own network namespace ---


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: host side 10.213.x.1, namespace
    side 10.213.x.2. Yields (namespace name, its address); removes both afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (ip netns + veth)")
    ns, sub = f"fdtest{os.getpid()}", os.getpid() % 250 + 1
    host_if, ns_if = f"fdh{os.getpid()}"[:15], f"fdn{os.getpid()}"[:15]
    try:
        sh("ip", "netns", "add", ns)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"10.213.{sub}.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.213.{sub}.2/24", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, f"10.213.{sub}.2"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes the veth pair with it
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_worker_on_another_host_in_a_network_namespace(checkpoint, netns, tmp_path):
    ns, addr = netns
    d, _ = checkpoint("llama-gqa")
    secret = tmp_path / "secret"
    secret.write_text("namespace secret")
    # the namespace's worker must refuse to start without a secret: 10.213.x.2 is not loopback
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "rpart.py"),
                        "--listen", f"{addr}:7001"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "shared secret" in p.stderr
    w = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "rpart.py"),
                          "--listen", f"{addr}:7001", "--secret-file", str(secret), "--threads", "1",
                          "--kv-mem", "64MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                socket.create_connection((addr, 7001), timeout=1).close()
                break
            except OSError:
                assert w.poll() is None, w.communicate()
                time.sleep(0.1)
        with pytest.raises(PermissionError):  # reachable from here, but not without the secret
            backend.WorkerClient(addr, 7001, timeout=5)
        with fastdecode.LLM(d, workers=0, quiet=True) as ref:
            want = [o.token_ids for o in ref.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)]
        with fastdecode.LLM(d, worker_hosts=[f"{addr}:7001"], secret=b"namespace secret", quiet=True) as llm:
            assert llm.backend.clients[0].addr == f"{addr}:7001"
            got = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)]
            assert llm.backend.stats()[0]["sequences"] == 0
        assert got == want
    finally:
        w.kill()
        w.communicate()
