"""Per-op numerics of attn_cpu.c through rpart.decode_attention, against a float64 reference.

Fresh random data every run (the seed is printed on failure), outputs poisoned with NaN first.
Error is measured per (sequence, head) row: max|out - ref| / max|ref|.
"""
import numpy as np
import pytest

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
                                     ((4, 4), 256), ((2, 1), 40)])
def test_other_head_layouts_and_dims(dtype, tol, heads, D):
    """The kernel's other paths: an odd head count (the last head alone), GQA groups of 3 and 2,
    head sizes that are not a multiple of 16 (masked vectors) and above 128 (two passes)."""
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


@pytest.mark.parametrize("name,args", list(bad_cases()))
def test_bad_argument_raises_naming_it(name, args):
    with pytest.raises(ValueError, match=f"^{name}"):
        rpart.decode_attention(*args)


def test_bad_out_raises():
    q, K, V = good()
    with pytest.raises(ValueError, match="^out"):
        rpart.decode_attention(q, K, V, out=np.empty((1, 1, 1), np.float32))
