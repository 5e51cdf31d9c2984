// attn_avx512.h - the AVX-512 flavor of the kernel's three operations (see attn_cpu.c):
// rows_scores by tiles of 16 dot products and one transposed reduction (int8 K with VNNI:
// tile_sums_q8), block_softmax sixteen heads per vector, rows_accumulate by tiles of rows.
// Included by attn_cpu.c after attn_common.h when the compiler targets AVX-512 (F, BW, VL).
#pragma once

FD_INLINE __m512 load16(const void *p, int i, int dt, __mmask16 m) {
    if (dt == FD_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    if (dt == FD_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i)), 16));
    if (dt == FD_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)p + i)));
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}
FD_INLINE __mmask16 mask_for(int left) { return left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

// x + y as floats, or (ints) as the int32 lanes their bits hold: one reduction serves both.
FD_INLINE __m512 add_as(__m512 x, __m512 y, int ints) {
    if (!ints) return _mm512_add_ps(x, y);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(x), _mm512_castps_si512(y)));
}
// Sum each of x, y's 128-bit chunks pairwise (chunks 0+2, 1+3 of x, then of y; or, for sel 1,
// chunks 0+1, 2+3): the first two levels of a transposed reduction.
FD_INLINE __m512 fold_chunks(__m512 x, __m512 y, int sel, int ints) {
    if (sel == 0) return add_as(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xee), ints);
    return add_as(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xdd), ints);
}
// The same inside each 128-bit chunk: lanes 0+2, 1+3 (sel 0) or 0+1, 2+3 (sel 1).
FD_INLINE __m512 fold_lanes(__m512 x, __m512 y, int sel, int ints) {
    if (sel == 0) return add_as(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xee), ints);
    return add_as(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xdd), ints);
}

// Reduce 16 vectors to one vector of their 16 horizontal sums in 15 folds of two shuffles and
// an add each. The sum of a[j] lands in lane 4 * (j % 4) + j / 4 (see hsum_lane). With ints,
// the vectors hold int32 lanes (int8 K's exact sums: the shuffles only move bits), and so does
// the result: one conversion afterwards instead of one per vector.
FD_INLINE __m512 hsum16x16(const __m512 a[16], int ints) {
    __m512 b[8], c[4], d[2];
    for (int j = 0; j < 8; j++) b[j] = fold_chunks(a[2 * j], a[2 * j + 1], 0, ints);
    for (int j = 0; j < 4; j++) c[j] = fold_chunks(b[2 * j], b[2 * j + 1], 1, ints);
    for (int j = 0; j < 2; j++) d[j] = fold_lanes(c[2 * j], c[2 * j + 1], 0, ints);
    return fold_lanes(d[0], d[1], 1, ints);
}
FD_INLINE __m512i hsum_lane(__m512i j) {
    return _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(j, _mm512_set1_epi32(3)), 2), _mm512_srli_epi32(j, 2));
}

// The dot products of a tile of HG = tile_heads(TT, NH) heads (from h0) x TT token rows (k, k + row, ..):
// a[t * HG + j] holds row t, head h0 + j, as 16 partial sums. Each q vector is loaded once for
// the TT rows and each K vector converted once for the NH heads that share it. GCC folded the q
// loads back into every FMA as a memory operand (16 loads of 64 bytes per 16 FMAs, where a Zen 4
// core loads one such vector per cycle); an empty asm on each loaded q forbids that: Llama-3-8b
// fp16 1.30x in cache and from memory (A/B, 1 thread), OPT-1.3b (one head per KV head) unchanged.
FD_INLINE void tile_dots(__m512 a[16], const float *restrict q, const char *k, size_t row, int TT, size_t head,
                         int h0, int Hq, int G, int NH, int D, int dt, Pf *pf) {
    const int HG = tile_heads(TT, NH);
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
            for (int j = 0; j < NH; j++) {  // the empty asm keeps q in a register: see tile_dots
                qv[j] = _mm512_maskz_loadu_ps(m, q + (size_t)(h + j) * D + i);
                __asm__("" : "+v"(qv[j]));
            }
#pragma GCC unroll 8
            for (int t = 0; t < TT; t++) {
                const __m512 x = load16(kh + (size_t)t * row, i, dt, m);
#pragma GCC unroll 4
                for (int j = 0; j < NH; j++) a[t * HG + u * NH + j] = _mm512_fmadd_ps(qv[j], x, a[t * HG + u * NH + j]);
            }
        }
    }
}

#if FD_VNNI
// tile_dots for int8 K and q8: 64 products per vpdpbusd into 16 int32 lanes, (k + 128) * q8,
// then the transposed reduction on the integers: returns the 16 sums (hsum16x16's lanes). They
// stay below 2^24 (|q8| <= 127, k + 128 <= 255, D <= 256), so they convert exactly.
FD_INLINE __m512 tile_sums_q8(const int8_t *restrict q8, const char *k, size_t row, int TT, size_t head,
                              int h0, int Hq, int G, int NH, int D, Pf *pf) {
    const int HG = tile_heads(TT, NH);
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
            for (int j = 0; j < NH; j++) {  // in a register, as in tile_dots
                qv[j] = _mm512_maskz_loadu_epi8(m, q8 + (size_t)(h + j) * D + i);
                __asm__("" : "+v"(qv[j]));
            }
#pragma GCC unroll 8
            for (int t = 0; t < TT; t++) {
                const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, kh + (size_t)t * row + i), flip);
#pragma GCC unroll 4
                for (int j = 0; j < NH; j++) ai[t * HG + u * NH + j] = _mm512_dpbusd_epi32(ai[t * HG + u * NH + j], x, qv[j]);
            }
        }
    }
    __m512 bits[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) bits[j] = _mm512_castsi512_ps(ai[j]);
    return _mm512_cvtepi32_ps(_mm512_castps_si512(hsum16x16(bits, 1)));
}
#endif

#if FD_BF16DOT
// tile_dots for bf16 K and q rounded to bf16: vdpbf16ps multiplies 32 pairs and adds each pair
// into one of 16 float lanes, so a 64-byte K vector costs one instruction per head and no
// conversion: half of fp16's FMAs, which bind with several query heads per KV head (G = 4 needs
// 4 FMAs per fp16 element, 16 lanes a cycle on a Zen 4 core: ~21 GB/s at 2.6 GHz, below its read).
FD_INLINE void tile_dots_bf16(__m512 a[16], const uint16_t *restrict qb, const char *k, size_t row, int TT, size_t head,
                              int h0, int Hq, int G, int NH, int D, Pf *pf) {
    const int HG = tile_heads(TT, NH);
    const uint64_t gm = div_magic(G);
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int u = 0; u < HG / NH; u++) {
        const int h = h0 + u * NH;
        if (h >= Hq) break;
        const uint16_t *kh = (const uint16_t *)(k + (size_t)div_g(h, gm) * head);
        pf_step(pf);
        for (int i = 0; i < D; i += 32) {  // masked-off elements are 0 in both
            const __mmask32 m = D - i >= 32 ? ~0u : (1u << (D - i)) - 1;
            __m512i qv[4];
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) {  // in a register, as in tile_dots
                qv[j] = _mm512_maskz_loadu_epi16(m, qb + (size_t)(h + j) * D + i);
                __asm__("" : "+v"(qv[j]));
            }
#pragma GCC unroll 8
            for (int t = 0; t < TT; t++) {
                const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(m, kh + (size_t)t * row / 2 + i);
#pragma GCC unroll 4
                for (int j = 0; j < NH; j++) a[t * HG + u * NH + j] = _mm512_dpbf16_ps(a[t * HG + u * NH + j], x, (__m512bh)qv[j]);
            }
        }
    }
}
#endif

// Row t's int8 scales for heads h0 .. h0 + n - 1 (n <= 16), one lane per head. With G > 1 a
// lane's KV head is floor((h + 0.5) / G), exact in float for h < 2^16 (the fraction stays >= 0.5 / G
// from an integer), and a permute picks it from the row's scales: the scalar loop with a store
// and a vector load that this replaced stalled store forwarding on every row (Llama int8).
FD_INLINE __m512 head_scales(const uint16_t *s, int t, int Hkv, int h0, int n, int G) {
    if (G == 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask_for(n), s + (size_t)t * Hkv + h0));
    const __m512 h = _mm512_add_ps(_mm512_set1_ps((float)h0 + 0.5f),
                                   _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i kv = _mm512_cvttps_epi32(_mm512_mul_ps(h, _mm512_set1_ps(1.0f / (float)G)));
    const int first = _mm_cvtsi128_si32(_mm512_castsi512_si128(kv)), left = Hkv - first;
    const __m512 row = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask_for(left < 16 ? left : 16), s + (size_t)t * Hkv + first));
    return _mm512_permutexvar_ps(_mm512_sub_epi32(kv, _mm512_set1_epi32(first)), row);
}

// Scores of TT token rows (k, k + row, ..) for every head: st[t * Hq + h]. A tile is HG
// heads x TT rows: 16 independent dot products, then one transposed reduction gives their sums;
// float K is scaled by `scale`, int8 K by its row scales too (and, with q8, by qmul less qcorr).
FD_INLINE void rows_scores(const Seq *sq, const char *k, const uint16_t *ks, size_t row, int TT, size_t head,
                           int Hq, int Hkv, int NH, int D, int dt, float scale, float *restrict st, Pf *pf) {
    const int HG = tile_heads(TT, NH), G = Hq / Hkv;
    const uint64_t gm = div_magic(G);
    for (int h0 = 0; h0 < Hq; h0 += HG) {
        // the sum of row t, head h0 + j is in lane hsum_lane(t * HG + j) of s: gather row t's below.
        __m512 s;
#if FD_VNNI
        if (dt == FD_I8) s = tile_sums_q8(sq->q8, k, row, TT, head, h0, Hq, G, NH, D, pf);
        else
#endif
        {
            __m512 a[16];  // a[t * HG + j]: row t, head h0 + j, as 16 partial sums
#if FD_BF16DOT
            if (dt == FD_BF16) tile_dots_bf16(a, sq->qb, k, row, TT, head, h0, Hq, G, NH, D, pf);
            else
#endif
            tile_dots(a, sq->q, k, row, TT, head, h0, Hq, G, NH, D, dt, pf);
            s = hsum16x16(a, 0);
        }
        const int n = Hq - h0 < HG ? Hq - h0 : HG;
        const __mmask16 keep = mask_for(n);
        __m512 mul = _mm512_set1_ps(scale), corr = _mm512_setzero_ps();
#if FD_VNNI
        if (dt == FD_I8) mul = _mm512_maskz_loadu_ps(keep, sq->qmul + h0), corr = _mm512_maskz_loadu_ps(keep, sq->qcorr + h0);
#endif
#pragma GCC unroll 8
        for (int t = 0; t < TT; t++) {
            const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(t * HG), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_permutexvar_ps(hsum_lane(lanes), s), corr), mul);
            if (dt == FD_I8)  // a tile within one KV head (HG == NH) has one scale per row: a broadcast
                x = _mm512_mul_ps(x, HG == NH ? _mm512_cvtph_ps(_mm256_set1_epi16((short)ks[(size_t)t * Hkv + div_g(h0, gm)])) : head_scales(ks, t, Hkv, h0, n, G));
            _mm512_mask_storeu_ps(st + (size_t)t * Hq + h0, keep, x);
        }
    }
}

// acc[h] += sum over the TT rows t of p[t * Hq + h] * v_t[h / G] (times the row's scale for
// int8): each accumulator vector loaded and stored once for the TT rows, each V vector
// converted once for the NH heads sharing it. Tried for GQA: 8 rows per tile with the weights
// as broadcast memory operands (half the accumulator loads and stores): no faster (Llama-3-8b
// in cache 1.02x, from memory 0.98x): with 4 query heads per KV head the FMAs bind.
FD_INLINE void rows_accumulate(float *restrict acc, const float *restrict p, const char *v, const uint16_t *vs, size_t row,
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
                pj[t][j] = _mm512_set1_ps(p[(size_t)t * Hq + h + j] * (dt == FD_I8 ? _cvtsh_ss(vs[(size_t)t * Hkv + hk]) : 1.0f));
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

// The sums of a pair-interleaved pass (rows_accumulate_q8, rows4_accumulate_bf16) sit, per 32
// elements, as [d 0-3, 8-11, 16-19, 24-27 | d 4-7, 12-15, 20-23, 28-31]: *x0, *x1 into d order
// by four 128-bit shuffles.
FD_INLINE void d_order(__m512i *x0, __m512i *x1) {
    const __m512i lo = _mm512_shuffle_i32x4(*x0, *x1, 0x44), hi = _mm512_shuffle_i32x4(*x0, *x1, 0xee);
    *x0 = _mm512_shuffle_i32x4(lo, lo, 0xd8), *x1 = _mm512_shuffle_i32x4(hi, hi, 0xd8);
}

#if FD_VNNI
// --- int8 V by integer dot products (vpdpwssd), a block at a time ---
// Converting int8 V to float costs a widening and a conversion per 16 elements before each FMA,
// and that bound int8 (its V pass cost as much per token as fp16's). Instead: the block's
// weights w = p * v_scale become int16 per head (w16 = round(w * 32767 / max_t w): the error is
// at most max w / 65534 per token, against int8 V's own max|v| / 254), V rows are widened to
// int16, and vpdpwssd adds w16[t] * v[t] + w16[t+1] * v[t+1] into int32 lanes: 32 products per
// instruction, no conversion. A block's sums (<= 128 * 32767 * 127 < 2^31) are scaled into the
// float accumulators once per block (fold_q8).

// w16 pairs for the block's first nb2 rows (nb2 even): wp[(t / 2) * Hq + h] holds w16[t] in its
// low half and w16[t + 1] in its high half for head h; wq[h] = max_t w / 32767 turns sums back.
// Where a row of p is whole vectors (Hq % 16 == 0), p becomes w on the way: the first pass stores
// p * v_scale back, so the scales are read and widened once (from memory, 1 thread: OPT-1.3b and
// Llama-3-8b 1.07-1.08x; 2 threads 0.98x and 1.04x). With other head counts the rows share lines,
// and loads after masked stores into the same lines stalled (SmolLM2's 9 heads: int8 over fp16
// 1.27x -> 1.06-1.09x in `bench.py kernel`), so there the second pass multiplies again.
FD_INLINE void pack_w16(uint32_t *restrict at, __mmask16 k, __m512 w0, __m512 w1, __m512 inv) {
    const __m512i lo = _mm512_cvtps_epi32(_mm512_mul_ps(w0, inv)), hi = _mm512_cvtps_epi32(_mm512_mul_ps(w1, inv));
    _mm512_mask_storeu_epi32(at, k, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
}

FD_INLINE void block_weights_i16(float *p, const uint16_t *vs, int nb2, int Hq, int Hkv, int G,
                                 uint32_t *restrict wp, float *restrict wq) {
    const int keep = Hq % 16 == 0;
    for (int h0 = 0; h0 < Hq; h0 += 16) {
        const __mmask16 k = mask_for(Hq - h0);
        const int n = Hq - h0 < 16 ? Hq - h0 : 16;
        __m512 mx = _mm512_setzero_ps();
#define W_AT(t) _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + (size_t)(t) * Hq + h0), head_scales(vs, t, Hkv, h0, n, G))
        if (keep)
            for (int t = 0; t < nb2; t++) {
                const __m512 w = W_AT(t);
                _mm512_storeu_ps(p + (size_t)t * Hq + h0, w);
                mx = _mm512_max_ps(mx, w);
            }
        else
            for (int t = 0; t < nb2; t++) mx = _mm512_max_ps(mx, W_AT(t));
        const __mmask16 pos = _mm512_cmp_ps_mask(mx, _mm512_setzero_ps(), _CMP_GT_OQ);
        const __m512 inv = _mm512_maskz_div_ps(pos, _mm512_set1_ps(32767.0f), mx);  // 0 where every w is 0
        _mm512_mask_storeu_ps(wq + h0, k, _mm512_mul_ps(mx, _mm512_set1_ps(1.0f / 32767.0f)));
        if (keep)
            for (int t = 0; t < nb2; t += 2)
                pack_w16(wp + (size_t)(t / 2) * Hq + h0, k, _mm512_loadu_ps(p + (size_t)t * Hq + h0),
                         _mm512_loadu_ps(p + (size_t)(t + 1) * Hq + h0), inv);
        else
            for (int t = 0; t < nb2; t += 2) pack_w16(wp + (size_t)(t / 2) * Hq + h0, k, W_AT(t), W_AT(t + 1), inv);
#undef W_AT
    }
}

// acci[h] += the TT rows' w16 . v for every head (rows v, v + row, ..; TT = 4 or 8, pairs of
// rows): per 32 elements of a row, widened to int16 and interleaved with the next row's, so lane
// 4k + i of the first vector holds d = 8k + i of the pair and of the second d = 8k + 4 + i
// (fold_q8 undoes this order). Each int32 accumulator is loaded and stored once for the TT rows.
FD_INLINE void rows_accumulate_q8(int32_t *restrict acci, const uint32_t *wp, const char *v, size_t row, size_t head,
                                  int Hq, int Hkv, int NH, int D, int TT, Pf *pf) {
    const uint64_t gm = div_magic(Hq / Hkv);
    for (int h = 0; h < Hq; h += NH) {
        const char *vh = v + (size_t)div_g(h, gm) * head;
        pf_step(pf);
        __m512i w[4][4];  // [pair][head]
#pragma GCC unroll 4
        for (int u = 0; u < TT / 2; u++)
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) w[u][j] = _mm512_set1_epi32((int)wp[(size_t)u * Hq + h + j]);
        for (int i = 0; i < D; i += 32) {
            __m512i x[4][2];  // [pair][lo, hi]
#pragma GCC unroll 4
            for (int u = 0; u < TT / 2; u++) {
                const __m512i r0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vh + (size_t)(2 * u) * row + i)));
                const __m512i r1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vh + (size_t)(2 * u + 1) * row + i)));
                x[u][0] = _mm512_unpacklo_epi16(r0, r1), x[u][1] = _mm512_unpackhi_epi16(r0, r1);
            }
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) {
                int32_t *a = acci + (size_t)(h + j) * D + i;
                __m512i a0 = _mm512_loadu_si512(a), a1 = _mm512_loadu_si512(a + 16);
#pragma GCC unroll 4
                for (int u = 0; u < TT / 2; u++)
                    a0 = _mm512_dpwssd_epi32(a0, w[u][j], x[u][0]), a1 = _mm512_dpwssd_epi32(a1, w[u][j], x[u][1]);
                _mm512_storeu_si512(a, a0);
                _mm512_storeu_si512(a + 16, a1);
            }
        }
    }
}

// acc[h] += wq[h] * acci[h] in d order, and acci = 0 for the next block.
FD_INLINE void fold_q8(float *restrict acc, int32_t *restrict acci, const float *wq, int Hq, int D) {
    for (int h = 0; h < Hq; h++) {
        const __m512 s = _mm512_set1_ps(wq[h]);
        for (int i = 0; i < D; i += 32) {
            int32_t *a = acci + (size_t)h * D + i;
            float *o = acc + (size_t)h * D + i;
            __m512i d0 = _mm512_loadu_si512(a), d1 = _mm512_loadu_si512(a + 16);
            d_order(&d0, &d1);
            _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), s, _mm512_loadu_ps(o)));
            _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), s, _mm512_loadu_ps(o + 16)));
            _mm512_storeu_si512(a, _mm512_setzero_si512());
            _mm512_storeu_si512(a + 16, _mm512_setzero_si512());
        }
    }
}
#endif

#if FD_BF16DOT
// --- bf16 V by vdpbf16ps, 4 rows (2 pairs) at a time ---
// The block's weights p go to bf16 (as torch's own bf16 attention rounds them: a relative error
// of at most 2^-8 per weight) in pairs of rows, and each V row pair, interleaved as in
// rows_accumulate_q8, adds p[t] * v[t] + p[t+1] * v[t+1] in one instruction per 16 lanes: half
// the FMAs of fp16 V and no conversion. The float accumulators stay in the interleaved order for
// the whole chunk (the per-block rescale is one factor per head: order-free) and go back to d
// order once, at its end (bf16_d_order).

// wp[(t / 2) * Hq + h] = bf16(p[t][h]) | bf16(p[t + 1][h]) << 16 for the block's nb rows, padded
// with zero weights to a multiple of TRB rows.
FD_INLINE void block_weights_bf16(const float *p, int nb, int Hq, uint32_t *restrict wp) {
    for (int t = 0; t < (nb + TRB - 1) / TRB * TRB; t += 2)
        for (int h0 = 0; h0 < Hq; h0 += 16) {
            const __mmask16 k = mask_for(Hq - h0);
            const __m512 w0 = _mm512_maskz_loadu_ps(t < nb ? k : 0, p + (size_t)t * Hq + h0);
            const __m512 w1 = _mm512_maskz_loadu_ps(t + 1 < nb ? k : 0, p + (size_t)(t + 1) * Hq + h0);
            const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w0));
            const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w1));
            _mm512_mask_storeu_epi32(wp + (size_t)(t / 2) * Hq + h0, k, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
}

// acc[h] (interleaved order) += the TRB rows' weighted V for every head; r[t] are the rows (a row
// past the block's end repeats the first, under a zero weight).
FD_INLINE void rows_accumulate_bf16(float *restrict acc, const uint32_t *wp, const char *const r[TRB], size_t head,
                                    int Hq, int Hkv, int NH, int D, Pf *pf) {
    const uint64_t gm = div_magic(Hq / Hkv);
    for (int h = 0; h < Hq; h += NH) {
        const size_t off = (size_t)div_g(h, gm) * head;
        pf_step(pf);
        __m512bh w[TRB / 2][4];
#pragma GCC unroll 4
        for (int u = 0; u < TRB / 2; u++)
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) w[u][j] = (__m512bh)_mm512_set1_epi32((int)wp[(size_t)u * Hq + h + j]);
        for (int i = 0; i < D; i += 32) {
            __m512bh lo[TRB / 2], hi[TRB / 2];
#pragma GCC unroll 4
            for (int u = 0; u < TRB / 2; u++) {
                const __m512i x0 = _mm512_loadu_si512(r[2 * u] + off + 2 * (size_t)i);
                const __m512i x1 = _mm512_loadu_si512(r[2 * u + 1] + off + 2 * (size_t)i);
                lo[u] = (__m512bh)_mm512_unpacklo_epi16(x0, x1), hi[u] = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
            }
#pragma GCC unroll 4
            for (int j = 0; j < NH; j++) {
                float *a = acc + (size_t)(h + j) * D + i;
                __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + 16);
#pragma GCC unroll 4
                for (int u = 0; u < TRB / 2; u++) a0 = _mm512_dpbf16_ps(a0, lo[u], w[u][j]), a1 = _mm512_dpbf16_ps(a1, hi[u], w[u][j]);
                _mm512_storeu_ps(a, a0), _mm512_storeu_ps(a + 16, a1);
            }
        }
    }
}

// bf16(x[i]) for i < n, 16 at a time, rounded to nearest even (as torch rounds to bf16); one
// element at a time, in C, this took 8% of a batch-16 call at SmolLM2's shapes.
FD_INLINE void round_bf16(const float *x, size_t n, uint16_t *restrict out) {
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 m = mask_for(n - i < 16 ? (int)(n - i) : 16);
        _mm256_mask_storeu_epi16(out + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

FD_INLINE void bf16_d_order(float *acc, int Hq, int D) {
    for (size_t i = 0; i < (size_t)Hq * D; i += 32) {
        __m512i x0 = _mm512_loadu_si512(acc + i), x1 = _mm512_loadu_si512(acc + i + 16);
        d_order(&x0, &x1);
        _mm512_storeu_si512(acc + i, x0), _mm512_storeu_si512(acc + i + 16, x1);
    }
}
#endif

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

// The block's scores taken flat, 16 at a time whatever their rows: lane j of vector i holds head
// (16 i + j) % Hq, a pattern that repeats every P vectors (P = Hq / gcd(Hq, 16), at most 16 here,
// so Hq <= 128). Each phase p of the pattern keeps its max and sum in a register over vectors
// p, p + P, ..; they are folded into heads once per block, a scalar pass over 16 P lanes.
FD_INLINE void block_softmax_flat(float *st, int nb, int Hq, int P, float *m, float *l, float *c) {
    const int n = nb * Hq;
    float lanes[256], mn[128], sum[128];
    for (int p = 0; p < P; p++) {
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int i = 16 * p; i < n; i += 16 * P) mx = _mm512_mask_max_ps(mx, mask_for(n - i), mx, _mm512_loadu_ps(st + i));
        _mm512_storeu_ps(lanes + 16 * p, mx);
    }
    for (int h = 0; h < Hq; h++) mn[h] = m[h], sum[h] = 0.0f;
    for (int k = 0, h = 0; k < 16 * P; k++, h = h + 1 == Hq ? 0 : h + 1) mn[h] = lanes[k] > mn[h] ? lanes[k] : mn[h];
    for (int k = 0, h = 0; k < 16 * P; k++, h = h + 1 == Hq ? 0 : h + 1) lanes[k] = mn[h];  // now the pattern of maxima
    for (int p = 0; p < P; p++) {
        const __m512 mp = _mm512_loadu_ps(lanes + 16 * p);
        __m512 s = _mm512_setzero_ps();
        for (int i = 16 * p; i < n; i += 16 * P) {
            const __mmask16 k = mask_for(n - i);
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, st + i), mp));
            _mm512_mask_storeu_ps(st + i, k, e);
            s = _mm512_mask_add_ps(s, k, s, e);
        }
        _mm512_storeu_ps(lanes + 16 * p, s);
    }
    for (int k = 0, h = 0; k < 16 * P; k++, h = h + 1 == Hq ? 0 : h + 1) sum[h] += lanes[k];
    for (int h0 = 0; h0 < Hq; h0 += 16) {
        const __mmask16 k = mask_for(Hq - h0);
        const __m512 mo = _mm512_maskz_loadu_ps(k, m + h0), mx = _mm512_maskz_loadu_ps(k, mn + h0);
        const __m512 cc = exp_neg(_mm512_sub_ps(mo, mx));  // as below
        _mm512_mask_storeu_ps(c + h0, k, cc);
        _mm512_mask_storeu_ps(l + h0, k, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, l + h0), cc, _mm512_maskz_loadu_ps(k, sum + h0)));
        _mm512_mask_storeu_ps(m + h0, k, mx);
    }
}

// Sixteen heads per vector: the block's max, exps and sum need no horizontal operation. When Hq
// is not a multiple of 16 a row leaves lanes idle (7 of 16 for SmolLM2's 9 heads), so the block
// goes flat instead (block_softmax_flat: 1.34x for a whole call at SmolLM2's shapes, 9:3 heads,
// D = 64, bf16, one thread, in cache; A/B in one process).
FD_INLINE void block_softmax(float *st, int nb, int Hq, float *m, float *l, float *c) {
    const int P = Hq / ((Hq & -Hq) < 16 ? (Hq & -Hq) : 16);
    if (Hq % 16 && P <= 16) {
        block_softmax_flat(st, nb, Hq, P, m, l, c);
        return;
    }
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
