"""bench_e2e.py - the engine measured: against transformers, and against the performance model.

`python bench.py e2e` runs the engine (S-Part on this CPU, one local worker) and transformers'
generate() on the same weights and prompts, alternating, and prints the ratios.
`python bench.py model` puts the performance model's predicted decode throughput beside the
engine's measured one (after `python perfmodel.py calibrate`).
"""
import dataclasses
import itertools
import json
import os
import time

import numpy as np

import backend

backend.short_openmp_spin()  # as the engine runs (before torch loads libgomp): see there
import perfmodel  # noqa: E402

# --- bench e2e ---

E2E_CONFIGS = [("opt-125m", 16, 128), ("opt-125m", 16, 1024), ("opt-1.3b", 16, 128), ("opt-1.3b", 8, 1024)]


def hf_twin(sp):
    """A transformers OPT model that shares the S-Part's (random) weights, without copies."""
    import spart
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    c = sp.cfg
    hc = OPTConfig(vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.n_layers, ffn_dim=c.ffn,
                   num_attention_heads=c.n_heads, max_position_embeddings=c.max_pos, word_embed_proj_dim=c.embed_dim,
                   do_layer_norm_before=c.pre_ln, bos_token_id=c.bos_id, eos_token_id=c.eos_id, pad_token_id=1)
    with torch.device("meta"):
        hf = OPTForCausalLM(hc)
    tied = {"lm_head.weight": "embed_tokens.weight"}
    hf.load_state_dict({n: sp.w[tied.get(n, spart.canonical_name(n))] for n in hf.state_dict()},
                       assign=True, strict=True)
    return hf.eval()


def run_hf(hf, prompts, gen):
    """transformers generate(), greedy, exactly `gen` tokens. Decode time runs from the first
    token (after prefill) to the last, timed by a logits processor called once per token."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores
    ids, clock = torch.tensor(prompts), Clock()
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, min_new_tokens=gen,
                          do_sample=False, logits_processor=LogitsProcessorList([clock]))
    wall = time.perf_counter() - t
    B = len(prompts)
    return {"decode_tok_s": B * (gen - 1) / (clock.times[-1] - clock.times[0]), "total_tok_s": B * gen / wall,
            "tokens": out[:, ids.shape[1]:].tolist()}


def workload(llm, B, P):
    """Run the engine's batches at B and make B random prompts of P tokens (seeded by P)."""
    llm.sched_cfg = dataclasses.replace(llm.sched_cfg, max_batch=B)
    rng = np.random.default_rng(P)
    return [rng.integers(4, llm.spart.cfg.vocab_size, P).tolist() for _ in range(B)]


def engine_per_model(configs, kv_dtype="float16"):
    """(llm, model, B, P, prompts) for each (model, B, P) config: one engine per model (one local
    worker, naive admission so a whole batch runs at once, KV of kv_dtype), closed when done with."""
    import fastdecode
    llm, loaded = None, None
    try:
        for model, B, P in configs:
            if loaded != model:
                if llm:
                    llm.close()
                llm, loaded = fastdecode.LLM(model, workers=1, schedule="naive", kv_dtype=kv_dtype, quiet=True), model
            yield llm, model, B, P, workload(llm, B, P)
    finally:
        if llm:
            llm.close()


def run_engine(llm, prompts, gen):
    t = time.perf_counter()
    outs = llm.generate(prompts, max_new_tokens=gen, ignore_eos=True, progress=False)
    wall, st = time.perf_counter() - t, llm.stats
    return {"decode_tok_s": st.decode_tokens / st.decode_wall, "total_tok_s": len(prompts) * gen / wall,
            "tokens": [o.token_ids for o in outs]}


def bench_e2e(args):
    """The engine (S-Part on this CPU, one local worker, naive admission so the whole batch runs
    at once as in generate()) against transformers generate() on the same weights and prompts."""
    import torch
    cores = os.cpu_count()
    configs = [c for c in E2E_CONFIGS if c[0] in args.models]
    print(f"engine: S-Part on cpu (float32), 1 local worker, fp16 KV, serial (both sides share {cores} cores); "
          f"transformers {__import__('transformers').__version__}: float32, DynamicCache, {cores} threads. "
          f"gen {args.gen_len} tokens, greedy; best of {args.rounds} alternating rounds")
    hdr = (f"{'model':<9}{'B':>3}{'prompt':>7} | {'decode tok/s':>12} {'hf':>7} {'ratio':>6} | "
           f"{'total tok/s':>11} {'hf':>7} {'ratio':>6} | {'same tokens':>11}")
    print(hdr + "\n" + "-" * len(hdr))
    torch.set_num_threads(cores)  # HF's setting; the engine's prefill restores it after use
    rows, hf, hf_of = [], None, None
    for llm, model, B, P, prompts in engine_per_model(configs):
        if hf_of is not llm:
            hf, hf_of = hf_twin(llm.spart), llm
        eng, ref = [], []
        for _ in range(args.rounds):
            eng.append(run_engine(llm, prompts, args.gen_len))
            ref.append(run_hf(hf, prompts, args.gen_len))
        best = lambda runs, k: max(r[k] for r in runs)
        same = np.mean([a == b for x, y in zip(eng[0]["tokens"], ref[0]["tokens"]) for a, b in zip(x, y)])
        row = {"model": model, "batch": B, "prompt": P, "gen": args.gen_len,
               "decode_tok_s": best(eng, "decode_tok_s"), "hf_decode_tok_s": best(ref, "decode_tok_s"),
               "total_tok_s": best(eng, "total_tok_s"), "hf_total_tok_s": best(ref, "total_tok_s"),
               "same_tokens": float(same)}
        row["decode_ratio"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
        row["total_ratio"] = row["total_tok_s"] / row["hf_total_tok_s"]
        rows.append(row)
        print(f"{model:<9}{B:>3}{P:>7} | {row['decode_tok_s']:12.1f} {row['hf_decode_tok_s']:7.1f} "
              f"{row['decode_ratio']:5.2f}x | {row['total_tok_s']:11.1f} {row['hf_total_tok_s']:7.1f} "
              f"{row['total_ratio']:5.2f}x | {100 * same:10.1f}%", flush=True)
    summary = {f"decode_ratio_p{P}": round(min(r["decode_ratio"] for r in rows if r["prompt"] == P), 3)
               for P in sorted({r["prompt"] for r in rows})}
    print(json.dumps({**summary, "rows": rows}))


# --- bench model ---

MODEL_CONFIGS = [("opt-125m", 16, 128), ("opt-125m", 16, 1024), ("opt-1.3b", 4, 128), ("opt-1.3b", 16, 256)]
MODEL_CONFIGS_INT8 = [("opt-125m", 16, 1024)]   # the longest KV of the fp16 rows: the R-Part's share is largest


def bench_model(args):
    """The performance model's predicted decode throughput beside fastdecode's measured one."""
    prof = perfmodel.load_profile()
    if prof is None:
        raise SystemExit(f"no profile at {perfmodel.profile_path()}: run `python perfmodel.py calibrate` first")
    print(f"profile {perfmodel.profile_path()}: read {prof['read_gbs']:.1f} GB/s, kernel fp16 {prof['kernel']['float16']:.1f} GB/s, "
          f"S-Part on {prof['device']}. Engine: 1 local worker, serial, naive admission, gen {args.gen_len}")
    hdr = (f"{'model':<9}{'B':>3}{'prompt':>7} {'KV':>7} | {'predicted':>9} {'measured':>9} tok/s | {'error':>6} | "
           f"{'S':>6} {'R':>6} {'X':>6} ms (pred)")
    print(hdr + "\n" + "-" * len(hdr))
    rows = []
    runs = itertools.chain(engine_per_model(MODEL_CONFIGS), engine_per_model(MODEL_CONFIGS_INT8, "int8"))
    for llm, model, B, P, prompts in runs:
        kv = llm.kv_cfg.dtype
        llm.max_prefill_tokens = B * P  # all prompts in one step: every decode step runs at batch B, as predicted
        measured = max(run_engine(llm, prompts, args.gen_len)["decode_tok_s"] for _ in range(args.rounds))
        step, parts = perfmodel.host_step(prof, llm.spart.cfg, B, P + args.gen_len / 2, kv_dtype=kv)
        row = {"model": model, "batch": B, "prompt": P, "kv_dtype": kv, "predicted_tok_s": B / step, "measured_tok_s": measured}
        row["rel_error"] = abs(row["predicted_tok_s"] - measured) / measured
        rows.append(row)
        print(f"{model:<9}{B:>3}{P:>7} {kv:>7} | {row['predicted_tok_s']:9.1f} {measured:9.1f}       | {100 * row['rel_error']:5.1f}% | "
              f"{parts['s'] * 1e3:6.1f} {parts['r'] * 1e3:6.1f} {parts['x'] * 1e3:6.1f}", flush=True)
    print(json.dumps({"max_rel_error": round(max(r["rel_error"] for r in rows), 4),
                      "rows": rows if args.json else len(rows)}))
