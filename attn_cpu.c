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
// KV elements are fp32, fp16 or int8. int8 rows carry one float16 scale per (token, KV head)
// beside them (x = scale * int8, symmetric, [L, Hkv] arrays): half of fp16's bytes. A float16
// scale is 2 bytes a head where float32's was 4: OPT-1.3b from memory 1.04-1.09x with one thread
// (A/B against float32 scales in one process), 1.02-1.06x with two; Llama-3-8b, whose tiles are
// compute-bound, 0.95-1.0x with one thread for the conversions, until the V pass widened each
// scale once (block_weights_i16 in attn_avx512.h). With
// AVX512-VNNI, q.k is an integer dot product: q is quantized per head to int8 once per call and
// vpdpbusd multiplies 64 bytes of K by 64 of q in one instruction. vpdpbusd takes its first
// operand unsigned, so K goes in as k + 128 (an xor with 0x80) and the surplus 128 * sum(q8) is
// subtracted from each sum. p.V with VNNI is an integer dot product too, vpdpwssd on int16: the
// block's weights p * v_scale rounded to int16 per head (8 bits would lose the small weights
// beside a large one), V widened to int16 (attn_avx512.h, "int8 V"). Without VNNI, V (and K)
// are converted to float.
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
// Each stream's prefetches run that far ahead of its loads, so an item's first 16 KiB of K and
// of V are prefetched in one burst as it starts: with SmolLM2's 384-byte rows and 145 tokens a
// sequence, a third of each item's rows had been loaded cold (A/B on a 30-layer store, 1 thread:
// 1.10-1.22x from memory for bf16, fp16 and int8; OPT-1.3b and Llama shapes 0.99-1.01x).

// The same library writes a KV store's rows (attn_store.h): fd_store_int8 quantizes float16 in C
// (at batch 16 with OPT-125m's heads a layer's write_batch takes 35 us, 122 in NumPy), and
// fd_decode_step runs a worker's whole layer of a decode step: check, write the new rows, attend.

// Legend: S sequences, Hq query heads, Hkv KV heads, G = Hq/Hkv, D head dim, L cached length.
// Built by `make` into attn_cpu.so (with attn_common.h and one SIMD flavor: attn_avx512.h or
// attn_portable.h) and loaded by rpart.py through ctypes.

#include "attn_common.h"

// --- SIMD helpers. Each flavor provides the same three operations:
//   rows_scores(q, k, row, TT..)     st[t][h] = scale * q[h] . k_t[h / G]   TT token rows, every head
//   block_softmax(st, nb, ..)        the online-softmax update of every head for a block of nb rows
//   rows_accumulate(acc, p, v, TT..) acc[h] += sum_t p[t][h] * v_t[h / G]   TT token rows, every head
// Heads that share a KV head (NH of them: 1, 2, 3 or 4) convert its vector once.
#if FD_AVX512
#include "attn_avx512.h"
#else  // AVX2+F16C or plain C: one head at a time
#include "attn_portable.h"
#endif

#include "attn_gqa.h"  // padded_group, attend_padded: groups of 5, 7, .. heads padded to a tile size

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
    const size_t head = (size_t)D * kv_bytes(dt), row = (size_t)Hkv * head;
    for (int h = 0; h < Hq; h++) { m[h] = -INFINITY; l[h] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)Hq * D);
    // int8 and bf16 V's scratch after c: int32 sums [Hq, D] (int8), weight pairs [BT / 2, Hq], their scales [Hq] (int8)
    int32_t *acci = (int32_t *)(c + Hq);
    uint32_t *wp = (uint32_t *)(acci + (size_t)Hq * D);
    float *wq = (float *)(wp + (size_t)Hq * BT / 2);
#if FD_VNNI
    if (dt == FD_I8) memset(acci, 0, sizeof(int32_t) * (size_t)Hq * D);
#endif
    (void)wq;
#if FD_BF16DOT
    const int bf16_v = dt == FD_BF16 && D % 32 == 0;  // V by vdpbf16ps; acc interleaved until the end
#endif
    const int NH = G % 4 == 0 ? 4 : G % 3 == 0 ? 3 : G % 2 == 0 ? 2 : 1;  // GQA: query heads that share K and V
    const int tk = NH == 3 ? TRK3 : TRK;  // rows of a K tile (tile_heads)
    const int steps = Hq / NH;  // steps of a tile: each issues its share of the prefetches
    const int pf_rows = (int)((PF_AHEAD + row - 1) / row), ahead = pf_rows > tk ? pf_rows : tk;  // rows
    Pf lead_k = rows_ahead(sq->k, t0 - ahead, ahead, ahead, t1, row, 1), lead_v = rows_ahead(sq->v, t0 - ahead, ahead, ahead, t1, row, 1);
    pf_rest(&lead_k);  // the item's first rows, which the prefetches below (ahead of each tile) never cover
    pf_rest(&lead_v);
    for (int b0 = t0; b0 < t1; b0 += BT) {
        const int nb = t1 - b0 < BT ? t1 - b0 : BT;
        for (int t = b0, n; t < b0 + nb; t += n) {  // K: every head's scores, tk rows at a time
            n = b0 + nb - t >= tk ? tk : 1;
            Pf pf = rows_ahead(sq->k, t, n, ahead, t1, row, steps);
            const char *kt = sq->k + (size_t)t * row;
            const uint16_t *ks = sq->ks ? sq->ks + (size_t)t * Hkv : NULL;
            float *st = sc + (size_t)(t - b0) * Hq;
            if (n == 1) rows_scores(sq, kt, ks, row, 1, head, Hq, Hkv, 1, D, dt, scale, st, &pf);
            else if (NH == 4) rows_scores(sq, kt, ks, row, TRK, head, Hq, Hkv, 4, D, dt, scale, st, &pf);
            else if (NH == 3) rows_scores(sq, kt, ks, row, TRK3, head, Hq, Hkv, 3, D, dt, scale, st, &pf);
            else if (NH == 2) rows_scores(sq, kt, ks, row, TRK, head, Hq, Hkv, 2, D, dt, scale, st, &pf);
            else rows_scores(sq, kt, ks, row, TRK, head, Hq, Hkv, 1, D, dt, scale, st, &pf);
            pf_rest(&pf);
        }
        block_softmax(sc, nb, Hq, m, l, c);  // sc now holds the weights; c rescales the old acc
        for (int h = 0; h < Hq; h++)
            if (c[h] != 1.0f)
                for (int i = 0; i < D; i++) acc[(size_t)h * D + i] *= c[h];
        const int tv = NH == 1 ? TRV1 : TRV;
        int v0 = b0;  // the first V row left for the float path
#if FD_VNNI
        if (dt == FD_I8 && D % 32 == 0) {  // int8 V by vpdpwssd, TRQ rows a tile, a last 4 (see attn_avx512.h)
            const int nb4 = nb / 4 * 4;
            block_weights_i16(sc, sq->vs + (size_t)b0 * Hkv, nb4, Hq, Hkv, G, wp, wq);
            for (int n; v0 < b0 + nb4; v0 += n) {
                n = b0 + nb4 - v0 >= TRQ ? TRQ : 4;
                Pf pf = rows_ahead(sq->v, v0, n, ahead, t1, row, steps);
                const uint32_t *w = wp + (size_t)(v0 - b0) / 2 * Hq;
                const char *vt = sq->v + (size_t)v0 * row;
                if (n == 4) rows_accumulate_q8(acci, w, vt, row, head, Hq, Hkv, NH, D, 4, &pf);  // (NH as it is: one variant)
                else if (NH == 4) rows_accumulate_q8(acci, w, vt, row, head, Hq, Hkv, 4, D, TRQ, &pf);
                else if (NH == 3) rows_accumulate_q8(acci, w, vt, row, head, Hq, Hkv, 3, D, TRQ, &pf);
                else if (NH == 2) rows_accumulate_q8(acci, w, vt, row, head, Hq, Hkv, 2, D, TRQ, &pf);
                else rows_accumulate_q8(acci, w, vt, row, head, Hq, Hkv, 1, D, TRQ, &pf);
                pf_rest(&pf);
            }
            fold_q8(acc, acci, wq, Hq, D);
        }
#endif
#if FD_BF16DOT
        if (bf16_v) {  // bf16 V by vdpbf16ps, TRB rows at a time, the last tile padded (see attn_avx512.h)
            block_weights_bf16(sc, nb, Hq, wp);
            for (; v0 < b0 + nb; v0 += TRB) {
                Pf pf = rows_ahead(sq->v, v0, TRB, ahead, t1, row, steps);
                const uint32_t *w = wp + (size_t)(v0 - b0) / 2 * Hq;
                const char *r[TRB];
                for (int t = 0; t < TRB; t++) r[t] = sq->v + (size_t)(v0 + t < b0 + nb ? v0 + t : v0) * row;
                if (NH == 4) rows_accumulate_bf16(acc, w, r, head, Hq, Hkv, 4, D, &pf);
                else if (NH == 3) rows_accumulate_bf16(acc, w, r, head, Hq, Hkv, 3, D, &pf);
                else if (NH == 2) rows_accumulate_bf16(acc, w, r, head, Hq, Hkv, 2, D, &pf);
                else rows_accumulate_bf16(acc, w, r, head, Hq, Hkv, 1, D, &pf);
                pf_rest(&pf);
            }
        }
#endif
        for (int t = v0, n; t < b0 + nb; t += n) {  // V: every head's accumulator, tv rows at a time
            n = b0 + nb - t >= tv ? tv : 1;
            Pf pf = rows_ahead(sq->v, t, n, ahead, t1, row, n == 1 ? Hq : steps);
            const char *vt = sq->v + (size_t)t * row;
            const uint16_t *vs = sq->vs ? sq->vs + (size_t)t * Hkv : NULL;
            const float *p = sc + (size_t)(t - b0) * Hq;
            if (n == 1) rows_accumulate(acc, p, vt, vs, row, 1, head, Hq, Hkv, 1, D, dt, &pf);
            else if (NH == 4) rows_accumulate(acc, p, vt, vs, row, TRV, head, Hq, Hkv, 4, D, dt, &pf);
            else if (NH == 3) rows_accumulate(acc, p, vt, vs, row, TRV, head, Hq, Hkv, 3, D, dt, &pf);
            else if (NH == 2) rows_accumulate(acc, p, vt, vs, row, TRV, head, Hq, Hkv, 2, D, dt, &pf);
            else rows_accumulate(acc, p, vt, vs, row, TRV1, head, Hq, Hkv, 1, D, dt, &pf);
            pf_rest(&pf);
        }
    }
#if FD_BF16DOT
    if (bf16_v) bf16_d_order(acc, Hq, D);
#endif
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
// float32 KV has only the any-D one: at 4 bytes an element its rate stays above the memory's
// with D unknown (A/B, 1 thread, in cache: OPT and SmolLM2 shapes 0.98-1.01x, Llama's 1.2x),
// and two fewer instantiations build 1.3 s faster (each takes ~1 s of the compiler's time).
typedef void (*chunk_fn)(const Seq *, int, int, int, int, int, float, float *, float *, float *, float *, float *);
#define CHUNK_FN(name, DD, DT)                                                                     \
    static void name(const Seq *sq, int t0, int t1, int Hq, int Hkv, int D, float scale, float *sc, \
                     float *c, float *m, float *l, float *acc) {                                    \
        attend_chunk(sq, t0, t1, Hq, Hkv, DD ? DD : D, DT, scale, sc, c, m, l, acc);                \
    }
CHUNK_FN(chunk_f16_d64, 64, FD_F16)
CHUNK_FN(chunk_f16_d128, 128, FD_F16)
CHUNK_FN(chunk_f16_any, 0, FD_F16)
CHUNK_FN(chunk_f32_any, 0, FD_F32)
CHUNK_FN(chunk_i8_d64, 64, FD_I8)
CHUNK_FN(chunk_i8_d128, 128, FD_I8)
CHUNK_FN(chunk_i8_any, 0, FD_I8)
CHUNK_FN(chunk_bf16_d64, 64, FD_BF16)
CHUNK_FN(chunk_bf16_d128, 128, FD_BF16)
CHUNK_FN(chunk_bf16_any, 0, FD_BF16)

static chunk_fn pick_chunk_fn(int D, int dt) {
    if (dt == FD_F16) return D == 64 ? chunk_f16_d64 : D == 128 ? chunk_f16_d128 : chunk_f16_any;
    if (dt == FD_I8) return D == 64 ? chunk_i8_d64 : D == 128 ? chunk_i8_d128 : chunk_i8_any;
    if (dt == FD_BF16) return D == 64 ? chunk_bf16_d64 : D == 128 ? chunk_bf16_d128 : chunk_bf16_any;
    return chunk_f32_any;
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
#if FD_VNNI && FD_BF16DOT
    return FD_SIMD "+vnni+bf16";
#elif FD_VNNI
    return FD_SIMD "+vnni";
#elif FD_BF16DOT
    return FD_SIMD "+bf16";
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
                        const void *const *k,        // S pointers to [L_s, Hkv, D], fp32, fp16, int8 or bf16
                        const void *const *v,        // S pointers to [L_s, Hkv, D]
                        const uint16_t *const *ks,   // S pointers to [L_s, Hkv] float16 scales of int8 K (else NULL)
                        const uint16_t *const *vs,   // S pointers to [L_s, Hkv] float16 scales of int8 V (else NULL)
                        const int64_t *lens,         // [S] L_s >= 1
                        int S, int Hq, int Hkv, int D, int kv_dtype, float scale,
                        int nthreads,                // <= 0: all
                        float *o) {                  // [S, Hq, D] out
    if (S < 1 || Hq < 1 || Hq > 65535 || Hkv < 1 || Hq % Hkv || D < 8 || D % 8 || D > MAX_D) return -1;
    if (kv_dtype < FD_F32 || kv_dtype > FD_BF16 || (kv_dtype == FD_I8 && (!ks || !vs))) return -1;
    int64_t total = 0;
    for (int s = 0; s < S; s++) {
        if (lens[s] < 1 || lens[s] > INT32_MAX || !k[s] || !v[s]) return -2;
        if (kv_dtype == FD_I8 && (!ks[s] || !vs[s])) return -2;
        total += lens[s];
    }
    if (2 * total * Hkv * D * (int64_t)kv_bytes(kv_dtype) < SMALL_CALL_BYTES) nthreads = 1;
    const int Gp = padded_group(Hq / Hkv);
    if (Gp != Hq / Hkv && (int64_t)Hkv * Gp <= 65535)
        return attend_padded(q, k, v, ks, vs, lens, S, Hq, Hkv, D, kv_dtype, scale, nthreads, o, Gp);
    if (nthreads <= 0) nthreads = fd_max_threads();
    int *first;
    Item *items;
    const int n_items = make_items(lens, S, nthreads, total, &first, &items);
    if (n_items < 0) return n_items;
    // One allocation per call, none in the hot loop: partials, per-thread scores, q8 and its factors.
    // a thread's scratch, apart by a line: scores [BT, Hq], c [Hq], and int8 and bf16 V's (see attend_chunk)
    const size_t stride = (size_t)Hq * (BT + 1) + (size_t)Hq * ((size_t)D + BT / 2 + 1) + 16;
    const size_t floats = (size_t)n_items * Hq * (2 + (size_t)D) + (size_t)nthreads * stride + 2 * (size_t)S * Hq;
    float *ws = malloc(sizeof(float) * floats + (size_t)S * Hq * D * (1 + sizeof(uint16_t)));
    if (!ws) { free(first); free(items); return -3; }
    float *pm = ws, *pl = pm + (size_t)n_items * Hq, *pacc = pl + (size_t)n_items * Hq;
    float *scores = pacc + (size_t)n_items * Hq * D, *qmul = scores + (size_t)nthreads * stride;
    float *qcorr = qmul + (size_t)S * Hq;
    int8_t *q8 = (int8_t *)(qcorr + (size_t)S * Hq);
    uint16_t *qb = (uint16_t *)(q8 + (size_t)S * Hq * D);
#if FD_BF16DOT  // bf16 q for vdpbf16ps; other builds widen bf16 K and keep q in float
    if (kv_dtype == FD_BF16)
        round_bf16(q, (size_t)S * Hq * D, qb);
#endif
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
                            q8 + qh * D, qmul + qh, qcorr + qh, qb + qh * D};
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

#include "attn_store.h"  // fd_store_int8 and fd_decode_step: writing a store's rows, and a whole decode step
