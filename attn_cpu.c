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
//   - inside an item, blocks of BT = 8 tokens: the scores of every head (tiles of heads x
//     tokens, q and each converted K vector reused in registers), one online-softmax update
//     for all heads, then every head's V accumulated with its accumulator in registers;
//   - K and V are prefetched in the order they are used, half a block ahead, a line at a time
//     among the loads (each 4 KiB row is a new page, which hardware prefetchers do not enter);
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
#define BT 8      // tokens per block. OPT-1.3b 32x2048 fp16, 1 thread: 8 -> 0.88 of read bandwidth,
#endif            // 16 -> 0.70, 4 -> 0.55 (interleaved builds; at 32 it was 0.6)
#ifndef PF_PER
#define PF_PER 1  // prefetches per inner loop iteration (1 beat 2, 3 and 4)
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

// A prefetch cursor: bytes [at, end) of p still to be prefetched. The tile loops below issue
// PF_PER lines per iteration and the caller the rest after the tile: issuing all of a tile's
// lines before its loads was 10-15% slower (measured), the prefetches crowding the loads out.
typedef struct { const char *p; size_t at, end; } Pf;

FD_INLINE void pf_lines(Pf *f, int n) {
    for (int j = 0; j < n && f->at < f->end; j++, f->at += 64) __builtin_prefetch(f->p + f->at, 0, PF_HINT);
}

FD_INLINE float block_max(const float *s, int n, float mx) {
    for (int t = 0; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    return mx;
}
#if !FD_AVX2  // AVX2 has its own; AVX-512 updates two heads at a time (softmax_pairs)
FD_INLINE float exp_sub(float *s, float mx, int n) {
    float sum = 0.0f;
    for (int t = 0; t < n; t++) sum += (s[t] = expf(s[t] - mx));
    return sum;
}
#endif

// --- SIMD helpers. Each flavor provides the same block operations, on one block of nb tokens
// whose rows (one head's K or V of token t) are `row` bytes apart (the cache is token-major):
//   tile_scores(q, k, NH, ..)          sc[j][t] = scale * q[j] . k_t  for NH heads sharing k
//   block_accumulate(acc, c, p, v..)   acc = c * acc + sum_t p[t] * v_t
//   shared_accumulate(acc, c, p, v, NH..)  the same for NH heads sharing v
#if FD_AVX512
FD_INLINE __m512 load16(const void *p, int i, int fp16, __mmask16 m) {
    if (fp16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}
FD_INLINE __mmask16 mask_for(int left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

// Lane selections for the levels of a transposed reduction (fold): L[k] pairs lanes 2^(3-k) apart.
static const int FOLD[4][32] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
    {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
    {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
    {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};

// Sum each of x, y's lanes pairwise as selected by lo/hi: one level of a transposed reduction.
FD_INLINE __m512 fold(__m512 x, __m512 y, const int *lo) {
    __m512i l = _mm512_loadu_si512(lo), h = _mm512_loadu_si512(lo + 16);
    return _mm512_add_ps(_mm512_permutex2var_ps(x, l, y), _mm512_permutex2var_ps(x, h, y));
}

// Reduce 16 vectors to one vector of their 16 horizontal sums: 15 folds instead of 16 reductions.
FD_INLINE __m512 hsum16x16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int j = 0; j < 8; j++) b[j] = fold(a[2 * j], a[2 * j + 1], FOLD[0]);  // lanes: 8 + 8 sums
    for (int j = 0; j < 4; j++) c[j] = fold(b[2 * j], b[2 * j + 1], FOLD[1]);  // 4 sums x 4
    for (int j = 0; j < 2; j++) d[j] = fold(c[2 * j], c[2 * j + 1], FOLD[2]);  // 8 sums x 2
    return fold(d[0], d[1], FOLD[3]);                                          // 16 sums x 1
}

// Reduce 8 vectors to the 8 lanes of their horizontal sums, in order (7 folds, then pairs).
FD_INLINE __m256 hsum8x16(const __m512 a[8]) {
    __m512 b[4], c[2];
    for (int j = 0; j < 4; j++) b[j] = fold(a[2 * j], a[2 * j + 1], FOLD[0]);  // lanes: 2 vectors x 8
    for (int j = 0; j < 2; j++) c[j] = fold(b[2 * j], b[2 * j + 1], FOLD[1]);  // 4 x 4
    const __m512 d = fold(c[0], c[1], FOLD[2]);                                // 8 x 2: pairs
    const __m512 e = _mm512_add_ps(d, _mm512_permute_ps(d, 0xb1));             // pair sums, twice
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14,
                                                                          0, 0, 0, 0, 0, 0, 0, 0), e));
}

// A tile is NH query heads sharing one KV head (NH = 1, 2 or 4) x TK tokens: 8 or 16 independent
// FMA chains, each q vector loaded once per TK tokens, each K vector converted once for all NH
// heads, then one transposed reduction for all the tile's scores.
FD_INLINE void tile_scores(const float *q, const char *k, int NH, size_t row, int nb, int D, int fp16,
                           float scale, float *sc, Pf *pf) {
    const int TK = NH == 4 ? 4 : 8;
    for (int t0 = 0; t0 < nb; t0 += TK) {
        const char *kt[8];
        __m512 a[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int t = 0; t < TK; t++) kt[t] = k + (size_t)(t0 + t < nb ? t0 + t : nb - 1) * row;  // a short
        for (int i = 0; i < D; i += 16) {                                   // tail repeats its last token
            const __mmask16 m = mask_for(D - i);
            pf_lines(pf, PF_PER);
            __m512 qv[4];
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) qv[j] = _mm512_maskz_loadu_ps(m, q + (size_t)j * D + i);
#pragma GCC unroll 8
            for (int t = 0; t < TK; t++) {
                const __m512 x = load16(kt[t], i, fp16, m);
#pragma GCC unroll 4
                for (int j = 0; j < NH; j++) a[j * TK + t] = _mm512_fmadd_ps(qv[j], x, a[j * TK + t]);
            }
        }
        const int n = nb - t0 < TK ? nb - t0 : TK;
        if (NH == 1) {
            _mm256_mask_storeu_ps(sc + t0, (__mmask8)((1u << n) - 1), _mm256_mul_ps(hsum8x16(a), _mm256_set1_ps(scale)));
        } else {
            const __m512 s = _mm512_mul_ps(hsum16x16(a), _mm512_set1_ps(scale));
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++)  // lanes j*TK.. are head j's: shift the pointer to match
                _mm512_mask_storeu_ps(sc + (size_t)j * (BT - TK) + t0, (__mmask16)(((1u << n) - 1) << (j * TK)), s);
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

#if BT == 8
#define FD_SOFTMAX_X2 1
// Within each half (8 lanes) of x: every lane gets the half's max, or sum.
FD_INLINE __m512 max8(__m512 x) {
    x = _mm512_max_ps(x, _mm512_shuffle_f32x4(x, x, 0xb1));
    x = _mm512_max_ps(x, _mm512_permute_ps(x, 0x4e));
    return _mm512_max_ps(x, _mm512_permute_ps(x, 0xb1));
}
FD_INLINE __m512 sum8(__m512 x) {
    x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xb1));
    x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4e));
    return _mm512_add_ps(x, _mm512_permute_ps(x, 0xb1));
}
// Heads h, h+1 (a pair of floats at p) to lanes 0-7 and 8-15, and back (lanes 0 and 8 to p).
FD_INLINE __m512 spread2(const float *p) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)p))));
}
FD_INLINE void gather2(float *p, __m512 x) {
    x = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), x);
    _mm_store_sd((double *)p, _mm_castps_pd(_mm512_castps512_ps128(x)));
}
// block_softmax for two heads per vector (a block of 8 tokens): see the generic version.
FD_INLINE int softmax_pairs(float *sc, int nb, int Hq, float *m, float *l, float *c) {
    const __mmask16 valid = (__mmask16)(((1u << nb) - 1) * 0x0101u);
    int h = 0;
    for (; h + 2 <= Hq; h += 2) {
        const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), valid, sc + (size_t)h * 8);
        const __m512 mo = spread2(m + h), mn = _mm512_max_ps(mo, max8(x));
        const __m512 e = _mm512_maskz_mov_ps(valid, exp_neg(_mm512_sub_ps(x, mn)));
        const __m512 cc = exp_neg(_mm512_sub_ps(mo, mn));  // ~0 on the first block (m = -inf)
        _mm512_storeu_ps(sc + (size_t)h * 8, e);
        gather2(m + h, mn);
        gather2(c + h, cc);
        gather2(l + h, _mm512_fmadd_ps(spread2(l + h), cc, sum8(e)));
    }
    return h;  // heads done
}
#endif

// The head's accumulator stays in registers across the block, up to 8 vectors at a time (4
// independent chains keep the FMA unit busy; even/odd token chains measured no faster). Not
// shared_accumulate with NH = 1: its prefetch per token here measured 0.67 of read against 0.87.
FD_INLINE void block_accumulate(float *acc, float c, const float *p, const char *v, size_t row, int nb,
                                int D, int fp16, Pf *pf) {
    for (int i0 = 0; i0 < D; i0 += 128) {
        __m512 a[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            a[j] = _mm512_setzero_ps();
            if (i0 + 16 * j < D) a[j] = _mm512_maskz_loadu_ps(mask_for(D - i0 - 16 * j), acc + i0 + 16 * j);
            if (i0 + 16 * j < D && c != 1.0f) a[j] = _mm512_mul_ps(_mm512_set1_ps(c), a[j]);
        }
        for (int t = 0; t < nb; t++) {
            if (t % 2 == 0) pf_lines(pf, PF_PER);
            const __m512 pt = _mm512_set1_ps(p[t]);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++)
                if (i0 + 16 * j < D)
                    a[j] = _mm512_fmadd_ps(load16(v + (size_t)t * row, i0 + 16 * j, fp16, mask_for(D - i0 - 16 * j)), pt, a[j]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            if (i0 + 16 * j < D) _mm512_mask_storeu_ps(acc + i0 + 16 * j, mask_for(D - i0 - 16 * j), a[j]);
    }
}

// NH heads sharing one KV head: each V vector converted once, used by all of them; 16/NH
// vectors of each head's accumulator in registers at a time.
FD_INLINE void shared_accumulate(float *acc, const float *c, const float *p, const char *v, int NH,
                                 size_t row, int nb, int D, int fp16, Pf *pf) {
    const int VC = 16 / NH;
    for (int i0 = 0; i0 < D; i0 += 16 * VC) {
        __m512 a[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            a[j] = _mm512_setzero_ps();
            if (i0 + 16 * (j % VC) < D) {
                const int i = i0 + 16 * (j % VC);
                a[j] = _mm512_mul_ps(_mm512_set1_ps(c[j / VC]), _mm512_maskz_loadu_ps(mask_for(D - i), acc + (size_t)(j / VC) * D + i));
            }
        }
        for (int t = 0; t < nb; t++) {
            pf_lines(pf, PF_PER);
            __m512 pj[4];
#pragma GCC unroll 4
            for (int h = 0; h < NH; h++) pj[h] = _mm512_set1_ps(p[(size_t)h * BT + t]);
#pragma GCC unroll 8
            for (int u = 0; u < VC; u++)
                if (i0 + 16 * u < D) {
                    const __m512 x = load16(v + (size_t)t * row, i0 + 16 * u, fp16, mask_for(D - i0 - 16 * u));
#pragma GCC unroll 4
                    for (int h = 0; h < NH; h++) a[h * VC + u] = _mm512_fmadd_ps(x, pj[h], a[h * VC + u]);
                }
        }
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++)
            if (i0 + 16 * (j % VC) < D) {
                const int i = i0 + 16 * (j % VC);
                _mm512_mask_storeu_ps(acc + (size_t)(j / VC) * D + i, mask_for(D - i), a[j]);
            }
    }
}

#else  // AVX2+F16C or plain C: one token at a time, the accumulator in L1

#if FD_AVX2
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
FD_INLINE float exp_sub(float *s, float mx, int n) {
    __m256 sum8 = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(s + t, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum8(sum8);
    for (; t < n; t++) sum += (s[t] = expf(s[t] - mx));
    return sum;
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
#endif

FD_INLINE void block_accumulate(float *acc, float c, const float *p, const char *v, size_t row, int nb,
                                int D, int fp16, Pf *pf) {
    (void)pf;  // the caller issues the tile's prefetches
    for (int i = 0; i < D; i++) acc[i] *= c;
    for (int t = 0; t < nb; t++) axpy(acc, p[t], v + (size_t)t * row, D, fp16);
}
// The tile operations of the AVX-512 path, one head at a time.
FD_INLINE void tile_scores(const float *q, const char *k, int NH, size_t row, int nb, int D, int fp16,
                           float scale, float *sc, Pf *pf) {
    (void)pf;
    for (int j = 0; j < NH; j++)
        for (int t = 0; t < nb; t++)
            sc[(size_t)j * BT + t] = scale * dot(q + (size_t)j * D, k + (size_t)t * row, D, fp16);
}
FD_INLINE void shared_accumulate(float *acc, const float *c, const float *p, const char *v, int NH,
                                 size_t row, int nb, int D, int fp16, Pf *pf) {
    for (int j = 0; j < NH; j++) block_accumulate(acc + (size_t)j * D, c[j], p + (size_t)j * BT, v, row, nb, D, fp16, pf);
}
#endif

// The online-softmax update of every head for one block: sc[h][0:nb] (heads BT floats apart)
// becomes exp(sc - new max); m (running max) and l (sum of exps) are updated and c[h] =
// exp(old max - new max) is the factor that rescales the head's old accumulator.
FD_INLINE void block_softmax(float *sc, int nb, int Hq, float *m, float *l, float *c) {
#ifdef FD_SOFTMAX_X2
    int h = softmax_pairs(sc, nb, Hq, m, l, c);
#else
    int h = 0;
#endif
    for (; h < Hq; h++) {
        float *s = sc + (size_t)h * BT;
        const float mx = block_max(s, nb, m[h]);
        c[h] = mx == m[h] ? 1.0f : expf(m[h] - mx);  // 0 on the first block (m = -inf)
        l[h] = l[h] * c[h] + exp_sub(s, mx, nb);
        m[h] = mx;
    }
}

// --- one work item: sequence s, tokens [t0, t1), all heads ---

typedef struct { int s, t0, t1; } Item;  // sequence s, tokens [t0, t1)

// Writes the item's partial result: m[Hq] running max, l[Hq] sum of exp, acc[Hq, D] unnormalized.
// Block by block (BT tokens), tile by tile of heads: the block's K rows were prefetched during
// the previous block's V pass and its V rows during its own K pass, so each K and V byte is read
// from memory once and found in cache.
FD_INLINE void attend_chunk(const float *q,         // [Hq, D]
                            const char *k,          // [L, Hkv, D] fp16 or fp32
                            const char *v,          // [L, Hkv, D]
                            int t0, int t1, int Hq, int Hkv, int D, int fp16, float scale,
                            float *sc, float *c,    // [Hq, BT], [Hq] scratch: the block's scores, rescaling
                            float *m, float *l,     // [Hq], [Hq]
                            float *acc) {           // [Hq, D]
    const int G = Hq / Hkv;
    const size_t head = (size_t)D * (fp16 ? 2 : 4), row = (size_t)Hkv * head;
    for (int h = 0; h < Hq; h++) { m[h] = -INFINITY; l[h] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)Hq * D);
    const int NH = G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1;  // GQA: query heads that share K and V
    const size_t tiles = (size_t)(Hq / NH);
    for (int b0 = t0; b0 < t1; b0 += BT) {
        const int nb = t1 - b0 < BT ? t1 - b0 : BT, nn = t1 - b0 - nb < BT ? t1 - b0 - nb : BT;
        const char *kb = k + (size_t)b0 * row, *vb = v + (size_t)b0 * row, *kn = kb + (size_t)nb * row;
        // Prefetch in the order of use, one step ahead: this block's V while its K is read, the
        // next block's K while this V is read; each tile issues its share (`step` bytes).
        const size_t v_bytes = (size_t)nb * row, k_bytes = (size_t)nn * row;
        const size_t v_step = (v_bytes / tiles + 63) & ~(size_t)63, k_step = (k_bytes / tiles + 63) & ~(size_t)63;
        for (int h = 0, i = 0; h < Hq; h += NH, i++) {  // K: the scores of every head, NH at a time
            Pf pf = {vb, i * v_step, (i + 1) * v_step < v_bytes ? (i + 1) * v_step : v_bytes};
            const size_t off = (size_t)(h / G) * head;
            float *s = sc + (size_t)h * BT;
            if (NH == 4) tile_scores(q + (size_t)h * D, kb + off, 4, row, nb, D, fp16, scale, s, &pf);
            else if (NH == 2) tile_scores(q + (size_t)h * D, kb + off, 2, row, nb, D, fp16, scale, s, &pf);
            else tile_scores(q + (size_t)h * D, kb + off, 1, row, nb, D, fp16, scale, s, &pf);
            pf_lines(&pf, INT32_MAX);  // what the loops did not issue
        }
        block_softmax(sc, nb, Hq, m, l, c);
        for (int h = 0, i = 0; h < Hq; h += NH, i++) {  // V: every head's accumulator
            Pf pf = {kn, i * k_step, (i + 1) * k_step < k_bytes ? (i + 1) * k_step : k_bytes};
            const size_t off = (size_t)(h / G) * head;
            float *a = acc + (size_t)h * D;
            if (NH == 1) block_accumulate(a, c[h], sc + (size_t)h * BT, vb + off, row, nb, D, fp16, &pf);
            else if (NH == 2) shared_accumulate(a, c + h, sc + (size_t)h * BT, vb + off, 2, row, nb, D, fp16, &pf);
            else shared_accumulate(a, c + h, sc + (size_t)h * BT, vb + off, 4, row, nb, D, fp16, &pf);
            pf_lines(&pf, INT32_MAX);
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
typedef void (*chunk_fn)(const float *, const char *, const char *, int, int, int, int, int, float,
                         float *, float *, float *, float *, float *);
#define CHUNK_FN(name, DD, F16)                                                                    \
    static void name(const float *q, const char *k, const char *v, int t0, int t1, int Hq, int Hkv, \
                     int D, float scale, float *sc, float *c, float *m, float *l, float *acc) {    \
        attend_chunk(q, k, v, t0, t1, Hq, Hkv, DD ? DD : D, F16, scale, sc, c, m, l, acc);            \
    }
CHUNK_FN(chunk_f16_d64, 64, 1)
CHUNK_FN(chunk_f16_d128, 128, 1)
CHUNK_FN(chunk_f16_any, 0, 1)
CHUNK_FN(chunk_f32_d64, 64, 0)
CHUNK_FN(chunk_f32_d128, 128, 0)
CHUNK_FN(chunk_f32_any, 0, 0)

static chunk_fn pick_chunk_fn(int D, int fp16) {
    if (fp16) return D == 64 ? chunk_f16_d64 : D == 128 ? chunk_f16_d128 : chunk_f16_any;
    return D == 64 ? chunk_f32_d64 : D == 128 ? chunk_f32_d128 : chunk_f32_any;
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
    size_t floats = (size_t)n_items * Hq * (2 + (size_t)D) + (size_t)nthreads * ((size_t)Hq * (BT + 1) + 16);
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

    const chunk_fn fn = pick_chunk_fn(D, kv_fp16);
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *sc = scores + (size_t)omp_get_thread_num() * ((size_t)Hq * (BT + 1) + 16);  // apart by a line
#else
        float *sc = scores;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n_items; i++) {
            const Item it = items[i];
            fn(q + (size_t)it.s * Hq * D, k[it.s], v[it.s], it.t0, it.t1, Hq, Hkv, D, scale, sc, sc + (size_t)Hq * BT,
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
