// attn_store.h - the kernel library's other job: writing an int8 KV store's rows as they come.
// kvcache.py quantizes float16 rows to int8 with a float16 scale per (token, KV head); in NumPy
// that cost 120-140 us a layer at batch 16 (converting float16, the short-axis max), 10-20% of
// the attention beside it. fd_store_int8 does the same rounding bit for bit. Included at the end
// of attn_cpu.c (one translation unit, one .so); loaded by rpart.py as store_int8.
#pragma once

// k and v hold n float16 rows [n, Hkv, D], one token's K or V each. Row i goes into its
// sequence's block of an int8 store (kvcache.py: [2, n_layers, capacity, Hkv, D] int8, scales
// [2, n_layers, capacity, Hkv] float16), where[i] = (block, scales, capacity), at position pos[i]
// of layer, quantized per head as kvcache.quantize_int8 does, bit for bit: scale = max|x| / 127
// rounded to float16 (one float16 step up where that fell below max|x| / 127: see kvcache.py),
// row = rint(x * (1 / scale)), 0 where scale is 0.
int fd_store_int8(const uint16_t *k, const uint16_t *v, int n, int Hkv, int D, const uint64_t *where,
                  const int64_t *pos, int layer, int n_layers) {
    if (n < 0 || Hkv < 1 || D < 8 || D % 8 || D > MAX_D || layer < 0 || layer >= n_layers) return -1;
    const size_t row = (size_t)Hkv * D;
    for (int i = 0; i < n; i++) {
        const uint64_t *w = where + 3 * (size_t)i;  // block, scales, capacity
        if (!w[0] || !w[1] || pos[i] < 0 || (uint64_t)pos[i] >= w[2]) return -2;
        for (int kv = 0; kv < 2; kv++) {
            const size_t at = ((size_t)kv * n_layers + layer) * w[2] + (size_t)pos[i];  // row index in the block
            const uint16_t *src = (kv ? v : k) + i * row;
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
                int8_t *q = (int8_t *)(uintptr_t)w[0] + (at * Hkv + h) * D;
                for (int j = 0; j < D; j++) {
                    const float r = rintf(f[j] * inv);  // within [-127, 127] but for an ulp: clamped
                    q[j] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : (int)r);
                }
                ((uint16_t *)(uintptr_t)w[1])[at * Hkv + h] = s16;
            }
        }
    }
    return 0;
}
