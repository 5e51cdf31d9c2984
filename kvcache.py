"""kvcache.py - one R-Part worker's KV store: per-sequence K and V for every layer.

The R-Part holds the KV-cache that limits a GPU's batch size; FastDecode moves it to CPU memory,
spread over workers. Each sequence gets, at admission, one block `[2, n_layers, capacity, Hkv, D]`
sized for prompt + max new tokens, so a sequence never grows mid-generation and a full cache is
refused at admission, never mid-step. K and V of layer l are `[capacity, Hkv, D]` C-contiguous;
the kernel reads the first L rows of each as views, without copies. A finished sequence's memory
is kept for the next one, within the budget: new memory costs a page fault per page, each
page zeroed by Linux, on its first write.

KV dtypes: float16, float32, bfloat16 (NumPy's from ml_dtypes; the kernel's vdpbf16ps path), or
int8. An int8 block holds int8 rows plus one float16 scale per
token and KV head for K and for V (`[2, n_layers, capacity, Hkv]`, symmetric: x ~ scale * row);
rows arrive as float16 (`KVConfig.row_dtype`) and are quantized here as they are written, so the
engine, the wire and the in-process loop all hand the same float16 rows to the same rounding
(quantize_int8 in NumPy, or bit for bit the same in C: KVCache's write_int8).
The scales count in the capacity accounting: 2 * (D + 2) bytes per token, head and layer.

Writes name their position (`write(seq, layer, pos, k, v)`), so a step that is retried after a
worker failure overwrites instead of appending twice.

The store knows nothing of sockets or kernels: the worker (rpart.py) writes into it and attends
over it. A decode step's layer goes through one C call (the kernel library's fd_decode_step) at
the addresses `where` names, doing what write_batch does here and then attending. It imports
nothing from this project.

Legend: L cached length, Hkv KV heads, D head dim.
"""
import dataclasses

import ml_dtypes
import numpy as np

DEFAULT_KV_MEM = "8GiB"   # a worker's KV budget unless told otherwise (the CLIs' --kv-mem)


def parse_size(text):
    """'8GiB', '512MiB', '2G', '1000000' -> bytes (> 0); a ValueError naming the text otherwise."""
    t = str(text).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6,
             "g": 10**9, "t": 10**12, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "")
    try:
        n = int(float(t[: len(t) - len(unit)]) * units.get(unit, 1))
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"size {text!r}: expected a positive size such as 8GiB, 512MiB or 2G")
    return n


def quantize_int8(x):
    """Symmetric int8 rows, one scale per token and head: x [..., Hkv, D] float ->
    (int8 [..., Hkv, D], float16 scales [..., Hkv]) with x ~ scales[..., None] * int8. Each
    element is off by at most scale / 2; an all-zero row gets scale 0. The scale is max|row| / 127
    rounded to float16, one float16 step up where rounding fell below it, so that 127 * scale still
    covers the row: scale <= max|row| / 127 * (1 + 2^-10) for rows of float16 values above ~0.008
    (float16's normal range), and an absolute 2^-24 step below. float16 (as llama.cpp's q8_0 blocks)
    rather than float32 makes a token's bytes 2 * (D + 2) per head, not 2 * (D + 4): the kernel
    reads 3% fewer bytes at D = 64 (OPT-1.3b: int8 over fp16 tokens/s, see the README)."""
    x = np.asarray(x, dtype=np.float32)
    top = np.abs(x).max(axis=-1)
    scales = (top / np.float32(127)).astype(np.float16)
    low = scales.astype(np.float32) * np.float32(127) < top
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    s = scales.astype(np.float32)
    inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s > 0)
    return np.clip(np.rint(x * inv[..., None]), -127, 127).astype(np.int8), scales


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)       # NumPy has no bfloat16 of its own; ml_dtypes adds it
KV_DTYPES = ("float16", "float32", "int8", "bfloat16")   # what a KVConfig accepts (the CLIs' --kv-dtype)
SCALE_BYTES = 2                               # an int8 row's float16 scale


class KVCacheFull(Exception):
    """The sequence does not fit in this worker's memory budget."""


@dataclasses.dataclass
class KVConfig:
    n_layers: int
    n_kv_heads: int                # Hkv
    head_dim: int                  # D
    dtype: str = "float16"         # or "float32", "int8", "bfloat16"
    mem_bytes: int = parse_size(DEFAULT_KV_MEM)  # budget for K and V of all sequences (and scales)

    def __post_init__(self):
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"KV dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        if min(self.n_layers, self.n_kv_heads, self.head_dim, self.mem_bytes) < 1:
            raise ValueError(f"KVConfig fields must be positive: {self}")

    @property
    def quantized(self):
        return self.dtype == "int8"

    @property
    def row_dtype(self):
        """The dtype fill/write take rows in (and the wire carries): the KV dtype, or float16
        for int8, quantized here (half the bytes of float32 on the wire, and exact in float32)."""
        return "float16" if self.quantized else self.dtype

    @property
    def bytes_per_token(self):
        """K and V of one token over all layers, with an int8 row's scale (llama-2-7b: fp16
        512 KiB, int8 2*32*32*(128 + 2) = 260 KiB)."""
        row = self.head_dim * np.dtype(self.dtype).itemsize + (SCALE_BYTES if self.quantized else 0)
        return 2 * self.n_layers * self.n_kv_heads * row


class KVCache:
    def __init__(self, cfg, write_int8=None):
        """write_int8, when given, writes an int8 store's rows in place of NumPy (it quantizes
        bit for bit as quantize_int8 does): write_int8(k, v, where, pos, layer, n_layers) puts
        float16 rows k, v [n, Hkv, D] at positions pos[i] (int64) of layer in the blocks where[i]
        (uint64 [n, 4]: self.where's tuples). The kernel library has one
        (rpart.store_int8): NumPy's took 120-140 us a layer at batch 16 with OPT-125m's heads."""
        self.cfg, self.write_int8 = cfg, (write_int8 if cfg.quantized else None)
        self.blocks = {}    # seq id -> [2, n_layers, capacity, Hkv, D] of the KV dtype
        self.scales = {}    # seq id -> [2, n_layers, capacity, Hkv] float16 (int8 caches only)
        self.lengths = {}   # seq id -> int64 [n_layers]: rows written per layer
        self.where = {}     # seq id -> addresses for C: (block, scales or 0, capacity, lengths)
        self.reserved = 0   # bytes promised to admitted sequences
        self.buffers = {}   # seq id -> the uint8 memory its block (and scales) are views of
        self.spare = []     # freed sequences' buffers, oldest first, kept for new ones (_buffer)
        self.held = 0       # bytes of all buffers, live and spare: the budget plus live buffers' slack at most

    # --- admission ---

    def can_allocate(self, capacity):
        return self.reserved + capacity * self.cfg.bytes_per_token <= self.cfg.mem_bytes

    def allocate(self, seq, capacity):
        if seq in self.blocks:
            raise KeyError(f"sequence {seq} already exists")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not self.can_allocate(capacity):
            raise KVCacheFull(f"sequence {seq}: {capacity} tokens need {capacity * self.cfg.bytes_per_token} "
                              f"bytes, {self.free_bytes()} of {self.cfg.mem_bytes} free")
        c = self.cfg
        shape = (2, c.n_layers, capacity, c.n_kv_heads, c.head_dim)
        nbytes = int(np.prod(shape)) * np.dtype(c.dtype).itemsize
        at = -(-nbytes // 64) * 64                                  # the scales after the rows, 64-byte aligned
        sbytes = 2 * c.n_layers * capacity * c.n_kv_heads * SCALE_BYTES if c.quantized else 0
        buf = self.buffers[seq] = self._buffer(at + sbytes)
        self.blocks[seq] = buf[:nbytes].view(c.dtype).reshape(shape)
        if c.quantized:
            self.scales[seq] = buf[at:at + sbytes].view(np.float16).reshape(shape[:4])
        self.lengths[seq] = np.zeros(c.n_layers, dtype=np.int64)
        self.where[seq] = (self.blocks[seq].ctypes.data, self.scales[seq].ctypes.data if c.quantized else 0,
                           capacity, self.lengths[seq].ctypes.data)
        self.reserved += capacity * c.bytes_per_token

    def free(self, seq):
        """Forget the sequence; its memory is kept for a later one (see _buffer) while everything
        held stays within the budget."""
        self.reserved -= self.capacity(seq) * self.cfg.bytes_per_token
        del self.blocks[seq], self.lengths[seq], self.where[seq]
        self.scales.pop(seq, None)
        self.spare.append(self.buffers.pop(seq))
        self._trim(0)

    def _buffer(self, nbytes):
        """nbytes of memory for a new sequence: a freed sequence's (at most 1/8 larger, the
        smallest that fits) when there is one, else new. Reused memory has its pages mapped
        already: new memory is zeroed by Linux on first touch, which on this VM ran at
        ~0.5 GB/s and took 60% of a worker's time while it received prefilled K/V (opt-1.3b,
        16 prompts of 128 tokens: 0.35-1.1 s; into reused memory 0.08 s). Rows are read only below
        a sequence's length, so what a reused buffer held is never seen."""
        fits = [i for i, b in enumerate(self.spare) if nbytes <= b.nbytes <= nbytes + nbytes // 8]
        if fits:
            return self.spare.pop(min(fits, key=lambda i: self.spare[i].nbytes))
        self._trim(nbytes)
        buf = np.empty(nbytes, dtype=np.uint8)    # address space only: pages are touched as rows are written
        self.held += nbytes
        return buf

    def _trim(self, more):
        """Let go of spare buffers, oldest first, until `more` new bytes fit in the budget
        beside everything held (live sequences' buffers and spares)."""
        while self.spare and self.held + more > self.cfg.mem_bytes:
            self.held -= self.spare.pop(0).nbytes

    # --- reading and writing ---

    def _check(self, seq):
        if seq not in self.blocks:
            raise KeyError(f"unknown sequence {seq}")
        return seq

    def where_of(self, seqs):
        """The sequences' where tuples as uint64 [S, 4], for C; each must exist."""
        return np.array([self.where[self._check(s)] for s in seqs], dtype=np.uint64)

    def capacity(self, seq):
        return self.blocks[self._check(seq)].shape[2]

    def check_position(self, seq, layer, pos):
        """A row may be written at pos of layer when pos <= rows written (no holes) and pos < capacity."""
        n, cap = self.lengths[self._check(seq)][layer], self.capacity(seq)
        if not 0 <= pos <= n:
            raise ValueError(f"sequence {seq} layer {layer}: position {pos} but {n} rows written")
        if pos >= cap:
            raise KVCacheFull(f"sequence {seq}: position {pos} exceeds capacity {cap}")

    def _store(self, seq, layer, rows, K, V):
        """K, V [n, Hkv, D] into `rows` (a slice or an index) of layer: as they are, or quantized."""
        if self.cfg.quantized:
            (K, ks), (V, vs) = (quantize_int8(X.astype(np.float16, copy=False)) for X in (K, V))
            self.scales[seq][0, layer, rows] = ks
            self.scales[seq][1, layer, rows] = vs
        block = self.blocks[seq]
        block[0, layer, rows] = K
        block[1, layer, rows] = V

    def _write_int8(self, layer, where, positions, k, v):
        """Rows k, v [n, Hkv, D] by write_int8, row i into the block where[i] (self.where's
        tuples, [n, 4]) at positions[i]."""
        k, v = (np.ascontiguousarray(x, dtype=np.float16) for x in (k, v))
        self.write_int8(k, v, where, np.asarray(positions, dtype=np.int64), layer, self.cfg.n_layers)

    def fill(self, seq, layer, K, V):
        """Prefilled K, V [L, Hkv, D] of one layer (the worker receives one layer per frame)."""
        block = self.blocks[self._check(seq)]
        if not 0 <= layer < block.shape[1]:
            raise ValueError(f"layer {layer} out of range [0, {block.shape[1]})")
        L = K.shape[0]
        if K.shape != V.shape or K.ndim != 3 or K.shape[1:] != block.shape[3:]:
            raise ValueError(f"sequence {seq}: prefill K/V shape {K.shape}/{V.shape} does not match "
                             f"[L, {block.shape[3]}, {block.shape[4]}]")
        if not 1 <= L <= block.shape[2]:
            raise KVCacheFull(f"sequence {seq}: prefill of {L} tokens outside capacity {block.shape[2]}")
        if self.write_int8 is None:
            self._store(seq, layer, slice(0, L), K, V)
        else:
            self._write_int8(layer, np.tile(self.where_of([seq]), (L, 1)), np.arange(L), K, V)
        self.lengths[seq][layer] = L

    def write(self, seq, layer, pos, k, v):
        """k, v [Hkv, D] at row pos of layer; pos <= rows written so far (no holes)."""
        self.write_batch(layer, [seq], [pos], k[None], v[None])

    def write_batch(self, layer, seqs, positions, k, v):
        """Row positions[i] of layer for each sequence: k, v [S, Hkv, D] (one decode step).
        Every sequence is checked before anything is written, so a bad request changes nothing;
        an int8 cache quantizes the S rows in one call, not S."""
        c = self.cfg
        if k.shape != (len(seqs), c.n_kv_heads, c.head_dim) or v.shape != k.shape:
            raise ValueError(f"k, v: expected [{len(seqs)}, {c.n_kv_heads}, {c.head_dim}], got {k.shape}, {v.shape}")
        if not 0 <= layer < c.n_layers:
            raise ValueError(f"layer {layer} out of range [0, {c.n_layers})")
        for s, pos in zip(seqs, positions):
            self.check_position(s, layer, pos)
        if self.write_int8 is not None:
            self._write_int8(layer, self.where_of(seqs), positions, k, v)
        else:
            kv = np.stack((k, v), dtype=c.row_dtype)  # [2, S, Hkv, D]: one write a sequence, not two
            if c.quantized:
                kv, scales = quantize_int8(kv)   # both in one pass; scales [2, S, Hkv]
            for i, (s, pos) in enumerate(zip(seqs, positions)):
                self.blocks[s][:, layer, pos] = kv[:, i]
                if c.quantized:
                    self.scales[s][:, layer, pos] = scales[:, i]
        for s, pos in zip(seqs, positions):
            self.lengths[s][layer] = pos + 1

    def views(self, seq, layer, length):
        """K, V [length, Hkv, D] of layer: views into the block, no copy."""
        block = self.blocks[self._check(seq)]
        return block[0, layer, :length], block[1, layer, :length]

    def scale_views(self, seq, layer, length):
        """An int8 cache's K and V scales [length, Hkv] float16 of layer: views, no copy."""
        sc = self.scales[self._check(seq)]
        return sc[0, layer, :length], sc[1, layer, :length]

    # --- accounting ---

    def free_bytes(self):
        return self.cfg.mem_bytes - self.reserved

    def stats(self):
        tokens = int(sum(int(n.max()) for n in self.lengths.values()))
        return {"sequences": len(self.blocks), "tokens": tokens,
                "bytes_used": tokens * self.cfg.bytes_per_token,
                "bytes_reserved": self.reserved, "bytes_free": self.free_bytes(),
                "bytes_spare": sum(b.nbytes for b in self.spare)}
