// matvec_cpu.c - the S-Part's matmuls at a few rows on a CPU: a read of the weights, at memory speed.
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
//     reads them ([N/8, K/32, 8, 32]: matvec.py's `tile_pack`): one stream in address order.
//     The plain [N, K] layout read 8 rows at a time is 8 short streams (1152 bytes each for
//     K = 576), which the hardware prefetchers follow badly: 22.7 GB/s, one thread 13 GB/s;
//     tiled 30.4 GB/s, one thread 28.9. Software prefetches on the plain layout did not help;
//   - AVX512_BF16's vdpbf16ps: two bf16 products added into each fp32 lane in one instruction,
//     no conversion. With the data in cache the loop runs at ~80 GB/s on one core, so on this
//     host the memory binds, not the instructions.
// Each weight vector loaded serves every row of x (up to 3 at a time, from registers), so the
// weights are read from memory once per call whatever M is, but the multiply-adds grow with M:
// at 16 rows, in cache, the loop issues 0.94 vdpbf16ps a cycle (one core), its peak here, and
// from memory SmolLM2's post-attention half took 17.1 ms a step against oneDNN's 16.0 (12 rows:
// 16.0 against 14.4; 8 rows: 11.2 against 13.1). So only calls of at most MAX_ROWS rows come here.
//
// A Llama layer's two halves are one call each (fd_llama_pre_bf16, fd_llama_post_bf16): the
// norm, the activation and the residual adds between the matmuls, with each of torch's bf16
// roundings, so that the results equal spart.py's torch forward bit for bit (on SmolLM2's real
// text, all 570 calls of a 20-token generation). At batch 1 those ~15 small torch calls a layer
// had cost about as much as reading the layer's weights.
//
// Without AVX512_BF16 this file builds to a stub that says so (fd_mv_available() == 0) and
// every call stays with torch and oneDNN (matvec.py).
//
// Legend: M rows of x, K input width, N output width (a multiple of 8; K of 32).

#include <math.h>
#include <stdint.h>
#include <omp.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define TILE_N 8    // weight rows per tile: 8 fp32 accumulators per row of x
#define TILE_K 32   // columns per tile row: one 64-byte vector of bf16
#define MAX_ROWS 8  // rows of x a call takes (matvec.py's MATVEC_ROWS): past it oneDNN is faster

int fd_mv_available(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

// bf16 <-> float32: a bf16 is the top half of a float32; rounding to nearest even, as torch does.
static inline float from_bf16(uint16_t v) { union { uint32_t u; float f; } c = { (uint32_t)v << 16 }; return c.f; }
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } c = { f };
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);   // NaN stays NaN
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1)) >> 16);
}

#ifdef __AVX512BF16__

// The 16 lanes of each of a[0..7] summed: [sum a0, ..., sum a7]. A tree of shuffles and adds
// (18 instructions) in place of eight horizontal sums (~64): at K = 576 and 16 rows the eight
// sums had cost as much as the multiply-adds.
static inline __m256 reduce8(const __m512 *a) {
    __m512 p[4], q[2];
    for (int i = 0; i < 4; i++)   // [a.lo256 + a.hi256, b.lo256 + b.hi256] for a, b = a[2i], a[2i+1]
        p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)   // 4 partial sums of each of a[4i..4i+3], one per 128-bit lane
        q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xDD));
    __m512 w = _mm512_add_ps(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
    w = _mm512_add_ps(w, _mm512_permute_ps(w, 0x4E));   // lane l: [sum a_l, sum a_(4+l), ...]
    __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, w));
}

// y[0..7] = bf16(sum + bias), or with a residual bf16(res + bf16(sum + bias)): torch's roundings
// of `h + linear(x, w, b)` in bf16 (vcvtneps2bf16 rounds to nearest even, as torch does).
static inline void store8(__m256 sum, const float *bias, const uint16_t *res, uint16_t *y) {
    __m128i v = (__m128i)_mm256_cvtneps_pbh(_mm256_add_ps(sum, _mm256_loadu_ps(bias)));
    if (res) {
        __m256 widen_r = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)res)), 16));
        __m256 widen_v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
        v = (__m128i)_mm256_cvtneps_pbh(_mm256_add_ps(widen_r, widen_v));
    }
    _mm_storeu_si128((__m128i *)y, v);
}

// One tile column (8 output columns, all of K) for MM rows of x: acc[m][r] sums x[m] . w[n0 + r].
// x [MM, K] bf16; t: the tile column [K/32, 8, 32] bf16; bias, res, y: this column's 8 outputs
// (res, the residual, may be NULL; it may be y itself). y = bf16(res + bf16(sum + bias)), the
// two roundings of torch's `h + linear(x, w, b)` in bf16.
#define TILE_FN(MM)                                                                              \
static inline void tile_##MM(const uint16_t *x, int K, const uint16_t *t, const float *bias,    \
                             const uint16_t *res, uint16_t *y, int N) {                          \
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
    for (int m = 0; m < MM; m++) store8(reduce8(acc[m]), bias, res ? res + (long)m * N : 0, y + (long)m * N); \
}
TILE_FN(1)
TILE_FN(2)
TILE_FN(3)   // 24 accumulators + 3 rows of x + 1 weight vector: 28 of the 32 registers

// y [M, N] = (res +) x [M, K] . w^T (+ b), the tile columns shared among the threads of the
// enclosing parallel region (an orphaned `omp for`: its end is a barrier).
static void mv_tiles(const uint16_t *x, int M, int K, const uint16_t *tiles, int N, const float *b,
                     const uint16_t *res, uint16_t *y) {
    static const float zero[TILE_N];
    #pragma omp for schedule(static)
    for (int c = 0; c < N / TILE_N; c++) {
        const uint16_t *t = tiles + (long)c * TILE_N * K;    // this column's tiles, K/32 of them
        const float *bias = b ? b + c * TILE_N : zero;
        long at = (long)c * TILE_N;
        int m = 0;
        for (; M - m >= 3; m += 3, at += 3L * N) tile_3(x + (long)m * K, K, t, bias, res ? res + at : 0, y + at, N);
        if (M - m == 2) tile_2(x + (long)m * K, K, t, bias, res ? res + at : 0, y + at, N);
        if (M - m == 1) tile_1(x + (long)m * K, K, t, bias, res ? res + at : 0, y + at, N);
    }
}

// x [M, H] = bf16(bf16(h * rsqrt(mean(h^2) + eps)) * w): Llama's RMSNorm with HF's two roundings.
static void rms_norm_rows(const uint16_t *h, int M, int H, const uint16_t *w, float eps, uint16_t *x) {
    #pragma omp for schedule(static)
    for (int m = 0; m < M; m++) {
        const uint16_t *hm = h + (long)m * H;
        double ss = 0;   // torch's sum is pairwise: a float32 sum in order rounded differently, in
                         // 45 of 1.15 M outputs against 2 for this one (random rows, H = 576)
        for (int i = 0; i < H; i++) ss += from_bf16(hm[i]) * from_bf16(hm[i]);
        float r = 1.0f / sqrtf((float)ss / H + eps);
        for (int i = 0; i < H; i++)
            x[(long)m * H + i] = to_bf16(from_bf16(to_bf16(from_bf16(hm[i]) * r)) * from_bf16(w[i]));
    }
}

// a [M, F] = bf16(bf16(silu(gate)) * up), gate and up the halves of gu [M, 2F]: Llama's MLP activation.
static void silu_mul_rows(const uint16_t *gu, int M, int F, uint16_t *a) {
    #pragma omp for schedule(static)
    for (long i = 0; i < (long)M * F; i++) {
        long m = i / F, f = i % F;
        float g = from_bf16(gu[m * 2 * F + f]);
        float s = from_bf16(to_bf16(g / (1.0f + expf(-g))));
        a[i] = to_bf16(s * from_bf16(gu[m * 2 * F + F + f]));
    }
}

#endif

static int bad_shape(int M, int K, int N) {
    return M < 1 || M > MAX_ROWS || K < TILE_K || K % TILE_K || N < TILE_N || N % TILE_N;
}

// y [M, N] bf16 = x [M, K] bf16 . w^T (+ b), w tiled as [N/8, K/32, 8, 32] bf16, b [N] fp32
// or NULL. Threads split the tile columns. Returns 0, or -1 for bad dimensions or no AVX512_BF16.
int fd_mv_bf16(const uint16_t *x, int M, int K, const uint16_t *tiles, int N,
               const float *b, uint16_t *y, int threads) {
    if (bad_shape(M, K, N) || threads < 1 || !fd_mv_available())
        return -1;
#ifdef __AVX512BF16__
    #pragma omp parallel num_threads(threads)
    mv_tiles(x, M, K, tiles, N, b, 0, y);
#else
    (void)x; (void)tiles; (void)b; (void)y;
#endif
    return 0;
}

// Llama's pre-attention at a few rows: qkv [M, N] = RMSNorm(h [M, H]) (weight w) . Wqkv^T.
// One call for torch's five (a norm is four ops in bf16 with HF's roundings, then the matmul).
int fd_llama_pre_bf16(const uint16_t *h, int M, int H, const uint16_t *norm_w, float eps,
                      const uint16_t *qkv_tiles, int N, uint16_t *qkv, int threads) {
    if (bad_shape(M, H, N) || threads < 1 || !fd_mv_available())
        return -1;
#ifdef __AVX512BF16__
    uint16_t x[MAX_ROWS * H];   // the normed rows: at most 8 x H bf16 on the stack
    #pragma omp parallel num_threads(threads)
    {
        rms_norm_rows(h, M, H, norm_w, eps, x);
        mv_tiles(x, M, H, qkv_tiles, N, 0, 0, qkv);
    }
#else
    (void)h; (void)norm_w; (void)eps; (void)qkv_tiles; (void)qkv;
#endif
    return 0;
}

// Llama's post-attention at a few rows, in one call for torch's ten:
//     h1 = h + o . Wo^T;   out = h1 + Wdown . (silu(gate) * up),  [gate, up] = RMSNorm(h1) . Wgu^T
// h, out [M, H]; o [M, QD] (all query heads' outputs); gate and up [M, F] each. `gu` and `a` are
// scratch the caller owns: [M, 2F] and [M, F] bf16. Each bf16 rounding is torch's.
int fd_llama_post_bf16(const uint16_t *h, const uint16_t *o, int M, int H, int QD,
                       const uint16_t *out_tiles, const uint16_t *norm_w, float eps,
                       const uint16_t *up_tiles, int F, const uint16_t *down_tiles,
                       uint16_t *gu, uint16_t *a, uint16_t *out, int threads) {
    if (bad_shape(M, QD, H) || bad_shape(M, H, 2 * F) || bad_shape(M, F, H) || threads < 1 || !fd_mv_available())
        return -1;
#ifdef __AVX512BF16__
    uint16_t x[MAX_ROWS * H];
    #pragma omp parallel num_threads(threads)
    {   // each step's `omp for` ends in a barrier: the next one reads what all threads wrote
        mv_tiles(o, M, QD, out_tiles, H, 0, h, out);          // out = h + attention's projection
        rms_norm_rows(out, M, H, norm_w, eps, x);
        mv_tiles(x, M, H, up_tiles, 2 * F, 0, 0, gu);
        silu_mul_rows(gu, M, F, a);
        mv_tiles(a, M, F, down_tiles, H, 0, out, out);        // out += the MLP's output
    }
#else
    (void)h; (void)o; (void)out_tiles; (void)norm_w; (void)eps; (void)up_tiles; (void)down_tiles;
    (void)gu; (void)a; (void)out;
#endif
    return 0;
}
