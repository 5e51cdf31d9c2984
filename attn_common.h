// attn_common.h - what every part of the CPU attention kernel shares: the build's SIMD flavor,
// the tuning constants, scalar helpers (fp16 by bits: also the plain-C path), a sequence's view
// (Seq) and the prefetch cursor (Pf). Included first by attn_cpu.c; see there for the design.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FD_AVX512 1
#define FD_SIMD "avx512"
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FD_AVX2 1
#define FD_SIMD "avx2+f16c"
#else
#define FD_SIMD "scalar"
#endif
#if FD_AVX512 && defined(__AVX512VNNI__)
#define FD_VNNI 1   // int8 q.k by vpdpbusd
#endif
#if FD_AVX512 && defined(__AVX512BF16__)
#define FD_BF16DOT 1  // bf16 q.k and p.v by vdpbf16ps
#endif

enum { FD_F32 = 0, FD_F16 = 1, FD_I8 = 2, FD_BF16 = 3 };  // KV element types, as rpart.py passes them

#ifndef BT
#define BT 128       // tokens per block: their scores are kept while the block's V is read
#endif
#ifndef TRK
#define TRK 4        // token rows per tile of the K pass
#endif
#ifndef TRK3
#define TRK3 5       // ... when 3 query heads share a KV head: 5 rows x 3 heads, 15 of a tile's 16 dot products
#endif
#ifndef TRV
#define TRV 4        // token rows per tile of the V pass, for heads sharing a KV head
#endif
#ifndef TRV1
#define TRV1 4       // ... and for one head per KV head (MHA)
#endif
#ifndef TRQ
#define TRQ 8        // token rows per tile of the int8 V pass (4 pairs; the block's last rows 4 at a time)
#endif
#ifndef TRB
#define TRB 4        // token rows per tile of the bf16 V pass (pairs of rows; 8: Llama in cache 0.88x)
#endif
#ifndef PF_AHEAD
#define PF_AHEAD 16384  // bytes: how far ahead of its use each row is prefetched (at least a tile)
#endif
#ifndef PF_LOCALITY
#define PF_LOCALITY 2  // prefetcht1: into L2 (see "Prefetch" in attn_cpu.c: t0 is bound by L1 miss buffers here)
#endif
#define MAX_D 256
#define MIN_CHUNK 128 // tokens; smaller chunks cost more in merging than they win in balance
// Below this many bytes of K and V a call runs on one thread: waking a sleeping OpenMP thread
// costs 10-50 us, more than reading 256 KiB takes one core (~8 us at 30 GB/s). Batch-1 decode lives here.
#define SMALL_CALL_BYTES (256 << 10)

#define FD_INLINE static inline __attribute__((always_inline))

// Heads in a K tile of TT rows: 16 / TT, so that the tile is 16 dot products; 3 when 3 heads share
// each KV head (G = 3, 6, ..: SmolLM2's 9:3), so that a tile is one KV head's group and each K
// vector is loaded (or converted) once for the 3 of them.
FD_INLINE int tile_heads(int TT, int NH) { return NH == 3 ? 3 : 16 / TT; }

// --- scalar helpers (also the portable fallback) ---

// IEEE half -> float by bit manipulation; handles subnormals, inf and NaN.
FD_INLINE float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112u) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {  // subnormal: normalize the mantissa
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// float -> IEEE half, rounded to nearest even (as NumPy's astype(float16) and F16C's vcvtps2ph):
// subnormals, overflow to inf and NaN included. For int8 rows' scales (attn_store.h).
FD_INLINE uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));  // inf, NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds past 65504: inf
    if (ax < 0x38800000u) {  // below half's smallest normal: a subnormal (or 0), 2^-24 a step
        if (ax < 0x33000000u) return (uint16_t)sign;  // at most half of 2^-24: rounds to 0 (ties to even)
        const uint32_t e = ax >> 23, man = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;  // 14 .. 24
        uint32_t h = man >> shift;
        const uint32_t rest = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        h += rest > half || (rest == half && (h & 1u));
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((ax >> 13) - (112u << 10)), rest = ax & 0x1fffu;  // rebias the exponent, keep 10 bits
    h += rest > 0x1000u || (rest == 0x1000u && (h & 1u));  // a carry into the exponent is right
    return (uint16_t)(sign | h);
}

// bfloat16 is float32's top half: widening is a shift (narrowing, only on AVX512-BF16 builds, is
// round_bf16 in attn_avx512.h).
FD_INLINE float bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

FD_INLINE size_t kv_bytes(int dt) { return dt == FD_F32 ? 4 : dt == FD_I8 ? 1 : 2; }

FD_INLINE float kv_at(const void *p, int i, int dt) {
    if (dt == FD_F16) return half_to_float(((const uint16_t *)p)[i]);
    if (dt == FD_BF16) return bf16_to_float(((const uint16_t *)p)[i]);
    return dt == FD_I8 ? (float)((const int8_t *)p)[i] : ((const float *)p)[i];
}

// h / G without a division instruction in the head loops: m = ceil(2^32 / G), and (h * m) >> 32
// is exact while h * G < 2^32, which Hq <= 65535 guarantees (checked at the entry). The idiv per
// head step (~10-20 cycles on Zen 4, with the loads' addresses waiting on it) was in every tile.
FD_INLINE uint64_t div_magic(int G) { return ((1ULL << 32) + (uint64_t)G - 1) / (uint64_t)G; }
FD_INLINE int div_g(int h, uint64_t m) { return (int)(((uint64_t)h * m) >> 32); }

// The scales of an int8 tile's rows are [TT, Hkv] float16s; head h of row t is scaled by this.
FD_INLINE float kv_scale(const uint16_t *s, int t, int Hkv, int h, int G) { return half_to_float(s[(size_t)t * Hkv + h / G]); }

// n halves -> floats: F16C's conversion where there is one (the same values), 8 at a time.
FD_INLINE void halves_to_floats(const uint16_t *h, int n, float *f) {
    int i = 0;
#if defined(__F16C__) && (defined(__AVX2__) || defined(__AVX512F__))
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) f[i] = half_to_float(h[i]);
}

// What one work item reads of its sequence. q8, qmul, qcorr exist for int8 KV with VNNI only,
// qb for bf16 KV with AVX512-BF16 only.
typedef struct {
    const float *q;        // [Hq, D]
    const char *k, *v;     // [L, Hkv, D] fp32, fp16, int8 or bf16
    const uint16_t *ks, *vs;  // [L, Hkv] float16 scales of int8 K and V rows (NULL otherwise)
    const int8_t *q8;      // [Hq, D] q / qstep, rounded: qstep = max|q[h]| / 127 per head
    const float *qmul;     // [Hq] scale * qstep: turns an integer dot product into a score
    const float *qcorr;    // [Hq] 128 * sum(q8[h]): what K's +128 offset added to each sum
    const uint16_t *qb;    // [Hq, D] q rounded to bf16
} Seq;

// A prefetch cursor: bytes [at, end) of p still to be prefetched, in address order. The tile
// loops issue `per` lines per step among their loads (pf_step), the caller the rest after the
// tile (pf_rest): issuing a tile's lines in one burst was slower (measured), crowding the loads.
typedef struct { const char *p; size_t at, end; int per; } Pf;

FD_INLINE void pf_lines(Pf *f, int n) {
    for (int j = 0; j < n && f->at < f->end; j++, f->at += 64) __builtin_prefetch(f->p + f->at, 0, PF_LOCALITY);
}
// A step's `per` lines with one check for the lot: checking the end per line (as pf_lines does)
// cost 9 instructions per 64-byte line, against 4 (2 conversions, 2 FMAs) for using it. The last
// step may run up to per - 1 lines past `end`: a prefetch never faults, and they are few.
// Tried and not kept: a fully unrolled run when `per` equals a step's own lines (a constant for
// G == NH): fewer instructions, the same time (A/B, 1 thread, in cache and from memory, +-2%).
FD_INLINE void pf_step(Pf *f) {
    if (f->at >= f->end) return;
    const char *p = f->p + f->at;
#pragma GCC unroll 4
    for (int j = 0; j < f->per; j++) __builtin_prefetch(p + 64 * (size_t)j, 0, PF_LOCALITY);
    f->at += 64 * (size_t)f->per;
}
FD_INLINE void pf_rest(Pf *f) { pf_lines(f, INT32_MAX); }

// The prefetches for a tile of rows [t, t + n) of base: rows [t + ahead, t + ahead + n), cut at
// t1, spread over the tile's `steps` steps.
FD_INLINE Pf rows_ahead(const char *base, int t, int n, int ahead, int t1, size_t row, int steps) {
    const int f0 = t + ahead < t1 ? t + ahead : t1, f1 = f0 + n < t1 ? f0 + n : t1;
    const int lines = (int)((size_t)(f1 - f0) * row / 64);
    return (Pf){base, (size_t)f0 * row, (size_t)f1 * row, (lines + steps - 1) / steps};
}
