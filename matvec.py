"""matvec.py - the S-Part at a few rows on a CPU: matvec_cpu.c's binding, and the weights in its tiles.

A decode step at batch 1-8 multiplies a handful of activation rows by every weight matrix: a
read of the weights, which oneDNN's prepacked linear (fast.py) does at ~0.6 of the memory's
rate on this host and matvec_cpu.c at ~1.0 (see there for why and the numbers). On top of the one
matmul (`matvec`, which fast.linear routes small calls to), a Llama layer's two halves are one C
call each (`llama_pre`, `llama_post`): at batch 1 the norm, the activation and the residual adds
cost as much in torch calls (~5-10 us each, ~15 a layer) as reading the MLP's weights.

spart.py's torch forward stays the reference: tests/test_matvec.py holds these to it.

Legend: T rows (tokens, T <= MATVEC_ROWS), H hidden, F MLP width, N, K a matrix's out and in widths.
"""
import ctypes
import dataclasses
import functools
import os
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MATVEC_PATH = os.path.join(HERE, "matvec_cpu.so")
MATVEC_ROWS = 8          # calls of at most this many rows go to matvec_cpu.c (above it oneDNN is faster)
TILE_N, TILE_K = 8, 32   # matvec_cpu.c's tile: 8 weight rows by 32 columns


# --- the library ---


@functools.cache
def matvec_lib():
    """matvec_cpu.so through ctypes, built with `make` when missing or older than matvec_cpu.c; None
    where it cannot be built or this CPU lacks AVX512_BF16 (then oneDNN runs every call)."""
    src = os.path.join(HERE, "matvec_cpu.c")
    if not os.path.exists(MATVEC_PATH) or os.path.getmtime(src) > os.path.getmtime(MATVEC_PATH):
        if subprocess.run(["make", "-C", HERE, "matvec_cpu.so"], capture_output=True).returncode != 0:
            return None
    try:
        lib = ctypes.CDLL(MATVEC_PATH)
    except OSError:
        return None
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.fd_mv_available.argtypes, lib.fd_mv_available.restype = [], I
    lib.fd_mv_bf16.argtypes, lib.fd_mv_bf16.restype = [P, I, I, P, I, P, P, I], I
    lib.fd_llama_pre_bf16.argtypes, lib.fd_llama_pre_bf16.restype = [P, I, I, P, F, P, I, P, I], I
    lib.fd_llama_post_bf16.argtypes, lib.fd_llama_post_bf16.restype = [P, P, I, I, I, P, P, F, P, I, P, P, P, P, I], I
    return lib if lib.fd_mv_available() else None


def can_tile(device, dtype):
    """Whether matvec_cpu.c can run this S-Part's small calls: bf16 on a CPU whose build has AVX512_BF16."""
    return device.type == "cpu" and dtype == torch.bfloat16 and matvec_lib() is not None


# --- weights in tiles ---


@dataclasses.dataclass
class Tiles:
    """A bf16 matrix w [N, K] in matvec_cpu.c's layout, and its bias."""
    t: torch.Tensor            # [N/8, K/32, 8, 32] bf16: 8 rows by 32 columns a tile, tiles in reading order
    b: torch.Tensor | None     # [N] float32 (matvec_cpu.c adds it before rounding, as oneDNN does)

    @property
    def shape(self):  # (N, K), as w.shape
        return self.t.shape[0] * TILE_N, self.t.shape[1] * TILE_K


def tile_pack(w, b=None):
    """w [N, K] bf16 (b [N] or None) -> Tiles, or None when N or K is not a multiple of the tile."""
    N, K = w.shape
    if N % TILE_N or K % TILE_K:
        return None
    t = w.reshape(N // TILE_N, TILE_N, K // TILE_K, TILE_K).transpose(1, 2).contiguous()
    return Tiles(t, None if b is None else b.float().contiguous())


# --- the calls ---


def _rows(x, K, what):
    """x as matvec_cpu.c reads it: bf16 [T, K], 1 <= T <= MATVEC_ROWS, contiguous."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != K or not 1 <= x.shape[0] <= MATVEC_ROWS:
        raise ValueError(f"{what}: x must be bf16 [T, {K}] with 1 <= T <= {MATVEC_ROWS}, got {x.dtype} {list(x.shape)}")
    return x.contiguous()


def _weight(w, H, what):
    """A norm's weight as matvec_cpu.c reads it: H bf16 values in a row (it reads exactly H)."""
    if w.dtype != torch.bfloat16 or w.shape != (H,):
        raise ValueError(f"{what}: the norm's weight must be bf16 [{H}], got {w.dtype} {list(w.shape)}")
    return w.contiguous()


def _check(rc, what):
    if rc != 0:
        raise RuntimeError(f"matvec_cpu.c refused {what}")


def matvec(x, tiles):
    """x [T, K] bf16 -> x @ w.T + b [T, N] bf16, w and b from `tiles`, on all of torch's threads."""
    N, K = tiles.shape
    x = _rows(x, K, "matvec")
    y = torch.empty(x.shape[0], N, dtype=torch.bfloat16)
    b = None if tiles.b is None else tiles.b.data_ptr()
    _check(matvec_lib().fd_mv_bf16(x.data_ptr(), x.shape[0], K, tiles.t.data_ptr(), N, b, y.data_ptr(),
                                   torch.get_num_threads()), f"x {list(x.shape)} against w [{N}, {K}]")
    return y


def llama_pre(h, norm_w, eps, qkv):
    """Llama's RMSNorm then the q, k, v projection: h [T, H] -> [T, N] bf16 (spart.pre_attn's
    first two lines in one call). norm_w [H] bf16; qkv: the stacked projection's Tiles (no bias)."""
    N, H = qkv.shape
    h, norm_w = _rows(h, H, "llama_pre"), _weight(norm_w, H, "llama_pre")
    y = torch.empty(h.shape[0], N, dtype=torch.bfloat16)
    _check(matvec_lib().fd_llama_pre_bf16(h.data_ptr(), h.shape[0], H, norm_w.data_ptr(), eps, qkv.t.data_ptr(),
                                          N, y.data_ptr(), torch.get_num_threads()), f"h {list(h.shape)}")
    return y


def llama_post(h, o, out, norm_w, eps, up, down):
    """Llama's layer after attention (spart.post_attn) in one call: h [T, H] and o [T, Hq D]
    bf16 -> the next layer's h [T, H]. out, up (gate and up stacked), down: the layer's Tiles."""
    H, QD = out.shape
    F = down.shape[1]
    h, o = _rows(h, H, "llama_post"), _rows(o, QD, "llama_post (o)")
    norm_w, T = _weight(norm_w, H, "llama_post"), h.shape[0]
    if o.shape[0] != T or up.shape != (2 * F, H) or down.shape[0] != H:   # C reads each by these widths
        raise ValueError(f"llama_post: o {list(o.shape)} for h {list(h.shape)}, up {up.shape} for down {down.shape}")
    y, gu, a = (torch.empty(T, n, dtype=torch.bfloat16) for n in (H, 2 * F, F))
    _check(matvec_lib().fd_llama_post_bf16(h.data_ptr(), o.data_ptr(), T, H, QD, out.t.data_ptr(), norm_w.data_ptr(),
                                           eps, up.t.data_ptr(), F, down.t.data_ptr(), gu.data_ptr(), a.data_ptr(),
                                           y.data_ptr(), torch.get_num_threads()), f"h {list(h.shape)}")
    return y
