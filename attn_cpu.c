// attn_cpu.c - the R-Part's compute: decode attention over ragged sequences on the CPU.
//
// FastDecode (He & Zhai, 2024) moves the KV-cache and the attention that reads it off the GPU.
// Each decode step, every sequence s brings one query per head and attends over its own cache:
//
//     o[s,h] = softmax(scale * q[s,h] . K_s[:, g]^T) . V_s[:, g],   g = h / (Hq/Hkv)
//
// This is memory-bound (every cached byte is read once per step and used for ~1 FMA), so the
// whole design is about reading K and V once, sequentially, at the machine's bandwidth:
//   - work items are (sequence, chunk of tokens) over ALL heads, so each token's row
//     [Hkv, D] is read contiguously (a per-head item would touch 2*D bytes per 4 KiB page);
//   - inside an item, blocks of BT tokens: scores for the block (K read once, stays in L1/L2),
//     an online-softmax update, then the V block is accumulated (V read once);
//   - long sequences are split in chunks, so one long sequence still uses every thread; the
//     partial (max, sum, acc) results are merged at the end (the log-sum-exp trick);
//   - OpenMP dynamic scheduling over items balances ragged lengths;
//   - AVX-512 or AVX2+F16C where the compiler targets them, plain C elsewhere.
//
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

#ifndef BT
#define BT 32         // tokens per block: its V rows, prefetched during the K pass, stay in L2
                      // (32 beat 16 and 8 at 2 threads: 39-40 vs 30-39 GB/s, OPT 32x2048 fp16)
#endif
#ifndef PF_HINT
#define PF_HINT 3
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

FD_INLINE float kv_at(const void *p, int i, int fp16) {
    return fp16 ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

// --- SIMD helpers: dot, axpy, exp ---

#if FD_AVX512
FD_INLINE __m512 load16(const void *p, int i, int fp16, __mmask16 m) {
    if (fp16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}
FD_INLINE __mmask16 mask_for(int left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

// q . k over D (a multiple of 8): two accumulators hide the FMA latency.
FD_INLINE float dot(const float *q, const void *k, int D, int fp16) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= D; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k, i, fp16, 0xffff), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), load16(k, i + 16, fp16, 0xffff), a1);
    }
    for (; i < D; i += 16) {
        __mmask16 m = mask_for(D - i);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), load16(k, i, fp16, m), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// acc[0:D] += p * v
FD_INLINE void axpy(float *acc, float p, const void *v, int D, int fp16) {
    __m512 vp = _mm512_set1_ps(p);
    for (int i = 0; i < D; i += 16) {
        __mmask16 m = mask_for(D - i);
        _mm512_mask_storeu_ps(acc + i, m,
                              _mm512_fmadd_ps(load16(v, i, fp16, m), vp, _mm512_maskz_loadu_ps(m, acc + i)));
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

// s[i] = exp(s[i] - mx[i]); sum[i] += s[i]   for i < n (a row of scores across heads)
FD_INLINE void exp_row(float *s, const float *mx, float *sum, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = mask_for(n - i);
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), _mm512_maskz_loadu_ps(m, mx + i)));
        _mm512_mask_storeu_ps(s + i, m, e);
        _mm512_mask_storeu_ps(sum + i, m, _mm512_add_ps(e, _mm512_maskz_loadu_ps(m, sum + i)));
    }
}

// acc[0:D] += p0*v0 + p1*v1 + p2*v2 + p3*v3: one load/store of acc per four tokens.
FD_INLINE void axpy4(float *acc, const float *p, int stride, const char *v, size_t row, int D, int fp16) {
    __m512 p0 = _mm512_set1_ps(p[0]), p1 = _mm512_set1_ps(p[stride]);
    __m512 p2 = _mm512_set1_ps(p[2 * stride]), p3 = _mm512_set1_ps(p[3 * stride]);
    for (int i = 0; i < D; i += 16) {
        __mmask16 m = mask_for(D - i);
        __m512 a = _mm512_maskz_loadu_ps(m, acc + i);
        __m512 b = _mm512_mul_ps(load16(v + row, i, fp16, m), p1);
        a = _mm512_fmadd_ps(load16(v, i, fp16, m), p0, a);
        b = _mm512_fmadd_ps(load16(v + 3 * row, i, fp16, m), p3, b);
        a = _mm512_fmadd_ps(load16(v + 2 * row, i, fp16, m), p2, a);
        _mm512_mask_storeu_ps(acc + i, m, _mm512_add_ps(a, b));
    }
}

// Sum each of x, y's lanes pairwise as selected by lo/hi: one level of a transposed reduction.
FD_INLINE __m512 fold(__m512 x, __m512 y, const int *lo) {
    __m512i l = _mm512_loadu_si512(lo), h = _mm512_loadu_si512(lo + 16);
    return _mm512_add_ps(_mm512_permutex2var_ps(x, l, y), _mm512_permutex2var_ps(x, h, y));
}

// Reduce 16 vectors to one vector of their 16 horizontal sums: 15 folds instead of 16 reductions.
FD_INLINE __m512 hsum16x16(__m512 a[16]) {
    static const int L1[32] = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23,
                               8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    static const int L2[32] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27,
                               4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    static const int L3[32] = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29,
                               2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    static const int L4[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                               1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    __m512 b[8], c[4], d[2];
    for (int j = 0; j < 8; j++) b[j] = fold(a[2 * j], a[2 * j + 1], L1);  // lanes: h 8 + h 8
    for (int j = 0; j < 4; j++) c[j] = fold(b[2 * j], b[2 * j + 1], L2);  // 4 heads x 4
    for (int j = 0; j < 2; j++) d[j] = fold(c[2 * j], c[2 * j + 1], L3);  // 8 heads x 2
    return fold(d[0], d[1], L4);                                          // 16 heads x 1
}

// out[h] = scale * q[h] . k[h / G] for every head h: the scores of one token.
FD_INLINE void scores_row(const float *q, const char *krow, size_t head, int Hq, int G, int D,
                          int fp16, float scale, float *out) {
    int h0 = 0;
    for (; h0 + 16 <= Hq; h0 += 16) {
        const float *qh = q + (size_t)h0 * D;
        const char *kh[16];
        __m512 a[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) { kh[j] = krow + (size_t)((h0 + j) / G) * head; a[j] = _mm512_setzero_ps(); }
        for (int i = 0; i < D; i += 16) {  // 16 independent FMA chains, one per head
            const __mmask16 m = mask_for(D - i);
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++)
                a[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qh + (size_t)j * D + i), load16(kh[j], i, fp16, m), a[j]);
        }
        _mm512_storeu_ps(out + h0, _mm512_mul_ps(hsum16x16(a), _mm512_set1_ps(scale)));
    }
    for (; h0 < Hq; h0++)
        out[h0] = scale * dot(q + (size_t)h0 * D, krow + (size_t)(h0 / G) * head, D, fp16);
}

#elif FD_AVX2
FD_INLINE __m256 load8(const void *p, int i, int fp16) {
    if (fp16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}
FD_INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
FD_INLINE float dot(const float *q, const void *k, int D, int fp16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= D; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k, i, fp16), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k, i + 8, fp16), a1);
    }
    if (i < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k, i, fp16), a0);
    return hsum8(_mm256_add_ps(a0, a1));
}
FD_INLINE void axpy(float *acc, float p, const void *v, int D, int fp16) {
    __m256 vp = _mm256_set1_ps(p);
    for (int i = 0; i < D; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(load8(v, i, fp16), vp, _mm256_loadu_ps(acc + i)));
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
FD_INLINE void exp_row(float *s, const float *mx, float *sum, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_loadu_ps(mx + i)));
        _mm256_storeu_ps(s + i, e);
        _mm256_storeu_ps(sum + i, _mm256_add_ps(e, _mm256_loadu_ps(sum + i)));
    }
    for (; i < n; i++) sum[i] += (s[i] = expf(s[i] - mx[i]));
}

#else  // plain C: the same algorithm, left to the compiler's auto-vectorizer
FD_INLINE float dot(const float *q, const void *k, int D, int fp16) {
    float a = 0.0f;
    for (int i = 0; i < D; i++) a += q[i] * kv_at(k, i, fp16);
    return a;
}
FD_INLINE void axpy(float *acc, float p, const void *v, int D, int fp16) {
    for (int i = 0; i < D; i++) acc[i] += p * kv_at(v, i, fp16);
}
FD_INLINE void exp_row(float *s, const float *mx, float *sum, int n) {
    for (int i = 0; i < n; i++) sum[i] += (s[i] = expf(s[i] - mx[i]));
}
#endif

#if !FD_AVX512  // the same contracts as the AVX-512 versions, one head or token at a time
FD_INLINE void axpy4(float *acc, const float *p, int stride, const char *v, size_t row, int D, int fp16) {
    for (int j = 0; j < 4; j++) axpy(acc, p[j * stride], v + j * row, D, fp16);
}
FD_INLINE void scores_row(const float *q, const char *krow, size_t head, int Hq, int G, int D,
                          int fp16, float scale, float *out) {
    for (int h = 0; h < Hq; h++)
        out[h] = scale * dot(q + (size_t)h * D, krow + (size_t)(h / G) * head, D, fp16);
}
#endif

FD_INLINE void prefetch_row(const char *p, size_t n) {
    for (size_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, PF_HINT);
}

FD_INLINE void scale_vec(float *a, float c, int D) {
    for (int i = 0; i < D; i++) a[i] *= c;  // rare (only when a block raises the max)
}

// --- one work item: sequence s, tokens [t0, t1), all heads ---

typedef struct {
    int s;       // sequence index
    int t0, t1;  // token range of this chunk
} Item;

// Writes the item's partial result: m[Hq] running max, l[Hq] sum of exp, acc[Hq, D] unnormalized.
FD_INLINE void attend_chunk(const float *q,         // [Hq, D]
                            const char *k,          // [L, Hkv, D] fp16 or fp32
                            const char *v,          // [L, Hkv, D]
                            int t0, int t1, int Hq, int Hkv, int D, int fp16, float scale,
                            float *sc,              // [BT, Hq] scratch: one block's scores
                            float *mnew,            // [Hq] scratch
                            float *m, float *l,     // [Hq], [Hq]
                            float *acc) {           // [Hq, D]
    const int G = Hq / Hkv;
    const size_t head = (size_t)D * (fp16 ? 2 : 4), row = (size_t)Hkv * head;
    for (int h = 0; h < Hq; h++) { m[h] = -INFINITY; l[h] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)Hq * D);
    for (int b0 = t0; b0 < t1; b0 += BT) {
        const int nb = t1 - b0 < BT ? t1 - b0 : BT;
        const char *kb = k + (size_t)b0 * row, *vb = v + (size_t)b0 * row;
        const int nb_next = t1 - b0 - nb < BT ? t1 - b0 - nb : BT;
        for (int t = 0; t < nb; t++) {  // K pass: token rows in memory order
            // Prefetch what comes next (this block's V, the next block's K) so the memory
            // system streams while we compute; the hardware prefetcher alone stalls on rows
            // that each start a new 4 KiB page (3x slower without this, measured).
            prefetch_row(vb + t * row, row);
            if (t < nb_next) prefetch_row(kb + (BT + t) * row, row);
            scores_row(q, kb + t * row, head, Hq, G, D, fp16, scale, sc + t * Hq);
        }
        // Online softmax, vertical across heads: new max, rescale old sums, exps in place.
        memcpy(mnew, m, sizeof(float) * Hq);
        for (int t = 0; t < nb; t++)
            for (int h = 0; h < Hq; h++) mnew[h] = sc[t * Hq + h] > mnew[h] ? sc[t * Hq + h] : mnew[h];
        for (int h = 0; h < Hq; h++) {
            const float c = expf(m[h] - mnew[h]);  // 0 on the first block (m = -inf)
            if (c != 1.0f) { l[h] *= c; scale_vec(acc + (size_t)h * D, c, D); }
            m[h] = mnew[h];
        }
        for (int t = 0; t < nb; t++) exp_row(sc + t * Hq, m, l, Hq);
        int t = 0;  // V pass: four token rows per update of each head's accumulator
        for (; t + 4 <= nb; t += 4)
            for (int h = 0; h < Hq; h++)
                axpy4(acc + (size_t)h * D, sc + t * Hq + h, Hq, vb + t * row + (h / G) * head, row, D, fp16);
        for (; t < nb; t++)
            for (int h = 0; h < Hq; h++)
                axpy(acc + (size_t)h * D, sc[t * Hq + h], vb + t * row + (h / G) * head, D, fp16);
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

// --- the entry point ---

const char *fd_simd(void) { return FD_SIMD; }

int fd_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Returns 0, or a negative code: -1 bad dims, -2 bad length or pointer, -3 out of memory.
int fd_decode_attention(const float *q,              // [S, Hq, D]
                        const void *const *k,        // S pointers to [L_s, Hkv, D], fp16 or fp32
                        const void *const *v,        // S pointers to [L_s, Hkv, D]
                        const int64_t *lens,         // [S] L_s >= 1
                        int S, int Hq, int Hkv, int D, int kv_fp16, float scale,
                        int nthreads,                // <= 0: all
                        float *o) {                  // [S, Hq, D] out
    if (S < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || D < 8 || D % 8 || D > MAX_D) return -1;
    int64_t total = 0;
    for (int s = 0; s < S; s++) {
        if (lens[s] < 1 || lens[s] > INT32_MAX || !k[s] || !v[s]) return -2;
        total += lens[s];
    }
    if (nthreads <= 0) nthreads = fd_max_threads();
    // Chunk so there are ~8 items per thread: balance without drowning in merges.
    int64_t chunk = (total + 8LL * nthreads - 1) / (8LL * nthreads);
    chunk = chunk < MIN_CHUNK ? MIN_CHUNK : (chunk + BT - 1) / BT * BT;
    int *first = malloc(sizeof(int) * ((size_t)S + 1));  // first item of each sequence
    if (!first) return -3;
    first[0] = 0;
    for (int s = 0; s < S; s++) first[s + 1] = first[s] + (int)((lens[s] + chunk - 1) / chunk);
    const int n_items = first[S];
    // One allocation per call, none in the hot loop: items, partials, per-thread scores.
    size_t floats = (size_t)n_items * Hq * (2 + (size_t)D) + (size_t)nthreads * Hq * (BT + 1);
    Item *items = malloc(sizeof(Item) * (size_t)n_items);
    float *ws = malloc(sizeof(float) * floats);
    if (!items || !ws) { free(first); free(items); free(ws); return -3; }
    float *pm = ws, *pl = pm + (size_t)n_items * Hq, *pacc = pl + (size_t)n_items * Hq;
    float *scores = pacc + (size_t)n_items * Hq * D;
    for (int s = 0; s < S; s++)
        for (int i = first[s]; i < first[s + 1]; i++) {
            int64_t t0 = (int64_t)(i - first[s]) * chunk, t1 = t0 + chunk;
            items[i] = (Item){s, (int)t0, (int)(t1 < lens[s] ? t1 : lens[s])};
        }

#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *sc = scores + (size_t)omp_get_thread_num() * Hq * (BT + 1);
#else
        float *sc = scores;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_items; i++) {
            const Item it = items[i];
            const float *qs = q + (size_t)it.s * Hq * D;
            if (kv_fp16)  // two instantiations: the dtype branch is gone from the inner loops
                attend_chunk(qs, k[it.s], v[it.s], it.t0, it.t1, Hq, Hkv, D, 1, scale, sc, sc + BT * Hq,
                             pm + (size_t)i * Hq, pl + (size_t)i * Hq, pacc + (size_t)i * Hq * D);
            else
                attend_chunk(qs, k[it.s], v[it.s], it.t0, it.t1, Hq, Hkv, D, 0, scale, sc, sc + BT * Hq,
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

// Reads n bytes (a multiple of 64) with nthreads threads; returns a checksum so nothing is elided.
uint64_t fd_read_probe(const void *buf, size_t n, int nthreads) {
    const uint64_t *p = buf;
    const int64_t words = (int64_t)(n / 8);
    uint64_t total = 0;
    if (nthreads <= 0) nthreads = fd_max_threads();
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : total)
    for (int64_t i = 0; i < words; i += 8) {  // 8 independent adds per 64-byte line
        uint64_t a = p[i] + p[i + 1] + p[i + 2] + p[i + 3];
        uint64_t b = p[i + 4] + p[i + 5] + p[i + 6] + p[i + 7];
        total += a ^ b;
    }
    return total;
}
