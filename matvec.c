// matvec.c - the S-Part's matmuls at a few rows on a CPU: a read of the weights, at memory speed.
//
// A decode step at batch 1 multiplies one activation row by every weight matrix of the model:
// each weight is read once and used for one multiply-add. That is a read of the weights, and
// its limit is the memory's read rate (SmolLM2-135M: 269 MB of bf16 a step, ~8 ms here).
// oneDNN's prepacked bf16 linear (fast.py) reads them at 17-21 GB/s at 1-4 rows on this host
// (AMD EPYC Zen 4, 2 threads); this file's loop reads them at 29-30 GB/s, the memory's rate.
//
//     y[m, n] = bf16( sum_k x[m, k] * w[n, k]  + b[n] )       m < M (1-8 rows), fp32 sums
//
// Two things make it reach the read rate, both measured on SmolLM2's four matrices cycling
// through 30 layers (213 MB, 2 threads, against oneDNN's 18.6-19.1 GB/s at one row):
//   - the weights are stored in tiles of 8 rows by 32 columns, tile after tile as the loop
//     reads them ([N/8, K/32, 8, 32]: fast.py's `tile_pack`): one stream in address order.
//     The plain [N, K] layout read 8 rows at a time is 8 short streams (1152 bytes each for
//     K = 576), which the hardware prefetchers follow badly: 22.7 GB/s, one thread 13 GB/s;
//     tiled 30.4 GB/s, one thread 28.9. Software prefetches on the plain layout did not help;
//   - AVX512_BF16's vdpbf16ps: two bf16 products added into each fp32 lane in one instruction,
//     no conversion. With the data in cache the loop runs at ~80 GB/s on one core, so on this
//     host the memory binds, not the instructions.
// Each weight vector loaded serves every row of x (up to 3 at a time, from registers), so the
// weights are read from memory once per call whatever M is; the instructions grow with M, and
// past 8 rows oneDNN's blocked kernel is faster (16 rows: 14.6 against 13.6 GB/s): fast.py
// sends only calls of at most MATVEC_ROWS rows here.
//
// Without AVX512_BF16 this file builds to a stub that says so (fd_mv_available() == 0) and
// fast.py keeps oneDNN's linear for every call.
//
// Legend: M rows of x, K input width, N output width (a multiple of 8; K of 32).

#include <stdint.h>
#include <omp.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define TILE_N 8    // weight rows per tile: 8 fp32 accumulators per row of x
#define TILE_K 32   // columns per tile row: one 64-byte vector of bf16

int fd_mv_available(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512BF16__

// One tile column (8 output columns, all of K) for MM rows of x: acc[m][r] sums x[m] . w[n0 + r].
// x [MM, K] bf16; t: the tile column [K/32, 8, 32] bf16; y, b: this tile column's 8 outputs.
#define TILE_FN(MM)                                                                              \
static inline void tile_##MM(const uint16_t *x, int K, const uint16_t *t, const float *bias,    \
                             uint16_t *y, int N) {                                               \
    __m512 acc[MM][TILE_N];                                                                      \
    for (int m = 0; m < MM; m++)                                                                 \
        for (int r = 0; r < TILE_N; r++) acc[m][r] = _mm512_setzero_ps();                       \
    for (int k = 0; k < K; k += TILE_K, t += TILE_N * TILE_K) {                                  \
        __m512bh xv[MM];                                                                         \
        for (int m = 0; m < MM; m++) xv[m] = (__m512bh)_mm512_loadu_si512(x + (long)m * K + k);  \
        for (int r = 0; r < TILE_N; r++) {                                                       \
            __m512bh wv = (__m512bh)_mm512_loadu_si512(t + r * TILE_K);                          \
            for (int m = 0; m < MM; m++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv[m], wv);     \
        }                                                                                        \
    }                                                                                            \
    for (int m = 0; m < MM; m++) {                                                               \
        float s[TILE_N];                                                                         \
        for (int r = 0; r < TILE_N; r++) s[r] = _mm512_reduce_add_ps(acc[m][r]) + bias[r];      \
        /* round to nearest even, as oneDNN rounds its fp32 sums */                              \
        __m128bh out = _mm256_cvtneps_pbh(_mm256_loadu_ps(s));                                   \
        _mm_storeu_si128((__m128i *)(y + (long)m * N), (__m128i)out);                           \
    }                                                                                            \
}
TILE_FN(1)
TILE_FN(2)
TILE_FN(3)   // 24 accumulators + 3 rows of x + 1 weight vector: 28 of the 32 registers

#endif

// y [M, N] bf16 = x [M, K] bf16 . w^T (+ b), w tiled as [N/8, K/32, 8, 32] bf16, b [N] fp32
// or NULL. Threads split the tile columns. Returns 0, or -1 for bad dimensions or no AVX512_BF16.
int fd_mv_bf16(const uint16_t *x, int M, int K, const uint16_t *tiles, int N,
               const float *b, uint16_t *y, int threads) {
    if (M < 1 || K < TILE_K || K % TILE_K || N < TILE_N || N % TILE_N || threads < 1 || !fd_mv_available())
        return -1;
#ifdef __AVX512BF16__
    static const float zero[TILE_N];
    int columns = N / TILE_N;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int c = 0; c < columns; c++) {
        const uint16_t *t = tiles + (long)c * TILE_N * K;    // this column's tiles, K/32 of them
        const float *bias = b ? b + c * TILE_N : zero;
        uint16_t *out = y + c * TILE_N;
        int m = 0;
        for (; M - m >= 3; m += 3) tile_3(x + (long)m * K, K, t, bias, out + (long)m * N, N);
        if (M - m == 2) tile_2(x + (long)m * K, K, t, bias, out + (long)m * N, N);
        if (M - m == 1) tile_1(x + (long)m * K, K, t, bias, out + (long)m * N, N);
    }
    return 0;
#else
    (void)x; (void)tiles; (void)b; (void)y;
    return -1;
#endif
}
