"""bfloat16 KV through the whole stack: the store, the wire, the worker, the engine's default.

bfloat16 rows are NumPy's bfloat16 (ml_dtypes) everywhere: the S-Part's bf16 k, v leave torch as
their bits (pipeline.to_host), travel as they are, and the kernel reads them with vdpbf16ps
where the CPU has AVX512-BF16 (tests/test_kernel.py checks its numerics on every build). An
engine whose S-Part runs in bfloat16 keeps its KV in bfloat16 unless told otherwise.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import backend
import bench_accuracy
import fastdecode
import kvcache
import rpart
from pipeline import to_host

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[2, 17, 45, 99, 3, 200, 7], [2, 80], [2, 5, 6, 7, 8, 9, 10, 11], [2, 9, 9], [2, 31, 41, 59, 26]]
BF16 = kvcache.BFLOAT16


def test_torch_bf16_reaches_numpy_bit_for_bit():
    x = torch.randn(3, 2, 16, dtype=torch.float32).to(torch.bfloat16)
    a = to_host(x, "bfloat16")
    assert a.dtype == BF16 and a.shape == (3, 2, 16)
    assert np.array_equal(a.view(np.int16), x.view(torch.int16).numpy())      # the bits, not a rounding
    assert np.array_equal(to_host(x.float(), BF16).view(np.int16), a.view(np.int16))  # float32 in: rounded once


def test_store_keeps_bf16_rows_exactly_in_fp16_bytes():
    cfg = kvcache.KVConfig(2, 3, 16, "bfloat16", 2**20)
    assert cfg.bytes_per_token == kvcache.KVConfig(2, 3, 16, "float16").bytes_per_token and cfg.row_dtype == "bfloat16"
    cache, rng = kvcache.KVCache(cfg), np.random.default_rng(0)
    K, V = (rng.standard_normal((5, 3, 16)).astype(BF16) * 300 for _ in "KV")  # beyond fp16's precision
    k, v = (rng.standard_normal((1, 3, 16)).astype(BF16) for _ in "kv")
    cache.allocate(7, 8)
    cache.fill(7, 1, K, V)
    cache.write_batch(1, [7], [5], k, v)
    Kc, Vc = cache.views(7, 1, 6)
    assert Kc.dtype == BF16 and np.shares_memory(Kc, cache.blocks[7])
    assert np.array_equal(Kc, np.concatenate([K, k])) and np.array_equal(Vc, np.concatenate([V, v]))


def test_worker_holds_bf16_and_attends_like_the_reference(worker):
    proc, addr = worker
    cfg = kvcache.KVConfig(n_layers=2, n_kv_heads=2, head_dim=64, dtype="bfloat16", mem_bytes=2**26)
    c = backend.WorkerClient(*addr, timeout=10)
    c.configure(cfg, 8)
    rng = np.random.default_rng(5)
    K, V = (rng.standard_normal((2, 40, 2, 64)).astype(BF16) for _ in "KV")
    q = rng.standard_normal((1, 8, 64)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 64)).astype(BF16) for _ in "kv")
    c.add_filled(100, 48, K, V)
    assert c.stats()["bytes_reserved"] == 48 * cfg.bytes_per_token
    c.send_decode(1, [100], [40], q, k, v)
    o, _ = c.recv_out((1, 8, 64))
    want = rpart.decode_attention(q, [np.concatenate([K[1], k])], [np.concatenate([V[1], v])])
    assert np.array_equal(o, want)       # the rows arrived bit for bit: the same kernel, the same answer
    c.call(backend.wire.DROP, (100,))
    assert proc.poll() is None


@pytest.mark.parametrize("kind,pipeline", [("llama-gqa", True), ("opt-preln", False)])
def test_bf16_sparts_default_is_bf16_kv_and_workers_equal_in_process(checkpoint, kind, pipeline):
    """The same bf16 rows, the same kernel: the same tokens through a worker as in process."""
    d, _ = checkpoint(kind)
    with fastdecode.LLM(d, workers=0, dtype="bfloat16", quiet=True) as ref:
        assert ref.kv_cfg.dtype == "bfloat16"
        want = [o.token_ids for o in ref.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]
    with fastdecode.LLM(d, workers=1, dtype="bfloat16", pipeline=pipeline, quiet=True) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]
    assert got == want
    with fastdecode.LLM(d, workers=0, dtype="float32", quiet=True) as f32:
        assert f32.kv_cfg.dtype == "float16"   # float32 S-Parts keep float16 KV


@pytest.mark.parametrize("kind", ["llama-gqa", "opt-preln"])
def test_bf16_kv_logits_error_against_fp16_kv(checkpoint, kind):
    """The S-Part in float32, so the KV dtype is the only difference. bf16 keeps 8 significant
    bits against fp16's 11 (a row element off by up to 2^-9 of itself, fp16 2^-12), and the
    kernel rounds q and the softmax weights to bf16 as well. Measured on these seeded models:
    relative logits error per position against fp16 KV, median 0.0035-0.0071, max 0.008-0.018;
    1-2 flips in 40, at top-2 margins 0.0002-0.0045 (of a range of 16). Bounds: median
    <= 0.01, max <= 0.05; greedy choices flip only at near-ties (top-2 margin under 1% of the
    logits' range)."""
    d, _ = checkpoint(kind)
    prompt = PROMPTS[0]
    with fastdecode.LLM(d, workers=0, dtype="float32", quiet=True) as llm:
        ids = prompt + llm.generate([prompt], max_new_tokens=40, ignore_eos=True)[0].token_ids
    logits, _ = bench_accuracy.kv_accuracy(d, ids, len(prompt), ("float16", "bfloat16"))
    r = bench_accuracy.compare(logits["float16"], logits["bfloat16"])
    print(kind, r)
    assert r["rel_err_median"] <= 0.01 and r["rel_err_max"] <= 0.05, r
    for f in r["flips"]:
        assert f["margin"] < 0.01 * r["logit_range"], f
    assert 0 < r["rel_err_median"], "bf16 KV changed nothing: is it rounding?"


def test_cli_reports_bf16_kv(checkpoint):
    d, _ = checkpoint("llama-gqa")
    out = subprocess.run([sys.executable, os.path.join(HERE, "fastdecode.py"), "--model", d, "--dtype", "bfloat16",
                          "--num-requests", "4", "--prompt-len", "8", "--gen-len", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["kv_dtype"] == "bfloat16" and rep["generated_tokens"] == 16
    assert rep["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 2                # 2 layers, 2 KV heads, D = 8
    assert "KV bfloat16" in out.stdout


def test_engine_and_llama_cpp_write_the_same_greedy_text(smollm2):
    """llama.cpp (when llama-cpp-python is installed) on the same GGUF, requantized to bf16, and
    the engine in bf16 with one local worker: the same 48 greedy tokens of real text. Different
    code for every part of the model, the same weights; a bf16 near-tie could flip a token, and
    none does on this prompt (128 of 128 tokens agreed in `python bench.py e2e --only-real`)."""
    pytest.importorskip("llama_cpp")
    import bench_e2e
    import bench_llamacpp
    mod = bench_e2e.smollm2_module()
    path = bench_llamacpp.requantized(mod.gguf_path(), "bfloat16", mod.cache_root())
    with fastdecode.LLM(smollm2, workers=1, dtype="bfloat16", quiet=True) as llm:
        prompt = llm.tokenizer.encode(bench_e2e.PARAGRAPH).ids
        ours = llm.generate([prompt], max_new_tokens=48, ignore_eos=True)[0].token_ids
    c = bench_llamacpp.Contender(path, n_seq=1, n_ctx_seq=len(prompt) + 64, n_batch=512)
    try:
        theirs = c.generate([prompt], 48).tokens[0]
    finally:
        c.close()
    assert ours == theirs, llm.tokenizer.decode(ours) + " | " + llm.tokenizer.decode(theirs)
