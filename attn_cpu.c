// attn_cpu.c - the R-Part's compute: decode attention over ragged sequences on the CPU.
//
// FastDecode (He & Zhai, 2024) moves the KV-cache and the attention that reads it off the GPU.
// Each decode step, every sequence s brings one query per head and attends over its own cache:
//
//     o[s,h] = softmax(scale * q[s,h] . K_s[:, g]^T) . V_s[:, g],   g = h / (Hq/Hkv)
//
// This is memory-bound (every cached byte is read once per step and used for ~1 FMA), so the
// design is about reading K and V once, at the machine's bandwidth, with little work per byte:
//   - work items are (sequence, chunk of tokens) over all heads; long sequences are split, so
//     one long sequence still uses every thread, and the chunks' partial (max, sum, acc)
//     results are merged at the end (the log-sum-exp trick); OpenMP hands out items dynamically;
//   - inside an item, blocks of BT tokens: a K pass computes every head's scores (token-major),
//     one online-softmax update for the block, vectorized across heads, then a V pass adds
//     every head's weighted V rows into its accumulator;
//   - both passes work in tiles of a few token rows (a row is one token's K or V for all KV
//     heads, Hkv * D values), so each q vector, converted K/V vector and accumulator vector in
//     a register is used for several rows or heads;
//   - each pass prefetches its own stream PF_AHEAD bytes ahead, row after row in address order,
//     a few lines among each step's loads (see "Prefetch" below);
//   - AVX-512 or AVX2+F16C where the compiler targets them, plain C elsewhere.
//
// KV elements are fp32, fp16 or int8. int8 rows carry one float32 scale per (token, KV head)
// beside them (x = scale * int8, symmetric, [L, Hkv] arrays): half of fp16's bytes. With
// AVX512-VNNI, q.k is an integer dot product: q is quantized per head to int8 once per call and
// vpdpbusd multiplies 64 bytes of K by 64 of q in one instruction. vpdpbusd takes its first
// operand unsigned, so K goes in as k + 128 (an xor with 0x80) and the surplus 128 * sum(q8) is
// subtracted from each sum. V (and K without VNNI) is converted to float: the weights p are
// probabilities that 8 bits cannot hold across a long context.
//
// Prefetch: a row is 4 KiB for OPT-1.3b, so reading a block head by head (a column) visits a
// new page per load, and the hardware prefetchers, which stay inside a page, fall behind. A
// loop that only touched the bytes reached 0.5-0.75 of the read bandwidth column-wise and
// 0.97-1.0 row-wise; with the kernel's arithmetic between the loads even row-wise reading needs
// the software prefetches (without them: 0.6 of read at one thread).
// They go to L2 (prefetcht1), not L1: on the Zen 4 host of issue 15 a prefetcht0 holds one of
// L1's few miss buffers until its line arrives, which capped one core at ~10-13 GB/s from memory,
// 0.35-0.47 of read, whatever the distance; prefetcht1 (or t2, the same here) leaves the L1 to
// the loads and gave 1.7-2.0x for OPT-1.3b fp16 from memory and 1.3-1.5x for Llama-3-8b (A/B in
// one process, 1 and 2 threads). Distances 8, 16, 32 and 64 KiB: within the noise; 16 kept.

// Legend: S sequences, Hq query heads, Hkv KV heads, G = Hq/Hkv, D head dim, L cached length.
// Built by `make` into attn_cpu.so and loaded by rpart.py through ctypes.

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

enum { FD_F32 = 0, FD_F16 = 1, FD_I8 = 2 };  // KV element types, as rpart.py passes them

#ifndef BT
#define BT 128       // tokens per block: their scores are kept while the block's V is read
#endif
#ifndef TRK
#define TRK 4        // token rows per tile of the K pass
#endif
#ifndef TRV
#define TRV 4        // token rows per tile of the V pass, for heads sharing a KV head
#endif
#ifndef TRV1
#define TRV1 4       // ... and for one head per KV head (MHA)
#endif
#ifndef PF_AHEAD
#define PF_AHEAD 16384  // bytes: how far ahead of its use each row is prefetched (at least a tile)
#endif
#ifndef PF_LOCALITY
#define PF_LOCALITY 2  // prefetcht1: into L2 (see "Prefetch" above: t0 is bound by L1 miss buffers here)
#endif
#define MAX_D 256
#define MIN_CHUNK 128 // tokens; smaller chunks cost more in merging than they win in balance

#define FD_INLINE static inline __attribute__((always_inline))

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

FD_INLINE float kv_at(const void *p, int i, int dt) {
    if (dt == FD_F16) return half_to_float(((const uint16_t *)p)[i]);
    return dt == FD_I8 ? (float)((const int8_t *)p)[i] : ((const float *)p)[i];
}

// h / G without a division instruction in the head loops: m = ceil(2^32 / G), and (h * m) >> 32
// is exact while h * G < 2^32, which Hq <= 65535 guarantees (checked at the entry). The idiv per
// head step (~10-20 cycles on Zen 4, with the loads' addresses waiting on it) was in every tile.
FD_INLINE uint64_t div_magic(int G) { return ((1ULL << 32) + (uint64_t)G - 1) / (uint64_t)G; }
FD_INLINE int div_g(int h, uint64_t m) { return (int)(((uint64_t)h * m) >> 32); }

// The scales of an int8 tile's rows are [TT, Hkv] floats; head h of row t is scaled by this.
FD_INLINE float kv_scale(const float *s, int t, int Hkv, int h, int G) { return s[(size_t)t * Hkv + h / G]; }

// What one work item reads of its sequence. q8, qmul, qcorr exist for int8 KV with VNNI only.
typedef struct {
    const float *q;        // [Hq, D]
    const char *k, *v;     // [L, Hkv, D] fp32, fp16 or int8
    const float *ks, *vs;  // [L, Hkv] scales of int8 K and V rows (NULL otherwise)
    const int8_t *q8;      // [Hq, D] q / qstep, rounded: qstep = max|q[h]| / 127 per head
    const float *qmul;     // [Hq] scale * qstep: turns an integer dot product into a score
    const float *qcorr;    // [Hq] 128 * sum(q8[h]): what K's +128 offset added to each sum
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

// --- SIMD helpers. Each flavor provides the same three operations:
//   rows_scores(q, k, row, TT..)     st[t][h] = scale * q[h] . k_t[h / G]   TT token rows, every head
//   block_softmax(st, nb, ..)        the online-softmax update of every head for a block of nb rows
//   rows_accumulate(acc, p, v, TT..) acc[h] += sum_t p[t][h] * v_t[h / G]   TT token rows, every head
// Heads that share a KV head (NH of them: 1, 2 or 4) convert its vector once.
#if FD_AVX512
FD_INLINE __m512 load16(const void *p, int i, int dt, __mmask16 m) {
    if (dt == FD_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    if (dt == FD_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)p + i)));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}
FD_INLINE __mmask16 mask_for(int left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

// Sum each of x, y's 128-bit chunks pairwise (chunks 0+2, 1+3 of x, then of y; or, for sel 1,
// chunks 0+1, 2+3): the first two levels of a transposed reduction.
FD_INLINE __m512 fold_chunks(__m512 x, __m512 y, int sel) {
    if (sel == 0) return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xdd));
}
// The same inside each 128-bit chunk: lanes 0+2, 1+3 (sel 0) or 0+1, 2+3 (sel 1).
FD_INLINE __m512 fold_lanes(__m512 x, __m512 y, int sel) {
    if (sel == 0) return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xee));
    return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xdd));
}

// Reduce 16 vectors to one vector of their 16 horizontal sums in 15 folds of two shuffles and
// an add each. The sum of a[j] lands in lane 4 * (j % 4) + j / 4 (see hsum_lane).
FD_INLINE __m512 hsum16x16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int j = 0; j < 8; j++) b[j] = fold_chunks(a[2 * j], a[2 * j + 1], 0);
    for (int j = 0; j < 4; j++) c[j] = fold_chunks(b[2 * j], b[2 * j + 1], 1);
    for (int j = 0; j < 2; j++) d[j] = fold_lanes(c[2 * j], c[2 * j + 1], 0);
    return fold_lanes(d[0], d[1], 1);
}
FD_INLINE __m512i hsum_lane(__m512i j) {
    return _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(j, _mm512_set1_epi32(3)), 2), _mm512_srli_epi32(j, 2));
}

// The dot products of a tile of 16 / TT heads (from h0) x TT token rows (k, k + row, ..):
// a[t * HG + j] holds row t, head h0 + j, as 16 partial sums. Each q vector is loaded once for
// the TT rows and each K vector converted once for the NH heads that share it.
FD_INLINE void tile_dots(__m512 a[16], const float *restrict q, const char *k, size_t row, int TT, size_t head,
                         int h0, int Hq, int G, int NH, int D, int dt, Pf *pf) {
    const int HG = 16 / TT;
    const uint64_t gm = div_magic(G);
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int u = 0; u < HG / NH; u++) {
        const int h = h0 + u * NH;
        if (h >= Hq) break;
        const char *kh = k + (size_t)div_g(h, gm) * head;
        pf_step(pf);
        for (int i = 0; i < D; i += 16) {
            const __mmask16 m = mask_for(D - i);
            __m512 qv[4];
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) qv[j] = _mm512_maskz_loadu_ps(m, q + (size_t)(h + j) * D + i);
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                const __m512 x = load16(kh + (size_t)t * row, i, dt, m);
#pragma GCC unroll 4
                for (int j = 0; j < NH; j++) a[t * HG + u * NH + j] = _mm512_fmadd_ps(qv[j], x, a[t * HG + u * NH + j]);
            }
        }
    }
}

#if FD_VNNI
// tile_dots for int8 K and q8: 64 products per vpdpbusd into 16 int32 lanes, (k + 128) * q8.
// The sums stay below 2^24 (|q8| <= 127, k + 128 <= 255, D <= 256), so they convert exactly.
FD_INLINE void tile_dots_q8(__m512 a[16], const int8_t *restrict q8, const char *k, size_t row, int TT, size_t head,
                            int h0, int Hq, int G, int NH, int D, Pf *pf) {
    const int HG = 16 / TT;
    const uint64_t gm = div_magic(G);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i ai[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) ai[j] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int u = 0; u < HG / NH; u++) {
        const int h = h0 + u * NH;
        if (h >= Hq) break;
        const char *kh = k + (size_t)div_g(h, gm) * head;
        pf_step(pf);
        for (int i = 0; i < D; i += 64) {  // masked-off bytes: q8 = 0 there, so they add 0
            const __mmask64 m = D - i >= 64 ? ~0ULL : (1ULL << (D - i)) - 1;
            __m512i qv[4];
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) qv[j] = _mm512_maskz_loadu_epi8(m, q8 + (size_t)(h + j) * D + i);
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, kh + (size_t)t * row + i), flip);
#pragma GCC unroll 4
                for (int j = 0; j < NH; j++) ai[t * HG + u * NH + j] = _mm512_dpbusd_epi32(ai[t * HG + u * NH + j], x, qv[j]);
            }
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) a[j] = _mm512_cvtepi32_ps(ai[j]);
}
#endif

// Row t's int8 scales for heads h0 .. h0 + n - 1 (n <= 16), one lane per head.
FD_INLINE __m512 head_scales(const float *s, int t, int Hkv, int h0, int n, int G) {
    if (G == 1) return _mm512_maskz_loadu_ps(mask_for(n), s + (size_t)t * Hkv + h0);
    float x[16] = {0};
    for (int j = 0; j < n; j++) x[j] = kv_scale(s, t, Hkv, h0 + j, G);
    return _mm512_loadu_ps(x);
}

// Scores of TT token rows (k, k + row, ..) for every head: st[t * Hq + h]. A tile is 16 / TT
// heads x TT rows: 16 independent dot products, then one transposed reduction gives their sums;
// float K is scaled by `scale`, int8 K by its row scales too (and, with q8, by qmul less qcorr).
FD_INLINE void rows_scores(const Seq *sq, const char *k, const float *ks, size_t row, int TT, size_t head,
                           int Hq, int Hkv, int NH, int D, int dt, float scale, float *restrict st, Pf *pf) {
    const int HG = 16 / TT, G = Hq / Hkv;
    for (int h0 = 0; h0 < Hq; h0 += HG) {
        __m512 a[16];
#if FD_VNNI
        if (dt == FD_I8) tile_dots_q8(a, sq->q8, k, row, TT, head, h0, Hq, G, NH, D, pf);
        else
#endif
        tile_dots(a, sq->q, k, row, TT, head, h0, Hq, G, NH, D, dt, pf);
        // a[t * HG + j] is row t, head h0 + j; its sum is in lane hsum_lane(t * HG + j): gather row t's.
        const __m512 s = hsum16x16(a);
        const int n = Hq - h0 < HG ? Hq - h0 : HG;
        const __mmask16 keep = mask_for(n);
        __m512 mul = _mm512_set1_ps(scale), corr = _mm512_setzero_ps();
#if FD_VNNI
        if (dt == FD_I8) mul = _mm512_maskz_loadu_ps(keep, sq->qmul + h0), corr = _mm512_maskz_loadu_ps(keep, sq->qcorr + h0);
#endif
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++) {
            const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(t * HG), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(hsum_lane(lanes), s), corr), mul);
            if (dt == FD_I8) x = _mm512_mul_ps(x, head_scales(ks, t, Hkv, h0, n, G));
            _mm512_mask_storeu_ps(st + (size_t)t * Hq + h0, keep, x);
        }
    }
}

// acc[h] += sum over the TT rows t of p[t * Hq + h] * v_t[h / G] (times the row's scale for
// int8): each accumulator vector loaded and stored once for the TT rows, each V vector
// converted once for the NH heads sharing it. Tried for GQA: 8 rows per tile with the weights
// as broadcast memory operands (half the accumulator loads and stores): no faster (Llama-3-8b
// in cache 1.02x, from memory 0.98x): with 4 query heads per KV head the FMAs bind.
FD_INLINE void rows_accumulate(float *restrict acc, const float *restrict p, const char *v, const float *vs, size_t row,
                               int TT, size_t head, int Hq, int Hkv, int NH, int D, int dt, Pf *pf) {
    const uint64_t gm = div_magic(Hq / Hkv);
    for (int h = 0; h < Hq; h += NH) {
        const int hk = div_g(h, gm);  // the KV head of heads h .. h + NH - 1 (NH divides G)
        const char *vh = v + (size_t)hk * head;
        pf_step(pf);
        __m512 pj[4][4];
#pragma GCC unroll 4
        for (int t = 0; t < TT; t++)
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++)
                pj[t][j] = _mm512_set1_ps(p[(size_t)t * Hq + h + j] * (dt == FD_I8 ? vs[(size_t)t * Hkv + hk] : 1.0f));
        for (int i = 0; i < D; i += 16) {
            const __mmask16 m = mask_for(D - i);
            __m512 a[4];
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) a[j] = _mm512_maskz_loadu_ps(m, acc + (size_t)(h + j) * D + i);
#pragma GCC unroll 4
            for (int t = 0; t < TT; t++) {
                const __m512 x = load16(vh + (size_t)t * row, i, dt, m);
#pragma GCC unroll 4
                for (int j = 0; j < NH; j++) a[j] = _mm512_fmadd_ps(x, pj[t][j], a[j]);
            }
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) _mm512_mask_storeu_ps(acc + (size_t)(h + j) * D + i, m, a[j]);
        }
    }
}

// exp for x <= 0 (Cody-Waite range reduction, degree-6 polynomial; ~1 ulp), 2^n by scalef.
FD_INLINE __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// Sixteen heads per vector: the block's max, exps and sum need no horizontal operation.
FD_INLINE void block_softmax(float *st, int nb, int Hq, float *m, float *l, float *c) {
    for (int h0 = 0; h0 < Hq; h0 += 16) {
        const __mmask16 k = mask_for(Hq - h0);
        const __m512 mo = _mm512_maskz_loadu_ps(k, m + h0);
        __m512 mn = mo, sum = _mm512_setzero_ps();
        for (int t = 0; t < nb; t++) mn = _mm512_max_ps(mn, _mm512_maskz_loadu_ps(k, st + (size_t)t * Hq + h0));
        for (int t = 0; t < nb; t++) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, st + (size_t)t * Hq + h0), mn));
            _mm512_mask_storeu_ps(st + (size_t)t * Hq + h0, k, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 cc = exp_neg(_mm512_sub_ps(mo, mn));  // ~0 on the first block (m = -inf); 1 if max held
        _mm512_mask_storeu_ps(c + h0, k, cc);
        _mm512_mask_storeu_ps(l + h0, k, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, l + h0), cc, sum));
        _mm512_mask_storeu_ps(m + h0, k, mn);
    }
}

#else  // AVX2+F16C or plain C: one head at a time

#if FD_AVX2
FD_INLINE __m256 load8(const void *p, int i, int dt) {
    if (dt == FD_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    if (dt == FD_I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
    return _mm256_loadu_ps((const float *)p + i);
}
FD_INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
FD_INLINE float dot(const float *q, const void *k, int D, int dt) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= D; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k, i, dt), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k, i + 8, dt), a1);
    }
    if (i < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k, i, dt), a0);
    return hsum8(_mm256_add_ps(a0, a1));
}
FD_INLINE void axpy(float *acc, float p, const void *v, int D, int dt) {
    __m256 vp = _mm256_set1_ps(p);
    for (int i = 0; i < D; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(load8(v, i, dt), vp, _mm256_loadu_ps(acc + i)));
}
FD_INLINE __m256 exp_neg(__m256 x) {  // as the AVX-512 version; 2^n built in the exponent bits
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// Eight heads per vector, as the AVX-512 block_softmax; returns the heads done.
FD_INLINE int softmax8(float *st, int nb, int Hq, float *m, float *l, float *c) {
    int h0 = 0;
    for (; h0 + 8 <= Hq; h0 += 8) {
        const __m256 mo = _mm256_loadu_ps(m + h0);
        __m256 mn = mo, sum = _mm256_setzero_ps();
        for (int t = 0; t < nb; t++) mn = _mm256_max_ps(mn, _mm256_loadu_ps(st + (size_t)t * Hq + h0));
        for (int t = 0; t < nb; t++) {
            const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(st + (size_t)t * Hq + h0), mn));
            _mm256_storeu_ps(st + (size_t)t * Hq + h0, e);
            sum = _mm256_add_ps(sum, e);
        }
        const __m256 cc = exp_neg(_mm256_sub_ps(mo, mn));
        _mm256_storeu_ps(c + h0, cc);
        _mm256_storeu_ps(l + h0, _mm256_fmadd_ps(_mm256_loadu_ps(l + h0), cc, sum));
        _mm256_storeu_ps(m + h0, mn);
    }
    return h0;
}
#else  // plain C: the same algorithm, left to the compiler's auto-vectorizer
FD_INLINE float dot(const float *q, const void *k, int D, int dt) {
    float a = 0.0f;
    for (int i = 0; i < D; i++) a += q[i] * kv_at(k, i, dt);
    return a;
}
FD_INLINE void axpy(float *acc, float p, const void *v, int D, int dt) {
    for (int i = 0; i < D; i++) acc[i] += p * kv_at(v, i, dt);
}
#endif

// int8 rows are converted to float and the row's scale applied to the dot product (to p in V).
FD_INLINE void rows_scores(const Seq *sq, const char *k, const float *ks, size_t row, int TT, size_t head,
                           int Hq, int Hkv, int NH, int D, int dt, float scale, float *st, Pf *pf) {
    const int G = Hq / Hkv;
    for (int t = 0; t < TT; t++)  // row by row; the tile's Hq / NH prefetch steps spread evenly
        for (int h = 0; h < Hq; h++) {
            if ((t * Hq + h) % (TT * NH) == 0) pf_step(pf);
            const float sc = dt == FD_I8 ? scale * kv_scale(ks, t, Hkv, h, G) : scale;
            st[(size_t)t * Hq + h] = sc * dot(sq->q + (size_t)h * D, k + (size_t)t * row + (size_t)(h / G) * head, D, dt);
        }
}
FD_INLINE void rows_accumulate(float *acc, const float *p, const char *v, const float *vs, size_t row, int TT,
                               size_t head, int Hq, int Hkv, int NH, int D, int dt, Pf *pf) {
    const int G = Hq / Hkv;
    for (int t = 0; t < TT; t++)
        for (int h = 0; h < Hq; h++) {
            if ((t * Hq + h) % (TT * NH) == 0) pf_step(pf);
            const float w = p[(size_t)t * Hq + h] * (dt == FD_I8 ? kv_scale(vs, t, Hkv, h, G) : 1.0f);
            axpy(acc + (size_t)h * D, w, v + (size_t)t * row + (size_t)(h / G) * head, D, dt);
        }
}
FD_INLINE void block_softmax(float *st, int nb, int Hq, float *m, float *l, float *c) {
#if FD_AVX2
    int h = softmax8(st, nb, Hq, m, l, c);
#else
    int h = 0;
#endif
    for (; h < Hq; h++) {  // one head at a time: its scores are Hq floats apart
        float mx = m[h], sum = 0.0f;
        for (int t = 0; t < nb; t++) mx = st[(size_t)t * Hq + h] > mx ? st[(size_t)t * Hq + h] : mx;
        for (int t = 0; t < nb; t++) sum += (st[(size_t)t * Hq + h] = expf(st[(size_t)t * Hq + h] - mx));
        c[h] = mx == m[h] ? 1.0f : expf(m[h] - mx);  // 0 on the first block (m = -inf)
        l[h] = l[h] * c[h] + sum;
        m[h] = mx;
    }
}
#endif

// --- one work item: sequence s, tokens [t0, t1), all heads ---

typedef struct { int s, t0, t1; } Item;  // sequence s, tokens [t0, t1)

// Writes the item's partial result: m[Hq] running max, l[Hq] sum of exp, acc[Hq, D] unnormalized.
// Block by block (BT tokens): the K rows give every head's scores, one softmax update turns them
// into weights, the accumulators are rescaled, and the V rows are added in. K and V are each
// read once, front to back.
FD_INLINE void attend_chunk(const Seq *sq, int t0, int t1, int Hq, int Hkv, int D, int dt, float scale,
                            float *sc, float *c,    // [BT, Hq], [Hq] scratch: the block's scores, rescaling
                            float *m, float *l,     // [Hq], [Hq]
                            float *acc) {           // [Hq, D]
    const int G = Hq / Hkv;
    const size_t head = (size_t)D * (dt == FD_F32 ? 4 : dt == FD_F16 ? 2 : 1), row = (size_t)Hkv * head;
    for (int h = 0; h < Hq; h++) { m[h] = -INFINITY; l[h] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)Hq * D);
    const int NH = G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1;  // GQA: query heads that share K and V
    const int steps = Hq / NH;  // steps of a tile: each issues its share of the prefetches
    const int pf_rows = (int)((PF_AHEAD + row - 1) / row), ahead = pf_rows > TRK ? pf_rows : TRK;  // rows
    for (int b0 = t0; b0 < t1; b0 += BT) {
        const int nb = t1 - b0 < BT ? t1 - b0 : BT;
        for (int t = b0, n; t < b0 + nb; t += n) {  // K: every head's scores, TRK rows at a time
            n = b0 + nb - t >= TRK ? TRK : 1;
            Pf pf = rows_ahead(sq->k, t, n, ahead, t1, row, steps);
            const char *kt = sq->k + (size_t)t * row;
            const float *ks = sq->ks ? sq->ks + (size_t)t * Hkv : NULL;
            float *st = sc + (size_t)(t - b0) * Hq;
            if (n == 1) rows_scores(sq, kt, ks, row, 1, head, Hq, Hkv, 1, D, dt, scale, st, &pf);
            else if (NH == 4) rows_scores(sq, kt, ks, row, TRK, head, Hq, Hkv, 4, D, dt, scale, st, &pf);
            else if (NH == 2) rows_scores(sq, kt, ks, row, TRK, head, Hq, Hkv, 2, D, dt, scale, st, &pf);
            else rows_scores(sq, kt, ks, row, TRK, head, Hq, Hkv, 1, D, dt, scale, st, &pf);
            pf_rest(&pf);
        }
        block_softmax(sc, nb, Hq, m, l, c);  // sc now holds the weights; c rescales the old acc
        for (int h = 0; h < Hq; h++)
            if (c[h] != 1.0f)
                for (int i = 0; i < D; i++) acc[(size_t)h * D + i] *= c[h];
        const int tv = NH == 1 ? TRV1 : TRV;
        for (int t = b0, n; t < b0 + nb; t += n) {  // V: every head's accumulator, tv rows at a time
            n = b0 + nb - t >= tv ? tv : 1;
            Pf pf = rows_ahead(sq->v, t, n, ahead, t1, row, steps);
            const char *vt = sq->v + (size_t)t * row;
            const float *vs = sq->vs ? sq->vs + (size_t)t * Hkv : NULL;
            const float *p = sc + (size_t)(t - b0) * Hq;
            if (n == 1) rows_accumulate(acc, p, vt, vs, row, 1, head, Hq, Hkv, 1, D, dt, &pf);
            else if (NH == 4) rows_accumulate(acc, p, vt, vs, row, TRV, head, Hq, Hkv, 4, D, dt, &pf);
            else if (NH == 2) rows_accumulate(acc, p, vt, vs, row, TRV, head, Hq, Hkv, 2, D, dt, &pf);
            else rows_accumulate(acc, p, vt, vs, row, TRV1, head, Hq, Hkv, 1, D, dt, &pf);
            pf_rest(&pf);
        }
    }
}

// Merge the partial results of one sequence's chunks for head h into o[D] (log-sum-exp).
static void merge_chunks(const float *m, const float *l, const float *acc, int n_chunks,
                         int Hq, int D, int h, float *o) {
    float M = -INFINITY, Lsum = 0.0f;
    for (int c = 0; c < n_chunks; c++) M = m[c * Hq + h] > M ? m[c * Hq + h] : M;
    for (int i = 0; i < D; i++) o[i] = 0.0f;
    for (int c = 0; c < n_chunks; c++) {
        const float w = expf(m[c * Hq + h] - M);
        const float *a = acc + ((size_t)c * Hq + h) * D;
        Lsum += w * l[c * Hq + h];
        for (int i = 0; i < D; i++) o[i] += w * a[i];
    }
    const float inv = 1.0f / Lsum;
    for (int i = 0; i < D; i++) o[i] *= inv;
}

// One instantiation per dtype and common head size: constant D unrolls the inner loops fully.
typedef void (*chunk_fn)(const Seq *, int, int, int, int, int, float, float *, float *, float *, float *, float *);
#define CHUNK_FN(name, DD, DT)                                                                     \
    static void name(const Seq *sq, int t0, int t1, int Hq, int Hkv, int D, float scale, float *sc, \
                     float *c, float *m, float *l, float *acc) {                                    \
        attend_chunk(sq, t0, t1, Hq, Hkv, DD ? DD : D, DT, scale, sc, c, m, l, acc);                \
    }
CHUNK_FN(chunk_f16_d64, 64, FD_F16)
CHUNK_FN(chunk_f16_d128, 128, FD_F16)
CHUNK_FN(chunk_f16_any, 0, FD_F16)
CHUNK_FN(chunk_f32_d64, 64, FD_F32)
CHUNK_FN(chunk_f32_d128, 128, FD_F32)
CHUNK_FN(chunk_f32_any, 0, FD_F32)
CHUNK_FN(chunk_i8_d64, 64, FD_I8)
CHUNK_FN(chunk_i8_d128, 128, FD_I8)
CHUNK_FN(chunk_i8_any, 0, FD_I8)

static chunk_fn pick_chunk_fn(int D, int dt) {
    if (dt == FD_F16) return D == 64 ? chunk_f16_d64 : D == 128 ? chunk_f16_d128 : chunk_f16_any;
    if (dt == FD_I8) return D == 64 ? chunk_i8_d64 : D == 128 ? chunk_i8_d128 : chunk_i8_any;
    return D == 64 ? chunk_f32_d64 : D == 128 ? chunk_f32_d128 : chunk_f32_any;
}

// --- int8 q for VNNI: once per call, before the work items ---

// q8[h] = round(q[h] / qstep), qstep = max|q[h]| / 127; qmul[h] = scale * qstep and qcorr[h] =
// 128 * sum(q8[h]). Rounding q costs up to qstep / 2 per element (the tests bound its effect).
static void quantize_q(const float *q, int n_heads, int D, float scale, int8_t *q8, float *qmul, float *qcorr) {
    for (int h = 0; h < n_heads; h++) {
        const float *x = q + (size_t)h * D;
        float mx = 0.0f;
        for (int i = 0; i < D; i++) mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
        const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
        int sum = 0;
        for (int i = 0; i < D; i++) {
            const int r = (int)rintf(x[i] * inv);  // |r| <= 127: x[i] * inv <= 127 (+ an ulp)
            q8[(size_t)h * D + i] = (int8_t)r;
            sum += r;
        }
        qmul[h] = scale * mx / 127.0f;
        qcorr[h] = 128.0f * (float)sum;
    }
}

// --- the entry point ---

const char *fd_simd(void) {
#if FD_VNNI
    return FD_SIMD "+vnni";
#else
    return FD_SIMD;
#endif
}

int fd_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Work items: each sequence cut into chunks of ~8 items per thread (balance without drowning
// in merges); first[s] is sequence s's first item. Returns the item count, or -3.
static int make_items(const int64_t *lens, int S, int nthreads, int64_t total, int **first_out, Item **items_out) {
    int64_t chunk = (total + 8LL * nthreads - 1) / (8LL * nthreads);
    chunk = chunk < MIN_CHUNK ? MIN_CHUNK : (chunk + BT - 1) / BT * BT;
    int *first = malloc(sizeof(int) * ((size_t)S + 1));
    if (!first) return -3;
    first[0] = 0;
    for (int s = 0; s < S; s++) first[s + 1] = first[s] + (int)((lens[s] + chunk - 1) / chunk);
    Item *items = malloc(sizeof(Item) * (size_t)first[S]);
    if (!items) { free(first); return -3; }
    for (int s = 0; s < S; s++)
        for (int i = first[s]; i < first[s + 1]; i++) {
            int64_t t0 = (int64_t)(i - first[s]) * chunk, t1 = t0 + chunk;
            items[i] = (Item){s, (int)t0, (int)(t1 < lens[s] ? t1 : lens[s])};
        }
    *first_out = first, *items_out = items;
    return first[S];
}

// Returns 0, or a negative code: -1 bad dims or dtype, -2 bad length or pointer, -3 out of memory.
int fd_decode_attention(const float *q,              // [S, Hq, D]
                        const void *const *k,        // S pointers to [L_s, Hkv, D], fp32, fp16 or int8
                        const void *const *v,        // S pointers to [L_s, Hkv, D]
                        const float *const *ks,      // S pointers to [L_s, Hkv] scales of int8 K (else NULL)
                        const float *const *vs,      // S pointers to [L_s, Hkv] scales of int8 V (else NULL)
                        const int64_t *lens,         // [S] L_s >= 1
                        int S, int Hq, int Hkv, int D, int kv_dtype, float scale,
                        int nthreads,                // <= 0: all
                        float *o) {                  // [S, Hq, D] out
    if (S < 1 || Hq < 1 || Hq > 65535 || Hkv < 1 || Hq % Hkv || D < 8 || D % 8 || D > MAX_D) return -1;
    if (kv_dtype < FD_F32 || kv_dtype > FD_I8 || (kv_dtype == FD_I8 && (!ks || !vs))) return -1;
    int64_t total = 0;
    for (int s = 0; s < S; s++) {
        if (lens[s] < 1 || lens[s] > INT32_MAX || !k[s] || !v[s]) return -2;
        if (kv_dtype == FD_I8 && (!ks[s] || !vs[s])) return -2;
        total += lens[s];
    }
    if (nthreads <= 0) nthreads = fd_max_threads();
    int *first;
    Item *items;
    const int n_items = make_items(lens, S, nthreads, total, &first, &items);
    if (n_items < 0) return n_items;
    // One allocation per call, none in the hot loop: partials, per-thread scores, q8 and its factors.
    const size_t stride = (size_t)Hq * (BT + 1) + 16;  // a thread's scores, apart by a line
    const size_t floats = (size_t)n_items * Hq * (2 + (size_t)D) + (size_t)nthreads * stride + 2 * (size_t)S * Hq;
    float *ws = malloc(sizeof(float) * floats + (size_t)S * Hq * D);
    if (!ws) { free(first); free(items); return -3; }
    float *pm = ws, *pl = pm + (size_t)n_items * Hq, *pacc = pl + (size_t)n_items * Hq;
    float *scores = pacc + (size_t)n_items * Hq * D, *qmul = scores + (size_t)nthreads * stride;
    float *qcorr = qmul + (size_t)S * Hq;
    int8_t *q8 = (int8_t *)(qcorr + (size_t)S * Hq);
#if FD_VNNI
    if (kv_dtype == FD_I8) quantize_q(q, S * Hq, D, scale, q8, qmul, qcorr);
#else
    (void)quantize_q;
#endif

    const chunk_fn fn = pick_chunk_fn(D, kv_dtype);
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *sc = scores + (size_t)omp_get_thread_num() * stride;
#else
        float *sc = scores;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_items; i++) {
            const int s = items[i].s;
            const size_t qh = (size_t)s * Hq;
            const Seq sq = {q + qh * D, k[s], v[s], kv_dtype == FD_I8 ? ks[s] : NULL, kv_dtype == FD_I8 ? vs[s] : NULL,
                            q8 + qh * D, qmul + qh, qcorr + qh};
            fn(&sq, items[i].t0, items[i].t1, Hq, Hkv, D, scale, sc, sc + (size_t)Hq * BT,
               pm + (size_t)i * Hq, pl + (size_t)i * Hq, pacc + (size_t)i * Hq * D);
        }
#pragma omp for schedule(static)
        for (int sh = 0; sh < S * Hq; sh++) {
            const int s = sh / Hq, h = sh % Hq, f = first[s];
            merge_chunks(pm + (size_t)f * Hq, pl + (size_t)f * Hq, pacc + (size_t)f * Hq * D,
                         first[s + 1] - f, Hq, D, h, o + (size_t)sh * D);
        }
    }
    free(first);
    free(items);
    free(ws);
    return 0;
}

// --- a STREAM-like read probe: the bandwidth the kernel is measured against ---

// Reads n bytes (a multiple of 8) with nthreads threads; returns a checksum so nothing is elided.
// A plain sum that the compiler vectorizes: 10-25% above the scalar loop this replaced, which
// could not keep up with memory on one core.
uint64_t fd_read_probe(const void *buf, size_t n, int nthreads) {
    const uint64_t *p = buf;
    const int64_t words = (int64_t)(n / 8);
    uint64_t total = 0;
    if (nthreads <= 0) nthreads = fd_max_threads();
#pragma omp parallel for simd num_threads(nthreads) schedule(static) reduction(+ : total)
    for (int64_t i = 0; i < words; i++) total += p[i];
    return total;
}
