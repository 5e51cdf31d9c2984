"""S-Part against Hugging Face transformers on the same weights: greedy tokens and logits."""
import dataclasses
import json
import os

import pytest
import torch

import fastdecode
import kvcache
import rpart
import fast
import spart
import weights

KINDS = ["opt-preln", "opt-postln-proj", "opt-preln-proj", "llama-mha", "llama-gqa", "llama3-rope"]
PROMPTS = [[2, 17, 45, 99, 3, 200, 7], [2, 80], [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 100, 101, 102]]
NEW = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one thread: measured on a loaded 2-core machine, a 2-thread bf16 matmul of
    [7, 64] x [64, 256] took 16 ms (OpenMP waits for a descheduled thread) against ~5 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_greedy(model, prompt, n=NEW):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_greedy_tokens_equal_transformers(checkpoint, kind, kv_dtype):
    d, model = checkpoint(kind)
    with fastdecode.LLM(d, workers=0, dtype="float32", kv_dtype=kv_dtype, quiet=True) as llm:
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
            h, rot = sp.embed(torch.tensor([tokens[pos]]), p), sp.rotary(p)
            for layer in range(c.n_layers):
                q, k, v = sp.pre_attn(layer, h, rot)
                o = rpart.attend_step(cache, layer, [0], [pos], q.numpy(), k.numpy().astype(kv_dtype),
                                      v.numpy().astype(kv_dtype))
                h = sp.post_attn(layer, h, torch.from_numpy(o))
            rows.append(sp.lm_head(h)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(checkpoint, kind):
    d, model = checkpoint(kind)
    sp = spart.SPart.load(d, dtype="float32")
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
    with fastdecode.LLM(d, workers=0, dtype="float32", quiet=True) as llm:
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


# --- bf16 against transformers' bf16 forward ---

BF16_TOL = 4e-2  # of max |logit|: bf16 keeps 8 significant bits (2^-8 = 3.9e-3 per rounding), and
                 # each logit here has passed ~20 roundings; measured 0.8e-2 (OPT) to 3.0e-2 (Llama),
                 # while transformers' own bf16 is 1.4e-2 to 8.5e-2 away from its float32


def near_tie_flips(ours, ref, tol):
    """Positions where the argmax of ours [P, V] differs from ref's and the flip is NOT explained
    by a near-tie: ref prefers its pick over ours by more than 2 * tol * max |logit| (each of the
    two logits may be off by tol * max |logit|). Prints the top-2 margin of every flip."""
    bad = []
    for i in torch.nonzero(ours.argmax(-1) != ref.argmax(-1)).flatten().tolist():
        a, b = ref[i].argmax().item(), ours[i].argmax().item()
        margin, allowed = (ref[i, a] - ref[i, b]).item(), 2 * tol * ref[i].abs().max().item()
        print(f"position {i}: transformers picks {a}, we pick {b}; its top-2 margin {margin:.4f} (near-tie below {allowed:.4f})")
        if margin > allowed:
            bad.append(i)
    return bad


def hf_bf16(model):
    import copy
    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_logits_match_transformers_bf16(checkpoint, kind):
    d, model = checkpoint(kind)
    tokens = PROMPTS[0] + hf_greedy(model, PROMPTS[0], 24)
    sp = spart.SPart.load(d, dtype="bfloat16")
    P = len(PROMPTS[0])
    ours = torch.stack([r.logits for r in sp.prefill_batch([spart.PrefillItem(tokens[:n]) for n in range(P, len(tokens) + 1)])])
    with torch.no_grad():
        ref = hf_bf16(model)(torch.tensor([tokens])).logits[0, P - 1:].float()
        ref32 = model(torch.tensor([tokens])).logits[0, P - 1:]
    rel = lambda a, b: ((a - b).abs().amax(-1) / b.abs().amax(-1)).max().item()
    err, hf_own = rel(ours, ref), rel(ref, ref32)
    assert err <= BF16_TOL, f"{kind}: bf16 logits relative error {err:.2e} against transformers' bf16"
    assert err < hf_own, f"{kind}: ours {err:.2e} from transformers' bf16, which is {hf_own:.2e} from its float32"
    assert near_tie_flips(ours, ref, BF16_TOL) == [], f"{kind}: a greedy pick differs beyond a near-tie"


@pytest.mark.parametrize("kind", ["opt-preln", "llama-gqa", "llama3-rope"])
def test_bf16_greedy_tokens_equal_transformers_bf16(checkpoint, kind):
    d, model = checkpoint(kind)
    hf = hf_bf16(model)
    with fastdecode.LLM(d, workers=0, dtype="bfloat16", kv_dtype="float16", quiet=True) as llm:
        ours = llm.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    for p, o in zip(PROMPTS, ours):
        theirs = hf_greedy(hf, p)
        if o.token_ids == theirs:
            continue
        j = next(i for i, (a, b) in enumerate(zip(o.token_ids, theirs)) if a != b)  # first flip
        with torch.no_grad():
            ref = hf(torch.tensor([p + theirs[:j]])).logits[0, -1:].float()
        ours_pick = torch.zeros_like(ref)
        ours_pick[0, o.token_ids[j]] = 1.0
        assert near_tie_flips(ours_pick, ref, BF16_TOL) == [], f"{kind}: prompt {p}, token {j} flips beyond a near-tie"


# --- batched and chunked prefill against one prompt at a time ---

MIXED = [[2, 17, 45, 99, 3, 200, 7], [2, 80], list(range(2, 40)), [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


def assert_close(got, want, what, tol=1e-5):
    """|got - want| <= tol * max |want|, printing the worst element."""
    err = (got.float() - want.float()).abs()
    worst = err.argmax().item()
    assert err.max() <= tol * want.abs().max(), f"{what}: worst error {err.max():.2e} at flat index {worst} " \
                                                  f"(want {want.flatten()[worst]:.4f}, got {got.flatten()[worst]:.4f})"


def chunked(sp, prompt, cuts):
    """Prefill `prompt` in chunks ending at `cuts`, each attending to the K/V of the earlier ones."""
    K = V = None
    start = 0
    for end in cuts + [len(prompt)]:
        r = sp.prefill_batch([spart.PrefillItem(prompt[start:end], start, K, V)])[0]
        K = r.k if K is None else torch.cat([K, r.k], 1)
        V = r.v if V is None else torch.cat([V, r.v], 1)
        start = end
    return r.logits, K, V


@pytest.mark.parametrize("kind", ["opt-preln", "opt-postln-proj", "llama-gqa", "llama3-rope"])
def test_batched_and_chunked_prefill_equal_one_at_a_time(checkpoint, kind):
    d, _ = checkpoint(kind)
    sp = spart.SPart.load(d, dtype="float32")
    alone = [sp.prefill(p) for p in MIXED]
    batched = sp.prefill_batch([spart.PrefillItem(p) for p in MIXED])
    for i, (want, got) in enumerate(zip(alone, batched)):
        for name, w, g in zip(("logits", "K", "V"), want, (got.logits, got.k, got.v)):
            assert g.shape == w.shape, f"{kind} prompt {i} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
            assert_close(g, w, f"{kind} batched, prompt {i} {name}")
        assert got.logits.argmax() == want[0].argmax()
    for i, cuts in ((0, [3]), (2, [1, 17, 30]), (3, [12])):
        got = chunked(sp, MIXED[i], cuts)
        for name, w, g in zip(("logits", "K", "V"), alone[i], got):
            assert_close(g, w, f"{kind} chunked at {cuts}, prompt {i} {name}")


@pytest.mark.parametrize("kind", ["opt-preln", "llama3-rope"])
def test_first_and_later_chunks_mix_in_one_batch(checkpoint, kind):
    d, _ = checkpoint(kind)
    sp = spart.SPart.load(d, dtype="float32")
    first = sp.prefill_batch([spart.PrefillItem(MIXED[2][:20])])[0]
    got = sp.prefill_batch([spart.PrefillItem(MIXED[0]), spart.PrefillItem(MIXED[2][20:], 20, first.k, first.v),
                            spart.PrefillItem(MIXED[1])])
    for i, r in zip((0, 2, 1), got):
        logits, K, V = sp.prefill(MIXED[i])
        assert_close(r.logits, logits, f"{kind} prompt {i} logits")
        assert_close(r.k, K[:, -r.k.shape[1]:], f"{kind} prompt {i} K")
        assert_close(r.v, V[:, -r.v.shape[1]:], f"{kind} prompt {i} V")


def test_prefill_matches_the_decode_reference(checkpoint):
    """Prefill's last logits equal the decode loop's (reference_logits) at every prompt length."""
    d, model = checkpoint("llama-gqa")
    sp = spart.SPart.load(d, dtype="float32")
    tokens = PROMPTS[2]
    ref = reference_logits(sp, tokens + [0], 1)                  # rows: logits after 1..len tokens
    got = torch.stack([r.logits for r in sp.prefill_batch([spart.PrefillItem(tokens[:n]) for n in range(1, len(tokens) + 1)])])
    assert_close(got, ref, "prefill vs decode loop")


# --- pieces: rotary fast path, dtype choice, loading and input errors ---


def test_rope_tables_equal_the_reference(checkpoint):
    sp = spart.SPart.load(checkpoint("llama3-rope")[0], dtype="float32")
    x, pos = torch.randn(9, 3, sp.cfg.head_dim), torch.tensor([0, 1, 2, 5, 63, 64, 200, 300, 511])
    got = spart.rope(x, sp.rope_cos[pos][:, None], sp.rope_sin[pos][:, None])
    assert_close(got, spart.apply_rope(x, pos, sp.inv_freq), "rope vs apply_rope", tol=1e-6)


def test_fused_weights_are_views_of_the_checkpoint_names(checkpoint):
    sp = spart.SPart.load(checkpoint("llama-gqa")[0], dtype="float32", pack=False)  # plain tensors to compare
    lw, w = sp.layers[1], sp.w
    q, k = w["layers.1.self_attn.q_proj.weight"], w["layers.1.self_attn.k_proj.weight"]
    assert q.data_ptr() == lw.qkv_w.data_ptr() and k.data_ptr() == lw.qkv_w[q.shape[0]:].data_ptr()
    assert torch.equal(lw.up_w[sp.cfg.ffn:], w["layers.1.mlp.up_proj.weight"])


def test_random_weights_are_stacked_without_a_copy():
    """random_weights lays a layer's matrices back to back, so fuse_layer's stacks are views;
    parts from separate tensors (a checkpoint) are copied."""
    cfg = dataclasses.replace(spart.KNOWN["llama-2-7b"][1], hidden=64, n_heads=4, n_kv_heads=2, ffn=96,
                              n_layers=2, vocab_size=100, head_dim=16)
    w = weights.random_weights(cfg, torch.float32, torch.device("cpu"))
    assert list(w) == list(weights.expected_shapes(cfg))
    q, k, v = (w[f"layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    gate, up = w["layers.1.mlp.gate_proj.weight"], w["layers.1.mlp.up_proj.weight"]
    lw = fast.fuse_layer(cfg, w, 1)
    assert lw.qkv_w.data_ptr() == q.data_ptr() and lw.up_w.data_ptr() == gate.data_ptr()
    assert torch.equal(lw.qkv_w, torch.cat([q, k, v])) and torch.equal(lw.up_w, torch.cat([gate, up]))
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    assert torch.equal(fast.stacked([a, b]), torch.cat([a, b])) and fast.stacked([a, b]).data_ptr() != a.data_ptr()
    whole = torch.randn(5, 4)
    assert fast.stacked([whole[3:], whole[:3]]).data_ptr() != whole.data_ptr()   # adjacent, in the wrong order


def test_random_layers_are_reordered_once_and_copied(monkeypatch):
    """With shared_layers, random layers are views of layer 0's buffer until prepack_layer makes
    each layer a copy of layer 0's packed matrices: one reorder per matrix of layer 0, every layer
    its own tensor (so decode reads as many bytes as with distinct weights), equal to layer 0's."""
    if not fast.can_prepack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this torch has no oneDNN prepacked linear")
    cfg = dataclasses.replace(spart.KNOWN["llama-2-7b"][1], hidden=64, n_heads=4, n_kv_heads=2, ffn=96,
                              n_layers=3, vocab_size=100, head_dim=16)
    w = weights.random_weights(cfg, torch.bfloat16, torch.device("cpu"), shared_layers=True)
    assert w["layers.2.mlp.up_proj.weight"].data_ptr() == w["layers.0.mlp.up_proj.weight"].data_ptr()
    reorders = []
    monkeypatch.setattr(fast, "prepack", lambda m: reorders.append(m.shape) or torch.ops.mkldnn._reorder_linear_weight(m, None))
    layers = [fast.fuse_layer(cfg, w, i) for i in range(cfg.n_layers)]
    packed = {}
    for lw in layers:
        fast.prepack_layer(lw, packed)
    assert len(reorders) == len(fast.PACKED)
    for name in fast.PACKED:
        mats = [getattr(lw, name) for lw in layers]
        assert len({id(m) for m in mats}) == cfg.n_layers and all(m.is_mkldnn for m in mats)
        assert all(torch.equal(m.to_dense(), mats[0].to_dense()) for m in mats[1:])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("kind", ["opt-postln-proj", "llama-gqa"])
def test_prepacked_equals_plain_and_unpacks(checkpoint, kind, dtype):
    d, model = checkpoint(kind)
    if not fast.can_prepack(torch.device("cpu"), getattr(torch, dtype)):
        pytest.skip("this torch has no oneDNN prepacked linear")
    packed, plain = spart.SPart.load(d, dtype=dtype, pack=True), spart.SPart.load(d, dtype=dtype, pack=False)
    assert packed.layers[0].qkv_w.is_mkldnn and not plain.layers[0].qkv_w.is_mkldnn and packed.head_w.is_mkldnn
    items = [spart.PrefillItem(p) for p in MIXED]
    for a, b in zip(packed.prefill_batch(items), plain.prefill_batch(items)):
        # bf16: the same oneDNN arithmetic in another weight layout, bit-identical here; allowed one
        # bf16 rounding (2^-8) of the largest value, in case another CPU's kernel sums in another
        # order. float32: oneDNN against the BLAS F.linear calls, another summation order: 1e-5.
        for x, y, what in ((a.logits, b.logits, "logits"), (a.k, b.k, "K"), (a.v, b.v, "V")):
            assert_close(x, y, f"{kind} packed vs plain {what}", tol=2 ** -8 if dtype == "bfloat16" else 1e-5)
    theirs = {spart.canonical_name(n): t for n, t in model.state_dict().items()}
    ours = packed.state_dict()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name].to(packed.dtype)), name
    assert set(ours) == set(weights.expected_shapes(packed.cfg))


def test_dtype_choice(monkeypatch):
    cfg, cpu = spart.KNOWN["opt-125m"][1], torch.device("cpu")
    assert fast.choose_dtype(cfg, cpu, "float32") == (torch.float32, "asked for")
    assert fast.choose_dtype(cfg, cpu, torch.bfloat16)[0] == torch.bfloat16
    monkeypatch.setattr(fast, "cpu_bf16_fast", lambda: None)
    assert fast.choose_dtype(cfg, cpu)[0] == torch.float32
    monkeypatch.setattr(fast, "cpu_bf16_fast", lambda: "amx_bf16")
    assert fast.choose_dtype(cfg, cpu) == (torch.bfloat16, "CPU has amx_bf16")


def test_known_config_is_copied_not_shared():
    sp = spart.SPart.load("opt-125m", quiet=True, dtype="bfloat16")
    sp.cfg.eos_id = 12345
    assert spart.KNOWN["opt-125m"][1].eos_id == 2


def test_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "model-Q8_0.gguf"
    path.write_bytes(b"GGUF")
    for model in (str(path), str(tmp_path / "missing.gguf")):
        with pytest.raises(ValueError, match="GGUF files are not read; convert it"):
            spart.SPart.load(model)


def test_prefill_input_errors_name_the_item(checkpoint):
    sp = spart.SPart.load(checkpoint("llama-gqa")[0], dtype="float32")
    V, P = sp.cfg.vocab_size, spart.PrefillItem
    K = sp.prefill([2, 3, 4])[1]
    for items, msg in (([P([2, 3]), P([2, V])], f"item 1: token id {V} is outside"),
                       ([P([-1])], "item 0: token id -1"),
                       ([P([])], "item 0: 0 tokens"),
                       ([P([2] * (sp.cfg.max_pos + 1))], "do not fit"),
                       ([P([5], 3)], r"item 0: past_k is None, a chunk at 3 needs \(2, 3, 2, 8\)"),
                       ([P([5], 2, K, K)], r"past_k is \(2, 3, 2, 8\), a chunk at 2 needs")):
        with pytest.raises(ValueError, match=msg):
            sp.prefill_batch(items)
