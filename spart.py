"""spart.py - the S-Part: every computation whose weights all sequences share.

FastDecode splits each transformer layer at attention. The S-Part (embedding, norms, the QKV
and output projections, rotary embedding, the MLP, the LM head) is compute-bound and gets more
efficient with batch size, so it runs on the GPU (CPU float32 with torch when there is none).
The R-Part (attention over each sequence's KV-cache) runs on CPU workers: see rpart.py.

One decode step of layer l, as the engine drives it:
    h = embed(ids, pos)                    # once, before layer 0
    q, k, v = pre_attn(l, h, pos)          # S-Part: norm, QKV, rotary
    o = <R-Part attention over the KV-cache>
    h = post_attn(l, h, o)                 # S-Part: output projection, residual, MLP
    logits = lm_head(h)                    # once, after the last layer

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

import torch
import torch.nn.functional as F

import weights
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
    """x [T, heads, D] rotated by angle pos * inv_freq (the rotate-half convention HF uses)."""
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]         # [T, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)[:, None, :]   # [T, 1, D]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


# --- the S-Part ---


def default_device_dtype(cfg, device=None, dtype=None):
    """CUDA when present (fp16 for OPT, bf16 for Llama), else CPU float32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else (torch.float16 if cfg.family == "opt" else torch.bfloat16)
    elif isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return device, dtype


class SPart:
    """The shared-weight half of the model on one device. Weights in `self.w` by canonical name."""

    def __init__(self, cfg, weights, device, dtype, tokenizer=None, source="random"):
        self.cfg, self.w, self.device, self.dtype = cfg, weights, device, dtype
        self.tokenizer, self.source = tokenizer, source
        self.inv_freq = rope_inv_freq(cfg).to(device) if cfg.family == "llama" else None

    @classmethod
    def load(cls, model, *, device=None, dtype=None, seed=0, quiet=False):
        """From a short name, hub repo id or directory; random weights (with a banner) when the
        checkpoint is not on disk. A directory that is named but missing is an error."""
        looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
        if looks_like_path and not os.path.isdir(model):
            raise FileNotFoundError(f"{model}: no such model directory")
        directory, repo = locate(model)
        if directory is not None:
            with open(os.path.join(directory, "config.json")) as f:
                cfg = ModelConfig.from_hf(json.load(f))
            dev, dt = default_device_dtype(cfg, device, dtype)
            return cls(cfg, weights.load_weights(directory, cfg, dt, dev), dev, dt, weights.load_tokenizer(directory), directory)
        if model not in KNOWN:
            raise FileNotFoundError(f"{model}: not a directory, not in the Hugging Face cache "
                                    f"({hf_cache_dir()}), and not a known name ({', '.join(KNOWN)})")
        cfg = KNOWN[model][1]
        dev, dt = default_device_dtype(cfg, device, dtype)
        if not quiet:
            print(f"*** {model}: weights not on disk ({repo} not in {hf_cache_dir()}); using RANDOM weights. "
                  "Throughput is real, text is meaningless. ***", file=sys.stderr, flush=True)
        return cls(cfg, weights.random_weights(cfg, dt, dev, seed), dev, dt, None, "random")

    # --- norms and projections ---

    def _norm(self, name, x):
        w = self.w[name + ".weight"]
        if self.cfg.family == "opt":
            return F.layer_norm(x, (x.shape[-1],), w, self.w[name + ".bias"], 1e-5)
        var = x.float().pow(2).mean(-1, keepdim=True)  # RMSNorm in float32, as Llama does
        return (x.float() * torch.rsqrt(var + self.cfg.eps)).to(x.dtype) * w

    def _linear(self, name, x):
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    # --- the interface the engine drives ---

    def embed(self, token_ids, positions):
        """token_ids, positions: int64 [T] -> h [T, H]."""
        c = self.cfg
        h = F.embedding(token_ids, self.w["embed_tokens.weight"])       # [T, embed_dim]
        if c.family == "opt":
            if c.embed_dim != c.hidden:
                h = self._linear("project_in", h)                          # [T, H]
            h = h + F.embedding(positions + 2, self.w["embed_positions.weight"])
        return h

    def pre_attn(self, layer, h, positions):
        """h [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], rotary applied."""
        c, p = self.cfg, f"layers.{layer}."
        T = h.shape[0]
        if c.family == "opt":
            x = self._norm(p + "self_attn_layer_norm", h) if c.pre_ln else h
        else:
            x = self._norm(p + "input_layernorm", h)
        a = p + "self_attn."
        q, k, v = self._linear(a + "q_proj", x), self._linear(a + "k_proj", x), self._linear(a + "v_proj", x)
        q = q.view(T, c.n_heads, c.head_dim)
        k, v = k.view(T, c.n_kv_heads, c.head_dim), v.view(T, c.n_kv_heads, c.head_dim)
        if c.family == "llama":
            q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        return q, k, v

    def post_attn(self, layer, h, o):
        """h [T, H] (this layer's input), o [T, Hq, D] attention output -> next layer's h [T, H]."""
        c, p = self.cfg, f"layers.{layer}."
        o = o.reshape(h.shape[0], c.n_heads * c.head_dim).to(h.dtype)
        if c.family == "llama":
            h = h + self._linear(p + "self_attn.o_proj", o)
            x = self._norm(p + "post_attention_layernorm", h)
            m = p + "mlp."
            return h + self._linear(m + "down_proj", F.silu(self._linear(m + "gate_proj", x)) * self._linear(m + "up_proj", x))
        h = h + self._linear(p + "self_attn.out_proj", o)
        if not c.pre_ln:
            h = self._norm(p + "self_attn_layer_norm", h)
        x = self._norm(p + "final_layer_norm", h) if c.pre_ln else h
        h = h + self._linear(p + "fc2", F.relu(self._linear(p + "fc1", x)))
        return h if c.pre_ln else self._norm(p + "final_layer_norm", h)

    def lm_head(self, h):
        """h [T, H] after the last layer -> logits [T, V] in float32."""
        c = self.cfg
        if c.family == "llama":
            h = self._norm("norm", h)
            return F.linear(h, self.w["embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"]).float()
        if c.pre_ln:
            h = self._norm("final_layer_norm", h)
        if c.embed_dim != c.hidden:
            h = self._linear("project_out", h)
        return F.linear(h, self.w["embed_tokens.weight"]).float()

    @torch.inference_mode()
    def prefill(self, token_ids):
        """Run a whole prompt with causal attention on the device.

        token_ids: list of ints, length L -> (logits of the last token [V],
        K [n_layers, L, Hkv, D], V [n_layers, L, Hkv, D]) in the compute dtype, on the device,
        so the engine can ship each layer's K/V once to the worker that will hold the sequence.
        """
        c = self.cfg
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.arange(len(token_ids), device=self.device)
        h = self.embed(ids, pos)
        Ks, Vs = [], []
        for layer in range(c.n_layers):
            q, k, v = self.pre_attn(layer, h, pos)            # [L, Hq, D], [L, Hkv, D] x2
            Ks.append(k)
            Vs.append(v)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               is_causal=True, enable_gqa=c.n_heads != c.n_kv_heads)
            h = self.post_attn(layer, h, o.transpose(0, 1))    # o: [Hq, L, D] -> [L, Hq, D]
        return self.lm_head(h[-1:])[0], torch.stack(Ks), torch.stack(Vs)
