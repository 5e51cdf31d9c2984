"""S-Part against Hugging Face transformers on the same weights: greedy tokens and logits."""
import json
import os

import numpy as np
import pytest
import torch

import fastdecode
import kvcache
import rpart
import spart

KINDS = ["opt-preln", "opt-postln-proj", "opt-preln-proj", "llama-mha", "llama-gqa", "llama3-rope"]
PROMPTS = [[2, 17, 45, 99, 3, 200, 7], [2, 80], [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 100, 101, 102]]
NEW = 32


def hf_greedy(model, prompt, n=NEW):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_greedy_tokens_equal_transformers(checkpoint, kind, kv_dtype):
    d, model = checkpoint(kind)
    with fastdecode.LLM(d, workers=0, kv_dtype=kv_dtype, quiet=True) as llm:
        ours = llm.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    for p, o in zip(PROMPTS, ours):
        assert o.token_ids == hf_greedy(model, p), f"{kind} {kv_dtype}: prompt {p}"
    assert len({t for o in ours for t in o.token_ids}) > 5, "degenerate output cannot tell layers apart"


def reference_logits(sp, tokens, prompt_len, kv_dtype="float32"):
    """Logits of every position after the prompt, by prefill + the in-process decode loop."""
    c = sp.cfg
    cache = kvcache.KVCache(kvcache.KVConfig(c.n_layers, c.n_kv_heads, c.head_dim, kv_dtype, 2**28))
    logits, K, V = sp.prefill(tokens[:prompt_len])
    cache.allocate(0, len(tokens))
    for layer in range(c.n_layers):
        cache.fill(0, layer, K[layer].numpy().astype(kv_dtype), V[layer].numpy().astype(kv_dtype))
    rows = [logits]
    with torch.inference_mode():
        for pos in range(prompt_len, len(tokens) - 1):
            p = torch.tensor([pos])
            h = sp.embed(torch.tensor([tokens[pos]]), p)
            for layer in range(c.n_layers):
                q, k, v = sp.pre_attn(layer, h, p)
                o = rpart.attend_step(cache, layer, [0], [pos], q.numpy(), k.numpy().astype(kv_dtype),
                                      v.numpy().astype(kv_dtype))
                h = sp.post_attn(layer, h, torch.from_numpy(o))
            rows.append(sp.lm_head(h)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(checkpoint, kind):
    d, model = checkpoint(kind)
    sp = spart.SPart.load(d)
    tokens = PROMPTS[0] + hf_greedy(model, PROMPTS[0], 24)
    ours = reference_logits(sp, tokens, len(PROMPTS[0]))
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0, len(PROMPTS[0]) - 1:-1]
    err = ((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
    assert err <= 1e-4, f"{kind}: logits relative error {err:.2e}"


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_checkpoint_formats(checkpoint, fmt):
    d, model = checkpoint("llama-gqa", fmt)
    if fmt == "sharded":
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    with fastdecode.LLM(d, workers=0, quiet=True) as llm:
        out = llm.generate([PROMPTS[0]], max_new_tokens=NEW, ignore_eos=True)
    assert out[0].token_ids == hf_greedy(model, PROMPTS[0])


def test_hf_cache_layout_is_found_offline(checkpoint, tmp_path, monkeypatch):
    d, _ = checkpoint("opt-preln")
    snap = tmp_path / "hub" / "models--someorg--tiny-opt" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    os.symlink(d, snap)
    (tmp_path / "hub" / "models--someorg--tiny-opt" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny-opt" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert spart.locate("someorg/tiny-opt")[0] == str(snap)
    assert spart.SPart.load("someorg/tiny-opt").source == str(snap)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        spart.SPart.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a known name"):
        spart.SPart.load("not-a-model")


def test_truncated_weights_name_the_file(checkpoint, tmp_path):
    d, _ = checkpoint("opt-preln")
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(d, "config.json")).read())
    data = open(os.path.join(d, "model.safetensors"), "rb").read()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read weights"):
        spart.SPart.load(str(bad))


def test_shape_mismatch_names_file_and_tensor(checkpoint, tmp_path):
    d, _ = checkpoint("opt-preln")
    bad = tmp_path / "shape"
    bad.mkdir()
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["ffn_dim"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(d, "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.decoder.layers.0.fc1.(weight|bias) has shape \(128"):
        spart.SPart.load(str(bad))


def test_known_configs_need_no_download():
    for name, (repo, cfg) in spart.KNOWN.items():
        assert cfg.head_dim * cfg.n_heads == cfg.hidden, name
    assert spart.KNOWN["llama-3-8b"][1].n_kv_heads == 8
    assert spart.KNOWN["opt-350m"][1].pre_ln is False
    assert abs(spart.KNOWN["opt-1.3b"][1].weight_count() / 1e9 - 1.3) < 0.05


def test_sampling_is_seeded_and_respects_top_p(checkpoint):
    d, _ = checkpoint("llama-gqa")
    with fastdecode.LLM(d, workers=0, quiet=True) as llm:
        a = llm.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
        b = llm.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
        c = llm.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    logits = torch.tensor([[10.0, 9.0, 0.0, -5.0]])
    picks = {fastdecode.sample(logits, 1.0, 0.5, [torch.Generator().manual_seed(i)])[0] for i in range(50)}
    assert picks == {0}, "top_p=0.5 keeps only the most likely token here"


def test_stops_on_eos(checkpoint):
    d, model = checkpoint("opt-preln")
    with fastdecode.LLM(d, workers=0, quiet=True) as llm:
        free = llm.generate([PROMPTS[0]], max_new_tokens=NEW, ignore_eos=True)[0].token_ids
        eos = free[5]
        llm.spart.cfg.eos_id = eos
        stopped = llm.generate([PROMPTS[0]], max_new_tokens=NEW)[0].token_ids
    assert stopped == free[: free.index(eos) + 1]
