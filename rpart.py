"""rpart.py - the R-Part: CPU decode attention (ctypes binding of attn_cpu.c).

FastDecode splits a transformer layer into the S-Part (weights, on the GPU) and the R-Part
(the per-sequence KV-cache and the attention that reads it, on CPU workers). This module is the
R-Part's compute: `decode_attention` calls the C kernel in attn_cpu.c over ragged sequences,
zero-copy. The slow, obvious reference it is tested against is `reference_attention`.

Legend: S sequences, Hq/Hkv query/KV heads, D head dim, L cached length of one sequence.

    python -c "import rpart; print(rpart.kernel_info())"
"""
import ctypes
import os
import subprocess
import threading

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
        lib.fd_decode_attention.argtypes = [P, P, P, P, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                            ctypes.c_int, P]
        lib.fd_decode_attention.restype = ctypes.c_int
        lib.fd_read_probe.argtypes = [P, ctypes.c_size_t, ctypes.c_int]
        lib.fd_read_probe.restype = ctypes.c_uint64
        lib.fd_simd.argtypes = []
        lib.fd_simd.restype = ctypes.c_char_p
        lib.fd_max_threads.argtypes = []
        lib.fd_max_threads.restype = ctypes.c_int
        _lib = lib
        return lib


def kernel_info():
    """{'simd': 'avx512' | 'avx2+f16c' | 'scalar', 'max_threads': n} of the loaded kernel."""
    lib = load_kernel()
    return {"simd": lib.fd_simd().decode(), "max_threads": lib.fd_max_threads()}


# --- decode attention ---

_KERNEL_ERRORS = {-1: "bad dimensions", -2: "bad sequence length or pointer", -3: "out of memory"}


def _check_kv(name, arrays, S, D):
    """Validate keys or values; return (pointer array, lengths, dtype, Hkv)."""
    if len(arrays) != S:
        raise ValueError(f"{name}: expected {S} arrays (one per sequence), got {len(arrays)}")
    ptrs = np.empty(S, dtype=np.uintp)
    lens = np.empty(S, dtype=np.int64)
    dtype = hkv = None
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{name}[{i}]: expected a numpy array, got {type(a).__name__}")
        if a.ndim != 3:
            raise ValueError(f"{name}[{i}]: expected shape [L, Hkv, D], got {a.shape}")
        if a.dtype not in (np.float16, np.float32) or (dtype is not None and a.dtype != dtype):
            raise ValueError(f"{name}[{i}]: dtype {a.dtype}; all must be float16 or all float32")
        if a.shape[0] < 1:
            raise ValueError(f"{name}[{i}]: empty sequence (L = 0)")
        if a.shape[2] != D:
            raise ValueError(f"{name}[{i}]: head dim {a.shape[2]} != q's {D}")
        if hkv is not None and a.shape[1] != hkv:
            raise ValueError(f"{name}[{i}]: {a.shape[1]} KV heads, earlier arrays have {hkv}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}[{i}]: not C-contiguous (the kernel reads it without a copy)")
        dtype, hkv = a.dtype, a.shape[1]
        ptrs[i] = a.__array_interface__["data"][0]
        lens[i] = a.shape[0]
    return ptrs, lens, dtype, hkv


def decode_attention(q, keys, values, *, scale=None, num_threads=None, out=None):
    """o[s,h] = softmax(scale * q[s,h] . K_s[:, g]^T) . V_s[:, g] with g = h // (Hq/Hkv).

    q: float32 [S, Hq, D]; keys, values: S C-contiguous arrays [L_s, Hkv, D], all float16 or all
    float32. Returns float32 [S, Hq, D] (written into `out` when given). No copy of keys or
    values is made.
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
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    if out is None:
        out = np.empty((S, Hq, D), dtype=np.float32)
    elif out.shape != (S, Hq, D) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out: expected C-contiguous float32 {(S, Hq, D)}, got {out.dtype} {out.shape}")
    lib = load_kernel()
    rc = lib.fd_decode_attention(q.ctypes.data, kp.ctypes.data, vp.ctypes.data, klen.ctypes.data,
                                 S, Hq, hkv, D, int(kdt == np.float16), float(scale),
                                 int(num_threads or 0), out.ctypes.data)
    if rc != 0:
        raise RuntimeError(f"fd_decode_attention: {_KERNEL_ERRORS.get(rc, rc)}")
    return out


def reference_attention(q, keys, values, *, scale=None):
    """The slow, obvious float64 version of decode_attention, for tests."""
    S, Hq, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.empty((S, Hq, D), dtype=np.float64)
    for s in range(S):
        K = keys[s].astype(np.float64)    # [L, Hkv, D]
        V = values[s].astype(np.float64)  # [L, Hkv, D]
        G = Hq // K.shape[1]
        for h in range(Hq):
            scores = scale * (K[:, h // G, :] @ q[s, h].astype(np.float64))  # [L]
            p = np.exp(scores - scores.max())
            out[s, h] = (p / p.sum()) @ V[:, h // G, :]
    return out


def attend_step(cache, layer, seqs, positions, q, k, v, *, num_threads=None):
    """One layer of one decode step on a KV store (kvcache.KVCache): write each sequence's new
    k, v [Hkv, D] at its position, then attend over rows [0, position]. q [S, Hq, D] -> o [S, Hq, D].
    Every sequence is checked before anything is written, so a bad request changes nothing."""
    for s, p in zip(seqs, positions):
        if s not in cache.blocks:
            raise KeyError(f"unknown sequence {s}")
        if not 0 <= p < cache.capacity(s):
            raise ValueError(f"sequence {s}: position {p} outside its capacity {cache.capacity(s)}")
    for i, (s, p) in enumerate(zip(seqs, positions)):
        cache.write(s, layer, int(p), k[i], v[i])
    kv = [cache.views(s, layer, int(p) + 1) for s, p in zip(seqs, positions)]
    return decode_attention(q, [a for a, _ in kv], [b for _, b in kv], num_threads=num_threads)
