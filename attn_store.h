// attn_store.h - the kernel library's other job: writing a KV store's rows as they come.
// kvcache.py keeps one block per sequence; `where` = (block, scales, capacity, lengths) is how the
// store names it to C (KVCache.where): the rows [2, n_layers, capacity, Hkv, D], an int8 store's
// float16 scales [2, n_layers, capacity, Hkv] (else 0), and int64 rows written per layer [n_layers].
// - fd_store_int8 quantizes float16 rows into an int8 store (NumPy took 120-140 us a layer at
//   batch 16: converting float16, the short-axis max), bit for bit as kvcache.quantize_int8 does;
// - fd_decode_step is one layer of a worker's decode step in one call: check, write, attend.
// Included at the end of attn_cpu.c (one translation unit, one .so); loaded by rpart.py.
#pragma once

// One token's float16 row [Hkv, D] into int8 rows dst [Hkv, D] and float16 scales [Hkv], per
// head as kvcache.quantize_int8 does, bit for bit: scale = max|x| / 127 rounded to float16 (one
// float16 step up where that fell below max|x| / 127: see kvcache.py), row = rint(x * (1 / scale)),
// 0 where scale is 0.
static void quantize_row_int8(const uint16_t *src, int Hkv, int D, int8_t *dst, uint16_t *scales) {
    for (int h = 0; h < Hkv; h++) {
        float f[MAX_D], mx;
        uint32_t top = 0;  // max |x| by its bits (the same order for floats; a loop the compiler vectorizes)
        halves_to_floats(src + (size_t)h * D, D, f);
        for (int j = 0; j < D; j++) {
            uint32_t b;
            memcpy(&b, f + j, 4);
            top = (b & 0x7fffffffu) > top ? b & 0x7fffffffu : top;
        }
        memcpy(&mx, &top, 4);
        uint16_t s16 = float_to_half(mx / 127.0f);
        if (half_to_float(s16) * 127.0f < mx) s16++;  // the next float16 up: 127 * scale covers max|x|
        const float s = half_to_float(s16), inv = s > 0.0f ? 1.0f / s : 0.0f;
        for (int j = 0; j < D; j++) {
            const float r = rintf(f[j] * inv);  // within [-127, 127] but for an ulp: clamped
            dst[(size_t)h * D + j] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : (int)r);
        }
        scales[h] = s16;
    }
}

// k and v hold n float16 rows [n, Hkv, D], one token's K or V each; row i goes to position
// pos[i] of layer in the int8 block where[i] (4 words a row, as above), quantized.
int fd_store_int8(const uint16_t *k, const uint16_t *v, int n, int Hkv, int D, const uint64_t *where,
                  const int64_t *pos, int layer, int n_layers) {
    if (n < 0 || Hkv < 1 || D < 8 || D % 8 || D > MAX_D || layer < 0 || layer >= n_layers) return -1;
    const size_t row = (size_t)Hkv * D;
    for (int i = 0; i < n; i++) {
        const uint64_t *w = where + 4 * (size_t)i;
        if (!w[0] || !w[1] || pos[i] < 0 || (uint64_t)pos[i] >= w[2]) return -2;
        for (int kv = 0; kv < 2; kv++) {
            const size_t at = ((size_t)kv * n_layers + layer) * w[2] + (size_t)pos[i];  // row index in the block
            quantize_row_int8((kv ? v : k) + i * row, Hkv, D, (int8_t *)(uintptr_t)w[0] + at * row,
                              (uint16_t *)(uintptr_t)w[1] + at * Hkv);
        }
    }
    return 0;
}

// One layer of a decode step on a store, for S sequences: the worker's hot path, one call where
// Python checked, wrote and addressed each sequence (SmolLM2 at batch 16, traced in a running
// worker: its DECODE handler 239 -> 184 us median a layer, 117 of them this call). Every sequence
// is checked before anything is written: pos[s] past its rows written (a hole) returns -4, at or
// past its capacity -5, with *bad = s. Then sequence s's new rows k[s], v[s] [Hkv, D] (the
// store's dtype; float16 for int8, quantized here) go to row pos[s] of layer, its rows written
// become pos[s] + 1, and the kernel attends over rows [0, pos[s]]: o [S, Hq, D]. Other codes as
// fd_decode_attention's. q arrives in the S-Part's own dtype (q_dtype: FD_F32, FD_F16 or FD_BF16:
// it left the S-Part without a float32 round trip) and is widened here, exactly.
int fd_decode_step(const void *q, int q_dtype, const void *k, const void *v, const uint64_t *where,
                   const int64_t *pos, int S, int Hq, int Hkv, int D, int kv_dtype, int layer, int n_layers,
                   float scale, int nthreads, float *o, int64_t *bad) {
    if (S < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || D < 8 || D % 8 || D > MAX_D || layer < 0 || layer >= n_layers ||
        kv_dtype < FD_F32 || kv_dtype > FD_BF16 || (q_dtype != FD_F32 && q_dtype != FD_F16 && q_dtype != FD_BF16))
        return -1;
    const int i8 = kv_dtype == FD_I8;
    for (int s = 0; s < S; s++) {
        const uint64_t *w = where + 4 * (size_t)s;
        *bad = s;
        if (!w[0] || !w[3] || (i8 && !w[1])) return -2;
        if (pos[s] < 0 || pos[s] > ((const int64_t *)(uintptr_t)w[3])[layer]) return -4;
        if ((uint64_t)pos[s] >= w[2]) return -5;
    }
    const size_t row = (size_t)Hkv * D, item = kv_bytes(kv_dtype);  // a token's elements; bytes of one stored
    const size_t in_item = i8 ? 2 : item;                            // bytes of one in k and v (int8's come as float16)
    const size_t nq = q_dtype == FD_F32 ? 0 : (size_t)S * Hq * D;  // q's elements to widen, if any
    void *mem = malloc((size_t)S * (4 * sizeof(void *) + sizeof(int64_t)) + nq * sizeof(float));
    if (!mem) return -3;
    const void **kp = mem, **vp = kp + S;
    const uint16_t **ksp = (const uint16_t **)(vp + S), **vsp = ksp + S;
    int64_t *lens = (int64_t *)(vsp + S);
    float *qw = (float *)(lens + S);  // [S, Hq, D] q widened, when it came as float16 or bf16
    for (size_t i = 0; i < nq; i++) qw[i] = kv_at((const uint16_t *)q + i, 0, q_dtype);
    const float *qf = nq ? qw : (const float *)q;
    for (int s = 0; s < S; s++) {
        const uint64_t *w = where + 4 * (size_t)s;
        char *block = (char *)(uintptr_t)w[0];
        uint16_t *scales = (uint16_t *)(uintptr_t)w[1];
        for (int kv = 0; kv < 2; kv++) {
            const size_t first = ((size_t)kv * n_layers + layer) * w[2];  // the layer's row 0 of K (kv 0) or V
            const size_t at = first + (size_t)pos[s];
            const char *src = (const char *)(kv ? v : k) + (size_t)s * row * in_item;
            if (i8)
                quantize_row_int8((const uint16_t *)src, Hkv, D, (int8_t *)block + at * row, scales + at * Hkv);
            else
                memcpy(block + at * row * item, src, row * item);
            (kv ? vp : kp)[s] = block + first * row * item;
            (kv ? vsp : ksp)[s] = i8 ? scales + first * Hkv : NULL;
        }
        lens[s] = ((int64_t *)(uintptr_t)w[3])[layer] = pos[s] + 1;
    }
    const int rc = fd_decode_attention(qf, kp, vp, i8 ? ksp : NULL, i8 ? vsp : NULL, lens, S, Hq, Hkv, D, kv_dtype,
                                       scale, nthreads, o);
    free(mem);
    return rc;
}
