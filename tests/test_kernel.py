"""Per-op numerics of attn_cpu.c through rpart.decode_attention, against a float64 reference.

Fresh random data every run (the seed is printed on failure), outputs poisoned with NaN first.
Error is measured per (sequence, head) row: max|out - ref| / max|ref|. int8 KV is checked
against a bound derived from its quantization (see "int8 KV" below), bfloat16 KV against the bound
its rounding of q and p implies, on every build of the kernel this CPU can run: native (AVX-512
with VNNI and BF16 here), AVX-512 without either, AVX2, plain C.
"""
import os
import subprocess

import numpy as np
import pytest

import kvcache
import rpart

SEED = np.random.SeedSequence().entropy
HEADS = [(1, 1), (32, 32), (8, 1), (32, 8)]  # Hq:Hkv = MHA small, MHA, MQA, GQA


def rng_for(*key):
    return np.random.default_rng([SEED % 2**63, *key])


def make_batch(rng, S, lens, Hq, Hkv, D, dtype, q_scale=1.0):
    q = (q_scale * rng.standard_normal((S, Hq, D))).astype(np.float32)
    K = [rng.standard_normal((L, Hkv, D), dtype=np.float32).astype(dtype) for L in lens]
    V = [rng.standard_normal((L, Hkv, D), dtype=np.float32).astype(dtype) for L in lens]
    return q, K, V


def row_error(out, ref):
    """max over rows of max|out-ref| / max|ref|, and where the worst element is."""
    err = np.abs(out - ref) / np.abs(ref).max(axis=2, keepdims=True)
    return err.max(), np.unravel_index(np.argmax(err), err.shape)


def check(q, K, V, threads, tol, **kw):
    out = np.full(q.shape, np.nan, dtype=np.float32)  # poisoned: every element must be written
    rpart.decode_attention(q, K, V, num_threads=threads, out=out, **kw)
    ref = rpart.reference_attention(q, K, V, **kw)
    assert np.isfinite(out).all(), "non-finite output"
    err, where = row_error(out, ref)
    assert err <= tol, f"seed {SEED}: error {err:.2e} > {tol:.0e} at {where}: {out[where]} vs {ref[where]}"


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float16, 2e-3)])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("threads", [1, 2])
def test_ragged_batch_matches_reference(dtype, tol, D, heads, threads):
    Hq, Hkv = heads
    rng = rng_for(D, Hq, Hkv, threads, np.dtype(dtype).itemsize)
    S = int(rng.integers(1, 65))
    lens = rng.integers(1, 5001, S)
    while S > 1 and lens.sum() * Hkv * D > 1.5e7:  # keep the float64 reference quick
        S -= 1
        lens = lens[:S]
    check(*make_batch(rng, S, lens, Hq, Hkv, D, dtype), threads, tol)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float16, 2e-3)])
@pytest.mark.parametrize("heads,D", [((25, 25), 64), ((12, 4), 72), ((6, 3), 8), ((16, 2), 200),
                                     ((4, 4), 256), ((2, 1), 40), ((9, 3), 64), ((14, 2), 64), ((12, 2), 64),
                                     ((10, 2), 64), ((13, 1), 32)])  # G 7, 5, 13: padded groups
def test_other_head_layouts_and_dims(dtype, tol, heads, D):
    """The kernel's other paths: an odd head count (the last head alone), GQA groups of 3, 6, 7
    and 2, head counts that are not a multiple of 16 (the flat softmax, and above 16 pattern vectors
    for 25 heads the row-wise one), head sizes that are not a multiple of 16 (masked vectors) and
    above 128 (two passes)."""
    Hq, Hkv = heads
    rng = rng_for(D, Hq, Hkv, 3, np.dtype(dtype).itemsize)
    lens = rng.integers(1, 600, 7)
    check(*make_batch(rng, 7, lens, Hq, Hkv, D, dtype), 2, tol)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-4), (np.float16, 2e-3)])
def test_one_long_sequence_split_across_threads(dtype, tol):
    rng = rng_for(5000)
    check(*make_batch(rng, 1, [5000], 32, 8, 128, dtype), 2, tol)


def test_batch_of_64_short_and_length_one():
    rng = rng_for(64)
    lens = rng.integers(1, 40, 64)
    lens[:8] = 1
    check(*make_batch(rng, 64, lens, 32, 32, 64, np.float16), 2, 2e-3)


def test_large_scores_stay_finite_and_correct():
    # |scores| ~ 1e3: a naive exp overflows. fp32 rounds such a score by ~1e3 * 6e-8 * sqrt(D),
    # which moves the softmax weights by up to ~1e-3 relative: that is the bound here.
    rng = rng_for(1000)
    q, K, V = make_batch(rng, 4, [700, 1, 300, 2000], 8, 8, 64, np.float32, q_scale=400.0)
    # scaled so the largest score is 2000 on every seed (at q_scale 400 alone it was ~900-1500)
    q *= np.float32(2000.0 / np.abs(K[0][:, 0] @ q[0, 0] / 8.0).max())
    ref_scores = np.abs(K[0][:, 0] @ q[0, 0] / 8.0)
    assert ref_scores.max() > 1e3
    check(q, K, V, 2, 1e-3)


def test_explicit_scale():
    rng = rng_for(7)
    check(*make_batch(rng, 3, [5, 50, 500], 8, 2, 64, np.float32), 2, 1e-4, scale=0.3)


# --- bad arguments raise ValueError naming the argument ---

def good(S=2, L=5, Hq=4, Hkv=2, D=64, dtype=np.float16):
    rng = np.random.default_rng(0)
    return make_batch(rng, S, [L] * S, Hq, Hkv, D, dtype)


def bad_cases():
    q, K, V = good()
    yield "q", (q.astype(np.float64), K, V)
    yield "q", (q[0], K, V)
    yield "q", (q[:, :, :60], [k[:, :, :60] for k in K], [v[:, :, :60] for v in V])  # D % 8
    yield "keys", (q, K[:1], V)
    yield "keys", (q, [K[0], K[1].astype(np.float32)], V)
    yield "keys", (q, [k.astype(np.float64) for k in K], V)
    yield "keys", (q, [K[0][:0], K[1]], [V[0][:0], V[1]])  # empty sequence
    yield "keys", (q, [K[0][:, :, :32], K[1]], V)  # mismatched D
    yield "keys", (q, [k[:, :1] for k in K][:1] + [K[1]], V)  # mismatched Hkv
    yield "keys", (q, [np.asfortranarray(K[0]), K[1]], V)  # non-contiguous
    yield "keys", (q, [K[0][::2], K[1]], V)  # non-contiguous slice
    yield "keys", (q, [k[:, :1].repeat(3, axis=1) for k in K], [v[:, :1].repeat(3, axis=1) for v in V])  # 4 % 3
    yield "keys", (q, [k.tolist() for k in K], V)
    yield "values", (q, K, [V[0], V[1][:3]])  # lengths differ from keys
    yield "values", (q, K, [v.astype(np.float32) for v in V])
    yield "values", (q, K, [v.astype(kvcache.BFLOAT16) for v in V])


@pytest.mark.parametrize("name,args", list(bad_cases()))
def test_bad_argument_raises_naming_it(name, args):
    with pytest.raises(ValueError, match=f"^{name}"):
        rpart.decode_attention(*args)


def test_bad_out_raises():
    q, K, V = good()
    with pytest.raises(ValueError, match="^out"):
        rpart.decode_attention(q, K, V, out=np.empty((1, 1, 1), np.float32))


# --- int8 KV: every build, against bounds derived from the quantization ---

def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


BUILDS = {"native": (None, set()), "novnni": ("attn_cpu_novnni.so", {"avx512f", "avx512bw", "avx512vl"}),
          "avx2": ("attn_cpu_avx2.so", {"avx2", "fma", "f16c"}), "scalar": ("attn_cpu_scalar.so", set())}


@pytest.fixture(params=list(BUILDS))
def build(request, monkeypatch):
    """rpart.decode_attention running one build of attn_cpu.c (made with `make variants`)."""
    lib, needs = BUILDS[request.param]
    if lib is not None:
        if not needs <= cpu_flags():
            pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())}")
        path = os.path.join(rpart.HERE, lib)
        r = subprocess.run(["make", "-C", rpart.HERE, lib], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        monkeypatch.setenv("FASTDECODE_KERNEL", path)  # load_kernel's override of its library
        monkeypatch.setattr(rpart, "_lib", None)
    yield rpart.kernel_info()["simd"]
    monkeypatch.setattr(rpart, "_lib", None)  # the next user loads the native build again


def quantized(K, V):
    (K8, ks), (V8, vs) = zip(*map(kvcache.quantize_int8, K)), zip(*map(kvcache.quantize_int8, V))
    return list(K8), list(V8), {"key_scales": list(ks), "value_scales": list(vs)}


def int8_bound(q, K, V, dK, dV, q_step, scale=None, v_int=None):
    """|out - ref| <= bound, per element, for softmax attention over K, V computed instead as if
    each K element were off by up to dK [L, Hkv] (per row), each V element by up to dV, and each
    q element by up to q_step / 2 [S, Hq] (VNNI rounds q to int8 per head), all in float64.
    A score moved by at most eps moves each weight by a factor in [e^-2eps, e^2eps], so the output
    moves by at most (e^2eps - 1) * sum_t p_t |v_t|, plus sum_t p_t dV_t from V itself; a
    1e-4 * max|ref| term covers fp32 arithmetic (the float tests' tolerance).
    v_int = (V8, V scales), for VNNI builds: they weigh int8 V by w = p * scale rounded to int16
    per block of 128 rows, off by up to max_block(w) / 65534 each (times e^2eps: the kernel's p)."""
    S, Hq, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    bound = np.empty((S, Hq, D))
    for s in range(S):
        K64, V64 = K[s].astype(np.float64), V[s].astype(np.float64)
        G = Hq // K64.shape[1]
        for h in range(Hq):
            k, v, qh = K64[:, h // G], V64[:, h // G], q[s, h].astype(np.float64)
            p = np.exp(scale * (k @ qh) - (scale * (k @ qh)).max())
            p /= p.sum()
            eps = scale * (np.abs(qh).sum() * dK[s][:, h // G] + q_step[s, h] / 2 * np.abs(k).sum(1)
                           + q_step[s, h] / 2 * D * dK[s][:, h // G]).max()
            bound[s, h] = np.expm1(2 * eps) * (p @ np.abs(v)) + p @ dV[s][:, h // G] + 1e-4 * np.abs(p @ v).max()
            if v_int is not None:
                w = p * v_int[1][s][:, h // G]
                w_max = np.repeat(np.maximum.reduceat(w, np.arange(0, len(w), 128)), 128)[:len(w)]
                bound[s, h] += np.exp(2 * eps) * (w_max / 65534) @ np.abs(v_int[0][s][:, h // G].astype(np.float64))
    return bound


def check_int8(q, K8, V8, sc, simd, threads=2):
    """The kernel on int8 rows against the float64 reference on the same rows times their scales."""
    out = np.full(q.shape, np.nan, dtype=np.float32)
    rpart.decode_attention(q, K8, V8, num_threads=threads, out=out, **sc)
    ref = rpart.reference_attention(q, K8, V8, **sc)
    Kd = [k * s[..., None].astype(np.float64) for k, s in zip(K8, sc["key_scales"])]
    Vd = [v * s[..., None].astype(np.float64) for v, s in zip(V8, sc["value_scales"])]
    q_step = np.abs(q).max(axis=2) / 127 if "vnni" in simd else np.zeros(q.shape[:2])
    zero = [np.zeros(k.shape[:2]) for k in K8]
    v_int = (V8, sc["value_scales"]) if "vnni" in simd else None
    bound = int8_bound(q, Kd, Vd, zero, zero, q_step, v_int=v_int)
    assert np.isfinite(out).all(), "non-finite output"
    worst = np.unravel_index(np.argmax(np.abs(out - ref) / bound), out.shape)
    assert (np.abs(out - ref) <= bound).all(), (f"seed {SEED} {simd}: |out - ref| {abs(out - ref)[worst]:.2e} > "
                                                f"bound {bound[worst]:.2e} at {worst}")
    return out


@pytest.mark.parametrize("heads,D", [((32, 32), 64), ((32, 8), 128), ((6, 3), 8), ((16, 2), 200), ((25, 25), 72),
                                     ((9, 3), 64), ((14, 2), 64), ((10, 2), 128)])
def test_int8_matches_reference_on_every_build(build, heads, D):
    """int8 K, V with their scales, every head layout path and masked head sizes, two threads."""
    Hq, Hkv = heads
    rng = rng_for(D, Hq, Hkv, 8)
    lens = rng.integers(1, 700, 5)
    lens[0] = 1
    q, K, V = make_batch(rng, 5, lens, Hq, Hkv, D, np.float32)
    check_int8(q, *quantized(K, V), build)


@pytest.mark.parametrize("heads,D", [((32, 32), 64), ((32, 8), 128), ((12, 12), 64), ((4, 2), 96)])
def test_int8_values_path_on_every_build(build, heads, D):
    """Zero keys (every weight equal, no error from K or q), V rows whose scales span 100x: what
    is left is the V path's own error (with VNNI: weights rounded to int16 per block), lengths
    around the 4-row groups and 128-row blocks, within the bound that rounding implies."""
    Hq, Hkv = heads
    rng = rng_for(D, Hq, Hkv, 44)
    lens = [1, 3, 4, 130, 515]
    q = rng.standard_normal((len(lens), Hq, D)).astype(np.float32)
    K = [np.zeros((n, Hkv, D), np.float32) for n in lens]
    V = [(rng.standard_t(5, (n, Hkv, D)) * 10 ** rng.uniform(-1, 1, (n, Hkv, 1))).astype(np.float32) for n in lens]
    check_int8(q, *quantized(K, V), build)


def realistic_kv(rng, L, Hkv, D):
    """Keys and values shaped like an LLM's: per-channel spread of 0.5x-2x, a few outlier key
    channels 10-20x the rest (as in the keys of OPT and Llama), values with heavier tails."""
    chan = rng.uniform(0.5, 2.0, (Hkv, D))
    chan[:, rng.choice(D, 4, replace=False)] *= rng.uniform(10, 20, (Hkv, 4))
    K = (rng.standard_normal((L, Hkv, D)) * chan).astype(np.float32)
    V = (rng.standard_t(5, (L, Hkv, D)) * rng.uniform(0.5, 2.0, (Hkv, D))).astype(np.float32)
    return K, V


def int8_accuracy(rng, S, L, Hq, Hkv, D, threads=2):
    """int8 KV's error against float64 attention on the unquantized K, V (realistic spread), and
    the bound its quantization implies: (max error / bound, max row error as row_error)."""
    q = rng.standard_normal((S, Hq, D)).astype(np.float32)
    K, V = zip(*(realistic_kv(rng, L, Hkv, D) for _ in range(S)))
    K8, V8, sc = quantized(K, V)
    out = rpart.decode_attention(q, K8, V8, num_threads=threads, **sc)
    ref = rpart.reference_attention(q, K, V)
    half = [s / 2 for s in sc["key_scales"]], [s / 2 for s in sc["value_scales"]]
    q_step = np.abs(q).max(axis=2) / 127 if "vnni" in rpart.kernel_info()["simd"] else np.zeros((S, Hq))
    bound = int8_bound(q, K, V, *half, q_step)
    return (np.abs(out - ref) / bound).max(), row_error(out, ref)[0]


@pytest.mark.parametrize("heads,D", [((32, 32), 64), ((32, 8), 128)])
def test_int8_accuracy_with_outlier_channels(heads, D):
    """Against float64 on the unquantized data: within the bound the rounding implies. Measured
    (OPT and Llama shapes, L=1000): row error median 6-8e-2, max 0.55 (fp16: 8e-4, 6e-3). Nearly
    all of it is K's: one scale per token and head is set by the outlier channels, so the others
    keep 3-4 bits (K alone: median 5.5-7e-2; V alone: 5-6e-3)."""
    err_over_bound, row_err = int8_accuracy(rng_for(D, 88), 3, 1000, *heads, D)
    assert err_over_bound <= 1, f"seed {SEED}: error {err_over_bound:.2f} x the quantization bound (row error {row_err:.2e})"


def int8_bad_cases():
    q, K, V = good(dtype=np.float32)
    K8, V8, sc = quantized(K, V)
    yield "key_scales", (q, K8, V8), {"value_scales": sc["value_scales"]}
    yield "key_scales", (q, K8, V8), {**sc, "key_scales": [s.astype(np.float64) for s in sc["key_scales"]]}
    yield "value_scales", (q, K8, V8), {**sc, "value_scales": [s[:, :1].copy() for s in sc["value_scales"]]}
    yield "value_scales", (q, K8, V8), {**sc, "value_scales": sc["value_scales"][:1]}
    yield "key_scales", (q, K, V), sc  # float rows with scales
    yield "values", (q, K8, V), sc


@pytest.mark.parametrize("name,args,kw", list(int8_bad_cases()))
def test_int8_bad_argument_raises_naming_it(name, args, kw):
    with pytest.raises(ValueError, match=f"^{name}"):
        rpart.decode_attention(*args, **kw)


def int8_stores(rows, seqs=(3, 5, 9), capacity=40):
    """The same int8 store twice, NumPy's writes and the kernel library's (rpart.store_int8),
    every byte of both blocks and scales set to the same junk first, so a stray write shows."""
    L, Hkv, D = rows.shape[1:]
    pair = [kvcache.KVCache(kvcache.KVConfig(3, Hkv, D, "int8", 2**26), write_int8=w) for w in (None, rpart.store_int8)]
    for c in pair:
        for s in seqs:
            c.allocate(s, capacity)
            c.blocks[s][...], c.scales[s][...] = 77, -1.0
    return pair


@pytest.mark.parametrize("Hkv,D", [(3, 64), (2, 128), (1, 8)])
def test_int8_writer_quantizes_like_numpy_bit_for_bit(build, Hkv, D):
    """Prefill and decode writes into an int8 store through the C writer leave every byte as
    NumPy's quantize_int8 does: float16 rows with outlier channels, all-zero rows, subnormals,
    ties that round to even (x / scale = k + 0.5), a row whose max is its only nonzero."""
    rng = rng_for(D, 5)
    rows = (rng.standard_normal((2, 24, Hkv, D)) * rng.uniform(1e-3, 30, (1, 1, Hkv, D))).astype(np.float16)
    rows[:, 3] = 0                                                  # all zero: scale 0, row 0
    rows[:, 4] = np.float16(6e-8)                                   # float16 subnormals
    rows[:, 5] = np.arange(D, dtype=np.float16) % 9 - 4             # max 4: x * 127 / 4 hits .75 .5 .25
    rows[:, 6, :, 1:] = 0                                           # the max is the only nonzero
    rows[:, 7] = (np.arange(D) % 20 + 0.5) * (-1.0) ** np.arange(D)   # ties: scale 1, +-(k + 0.5) to even
    rows[:, 7, :, 0] = 127
    numpy_store, c_store = int8_stores(rows)
    for c in (numpy_store, c_store):
        for layer in range(3):
            c.fill(3, layer, rows[0, :12 + layer], rows[1, :12 + layer])
            c.fill(5, layer, rows[1, :1], rows[0, :1])
        for step in range(8):                                       # decode: 3 sequences at ragged positions
            k, v = rows[0, 12 + step: 15 + step].copy(), rows[1, step: step + 3].copy()
            c.write_batch(step % 3, [3, 5, 9], [12 + step % 3 + step // 3, 1 + step // 3, step // 3], k, v)
    for s in (3, 5, 9):
        assert np.array_equal(numpy_store.blocks[s], c_store.blocks[s]), f"sequence {s}: int8 rows differ"
        assert np.array_equal(numpy_store.scales[s].view(np.uint16), c_store.scales[s].view(np.uint16))
        assert np.array_equal(numpy_store.lengths[s], c_store.lengths[s])
    assert (c_store.scales[3][0, 0, 3] == 0).all() and (c_store.blocks[3][0, 0, 3] == 0).all()


def test_int8_writer_checks_before_writing():
    """A bad step through the C writer fails as NumPy's does and changes nothing; a bad address
    list is refused by the library itself."""
    rows = np.ones((2, 4, 2, 16), np.float16)
    _, c = int8_stores(rows, seqs=(0, 1), capacity=4)
    before = c.blocks[1].copy()
    with pytest.raises(ValueError, match="position 3"):
        c.write_batch(0, [0, 1], [0, 3], rows[0, :2], rows[1, :2])   # a hole in sequence 1
    with pytest.raises(kvcache.KVCacheFull):
        c.fill(1, 0, np.ones((5, 2, 16), np.float16), np.ones((5, 2, 16), np.float16))
    assert np.array_equal(c.blocks[1], before) and c.lengths[1].sum() == 0
    where = np.array([c.where[1]], dtype=np.uint64)
    with pytest.raises(RuntimeError, match="bad sequence length or pointer"):       # position past capacity
        rpart.store_int8(rows[0, :1], rows[1, :1], where, np.array([4], np.int64), 0, 3)
    with pytest.raises(RuntimeError, match="bad dimensions"):                       # layer past n_layers
        rpart.store_int8(rows[0, :1], rows[1, :1], where, np.array([0], np.int64), 3, 3)
    assert np.array_equal(c.blocks[1], before)


# --- bfloat16 KV: every build, against the bound its rounding implies ---

def check_bf16(q, K, V, simd, threads=2):
    """The kernel on bf16 rows against float64 on the same rows. A build with AVX512-BF16 ("bf16"
    in simd) rounds q to bf16 (so does the reference here) and, where D % 32 == 0, each softmax
    weight to bf16 for p.v: each weight off by at most 2^-8 of itself (8 significant bits), so the output by
    at most 2^-8 * sum_t p_t |v_t|. Other builds widen the rows to float: no rounding beyond fp32's,
    which the 1e-4 * max|ref| term covers (the float tests' tolerance)."""
    dot = "bf16" in simd
    qr = q.astype(kvcache.BFLOAT16).astype(np.float32) if dot else q
    out = np.full(q.shape, np.nan, dtype=np.float32)
    rpart.decode_attention(q, K, V, num_threads=threads, out=out)
    ref = rpart.reference_attention(qr, K, V)
    p_abs_v = rpart.reference_attention(qr, K, [np.abs(v.astype(np.float64)) for v in V])  # sum_t p_t |v_t|
    bound = (2.0**-8 if dot and q.shape[2] % 32 == 0 else 0.0) * p_abs_v + 1e-4 * np.abs(ref).max(axis=2, keepdims=True)
    assert np.isfinite(out).all(), "non-finite output"
    worst = np.unravel_index(np.argmax(np.abs(out - ref) / bound), out.shape)
    assert (np.abs(out - ref) <= bound).all(), (f"seed {SEED} {simd}: |out - ref| {abs(out - ref)[worst]:.2e} > "
                                                f"bound {bound[worst]:.2e} at {worst}")


@pytest.mark.parametrize("heads,D", [((32, 32), 64), ((32, 8), 128), ((12, 4), 64), ((25, 25), 96), ((6, 3), 8),
                                     ((16, 2), 200), ((9, 3), 64), ((12, 2), 64), ((14, 2), 64), ((10, 2), 128)])
def test_bf16_matches_reference_on_every_build(build, heads, D):
    """bf16 K, V: the vdpbf16ps paths (GQA groups of 4, 3, 6, 2 and 1, an odd head count), masked head
    sizes and D % 32 != 0 (V by conversion), lengths around the 4-row tiles (the last padded
    with zero weights) and the 128-row blocks, q not representable in bf16."""
    Hq, Hkv = heads
    rng = rng_for(D, Hq, Hkv, 16)
    lens = [1, 2, 3, 5, 130, 515]
    q, K, V = make_batch(rng, len(lens), lens, Hq, Hkv, D, kvcache.BFLOAT16, q_scale=2.0)
    check_bf16(q, K, V, build)


def test_bf16_single_thread_long_sequence(build):
    rng = rng_for(2048, 16)
    check_bf16(*make_batch(rng, 2, [2048, 77], 32, 8, 128, kvcache.BFLOAT16), build, threads=1)
