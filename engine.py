"""engine.py - the FastDecode engine: requests in, tokens out, one step at a time.

FastDecode (He & Zhai, 2024) serves an LLM with the S-Part (shared weights: spart.py) on the
GPU and the R-Part (the KV-cache and attention: backend.py, rpart.py) on CPU worker processes.
This module drives them. Its step API is what a server runs in a loop, and `generate` is a
short loop over it:

    rid = llm.add_request(prompt, SamplingParams(max_tokens=32))   # queued; returns at once
    while llm.has_unfinished():
        for out in llm.step():                                     # one engine iteration
            print(out.request_id, out.text_delta, out.finish_reason)

One step: admit queued requests (scheduler.py decides how many: load-stabilizing admission),
prefill them and place their K/V on a worker, then run one decode step for every running
sequence through the two-micro-batch pipeline (pipeline.py), sample (sampling.py), and retire
the finished ones, freeing their KV. Requests are checked when added, so a request that could
never run (too long, out-of-vocabulary ids, more KV than any worker holds) is refused at once,
and a full KV-cache only makes a request wait: it never fails mid-step.

The engine keeps every request's token ids, so a lost worker loses no token: its sequences are
prefilled again on the survivors and the step is redone.

Legend: S sequences, H hidden, Hq/Hkv heads, D head dim, V vocabulary.
"""
import dataclasses
import os
import secrets
import time

import backend

backend.short_openmp_spin()  # before torch loads libgomp: see there
import torch  # noqa: E402

import kvcache  # noqa: E402
import scheduler as sched  # noqa: E402
import spart as spart_mod  # noqa: E402
from pipeline import DecodeStep, StepStats, q_dtype, to_host  # noqa: E402
from sampling import SamplingParams, TextStream, sample_each  # noqa: E402

# --- requests ---


# Prompt tokens prefilled per step at most (a longer prompt takes several steps while the running
# sequences go on decoding): `--max-prefill-tokens`, or the performance model's choice.
DEFAULT_PREFILL_TOKENS = 512


class NeverFits(ValueError, MemoryError):
    """A request needs more KV than any worker has even when empty: it could never run."""


@dataclasses.dataclass
class Prefill:
    """A sequence's prefill in progress: its tokens go through the S-Part a chunk per step, and
    its K/V stay on the device until the last chunk, then go to a worker in one piece."""
    tokens: list                 # what to prefill: the prompt (+ all but the last generated token, after a worker loss)
    done: int = 0                # tokens prefilled so far
    k: torch.Tensor = None       # [n_layers, done, Hkv, D] on the device, the S-Part's dtype
    v: torch.Tensor = None
    logits: torch.Tensor = None  # [V] float32 of the last token prefilled: samples the first new token

    @property
    def finished(self):
        return self.done == len(self.tokens)


@dataclasses.dataclass(eq=False)
class Request(sched.Sequence):
    """A sequence (what the scheduler sees) plus what its user asked for and has been told."""
    request_id: str = ""
    params: SamplingParams = None
    generator: torch.Generator = None
    text: TextStream = None
    finish_reason: str = None    # "stop" (EOS, a stop token or string), "length", "abort"
    prefill: Prefill = None      # set while its prompt is being prefilled, None once it decodes


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list          # tokens generated this step (one, or none when aborted)
    text_delta: str              # text that may be shown now ("" without a tokenizer)
    text: str                    # all text shown so far
    finished: bool
    finish_reason: str           # None while running; "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class Output:
    token_ids: list              # generated ids, ending with EOS where generation stopped on it
    text: str = None             # decoded text, or None without a tokenizer


# --- the engine ---


class LLM:
    """FastDecode engine. `LLM(model, workers=1)` starts local R-Part workers; `workers=0` keeps
    the KV in this process (the reference loop); `worker_hosts=["h:p", ...]` uses running ones.
    pipeline=None picks: two micro-batches when the S-Part has a GPU or the workers are on other
    hosts; one serial batch when both sides would share this machine's CPU cores (overlapping
    them there only makes them compete, see the README)."""

    def __init__(self, model, *, workers=1, worker_hosts=None, device=None, dtype=None,
                 kv_dtype=None, kv_mem=kvcache.DEFAULT_KV_MEM, worker_threads=None, pipeline=None,
                 schedule="stabilized", max_batch=None, kv_cap=0, max_prefill_tokens=DEFAULT_PREFILL_TOKENS,
                 secret=None, trace=None, quiet=False):
        self.backend = None
        kernel = None if worker_hosts else backend.build_kernel_in_background()  # beside the weights' loading
        self.spart = spart_mod.SPart.load(model, device=device, dtype=dtype, quiet=quiet)
        if kernel:
            kernel.join()
        c = self.spart.cfg
        # KV by default in a bf16 S-Part's own dtype: no conversion, and half fp16's kernel FMAs
        kv_dtype = kv_dtype or ("bfloat16" if self.spart.dtype == torch.bfloat16 else "float16")
        self.kv_cfg = kvcache.KVConfig(c.n_layers, c.n_kv_heads, c.head_dim, kv_dtype, kvcache.parse_size(kv_mem))
        if pipeline is None:  # overlap pays where the two sides have their own hardware
            pipeline = self.spart.device.type != "cpu" or bool(worker_hosts)
        self.pipeline, self.quiet, self.max_prefill_tokens = pipeline, quiet, max_prefill_tokens
        batch = {"max_batch": max_batch} if max_batch else {}
        self.scheduler = sched.Scheduler(sched.SchedulerConfig(policy=schedule, kv_cap=kv_cap, **batch))
        if worker_hosts or workers:
            self.backend = backend.RemoteBackend(self.kv_cfg, c.n_heads, q_dtype=q_dtype(self.spart), hosts=worker_hosts,
                                                 n_local=0 if worker_hosts else workers, threads=worker_threads, secret=secret)
        else:
            self.backend = backend.LocalBackend(self.kv_cfg, worker_threads)
        self.decode_step = DecodeStep(self.spart, self.backend, self.kv_cfg.row_dtype, StepStats(), trace)
        self.requests = {}       # request id -> Request, from add_request until it finishes
        self.prefilling = []     # admitted Requests whose prefill is not finished, oldest first
        self.outbox = []         # RequestOutputs made since the last step() returned
        self.next_seq = 0

    @property
    def stats(self):
        """This run's StepStats: held by the decode step, which adds to it; the engine adds prefill."""
        return self.decode_step.stats

    @stats.setter
    def stats(self, stats):
        self.decode_step.stats = stats

    @property
    def sched_cfg(self):
        return self.scheduler.cfg

    @sched_cfg.setter
    def sched_cfg(self, cfg):  # the perf model's plan and the benches set batch and KV cap
        self.scheduler.cfg = cfg

    @property
    def tokenizer(self):
        return self.spart.tokenizer

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop the workers this engine started."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    # --- taking requests ---

    def check_request(self, prompt, params):
        """-> the prompt's token ids, or a ValueError saying why it can never run. Runs no model
        code and changes nothing: a server may call it from any thread."""
        c = self.spart.cfg
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty: it needs at least one token")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer on disk: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < c.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {ids[bad]} at position {bad} is outside the vocabulary (size {c.vocab_size})")
        if len(ids) + params.max_tokens > c.max_pos:
            raise ValueError(f"{len(ids)} prompt tokens + {params.max_tokens} max_tokens exceed the model's "
                             f"{c.max_pos} positions")
        need, largest = (len(ids) + params.max_tokens) * self.kv_cfg.bytes_per_token, max(self.backend.budgets())
        if need > largest:
            raise NeverFits(f"{len(ids)} + {params.max_tokens} tokens need {need} bytes of KV: they fit on no worker "
                            f"even when empty (largest budget {largest} bytes)")
        return ids

    def add_request(self, prompt, params=None, request_id=None):
        """Queue a request (a string, or a list of token ids) -> its id. Raises ValueError (see
        check_request) for one that could never run."""
        params = params or SamplingParams()
        ids = self.check_request(prompt, params)
        request_id = str(request_id if request_id is not None else f"req-{self.next_seq}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(self.next_seq, ids, params.max_tokens, request_id=request_id, params=params,
                      generator=params.generator(secrets.randbits(63)), text=TextStream(self.tokenizer, params.stop))
        self.next_seq += 1
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id):
        """Stop a request now and free its KV; its last output (reason "abort") comes with the
        next step(). An unknown or finished id is ignored."""
        req = self.requests.pop(request_id, None)
        if req is None or not self.scheduler.remove(req):
            return
        req.done, req.finish_reason = True, "abort"
        if req.prefill is not None:
            self.prefilling.remove(req)
        self.outbox.append(self._output(req, []))
        if self.backend.holds(req.idx):
            try:
                self.backend.drop(req.idx)
            except backend.WorkerLost as lost:
                self._recover(lost)

    def has_unfinished(self):
        return self.scheduler.has_work() or bool(self.outbox)

    def metrics(self):
        """For a server's /metrics: queue lengths, KV use per worker, the last step's KV tokens."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_usage": self.backend.kv_usage(), "kv_tokens": self.scheduler.kv_tokens()}

    # --- one step ---

    def step(self):
        """Admit, prefill a chunk, decode one token for every running sequence, retire -> the
        outputs of this step (one per request that produced a token, finished, or was aborted)."""
        try:
            for r in self.scheduler.admit(self._placer()):
                self._start_prefill(r)
            self._prefill_chunk()
            self._retire()
            if any(r.prefill is None for r in self.scheduler.running):
                self._decode()
                self._retire()
        except backend.WorkerLost as lost:
            self._recover(lost)
        out, self.outbox = self.outbox, []
        return out

    def _placer(self):
        """can_place(seq) for one admission round. The sequences still in prefill hold no KV on
        a worker yet, so their room is counted first; each yes reserves room for the next asks."""
        planned = [r.capacity for r in self.prefilling]

        def can_place(seq):
            if not self.backend.can_place(planned + [seq.capacity]):
                return False
            planned.append(seq.capacity)
            return True
        return can_place

    # --- prefill: chunks of many prompts in one packed forward ---

    def _start_prefill(self, r):
        r.prefill = Prefill(r.prompt + r.generated[:-1])  # after a worker loss: all but the last token
        self.prefilling.append(r)

    def _prefill_chunk(self):
        """Up to max_prefill_tokens prompt tokens, oldest sequences first, through the S-Part
        in one packed forward; a sequence whose prompt is done goes to a worker."""
        budget, picked = self.max_prefill_tokens, []
        for r in self.prefilling:
            n = min(budget, len(r.prefill.tokens) - r.prefill.done)
            if n > 0:
                picked.append((r, n))
                budget -= n
        t = time.perf_counter()
        if picked:
            items = [spart_mod.PrefillItem(p.tokens[p.done:p.done + n], p.done, p.k, p.v)
                     for p, n in ((r.prefill, n) for r, n in picked)]
            for (r, n), res in zip(picked, self._run_prefill(items)):
                p = r.prefill
                p.k = res.k if p.k is None else torch.cat([p.k, res.k], 1)
                p.v = res.v if p.v is None else torch.cat([p.v, res.v], 1)
                p.done, p.logits = p.done + n, res.logits
                self.stats.prefill_tokens += n
        for r in [r for r in self.prefilling if r.prefill.finished]:  # (one whose placing failed too)
            self._place(r)
        self.stats.prefill_wall += time.perf_counter() - t

    def _run_prefill(self, items):
        decode_threads = torch.get_num_threads()
        if self.spart.device.type == "cpu":  # the workers idle during prefill: use every core
            torch.set_num_threads(os.cpu_count() or 1)
        try:
            return self.spart.prefill_batch(items)
        finally:
            torch.set_num_threads(decode_threads)

    def _place(self, r):
        """Prefill done: K/V to the worker with the most free KV, and the first token sampled
        (unless the sequence had its tokens already: a re-prefill after a worker loss)."""
        p, dt = r.prefill, self.kv_cfg.row_dtype   # float16 for an int8 cache: quantized where stored
        self.backend.add(r.idx, to_host(p.k, dt), to_host(p.v, dt), r.capacity)
        r.prefill = None
        self.prefilling.remove(r)
        if not r.generated:
            self._append_token(r, sample_each(p.logits[None], [r.params], [r.generator])[0])

    def _decode(self):
        sc, st = self.scheduler, self.stats
        seqs = [r for r in sc.running if r.prefill is None]
        micro = sc.split(seqs) if self.pipeline else [sorted(seqs, key=lambda s: s.idx)]
        st.kv_per_step.append(sum(s.length for s in seqs))
        st.batch_per_step.append(len(seqs))
        held = {}
        for s in seqs:
            w = self.backend.worker_of(s.idx)
            held[w] = held.get(w, 0) + s.length
        for w, n in held.items():
            st.kv_peak[w] = max(st.kv_peak.get(w, 0), n)
        t = time.perf_counter()
        logits = self.decode_step(micro)
        order = [s for mb in micro for s in mb]
        for r, tok in zip(order, sample_each(logits, [r.params for r in order], [r.generator for r in order])):
            self._append_token(r, tok)
        st.decode_wall += time.perf_counter() - t
        st.decode_tokens += len(order)

    def _append_token(self, r, tok):
        """Record a new token, decide whether the request is done, and queue its output."""
        r.generated.append(tok)
        p = r.params
        if (not p.ignore_eos and tok == self.spart.cfg.eos_id) or tok in p.stop_token_ids:
            r.finish_reason = "stop"
        elif len(r.generated) >= r.max_new:
            r.finish_reason = "length"
        delta, stopped = r.text.update(r.generated, final=r.finish_reason is not None)
        if stopped:
            r.finish_reason = "stop"
        r.done = r.finish_reason is not None
        self.outbox.append(self._output(r, [tok], delta))

    def _output(self, r, new_ids, delta=""):
        return RequestOutput(r.request_id, new_ids, delta, r.text.text, r.done, r.finish_reason,
                             len(r.prompt), len(r.generated))

    def _retire(self):
        for r in self.scheduler.retire():
            self.requests.pop(r.request_id, None)
            self.backend.drop(r.idx)

    def _recover(self, lost):
        """A worker died: every running sequence whose KV is gone is prefilled again from its
        token ids (by the next steps, on the survivors); the interrupted step is redone."""
        self.backend.remove_worker(lost.worker)
        if not self.backend.alive:
            raise RuntimeError(f"worker {lost.worker} was lost and no worker survives: {lost}") from lost
        if not self.quiet:
            print(f"\n!!! worker {lost.worker} lost ({lost}); re-prefilling its sequences on "
                  f"{len(self.backend.alive)} survivor(s)", flush=True)
        for r in self.scheduler.running:
            if r.prefill is None and not self.backend.holds(r.idx):
                self._start_prefill(r)

    # --- offline generation: a loop over the step API ---

    def generate(self, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0,
                 ignore_eos=False, progress=None):
        """prompts: strings or lists of token ids -> [Output] in prompt order. Every prompt is
        checked before any runs; max_new_tokens is one number or one per prompt."""
        from tqdm import tqdm
        news = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        params = []
        for i, (p, n) in enumerate(zip(prompts, news)):
            try:
                params.append(SamplingParams(int(n), temperature, top_p, seed * 1_000_003 + i, ignore_eos=ignore_eos))
                self.check_request(p, params[-1])
            except ValueError as e:
                raise type(e)(f"prompt {i}: {e}") from e
        self.stats = StepStats()
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        tokens, texts = {rid: [] for rid in ids}, {}
        bar = tqdm(total=sum(news), unit="tok", disable=self.quiet if progress is None else not progress,
                   dynamic_ncols=True, desc="decode")
        while any(rid not in texts for rid in ids):
            for out in self.step():
                tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    texts[out.request_id] = out.text if self.tokenizer else None
                bar.update(len(out.new_token_ids))
            bar.set_postfix(running=len(self.scheduler.running),
                            tok_s=f"{self.stats.decode_tokens / max(1e-9, self.stats.decode_wall):.0f}")
        bar.close()
        return [Output(tokens[rid], texts[rid]) for rid in ids]
