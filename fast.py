"""fast.py - how the S-Part holds its weights to run fast on the device it has.

Three decisions that spart.py's forward relies on, each measured on this CPU (AMD EPYC with
AVX512_BF16, torch 2.13):
- the compute dtype: bf16 where the CPU has bf16 dot-product instructions, float32 elsewhere
  (`choose_dtype`);
- one layer's weights fused: the matmuls that read the same input stacked into one
  (`LayerWeights`, `fuse_layer`): fewer torch calls per layer;
- bf16 and float32 matrices reordered once into oneDNN's own layout (`prepack`, `linear`),
  instead of on every call (bf16) or a BLAS call on the plain matrix (float32);
- bf16 matrices also tiled for matvec_cpu.c (matvec.py), which reads them at the memory's rate
  where a call has at most MATVEC_ROWS rows (a decode step at a small batch): oneDNN reads them
  at ~0.6 of that rate there, and is faster above it.

Nothing here knows the model's forward; spart.py imports it.

Legend: H hidden size, Hq/Hkv heads, D head dim, F MLP width.
"""
import dataclasses

import torch
import torch.nn.functional as F

from matvec import MATVEC_ROWS, Tiles, matvec, tile_pack

# --- the compute dtype ---

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_bf16_fast():
    """The name of this CPU's bf16 dot-product instructions (amx_bf16 or avx512_bf16), which
    oneDNN uses for torch's bf16 matmuls, or None. Without them bf16 is emulated: slower than float32."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap way to tell, stay safe
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def choose_dtype(cfg, device, dtype=None):
    """(dtype, why): the S-Part's compute dtype and a phrase saying why, for banners and reports.

    Measured on an AMD EPYC with AVX512_BF16, torch 2.13, 2 threads, F.linear 2048 -> 8192:
    bf16 189 / 255 / 391 GFLOP/s at 16 / 32 / 512 rows against float32 47 / 68 / 154 (and
    1.2-2.3x faster at 1 row, where reading the weights dominates); float16 matmuls on the CPU
    run at 44-46 GFLOP/s, slower than float32. So bf16 where the CPU has bf16 instructions, float32 elsewhere.
    """
    if dtype is not None:
        return (DTYPES[dtype] if isinstance(dtype, str) else dtype), "asked for"
    if device.type != "cpu":
        return (torch.float16 if cfg.family == "opt" else torch.bfloat16), f"{device.type} default"
    flag = cpu_bf16_fast()
    if flag:
        return torch.bfloat16, f"CPU has {flag}"
    return torch.float32, "CPU lacks bf16 instructions"


def default_device_dtype(cfg, device=None, dtype=None):
    """(device, dtype, why): CUDA when present (fp16 for OPT, bf16 for Llama), else the CPU
    in `choose_dtype`'s pick; `dtype` (a torch dtype or its name) overrides."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return (device, *choose_dtype(cfg, device, dtype))


# --- one layer's weights, fused ---


@dataclasses.dataclass
class LayerWeights:
    """One layer's weights, with the matmuls that read the same input stacked into one: fewer
    torch calls per layer (measured here at 1 row: an add 1 us, a layer_norm or a 64 x 64 bf16
    linear ~16 us, before any arithmetic) and one bigger matmul.
    Norm 1 is before attention (after it in post-LN OPT), norm 2 before the MLP (after it).

    torch.compile of the per-layer S-Part does not pay on this CPU (torch 2.13, 1 thread, bf16,
    measured interleaved with eager): pre_attn and post_attn compiled as functions of the layer's
    tensors (dynamic batch, so one graph for all layers and batch sizes) ran 0.72-1.00x eager's
    speed at batch 1/16/32 on SmolLM2-135M's shape and 0.84-0.97x on opt-125m's, after 26 s / 7 s
    of compiling. The time is in the matmuls, which compiling leaves to the same oneDNN calls."""
    norm1_w: torch.Tensor                 # [H]
    norm1_b: torch.Tensor | None          # [H] (OPT's LayerNorm; Llama's RMSNorm has none)
    qkv_w: torch.Tensor                   # [(Hq + 2 Hkv) D, H]: q, k, v projections stacked
    qkv_b: torch.Tensor | None
    out_w: torch.Tensor                   # [H, Hq D]
    out_b: torch.Tensor | None
    norm2_w: torch.Tensor                 # [H]
    norm2_b: torch.Tensor | None
    up_w: torch.Tensor                    # OPT fc1 [F, H]; Llama gate and up stacked [2F, H]
    up_b: torch.Tensor | None
    down_w: torch.Tensor                  # [H, F]
    down_b: torch.Tensor | None
    qkv_t: Tiles | None = None            # the four matrices tiled for matvec_cpu.c (`prepack_layer`)
    out_t: Tiles | None = None
    up_t: Tiles | None = None
    down_t: Tiles | None = None


def layer_names(cfg):
    """LayerWeights field -> the checkpoint names (after "layers.{i}.", before ".weight"/".bias")
    stacked into it, in order. The one place that knows which projections share a matmul."""
    if cfg.family == "opt":
        names = {"norm1": ["self_attn_layer_norm"], "out": ["self_attn.out_proj"], "norm2": ["final_layer_norm"],
                 "up": ["fc1"], "down": ["fc2"]}
    else:
        names = {"norm1": ["input_layernorm"], "out": ["self_attn.o_proj"], "norm2": ["post_attention_layernorm"],
                 "up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}
    return {"qkv": [f"self_attn.{x}_proj" for x in "qkv"], **names}


PACKED = ("qkv_w", "out_w", "up_w", "down_w")  # the LayerWeights matrices `prepack` reorders


def stacked(parts):
    """torch.cat(parts) along dim 0, but a view when the parts already lie back to back in one
    buffer (weights.random_weights makes them so): no copy of the layer's matrices."""
    first, rows = parts[0], sum(p.shape[0] for p in parts)
    at = first.data_ptr()
    for p in parts:
        if not p.is_contiguous() or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or p.data_ptr() != at or p.shape[1:] != first.shape[1:]:
            return torch.cat(parts) if len(parts) > 1 else first
        at += p.numel() * p.element_size()
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


def fuse_layer(cfg, w, layer):
    """LayerWeights of one layer from the canonical weights `w`, whose entries for the stacked
    matrices are replaced by views into them (no second copy; `w` still reads as a checkpoint)."""
    p, fields = f"layers.{layer}.", {}
    for field, names in layer_names(cfg).items():
        for suffix, end in ((".weight", "_w"), (".bias", "_b")):
            keys = [p + n + suffix for n in names]
            if keys[0] not in w:
                fields[field + end] = None
                continue
            whole = stacked([w[k] for k in keys])
            start = 0
            for k in keys:
                rows = w[k].shape[0]
                w[k], start = whole[start:start + rows], start + rows
            fields[field + end] = whole
    return LayerWeights(**fields)


# --- weights in oneDNN's own layout (CPU) ---


def can_prepack(device, dtype):
    """Whether this torch has oneDNN's prepacked linear (the private ops torch.compile's CPU
    backend uses when it freezes weights), and the weights are bf16 or float32 on the CPU."""
    ops = torch.ops.mkldnn
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
            and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def prepack(w):
    """w [out, in] bf16 or float32 -> the same matrix reordered once into oneDNN's blocked layout
    (an opaque mkldnn tensor; .to_dense() gives w back). F.linear reorders bf16 weights on every
    call: measured here, 1 thread, the prepacked linear is 1.3-1.6x faster at 1-32 rows (768 ->
    3072 and 2048 -> 8192) with bit-identical results, and one opt-125m layer 1.4-1.8x faster.
    float32 F.linear goes to BLAS instead: prepacked, 2 threads, 1.1-1.4x faster at 16-2048 rows
    (768 <-> 3072, 2048 -> 8192), equal to it within float32 summation order (tests/test_spart.py)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def prepack_layer(lw, packed, tiled=False):
    """Prepack one layer's matrices (PACKED) in place, and with `tiled` tile them for matvec_cpu.c too
    (the `_t` fields; the bias goes with the tiles). `packed` ({(address, shape): (packed matrix,
    tiles)}, one dict for all the layers) remembers each source: a matrix whose memory an earlier
    layer's already was gets a copy of that one's forms instead of a second reorder. Only random
    weights share memory so (weights.random_weights with shared_layers): oneDNN's reorder runs at
    ~1.5 GB/s here with 2 threads, a copy of its result at ~4 GB/s, so making opt-1.3b's random
    S-Part takes 1.3 s instead of 2.5-5.5 s, beside the kernel's build in a fresh `make run`.
    (All sources exist before the first is packed, so two share an address only by sharing memory.)"""
    for name in PACKED:
        w, b = getattr(lw, name), getattr(lw, name[:-2] + "_b")
        key = (w.data_ptr(), tuple(w.shape))
        if key in packed:
            dnn, tiles = packed[key]
            dnn, tiles = dnn.clone(), None if tiles is None else Tiles(tiles.t.clone(), tiles.b)
        else:
            dnn, tiles = prepack(w), tile_pack(w, b) if tiled else None
            packed[key] = dnn, tiles
        setattr(lw, name, dnn)
        setattr(lw, name[:-2] + "_t", tiles)


def linear(x, w, b=None, tiles=None):
    """F.linear: through matvec_cpu.c when `tiles` (w tiled) are given and x has at most MATVEC_ROWS
    rows, else through oneDNN's prepacked linear when w was prepacked. x [T, in] -> [T, out]."""
    if tiles is not None and x.shape[0] <= MATVEC_ROWS:
        return matvec(x, tiles)
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)
