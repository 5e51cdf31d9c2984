"""spart.py - the S-Part: every computation whose weights all sequences share.

FastDecode splits each transformer layer at attention. The S-Part (embedding, norms, the QKV
and output projections, rotary embedding, the MLP, the LM head) is compute-bound and gets more
efficient with batch size, so it runs on the GPU (on the CPU with torch when there is none:
bfloat16 where the CPU has bf16 instructions, float32 elsewhere; see fast.py).
The R-Part (attention over each sequence's KV-cache) runs on CPU workers: see rpart.py.

One decode step of layer l, as the engine drives it:
    h = embed(ids, pos)                    # once, before layer 0
    rot = rotary(pos)                      # once: the rotary rows of these positions (Llama)
    q, k, v = pre_attn(l, h, rot)          # S-Part: norm, QKV, rotary
    o = <R-Part attention over the KV-cache>
    h = post_attn(l, h, o)                 # S-Part: output projection, residual, MLP
    logits = lm_head(h)                    # once, after the last layer

Prompts take another path (prefill.py, reached as SPart.prefill_batch): the new tokens of many
sequences (whole prompts, or chunks of long ones after their earlier chunks) run in one packed
forward with causal attention on the device, returning each one's last logits and K/V.

Models: OPT (learned positions, pre- or post-LN, project_in/out, ReLU MLP, tied head) and
Llama (RMSNorm, rotary with llama3 scaling, SwiGLU, grouped-query attention, untied head).
Weights come from Hugging Face checkpoints on disk or are random: see weights.py.

Legend: T tokens in a call, H hidden size, Hq/Hkv heads, D head dim, V vocabulary, F MLP width.
"""
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import prefill
import weights
from fast import PACKED, can_prepack, default_device_dtype, fuse_layer, layer_names, linear, prepack, prepack_layer
from matvec import MATVEC_ROWS, can_tile, llama_post, llama_pre, tile_pack
from prefill import PrefillItem, PrefillResult  # noqa: F401  (the engine builds them as spart.PrefillItem)
from weights import canonical_name, hf_cache_dir  # noqa: F401  (callers use spart.canonical_name)

# --- configs ---


@dataclasses.dataclass
class ModelConfig:
    family: str                  # "opt" or "llama"
    vocab_size: int
    hidden: int                  # H
    n_layers: int
    n_heads: int                 # Hq
    n_kv_heads: int              # Hkv (Hq for OPT)
    ffn: int                     # F
    max_pos: int
    head_dim: int = 0            # D; 0 means hidden // n_heads
    eps: float = 1e-5
    bos_id: int = 1
    eos_id: int = 2
    # OPT
    pre_ln: bool = True          # do_layer_norm_before; False in opt-350m (post-LN)
    embed_dim: int = 0           # word_embed_proj_dim; 0 means hidden (no project_in/out)
    # Llama
    rope_theta: float = 10000.0
    rope_scaling: dict = None    # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.family not in ("opt", "llama"):
            raise ValueError(f"family must be 'opt' or 'llama', got {self.family!r}")
        self.head_dim = self.head_dim or self.hidden // self.n_heads
        self.embed_dim = self.embed_dim or self.hidden
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.family == "opt" and self.n_kv_heads != self.n_heads:
            raise ValueError("OPT has no grouped-query attention")

    @classmethod
    def from_hf(cls, c):
        """From a Hugging Face config.json dict (transformers 4 or 5 layout)."""
        kind = c.get("model_type")
        if kind == "opt":
            return cls("opt", c["vocab_size"], c["hidden_size"], c["num_hidden_layers"],
                       c["num_attention_heads"], c["num_attention_heads"], c["ffn_dim"],
                       c["max_position_embeddings"], bos_id=c.get("bos_token_id", 2),
                       eos_id=c.get("eos_token_id", 2), pre_ln=c.get("do_layer_norm_before", True),
                       embed_dim=c.get("word_embed_proj_dim") or c["hidden_size"], tie_embeddings=True)
        if kind == "llama":
            rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
            scaling = rope if rope.get("rope_type", rope.get("type")) == "llama3" else None
            eos = c.get("eos_token_id", 2)
            return cls("llama", c["vocab_size"], c["hidden_size"], c["num_hidden_layers"],
                       c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                       c["intermediate_size"], c["max_position_embeddings"], head_dim=c.get("head_dim") or 0,
                       eps=c.get("rms_norm_eps", 1e-5), bos_id=c.get("bos_token_id", 1),
                       eos_id=eos[0] if isinstance(eos, list) else eos,
                       rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
                       rope_scaling=scaling, tie_embeddings=c.get("tie_word_embeddings", False))
        raise ValueError(f"unsupported model_type {kind!r} (OPT and Llama are)")

    def weight_count(self):
        """Parameters in the S-Part (all of the model's weights)."""
        H, F_, D = self.hidden, self.ffn, self.head_dim
        attn = H * D * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = (3 if self.family == "llama" else 2) * H * F_
        head = 0 if self.tie_embeddings else self.vocab_size * H
        return self.n_layers * (attn + mlp) + self.vocab_size * self.embed_dim + head


def _opt(h, layers, heads, ffn, embed_dim=0, pre_ln=True):
    return ModelConfig("opt", 50272, h, layers, heads, heads, ffn, 2048, bos_id=2, eos_id=2,
                       pre_ln=pre_ln, embed_dim=embed_dim, tie_embeddings=True)


def _llama(h, layers, heads, kv, ffn, vocab=32000, max_pos=4096, theta=10000.0, bos=1, eos=2):
    return ModelConfig("llama", vocab, h, layers, heads, kv, ffn, max_pos, rope_theta=theta,
                       bos_id=bos, eos_id=eos)


# Short name -> (hub repo id, config), so a known model needs no download to be shaped.
KNOWN = {
    "opt-125m": ("facebook/opt-125m", _opt(768, 12, 12, 3072)),
    "opt-350m": ("facebook/opt-350m", _opt(1024, 24, 16, 4096, embed_dim=512, pre_ln=False)),
    "opt-1.3b": ("facebook/opt-1.3b", _opt(2048, 24, 32, 8192)),
    "opt-2.7b": ("facebook/opt-2.7b", _opt(2560, 32, 32, 10240)),
    "opt-6.7b": ("facebook/opt-6.7b", _opt(4096, 32, 32, 16384)),
    "opt-13b": ("facebook/opt-13b", _opt(5120, 40, 40, 20480)),
    "opt-30b": ("facebook/opt-30b", _opt(7168, 48, 56, 28672)),
    "opt-66b": ("facebook/opt-66b", _opt(9216, 64, 72, 36864)),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", _llama(4096, 32, 32, 32, 11008)),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", _llama(5120, 40, 40, 40, 13824)),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", _llama(8192, 80, 64, 8, 28672)),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B",
                   _llama(4096, 32, 32, 8, 14336, 128256, 8192, 500000.0, 128000, 128001)),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B",
                    _llama(8192, 80, 64, 8, 28672, 128256, 8192, 500000.0, 128000, 128001)),
}

def locate(model):
    """weights.locate, with the short names of KNOWN understood."""
    return weights.locate(model, {name: repo for name, (repo, _) in KNOWN.items()})


# --- rotary embedding (Llama) ---


def rope_inv_freq(cfg):
    """[D/2] inverse frequencies, with llama3-style scaling of the long wavelengths if configured."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old = sc.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: slowed down
    smooth = (old / wavelen - lo) / (hi - lo)                     # in between: interpolated
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x, positions, inv_freq):
    """Reference: x [T, heads, D] rotated by angle pos * inv_freq (HF's rotate-half convention)."""
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]         # [T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[:, None, :]   # [T, 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rope_tables(cfg, dtype, device):
    """cos [max_pos, D] and signed sin [max_pos, D] (-sin on the first half), computed once in
    float64: rotate_half(x) * sin == x.roll(D/2) * signed sin, so `rope` is 3 ops, not 7."""
    ang = torch.arange(cfg.max_pos, dtype=torch.float64)[:, None] * rope_inv_freq(cfg)[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([-ang.sin(), ang.sin()], -1)
    return cos.to(device, dtype), sin.to(device, dtype)


def rope(x, cos, sin):
    """Fast path of apply_rope: x [T, heads, D], cos/sin [T, 1, D] rows of rope_tables."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


# --- the S-Part ---


class SPart:
    """The shared-weight half of the model on one device. `self.w`: the weights by canonical
    name (as read); `self.layers`: the same tensors, fused per layer, that the forward uses."""

    def __init__(self, cfg, weights, device, dtype, tokenizer=None, source="random", dtype_why="asked for", pack=None):
        self.cfg, self.w, self.device, self.dtype, self.dtype_why = cfg, weights, device, dtype, dtype_why
        self.tokenizer, self.source = tokenizer, source
        self.layers = [fuse_layer(cfg, weights, i) for i in range(cfg.n_layers)]
        self.packed = can_prepack(device, dtype) if pack is None else pack
        self.tiled = self.packed and can_tile(device, dtype)  # and in matvec_cpu.c's tiles, for small batches
        if self.packed:  # the layers' matrices live only in oneDNN's layout; state_dict() unpacks
            packed = {}  # by source: layers that share memory (random weights) share one reorder
            for i, lw in enumerate(self.layers):
                prepack_layer(lw, packed, self.tiled)
                for key in [k for k in weights if k.startswith(f"layers.{i}.") and weights[k].dim() == 2]:
                    del weights[key]
        head = self.head_name = "lm_head.weight" if cfg.family == "llama" and not cfg.tie_embeddings \
            else "embed_tokens.weight"
        self.head_w = prepack(weights[head]) if self.packed else weights[head]  # [V, H] (embed_dim for OPT)
        self.head_t = tile_pack(weights[head]) if self.tiled else None
        if self.packed and head == "lm_head.weight":  # a tied head's table stays: the embedding reads it
            del weights[head]
        self.inv_freq = rope_inv_freq(cfg).to(device) if cfg.family == "llama" else None
        self.rope_cos, self.rope_sin = rope_tables(cfg, dtype, device) if cfg.family == "llama" else (None, None)

    @classmethod
    def load(cls, model, *, device=None, dtype=None, seed=0, quiet=False, pack=None):
        """From a short name, hub repo id or directory; random weights (with a banner) when the
        checkpoint is not on disk. A directory that is named but missing is an error, and so is
        a GGUF file (not read here). `dtype`: None (choose_dtype decides), a torch dtype or its name.
        `pack`: None (prepack the matrices when can_prepack), True or False."""
        if str(model).lower().endswith(".gguf"):
            raise ValueError(f"{model}: GGUF files are not read; convert it to a Hugging Face checkpoint "
                             "directory (config.json + safetensors) and pass that directory")
        looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
        if looks_like_path and os.path.isfile(model):
            raise FileNotFoundError(f"{model}: a file, not a checkpoint directory (config.json + weights)")
        if looks_like_path and not os.path.isdir(model):
            raise FileNotFoundError(f"{model}: no such model directory")
        directory, repo = locate(model)
        if directory is not None:
            with open(os.path.join(directory, "config.json")) as f:
                cfg = ModelConfig.from_hf(json.load(f))
            dev, dt, why = default_device_dtype(cfg, device, dtype)
            return cls(cfg, weights.load_weights(directory, cfg, dt, dev), dev, dt,
                       weights.load_tokenizer(directory), directory, why, pack)
        if model not in KNOWN:
            raise FileNotFoundError(f"{model}: not a directory, not in the Hugging Face cache "
                                    f"({hf_cache_dir()}), and not a known name ({', '.join(KNOWN)})")
        if not quiet:
            print(f"*** {model}: weights not on disk ({repo} not in {hf_cache_dir()}); using RANDOM weights. "
                  "Throughput is real, text is meaningless. ***", file=sys.stderr, flush=True)
        # a copy of the table's config: an engine may edit its cfg, not the table
        return cls.random(dataclasses.replace(KNOWN[model][1]), device=device, dtype=dtype, seed=seed, pack=pack)

    @classmethod
    def random(cls, cfg, *, device=None, dtype=None, seed=0, pack=None):
        """An S-Part of config `cfg` with random weights (load's fallback; calibrate's shrunken layers)."""
        dev, dt, why = default_device_dtype(cfg, device, dtype)
        packed = can_prepack(dev, dt) if pack is None else pack  # packing copies each layer: share them until then
        return cls(cfg, weights.random_weights(cfg, dt, dev, seed, shared_layers=packed), dev, dt, None, "random", why, packed)

    def state_dict(self):
        """{canonical name: plain tensor}: every weight as a checkpoint names it (prepacked
        matrices unpacked: a copy), e.g. to build a transformers twin of this model."""
        out = dict(self.w)
        if not self.packed:
            return out
        if self.head_name not in out:  # an untied head lives only prepacked
            out[self.head_name] = self.head_w.to_dense()
        shapes = weights.expected_shapes(self.cfg)
        for i, lw in enumerate(self.layers):
            for field, names in layer_names(self.cfg).items():
                keys = [f"layers.{i}.{n}.weight" for n in names]
                if field + "_w" in PACKED:
                    parts = getattr(lw, field + "_w").to_dense().split([shapes[k][0] for k in keys])
                    out.update(zip(keys, parts))
        return out

    # --- prompts: see prefill.py ---

    def prefill_batch(self, items):
        """list of prefill.PrefillItem -> list of prefill.PrefillResult (prefill.prefill_batch)."""
        return prefill.prefill_batch(self, items)

    def prefill(self, token_ids):
        """One whole prompt: token_ids (L ints) -> (logits of the last token [V] float32,
        K [n_layers, L, Hkv, D], V [n_layers, L, Hkv, D]) in the compute dtype, on the device."""
        r = prefill.prefill_batch(self, [prefill.PrefillItem(list(token_ids))])[0]
        return r.logits, r.k, r.v

    # --- pieces ---

    def _norm(self, x, w, b):
        """LayerNorm (OPT) or RMSNorm (Llama; in float32 and rounded before the weight, as HF does)."""
        if self.cfg.family == "opt":
            return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.cfg.eps).to(x.dtype) * w

    def _in_c(self, h, lw):
        """Whether a Llama layer's half runs as one matvec_cpu.c call: tiled weights and a few rows."""
        return h.shape[0] <= MATVEC_ROWS and lw.qkv_t is not None and lw.up_t is not None \
            and lw.out_t is not None and lw.down_t is not None

    # --- the interface the engine drives ---

    def embed(self, token_ids, positions):
        """token_ids, positions: int64 [T] -> h [T, H]."""
        c = self.cfg
        h = F.embedding(token_ids, self.w["embed_tokens.weight"])       # [T, embed_dim]
        if c.family == "opt":
            if c.embed_dim != c.hidden:
                h = F.linear(h, self.w["project_in.weight"])                # [T, H]
            h = h + F.embedding(positions + 2, self.w["embed_positions.weight"])  # OPT's offset 2
        return h

    def rotary(self, positions):
        """positions int64 [T] -> (cos, sin) [T, 1, D], the rows of rope_tables that pre_attn
        rotates by (the same in every layer: looked up once per step), or None for OPT."""
        if self.cfg.family != "llama":
            return None
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def pre_attn(self, layer, h, rot):
        """h [T, H], rot = rotary(positions) -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D],
        rotary applied (views into one [T, (Hq + 2 Hkv) D] result: not contiguous)."""
        c, lw = self.cfg, self.layers[layer]
        nq, nkv = c.n_heads, c.n_kv_heads
        if c.family == "llama" and self._in_c(h, lw):   # the norm and the matmul in one C call
            qkv = llama_pre(h, lw.norm1_w, c.eps, lw.qkv_t).view(h.shape[0], nq + 2 * nkv, c.head_dim)
        else:
            x = self._norm(h, lw.norm1_w, lw.norm1_b) if c.family == "llama" or c.pre_ln else h
            qkv = linear(x, lw.qkv_w, lw.qkv_b, lw.qkv_t).view(h.shape[0], nq + 2 * nkv, c.head_dim)
        if c.family == "llama":  # q and k are adjacent heads: one rotation for both
            qk = rope(qkv[:, :nq + nkv], *rot)
            return qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv:]
        return qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]

    def post_attn(self, layer, h, o):
        """h [T, H] (this layer's input), o [T, Hq, D] attention output -> next layer's h [T, H]."""
        c, lw = self.cfg, self.layers[layer]
        o = o.reshape(h.shape[0], c.n_heads * c.head_dim).to(h.dtype)  # no-op when o is in h's dtype
        if c.family == "llama" and self._in_c(h, lw):   # the whole of the below in one C call
            return llama_post(h, o, lw.out_t, lw.norm2_w, c.eps, lw.up_t, lw.down_t)
        h = h + linear(o, lw.out_w, lw.out_b, lw.out_t)
        if c.family == "llama":
            gate, up = linear(self._norm(h, lw.norm2_w, None), lw.up_w, None, lw.up_t).chunk(2, dim=-1)  # [T, F] x2
            return h + linear(F.silu(gate) * up, lw.down_w, None, lw.down_t)
        if not c.pre_ln:
            h = self._norm(h, lw.norm1_w, lw.norm1_b)
        x = self._norm(h, lw.norm2_w, lw.norm2_b) if c.pre_ln else h
        h = h + linear(F.relu(linear(x, lw.up_w, lw.up_b, lw.up_t)), lw.down_w, lw.down_b, lw.down_t)
        return h if c.pre_ln else self._norm(h, lw.norm2_w, lw.norm2_b)

    def lm_head(self, h):
        """h [T, H] after the last layer -> logits [T, V] in float32."""
        c = self.cfg
        if c.family == "llama":
            h = self._norm(h, self.w["norm.weight"], None)
            return linear(h, self.head_w, None, self.head_t).float()
        if c.pre_ln:
            h = self._norm(h, self.w["final_layer_norm.weight"], self.w["final_layer_norm.bias"])
        if c.embed_dim != c.hidden:
            h = F.linear(h, self.w["project_out.weight"])
        return linear(h, self.head_w, None, self.head_t).float()

# --- measuring: what one layer costs (bench.py and perfmodel.py can call it) ---


@torch.inference_mode()
def layer_seconds(sp, batch, reps=20):
    """Median seconds of one layer's S-Part at `batch` sequences in decode (pre_attn, then
    post_attn with a stand-in attention output), cycling through the layers so the weights are
    read from memory as in a real step, not from cache."""
    c, dev = sp.cfg, sp.device
    h = torch.randn(batch, c.hidden, device=dev).to(sp.dtype) * 0.1
    o = torch.randn(batch, c.n_heads, c.head_dim, device=dev)                 # float32, as workers return it
    pos = torch.arange(batch, device=dev) + 64
    times = []
    for i in range(reps + 2):
        layer = i % c.n_layers
        t = time.perf_counter()
        sp.pre_attn(layer, h, sp.rotary(pos))
        sp.post_attn(layer, h, o)[0, 0].item()                                 # .item() waits for a GPU
        times.append(time.perf_counter() - t)
    return sorted(times[2:])[reps // 2]
