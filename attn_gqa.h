// attn_gqa.h - GQA groups that no tile size divides, padded to one that does. The kernel's
// tiles take 4, 3 or 2 query heads per KV head (attend_chunk's NH) and convert each K and V vector
// once for them; a group of 5 or 7 heads would take one head at a time. fd_decode_attention calls
// attend_padded for such groups, which runs the kernel itself on a padded copy of q. Included by
// attn_cpu.c after the SIMD flavor (one translation unit, one .so).
#pragma once

// GQA groups of 5, 7, 11, .. query heads: no tile size (attend_chunk's NH: 4, 3 or 2 heads that
// share each converted K and V vector) divides them, and one head at a time converts each vector
// G times. Padding every group with zero queries to the next multiple of 4 or 3 (5 -> 6, 7 -> 8)
// costs the dummy heads' arithmetic (a zero query weighs the rows evenly: finite, then dropped)
// and saves the conversions. Returns G itself where a tile size divides it.
static int padded_group(int G) {
    int g = G;
#if FD_AVX512  // (the portable flavor takes one head at a time anyway)
    if (G > 1 && G % 2 && G % 3)
        while (g % 4 && g % 3) g++;
#endif
    return g;
}

int fd_decode_attention(const float *, const void *const *, const void *const *, const uint16_t *const *,
                        const uint16_t *const *, const int64_t *, int, int, int, int, int, float, int, float *);

// fd_decode_attention with each group of G query heads padded to Gp (see padded_group).
static int attend_padded(const float *q, const void *const *k, const void *const *v, const uint16_t *const *ks,
                         const uint16_t *const *vs, const int64_t *lens, int S, int Hq, int Hkv, int D, int kv_dtype,
                         float scale, int nthreads, float *o, int Gp) {
    const int G = Hq / Hkv, Hp = Hkv * Gp;
    float *qp = calloc((size_t)S * Hp * D * 2, sizeof(float)), *op = qp + (size_t)S * Hp * D;  // [S, Hp, D] each
    if (!qp) return -3;
    for (int s = 0; s < S; s++)  // head h is head h % G of group h / G: padded head (h / G) * Gp + h % G
        for (int h = 0; h < Hq; h++)
            memcpy(qp + ((size_t)s * Hp + (size_t)(h / G) * Gp + h % G) * D, q + ((size_t)s * Hq + h) * D, sizeof(float) * D);
    const int rc = fd_decode_attention(qp, k, v, ks, vs, lens, S, Hp, Hkv, D, kv_dtype, scale, nthreads, op);
    for (int s = 0; rc == 0 && s < S; s++)
        for (int h = 0; h < Hq; h++)
            memcpy(o + ((size_t)s * Hq + h) * D, op + ((size_t)s * Hp + (size_t)(h / G) * Gp + h % G) * D, sizeof(float) * D);
    free(qp);
    return rc;
}
