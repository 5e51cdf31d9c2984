"""fastdecode.py - the engine: FastDecode's decode loop, the public `LLM` API, and the CLI.

FastDecode (He & Zhai, 2024) serves an LLM with the S-Part (shared weights: spart.py) on the
GPU and the R-Part (the KV-cache and attention: rpart.py, kvcache.py) on CPU worker processes.
Per token per layer only q, k, v go to the workers and o comes back.

The two-micro-batch pipeline. The running batch is split into A and B of equal KV load
(scheduler.py). For every layer, the R-Part of one micro-batch overlaps the S-Part of the other:

    S-Part (GPU):  preA0 preB0 | postA0 preA1 | postB0 preB1 | postA1 preA2 | postB1 ...
    R-Part (CPU):        attnA0 | attnB0      | attnA1       | attnB1       | attnA2 ...

`submit` hands a micro-batch's q, k, v to the workers and returns at once; `collect` waits for
its o. So while the workers attend over A's cache for layer l, this process runs B's post_attn
of layer l-1 and pre_attn of layer l. With S and R balanced, neither side idles; the scheduler
keeps them balanced over time. `--no-pipeline` runs one batch serially (same tokens).

    python fastdecode.py --model opt-1.3b            # synthetic throughput workload + report
    python fastdecode.py --model DIR --prompt "Hello" # completions

Legend: S sequences in a micro-batch, H hidden, Hq/Hkv heads, D head dim, V vocabulary.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import time

import numpy as np

import rpart

rpart.short_openmp_spin()  # before torch loads libgomp: see there
import torch  # noqa: E402

import kvcache  # noqa: E402
import perfmodel  # noqa: E402
import scheduler as sched  # noqa: E402
import spart  # noqa: E402

# --- sampling ---


def sample(logits, temperature, top_p, generators):
    """logits [S, V] float32 -> S token ids. Greedy at temperature 0; else top-p sampling with
    one generator per sequence, so a sequence's draws do not depend on its batch-mates."""
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / temperature, -1)
    out = []
    for i, g in enumerate(generators):
        p, idx = probs[i].sort(descending=True)
        keep = (p.cumsum(0) - p) < top_p            # the smallest prefix reaching top_p
        p = p * keep
        out.append(int(idx[torch.multinomial(p / p.sum(), 1, generator=g)]))
    return out


# --- the in-process R-Part (workers=0): the reference the workers are tested against ---


class LocalBackend:
    """R-Part in this process: one KVCache, attention run synchronously at submit."""

    def __init__(self, kv_cfg, threads=None):
        self.cache = kvcache.KVCache(kv_cfg)
        self.threads = threads
        self.r_busy = 0.0

    def free_bytes(self):
        return [self.cache.free_bytes()]

    def add(self, worker, seq_id, K, V, capacity):
        self.cache.allocate(seq_id, capacity)
        for layer in range(K.shape[0]):
            self.cache.fill(seq_id, layer, K[layer], V[layer])

    def drop(self, seq_id):
        self.cache.free(seq_id)

    def submit(self, layer, seqs, positions, q, k, v):
        t = time.perf_counter()
        o = kvcache.attend_step(self.cache, layer, seqs, positions, q, k, v, num_threads=self.threads)
        self.r_busy += time.perf_counter() - t
        return o

    def collect(self, handle):
        return handle

    def stats(self):
        return [self.cache.stats()]

    def close(self):
        pass


# --- the engine ---


@dataclasses.dataclass
class Output:
    token_ids: list          # generated ids, ending with EOS where generation stopped on it
    text: str = None         # decoded text, or None without a tokenizer


@dataclasses.dataclass
class StepStats:
    """Where the time went, summed over decode steps."""
    s_busy: float = 0.0
    decode_wall: float = 0.0
    prefill_wall: float = 0.0
    step_ms: list = dataclasses.field(default_factory=list)
    kv_per_step: list = dataclasses.field(default_factory=list)
    batch_per_step: list = dataclasses.field(default_factory=list)
    decode_tokens: int = 0
    prefill_tokens: int = 0
    kv_peak: dict = dataclasses.field(default_factory=dict)   # worker -> most KV tokens held


class LLM:
    """FastDecode engine. `LLM(model, workers=1)` spawns local R-Part workers; `workers=0` keeps
    the KV in this process (the reference loop); `worker_hosts=["h:p", ...]` uses running ones.
    pipeline=None picks: two micro-batches when the S-Part has a GPU or the workers are on other
    hosts; one serial batch when both sides would share this machine's CPU cores (overlapping
    them there only makes them compete, see the README)."""

    def __init__(self, model, *, workers=1, worker_hosts=None, device=None, dtype=None,
                 kv_dtype="float16", kv_mem="8GiB", worker_threads=None, pipeline=None,
                 schedule="stabilized", max_batch=64, kv_cap=0, secret=None, trace=None, quiet=False):
        self.spart = spart.SPart.load(model, device=device, dtype=dtype, quiet=quiet)
        c = self.spart.cfg
        self.kv_cfg = kvcache.KVConfig(c.n_layers, c.n_kv_heads, c.head_dim, kv_dtype, kvcache.parse_size(kv_mem))
        if pipeline is None:  # overlap pays where the two sides have their own hardware
            pipeline = self.spart.device.type != "cpu" or bool(worker_hosts)
        self.pipeline, self.quiet, self.tracer = pipeline, quiet, trace
        self.sched_cfg = sched.SchedulerConfig(max_batch=max_batch, policy=schedule, kv_cap=kv_cap)
        self.kv_np_dtype = np.dtype(kv_dtype)
        if worker_hosts or workers:
            self.backend = rpart.RemoteBackend(self.kv_cfg, c.n_heads, n_local=0 if worker_hosts else workers,
                                               hosts=worker_hosts, threads=worker_threads, secret=secret)
        else:
            self.backend = LocalBackend(self.kv_cfg, worker_threads)
        self.stats = StepStats()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop the workers this engine started."""
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self.backend = None

    # --- prefill and placement ---

    def _tokenize(self, p):
        if isinstance(p, str):
            if self.spart.tokenizer is None:
                raise ValueError("this model has no tokenizer on disk: pass prompts as lists of token ids")
            return self.spart.tokenizer.encode(p).ids
        return [int(t) for t in p]

    def _can_place(self, seq):
        return sched.place(self.backend.free_bytes(), seq.capacity * self.kv_cfg.bytes_per_token) >= 0

    def _prefill(self, seq, tokens):
        """Prefill `tokens` on the device; ship K/V to the worker with the most free KV memory.
        Returns the last position's logits [V]."""
        t = time.perf_counter()
        decode_threads = torch.get_num_threads()
        if self.spart.device.type == "cpu":  # the workers idle during prefill: use every core
            torch.set_num_threads(os.cpu_count() or 1)
        try:
            logits, K, V = self.spart.prefill(tokens)        # K, V [n_layers, L, Hkv, D]
        finally:
            torch.set_num_threads(decode_threads)
        seq.worker = sched.place(self.backend.free_bytes(), seq.capacity * self.kv_cfg.bytes_per_token)
        if seq.worker < 0:
            raise MemoryError(f"request {seq.idx}: no worker has room for {seq.capacity} tokens")
        to_np = lambda x: x.to("cpu", torch.float32).numpy().astype(self.kv_np_dtype)
        self.backend.add(seq.worker, seq.idx, to_np(K), to_np(V), seq.capacity)
        self.stats.prefill_wall += time.perf_counter() - t
        self.stats.prefill_tokens += len(tokens)
        return logits

    def _finish_token(self, seq, tok):
        seq.generated.append(tok)
        eos = not seq.ignore_eos and tok == self.spart.cfg.eos_id
        seq.done = eos or len(seq.generated) >= seq.max_new

    # --- one decode step: the two-micro-batch pipeline ---

    def _submit(self, layer, mb):
        """pre_attn on the device, then hand q, k, v to the workers; returns without waiting."""
        q, k, v = self.spart.pre_attn(layer, mb["h"], mb["pos"])     # [S, Hq, D], [S, Hkv, D] x2
        q = q.to("cpu", torch.float32).numpy()                       # synchronizes with the GPU
        k = k.to("cpu", torch.float32).numpy().astype(self.kv_np_dtype)
        v = v.to("cpu", torch.float32).numpy().astype(self.kv_np_dtype)
        mb["handle"] = self.backend.submit(layer, mb["ids"], mb["positions"], q, k, v)
        if self.tracer:
            self.tracer.r_begin(mb, layer)

    @torch.inference_mode()
    def _decode_step(self, micro):
        """One token for every sequence in the micro-batches; returns logits [sum S, V]."""
        dev, L = self.spart.device, self.spart.cfg.n_layers
        s_busy, t0 = 0.0, time.perf_counter()
        mbs = []
        for i, seqs in enumerate(micro):
            positions = [s.length - 1 for s in seqs]
            toks = torch.tensor([s.generated[-1] for s in seqs], device=dev)
            pos = torch.tensor(positions, device=dev)
            mbs.append({"name": "AB"[i] if len(micro) > 1 else "all", "seqs": seqs, "ids": [s.idx for s in seqs],
                        "positions": positions, "pos": pos, "h": self.spart.embed(toks, pos)})
        for mb in mbs:                    # prologue: layer 0's R work of A, then of B
            with self._s_span(mb, 0, "pre"):
                self._submit(0, mb)
        for layer in range(L):
            for mb in mbs:                # while mb's R work runs, the other's S work runs
                o = self.backend.collect(mb["handle"])              # [S, Hq, D] float32
                if self.tracer:
                    self.tracer.r_end(mb, layer)
                with self._s_span(mb, layer, "post"):
                    mb["h"] = self.spart.post_attn(layer, mb["h"], torch.from_numpy(o).to(dev))
                    if layer + 1 < L:
                        self._submit(layer + 1, mb)
        with self._s_span(None, L, "head"):
            logits = self.spart.lm_head(torch.cat([mb["h"] for mb in mbs]))
        self.stats.step_ms.append(1e3 * (time.perf_counter() - t0))
        return logits

    @contextlib.contextmanager
    def _s_span(self, mb, layer, what):
        """Times S-Part work (and traces it when a tracer is set)."""
        t = time.perf_counter()
        if self.tracer:
            self.tracer.s_begin(mb, layer, what)
        try:
            yield
        finally:
            self.stats.s_busy += time.perf_counter() - t
            if self.tracer:
                self.tracer.s_end(mb, layer, what)

    # --- generation ---

    def _sequences(self, prompts, max_new_tokens, ignore_eos):
        news = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        seqs = []
        for i, (p, n) in enumerate(zip(prompts, news)):
            ids = self._tokenize(p)
            if not ids or n < 1:
                raise ValueError(f"prompt {i}: needs at least one token and max_new_tokens >= 1")
            if len(ids) + n > self.spart.cfg.max_pos:
                raise ValueError(f"prompt {i}: {len(ids)} + {n} tokens exceed the model's {self.spart.cfg.max_pos} positions")
            seqs.append(sched.Sequence(i, ids, int(n), ignore_eos))
        return seqs

    def _admit(self, seq, sampler):
        """Prefill a new (or lost) sequence and sample its first token if it has none yet."""
        tokens = seq.prompt if not seq.generated else (seq.prompt + seq.generated)[:-1]
        logits = self._prefill(seq, tokens)
        if not seq.generated:
            self._finish_token(seq, sampler(logits[None], [seq])[0])

    def _recover(self, lost, scheduler, sampler):
        """A worker died: re-prefill its sequences from their token ids on the survivors."""
        alive = self.backend.remove_worker(lost.worker)
        if not alive:
            raise RuntimeError(f"worker {lost.worker} was lost and no worker survives: {lost}") from lost
        if not self.quiet:
            print(f"\n!!! worker {lost.worker} lost ({lost}); re-prefilling its sequences on {alive} survivor(s)")
        for seq in scheduler.running:
            if seq.worker == lost.worker:
                self._admit(seq, sampler)

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0,
                 ignore_eos=False, progress=None):
        """prompts: strings or lists of token ids -> [Output] in prompt order."""
        from tqdm import tqdm
        seqs = self._sequences(prompts, max_new_tokens, ignore_eos)
        gens = {s.idx: torch.Generator().manual_seed(seed * 1_000_003 + s.idx) for s in seqs}
        sampler = lambda logits, ss: sample(logits, temperature, top_p, [gens[s.idx] for s in ss])
        sc = sched.Scheduler(self.sched_cfg, seqs)
        bar = tqdm(total=sum(s.max_new for s in seqs), unit="tok", disable=self.quiet if progress is None else not progress,
                   dynamic_ncols=True, desc="decode")
        while sc.has_work():
            try:
                for seq in sc.admit(self._can_place):
                    self._admit(seq, sampler)
                    bar.update(1)
                self._retire(sc)
                if not sc.running:
                    continue
                micro = sc.split() if self.pipeline else [sorted(sc.running, key=lambda s: s.idx)]
                self.stats.kv_per_step.append(sc.kv_tokens())
                self.stats.batch_per_step.append(len(sc.running))
                held = {}
                for s in sc.running:
                    held[s.worker] = held.get(s.worker, 0) + s.length
                for w, n in held.items():
                    self.stats.kv_peak[w] = max(self.stats.kv_peak.get(w, 0), n)
                t = time.perf_counter()
                logits = self._decode_step(micro)
                order = [s for mb in micro for s in mb]
                for s, tok in zip(order, sampler(logits, order)):
                    self._finish_token(s, tok)
                self.stats.decode_wall += time.perf_counter() - t
                self.stats.decode_tokens += len(order)
                bar.update(len(order))
                bar.set_postfix(running=len(order), tok_s=f"{self.stats.decode_tokens / max(1e-9, self.stats.decode_wall):.0f}")
                self._retire(sc)
            except rpart.WorkerLost as lost:
                self._recover(lost, sc, sampler)
        bar.close()
        tok = self.spart.tokenizer
        return [Output(s.generated, tok.decode(s.generated) if tok else None) for s in seqs]

    def _retire(self, sc):
        for s in sc.retire():
            self.backend.drop(s.idx)


# --- trace: Chrome/Perfetto JSON, one track for the S-Part and one per worker ---


class Tracer:
    def __init__(self):
        self.events, self.t0, self.open = [], time.perf_counter(), {}
        self.step = 0

    def _us(self):
        return (time.perf_counter() - self.t0) * 1e6

    def s_begin(self, mb, layer, what):
        self.open["S"] = self._us()

    def s_end(self, mb, layer, what):
        name = f"{what} L{layer} {mb['name'] if mb else ''}".strip()
        self.events.append({"name": name, "cat": "S-Part", "ph": "X", "pid": 1, "tid": 0, "ts": self.open["S"],
                            "dur": self._us() - self.open["S"], "args": {"step": self.step, "layer": layer}})
        if what == "head":
            self.step += 1

    def r_begin(self, mb, layer):
        self.open[("R", mb["name"])] = self._us()

    def r_end(self, mb, layer):
        start = self.open.pop(("R", mb["name"]))
        h = mb["handle"]
        workers = sorted({w for w, _ in h[0]}) if isinstance(h, tuple) else [0]
        for w in workers:
            self.events.append({"name": f"attn L{layer} {mb['name']}", "cat": "R-Part", "ph": "X", "pid": 1,
                                "tid": 1 + w, "ts": start, "dur": self._us() - start,
                                "args": {"step": self.step, "layer": layer, "micro_batch": mb["name"]}})

    def save(self, path, n_workers):
        names = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "S-Part"}}]
        names += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": 1 + w, "args": {"name": f"R-Part worker {w}"}}
                  for w in range(max(1, n_workers))]
        with open(path, "w") as f:
            json.dump({"traceEvents": names + self.events, "displayTimeUnit": "ms"}, f)


# --- the CLI: a synthetic throughput workload, or completions ---


def gen_lengths(spec, n, rng):
    """'64' -> [64]*n; '32-128' -> uniform integers in [32, 128]."""
    if "-" in str(spec):
        lo, hi = (int(x) for x in str(spec).split("-"))
        return rng.integers(lo, hi + 1, n).tolist()
    return [int(spec)] * n


def predicted_decode_tok_s(llm, prof):
    """What the performance model predicts for the decode steps that ran (their batch sizes and
    KV lengths), on the machine the profile describes; None without a profile."""
    st = llm.stats
    if prof is None or not st.batch_per_step:
        return None
    secs = sum(perfmodel.host_step(prof, llm.spart.cfg, b, kv / b, kv_dtype=llm.kv_cfg.dtype, pipelined=llm.pipeline)[0]
               for b, kv in zip(st.batch_per_step, st.kv_per_step))
    return sum(st.batch_per_step) / secs


def report(llm, outs, wall, args, prof=None):
    st, n_workers = llm.stats, len(llm.backend.free_bytes())
    gen = sum(len(o.token_ids) for o in outs)
    steps = np.array(st.step_ms or [0.0])
    r_busy = llm.backend.r_busy / max(1, n_workers)   # average per worker: they run in parallel
    rep = {
        "model": args.model, "requests": len(outs), "generated_tokens": gen, "workers": n_workers,
        "pipeline": llm.pipeline, "schedule": llm.sched_cfg.policy,
        "decode_tok_s": st.decode_tokens / max(1e-9, st.decode_wall), "total_tok_s": gen / max(1e-9, wall),
        "wall_s": wall, "prefill_s": st.prefill_wall, "decode_s": st.decode_wall,
        "step_ms_p50": float(np.percentile(steps, 50)), "step_ms_p99": float(np.percentile(steps, 99)),
        "s_busy_s": st.s_busy, "r_busy_s": r_busy,
        "overlap_efficiency": max(st.s_busy, r_busy) / max(1e-9, st.decode_wall),
        "kv_tokens_peak_per_worker": {str(k): v for k, v in sorted(st.kv_peak.items())},
        "predicted_decode_tok_s": predicted_decode_tok_s(llm, prof),
        "tokens_sha256": hashlib.sha256(np.array([t for o in outs for t in o.token_ids], np.int64).tobytes()).hexdigest(),
    }
    print(f"\n{args.model}: {len(outs)} requests, {gen} tokens in {wall:.1f} s "
          f"({n_workers} worker(s), {'pipelined' if llm.pipeline else 'serial'}, {llm.sched_cfg.policy})")
    print(f"  throughput   decode {rep['decode_tok_s']:.1f} tok/s, total {rep['total_tok_s']:.1f} tok/s")
    print(f"  time         prefill {st.prefill_wall:.1f} s, decode {st.decode_wall:.1f} s; "
          f"step p50 {rep['step_ms_p50']:.0f} ms, p99 {rep['step_ms_p99']:.0f} ms")
    print(f"  busy         S-Part {st.s_busy:.1f} s, R-Part {r_busy:.1f} s (per worker); "
          f"overlap efficiency {rep['overlap_efficiency']:.2f}{'' if llm.pipeline else ' (serial: nothing to overlap)'}")
    print(f"  KV held      peak tokens per worker {rep['kv_tokens_peak_per_worker']}")
    if rep["predicted_decode_tok_s"] is None:
        print(f"  model        no calibration profile ({perfmodel.PROFILE}): run `python perfmodel.py calibrate`")
    else:
        print(f"  model        predicted decode {rep['predicted_decode_tok_s']:.1f} tok/s for these steps "
              f"(measured/predicted {rep['decode_tok_s'] / rep['predicted_decode_tok_s']:.2f})")
    return rep


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FastDecode: S-Part on the GPU (or CPU), R-Part on CPU workers.")
    a = p.add_argument
    a("--model", default="opt-1.3b", help="short name (opt-1.3b), hub repo id, or checkpoint directory")
    a("--workers", type=int, default=1, help="local R-Part worker processes to spawn (0: in-process)")
    a("--worker-hosts", default=None, help="comma-separated host:port of running workers (instead of spawning)")
    a("--secret-file", default=None, help="shared secret for workers beyond loopback")
    a("--num-requests", type=int, default=32, help="synthetic workload: number of requests")
    a("--prompt-len", type=int, default=64, help="synthetic workload: prompt tokens per request")
    a("--gen-len", default="32", help="synthetic workload: tokens to generate, a number or a range LO-HI")
    a("--max-batch", type=int, default=None, help="most sequences running at once (default: from the perf model, else 32)")
    a("--kv-cap", type=int, default=None, help="cap on the running batch's KV tokens (default: from the perf model, else none)")
    a("--kv-dtype", default="float16", choices=["float16", "float32"], help="KV-cache element type")
    a("--kv-mem", default="8GiB", help="KV memory budget per worker")
    a("--device", default=None, help="S-Part device (default: cuda if available, else cpu)")
    a("--dtype", default=None, help="S-Part dtype (default: fp16/bf16 on CUDA, float32 on CPU)")
    a("--worker-threads", type=int, default=None, help="attention threads per local worker")
    a("--pipeline", dest="pipeline", action="store_true", default=None,
      help="two micro-batches (default where the S-Part has a GPU or workers are remote)")
    a("--no-pipeline", dest="pipeline", action="store_false", help="run one batch serially")
    a("--schedule", default="stabilized", choices=["stabilized", "naive"], help="admission policy")
    a("--trace", default=None, help="write a Chrome/Perfetto trace JSON here")
    a("--prompt", action="append", default=None, help="a text prompt (repeatable): print completions")
    a("--prompt-ids", default=None, help="a prompt as comma-separated token ids: print the completion")
    a("--max-new-tokens", type=int, default=64, help="tokens to generate for --prompt/--prompt-ids")
    a("--temperature", type=float, default=0.0, help="0: greedy")
    a("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    a("--seed", type=int, default=0, help="seed for the workload and for sampling")
    a("--json", action="store_true", help="print the report as one JSON object on the last line")
    return p.parse_args(argv)


def default_threads(args, device):
    """Worker threads. On a CPU-only machine the S-Part and local workers share the cores: run
    serially, each side gets them all; pipelined, they are split between the two sides."""
    cores = os.cpu_count() or 1
    if args.worker_hosts or args.workers == 0:
        return args.worker_threads
    if device == "cpu" and args.pipeline:
        wt = args.worker_threads or max(1, cores // (args.workers + 1))
        torch.set_num_threads(max(1, cores - args.workers * wt))
        return wt
    return args.worker_threads or max(1, cores // args.workers)


def apply_plan(llm, prof, args, mean_gen):
    """Batch size and KV cap from the performance model, where the command line left them open."""
    p = perfmodel.plan(prof, llm.spart.cfg, args.prompt_len, mean_gen, kv_mem_bytes=llm.kv_cfg.mem_bytes,
                       workers=len(llm.backend.free_bytes()), pipelined=llm.pipeline, kv_dtype=llm.kv_cfg.dtype)
    llm.sched_cfg = dataclasses.replace(llm.sched_cfg, max_batch=args.max_batch or p["max_batch"],
                                        kv_cap=p["kv_cap"] if args.kv_cap is None else args.kv_cap)
    print(f"perf model plan: max batch {llm.sched_cfg.max_batch}, KV cap {llm.sched_cfg.kv_cap} tokens "
          f"(predicted {p['tok_s']:.1f} tok/s at batch {p['max_batch']})")


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    wt = default_threads(args, device)
    secret = open(args.secret_file, "rb").read().strip() if args.secret_file else None
    tracer = Tracer() if args.trace else None
    prof = perfmodel.load_profile()
    with LLM(args.model, workers=args.workers, worker_hosts=args.worker_hosts.split(",") if args.worker_hosts else None,
             device=args.device, dtype=args.dtype, kv_dtype=args.kv_dtype, kv_mem=args.kv_mem, worker_threads=wt,
             pipeline=args.pipeline, schedule=args.schedule, max_batch=args.max_batch or 32, kv_cap=args.kv_cap or 0,
             secret=secret, trace=tracer) as llm:
        if args.prompt or args.prompt_ids:
            prompts = (args.prompt or []) + ([[int(t) for t in args.prompt_ids.split(",")]] if args.prompt_ids else [])
            t = time.perf_counter()
            outs = llm.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, progress=False)
            wall = time.perf_counter() - t
            for p, o in zip(prompts, outs):
                print(f"--- {p!r}\n{o.text if o.text is not None else o.token_ids}")
        else:
            rng = np.random.default_rng(args.seed)
            V = llm.spart.cfg.vocab_size
            prompts = [rng.integers(4, V, args.prompt_len).tolist() for _ in range(args.num_requests)]
            gens = gen_lengths(args.gen_len, args.num_requests, rng)
            print(f"workload: {args.num_requests} requests, prompt {args.prompt_len}, gen {args.gen_len} tokens (ignore EOS)")
            if prof is not None and (args.max_batch is None or args.kv_cap is None):
                apply_plan(llm, prof, args, float(np.mean(gens)))
            t = time.perf_counter()
            outs = llm.generate(prompts, max_new_tokens=gens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed, ignore_eos=True,
                                progress=True)
            wall = time.perf_counter() - t
        rep = report(llm, outs, wall, args, prof)
        if tracer:
            tracer.save(args.trace, len(llm.backend.free_bytes()))
            print(f"  trace        {args.trace} (open in https://ui.perfetto.dev)")
    if args.json:
        print(json.dumps(rep))


if __name__ == "__main__":
    main()
