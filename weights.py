"""weights.py - where a model's weights come from: a checkpoint on disk, or random numbers.

The S-Part (spart.py) computes; this module only finds and reads. A model named by a short name
(spart.KNOWN), a hub repo id or a directory is looked up on disk, never downloaded: in the
directory itself, then in the Hugging Face cache's layout. Weights are read from safetensors or
torch .bin files (single or sharded), renamed to one canonical name per tensor, and checked
against the shapes the config needs; random weights of the same shapes stand in when no
checkpoint is on disk, so throughput can be measured without one.

Legend: H hidden size, Hq/Hkv heads, D head dim, V vocabulary, F MLP width.
"""
import json
import math
import os

import torch

# --- finding a checkpoint on disk ---


def hf_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def locate(model, aliases=None):
    """(directory or None, hub repo id or None) for a repo id, a directory, or a short name that
    `aliases` ({short name: repo id}, e.g. spart.KNOWN's) maps to a repo id.

    Looks in the directory itself, then in the Hugging Face cache's on-disk layout
    (models--ORG--NAME/snapshots/REV, with REV from refs/main when present). Never downloads.
    """
    if os.path.isdir(model):
        return model, None
    repo = (aliases or {}).get(model, model)
    if repo.count("/") != 1:
        return None, None
    root = os.path.join(hf_cache_dir(), "models--" + repo.replace("/", "--"))
    snaps = os.path.join(root, "snapshots")
    if not os.path.isdir(snaps):
        return None, repo
    ref = os.path.join(root, "refs", "main")
    revs = [open(ref).read().strip()] if os.path.exists(ref) else sorted(os.listdir(snaps))
    for rev in revs:
        d = os.path.join(snaps, rev)
        if os.path.exists(os.path.join(d, "config.json")):
            return d, repo
    return None, repo


# --- reading weights ---


def weight_files(directory):
    """The checkpoint's weight files: sharded (index JSON) or single, safetensors preferred."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        ipath = os.path.join(directory, index)
        if os.path.exists(ipath):
            with open(ipath) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, s) for s in shards]
        if os.path.exists(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or their index JSON")


def read_tensors(path):
    """{name: tensor} from one .safetensors or .bin file; a clear error naming it if unreadable."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt: say which file
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e


def canonical_name(name):
    """Strip the wrappers checkpoints differ in: 'model.decoder.x' and 'decoder.x' -> 'x'."""
    for prefix in ("model.decoder.", "decoder.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def expected_shapes(cfg):
    """{canonical weight name: shape} that the S-Part needs."""
    H, D, Hq, Hkv, Fw = cfg.hidden, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn
    shapes = {"embed_tokens.weight": (cfg.vocab_size, cfg.embed_dim)}
    if cfg.family == "opt":
        shapes["embed_positions.weight"] = (cfg.max_pos + 2, H)  # OPT's positions start at 2
        if cfg.embed_dim != H:
            shapes["project_in.weight"] = (H, cfg.embed_dim)
            shapes["project_out.weight"] = (cfg.embed_dim, H)
        if cfg.pre_ln:
            shapes.update({"final_layer_norm.weight": (H,), "final_layer_norm.bias": (H,)})
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            for n, shape in (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (H, H)),
                             ("self_attn.v_proj", (H, H)), ("self_attn.out_proj", (H, H)),
                             ("fc1", (Fw, H)), ("fc2", (H, Fw)),
                             ("self_attn_layer_norm", (H,)), ("final_layer_norm", (H,))):
                shapes[p + n + ".weight"] = shape
                shapes[p + n + ".bias"] = (shape[0],)
    else:
        shapes["norm.weight"] = (H,)
        if not cfg.tie_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, H)
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            shapes.update({p + "self_attn.q_proj.weight": (Hq * D, H), p + "self_attn.k_proj.weight": (Hkv * D, H),
                           p + "self_attn.v_proj.weight": (Hkv * D, H), p + "self_attn.o_proj.weight": (H, Hq * D),
                           p + "mlp.gate_proj.weight": (Fw, H), p + "mlp.up_proj.weight": (Fw, H),
                           p + "mlp.down_proj.weight": (H, Fw), p + "input_layernorm.weight": (H,),
                           p + "post_attention_layernorm.weight": (H,)})
    return shapes


def load_weights(directory, cfg, dtype, device):
    """{canonical name: tensor on device}; every needed tensor present with the right shape."""
    need, got, where = expected_shapes(cfg), {}, {}
    for path in weight_files(directory):
        for name, t in read_tensors(path).items():
            key = canonical_name(name)
            if key in need:
                if tuple(t.shape) != need[key]:
                    raise ValueError(f"{path}: tensor {name} has shape {tuple(t.shape)}, "
                                     f"the config needs {need[key]}")
                got[key], where[key] = t.to(device=device, dtype=dtype), path
    missing = [k for k in need if k not in got]
    if missing:
        raise ValueError(f"{directory}: weights missing from the checkpoint: {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return got


POOL = 1_000_003  # a prime length, so tiled rows never line up with each other


def random_weights(cfg, dtype, device, seed=0, shared_layers=False):
    """Random weights of the right shapes in seconds: N(0, 0.02) values drawn once into a pool,
    then tiled into each tensor from a random offset (normal_ over 1.3e9 floats takes ~15 s;
    throughput does not depend on the values). A layer's matrices are views, in checkpoint
    order, into one buffer of that layer, so the ones the S-Part stacks (q, k, v; gate, up) are
    already back to back: fast.fuse_layer takes them as they are instead of copying them.
    shared_layers: every layer's matrices are views of layer 0's buffer, for a caller that copies
    each layer anyway (the S-Part prepacking them: fast.prepack_layer); 1/n_layers of the work."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.empty(2 * POOL, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(dtype)
    shapes, out = expected_shapes(cfg), {}
    groups = {}   # "layers.{i}" (the name itself outside the layers) -> the names of its matrices
    for name, shape in shapes.items():
        if len(shape) == 2:
            groups.setdefault(".".join(name.split(".")[:2]) if name.startswith("layers.") else name, []).append(name)
        else:  # norms' weights 1, biases 0
            out[name] = (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, dtype=dtype, device=device)
    layer0 = None
    for group, names in groups.items():
        sizes = [math.prod(shapes[name]) for name in names]
        n, start = sum(sizes), int(torch.randint(POOL, (1,), generator=g))
        if shared_layers and group.startswith("layers.") and layer0 is not None:
            flat = layer0
        else:
            flat, full = torch.empty(n, dtype=dtype), n // POOL
            flat[:full * POOL].view(full, POOL).copy_(pool[start:start + POOL])  # broadcast copy
            flat[full * POOL:].copy_(pool[start:start + n - full * POOL])
            flat = flat.to(device)
            layer0 = flat if group == "layers.0" else layer0
        for name, part in zip(names, flat.split(sizes)):
            out[name] = part.view(shapes[name])
    return {name: out[name] for name in shapes}


# --- tokenizer ---


def load_tokenizer(directory):
    """A `tokenizers.Tokenizer` from tokenizer.json or vocab.json + merges.txt, else None."""
    if directory is None:
        return None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if os.path.exists(vocab) and os.path.exists(merges):  # GPT-2 style byte-level BPE (OPT)
        tok = Tokenizer(models.BPE.from_file(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    return None
