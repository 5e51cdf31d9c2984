"""bench_llamacpp.py - llama.cpp as a contender, on the same SmolLM2 weights (optional).

What a CPU user would run instead of this engine is llama.cpp. When the Python binding
(`llama-cpp-python`, which builds llama.cpp from source at install: ~8 minutes on 2 cores here) is
installed, `python bench.py e2e` adds it beside the engine's SmolLM2 rows: the same GGUF file
the engine's checkpoint was converted from (tests/smollm2.py), requantized once by llama.cpp's
own quantize call to the engine's dtype (bf16 here; the package ships Q4_1, and both sides
de-quantize it), its default float16 KV-cache, every core, greedy.

Both workloads go through llama.cpp's batch API (llama_decode on a llama_batch), one sequence
id per prompt, as its server does: the prompts in one prefill batch, then one token per
sequence per step. Times are llama_decode's (synchronized); argmax runs outside them for the
batch-1 step, inside them for the batch's decode rate, as the engine's figures count it.
"""
import ctypes
import dataclasses
import functools
import importlib.util
import os
import time

import numpy as np

FTYPES = {"bfloat16": 32, "float16": 1, "float32": 0}  # llama.cpp's LLAMA_FTYPE_* (MOSTLY_BF16, MOSTLY_F16, ALL_F32)


def available():
    """Whether llama-cpp-python is installed (not imported: loading it loads llama.cpp)."""
    return importlib.util.find_spec("llama_cpp") is not None


def requantized(src, dtype, cache_dir):
    """src GGUF -> a copy in `dtype` beside the engine's converted checkpoint (made once, by
    llama.cpp's quantize, which de-quantizes Q4_1 blocks as transformers does)."""
    import llama_cpp as lc
    quiet(lc)
    st = os.stat(src)
    out = os.path.join(cache_dir, f"{os.path.basename(src)[:-5]}-{dtype}-{st.st_size}-{int(st.st_mtime)}.gguf")
    if os.path.exists(out):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = FTYPES[dtype], True
    tmp = f"{out}.tmp-{os.getpid()}"
    rc = lc.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dtype}) returned {rc}")
    os.replace(tmp, out)
    return out


@dataclasses.dataclass
class Run:
    """One generate() on llama.cpp."""
    prefill_s: float             # the prompts' one batch
    step_s: list                 # [gen - 1] llama_decode of each decode step
    decode_s: float              # the decode loop's wall time, argmax included
    tokens: list                 # [n prompts][gen] greedy tokens


class Contender:
    """One llama.cpp model and context sized for `n_seq` sequences of up to `n_ctx_seq` tokens."""

    def __init__(self, path, n_seq, n_ctx_seq, n_batch):
        import llama_cpp as lc
        self.lc = lc
        lc.llama_backend_init()
        quiet(lc)
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_seq * n_ctx_seq, n_batch, min(n_batch, 512), n_seq
        cp.n_threads = cp.n_threads_batch = os.cpu_count() or 1
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.batch = lc.llama_batch_init(n_batch, 0, n_seq)

    def close(self):
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def decode(self, entries):
        """entries: (token, position, sequence, wants logits) -> seconds llama_decode took."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        t = time.perf_counter()
        if rc := self.lc.llama_decode(self.ctx, b):
            raise RuntimeError(f"llama_decode returned {rc}")
        self.lc.llama_synchronize(self.ctx)
        return time.perf_counter() - t

    def argmax(self, i):
        """Greedy token from the logits of batch entry i."""
        return int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def generate(self, prompts, gen):
        """Greedy `gen` tokens for each prompt, all in one batch -> Run."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)  # a fresh KV-cache
        entries = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        prefill = self.decode(entries)
        last = np.cumsum([len(p) for p in prompts]) - 1
        toks = [[self.argmax(int(i))] for i in last]
        steps, t0 = [], time.perf_counter()
        for g in range(1, gen):
            steps.append(self.decode([(toks[s][-1], len(pr) + g - 1, s, True) for s, pr in enumerate(prompts)]))
            for s in range(len(prompts)):
                toks[s].append(self.argmax(s))
        return Run(prefill, steps, time.perf_counter() - t0, toks)


@functools.cache
def _ignore_log(lc):
    """A log callback that drops llama.cpp's lines; made once and kept (cached) for as long as
    llama.cpp may call it."""
    return lc.llama_log_callback(lambda level, text, user: None)


def quiet(lc):
    """Silence llama.cpp's logging (loading, quantizing)."""
    lc.llama_log_set(_ignore_log(lc), None)


def smollm2_rows(gguf, cache_dir, prompt, prompts16, dtype, gen_b1, gen_b16):
    """The engine's SmolLM2 workloads on llama.cpp: the batch-1 decode step (prompt, gen_b1 new
    tokens) and batch-16 decode (prompts16, gen_b16 new tokens). Returns the figures and the
    batch-1 tokens (to compare with the engine's greedy text)."""
    path = requantized(gguf, dtype, cache_dir)
    c = Contender(path, n_seq=1, n_ctx_seq=len(prompt) + gen_b1 + 32, n_batch=512)
    try:
        c.generate([prompt], 8)                                   # warm up
        b1 = c.generate([prompt], gen_b1)
    finally:
        c.close()
    P = max(len(p) for p in prompts16)
    c = Contender(path, n_seq=len(prompts16), n_ctx_seq=P + gen_b16 + 32, n_batch=len(prompts16) * P)
    try:
        runs = [c.generate(prompts16, gen_b16) for _ in range(2)]  # the first pays new memory
    finally:
        c.close()
    best = min(runs, key=lambda r: r.decode_s)
    return {"dtype": dtype, "step_ms_b1": 1e3 * float(np.median(b1.step_s)),
            "decode_tok_s_b16": len(prompts16) * len(best.step_s) / best.decode_s, "prefill_s_b16": best.prefill_s}, b1.tokens[0]
