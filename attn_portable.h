// attn_portable.h - the kernel's three operations (see attn_cpu.c) one head at a time, for
// builds without AVX-512: AVX2+F16C+FMA where the compiler targets it, plain C elsewhere (left
// to the auto-vectorizer). Same algorithm and results as attn_avx512.h, within rounding.
#pragma once

#if FD_AVX2
FD_INLINE __m256 load8(const void *p, int i, int dt) {
    if (dt == FD_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    if (dt == FD_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
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
FD_INLINE void rows_scores(const Seq *sq, const char *k, const uint16_t *ks, size_t row, int TT, size_t head,
                           int Hq, int Hkv, int NH, int D, int dt, float scale, float *st, Pf *pf) {
    const int G = Hq / Hkv;
    for (int t = 0; t < TT; t++)  // row by row; the tile's Hq / NH prefetch steps spread evenly
        for (int h = 0; h < Hq; h++) {
            if ((t * Hq + h) % (TT * NH) == 0) pf_step(pf);
            const float sc = dt == FD_I8 ? scale * kv_scale(ks, t, Hkv, h, G) : scale;
            st[(size_t)t * Hq + h] = sc * dot(sq->q + (size_t)h * D, k + (size_t)t * row + (size_t)(h / G) * head, D, dt);
        }
}
FD_INLINE void rows_accumulate(float *acc, const float *p, const char *v, const uint16_t *vs, size_t row, int TT,
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
