"""serving.py - the engine thread: where FastDecode's step loop meets asyncio, and what it measures.

server.py's HTTP handlers run on an asyncio event loop; the engine (engine.py) is not
thread-safe and its step() blocks for a whole decode step. This module joins the two:

    handlers (event loop)                          EngineLoop (one thread, owns the engine)
      Flight(...) -> engine.submit / abort  --inbox: queue.Queue-->   add_request / abort
      async for out in flight               <--call_soon_threadsafe--  step() outputs, per request

`EngineLoop` applies what the handlers asked between steps and delivers each output to the
asyncio queue of the HTTP request it belongs to (`Flight`). The handlers never wait on the engine
and never run model code. `Metrics` (Prometheus, in a registry of its own) is fed by the engine
thread, which alone sees every step: queue lengths, KV use per worker, the running batch's KV
tokens per step (the R-Part load), time to first token, inter-token and end-to-end latency.
"""
import asyncio
import dataclasses
import queue
import threading
import time
import uuid

from protocol import APIError

# --- metrics ---


class Metrics:
    """Prometheus metrics in a registry of their own (two apps in one process do not collide).
    Named like vLLM's, with `fastdecode:` for `vllm:`; plus the R-Part load per step."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
        r = self.registry = CollectorRegistry()
        lat = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
        self.running = Gauge("fastdecode:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("fastdecode:num_requests_waiting", "Requests queued for admission", registry=r)
        self.kv_usage = Gauge("fastdecode:kv_cache_usage_perc", "Fraction of a worker's KV memory reserved (0-1)",
                              ["worker"], registry=r)
        self.kv_tokens = Gauge("fastdecode:kv_tokens", "Total KV tokens of the running batch at the last step "
                               "(the R-Part load)", registry=r)
        self.step_kv = Histogram("fastdecode:step_kv_tokens", "Total KV tokens of the running batch, per decode step",
                                 buckets=[round(2 ** (i / 2)) for i in range(8, 44)], registry=r)
        self.ttft = Histogram("fastdecode:time_to_first_token_seconds", "Arrival to first token", buckets=lat, registry=r)
        self.itl = Histogram("fastdecode:inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=lat, registry=r)
        self.e2e = Histogram("fastdecode:e2e_request_latency_seconds", "Arrival to last token", buckets=lat, registry=r)
        self.prompt_tokens = Counter("fastdecode:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("fastdecode:generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("fastdecode:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.engine = Info("fastdecode:engine", "How the engine runs (a benchmark reads which schedule it measured)",
                           registry=r)

    def describe(self, llm):
        self.engine.info({"schedule": llm.sched_cfg.policy, "max_batch": str(llm.sched_cfg.max_batch),
                          "kv_cap": str(llm.sched_cfg.kv_cap), "pipeline": str(llm.pipeline),
                          "workers": str(len(llm.backend.kv_usage())), "device": str(llm.spart.device)})

    def engine_state(self, m, stepped):
        """m: the engine's metrics() after a step (stepped) or while idle."""
        self.running.set(m["running"])
        self.waiting.set(m["waiting"])
        for w, frac in enumerate(m["kv_usage"]):
            self.kv_usage.labels(worker=str(w)).set(frac)
        self.kv_tokens.set(m["kv_tokens"] if m["running"] else 0)
        if stepped and m["running"]:
            self.step_kv.observe(m["kv_tokens"])

    def exposition(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- the engine thread ---


@dataclasses.dataclass
class Tracked:
    """The engine thread's record of one live request."""
    deliver: object              # callable(RequestOutput | Exception), safe to call from any thread
    arrival: float               # time.monotonic() when the handler handed it over
    last: float = 0.0            # when its previous output came (0: none yet)


class EngineLoop:
    """Owns the engine. Handlers call `submit` and `abort` (thread-safe: they only enqueue);
    the thread applies them between steps and delivers each step's outputs."""

    IDLE_WAIT_S = 0.5            # how long an idle engine blocks on its inbox before rechecking

    def __init__(self, llm, metrics):
        self.llm, self.metrics = llm, metrics
        self.inbox = queue.Queue()
        self.stopping = threading.Event()
        self.error = None        # the exception that stopped the loop, if one did: /health says so
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.inbox.put(None)     # wakes an idle wait
        self.thread.join()

    def submit(self, request_id, token_ids, params, deliver):
        self.inbox.put(("add", request_id, token_ids, params, deliver, time.monotonic()))

    def abort(self, request_id):
        self.inbox.put(("abort", request_id))

    def _run(self):
        live = {}                # request id -> Tracked
        try:
            while not self.stopping.is_set():
                self._apply_inbox(live, block=not self.llm.has_unfinished())
                stepped = self.llm.has_unfinished()
                if stepped:
                    self._deliver(live, self.llm.step(), time.monotonic())
                self.metrics.engine_state(self.llm.metrics(), stepped)
        except Exception as e:   # the engine is broken: fail every live request, report unhealthy
            self.error = e
            for t in live.values():
                t.deliver(e)

    def _apply_inbox(self, live, block):
        try:
            cmd = self.inbox.get(timeout=self.IDLE_WAIT_S) if block else self.inbox.get_nowait()
            while True:
                if cmd is not None:
                    self._apply(live, cmd)
                cmd = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, live, cmd):
        if cmd[0] == "abort":
            if cmd[1] in live:   # else it finished already: nothing to free
                self.llm.abort(cmd[1])
            return
        _, rid, token_ids, params, deliver, arrival = cmd
        try:
            self.llm.add_request(token_ids, params, request_id=rid)
        except ValueError as e:  # checked by the handler already; the engine has the last word
            deliver(APIError(str(e), param="prompt"))
            return
        live[rid] = Tracked(deliver, arrival)

    def _deliver(self, live, outputs, now):
        m = self.metrics
        for out in outputs:
            t = live.get(out.request_id)
            if t is None:
                continue
            n = len(out.new_token_ids)
            if n:
                if t.last == 0.0:
                    m.ttft.observe(now - t.arrival)
                    m.prompt_tokens.inc(out.prompt_tokens)
                else:    # a step that produced n tokens spreads its gap over them
                    for _ in range(n):
                        m.itl.observe((now - t.last) / n)
                t.last = now
                m.generation_tokens.inc(n)
            if out.finished:
                del live[out.request_id]
                m.success.labels(finished_reason=out.finish_reason).inc()
                if out.finish_reason != "abort":
                    m.e2e.observe(now - t.arrival)
            t.deliver(out)


# --- one HTTP request's view of its engine requests ---


class Flight:
    """The engine requests of one HTTP request (one per prompt), and the asyncio queue their
    outputs arrive on. Iterate it for (choice index, RequestOutput); `abort_unfinished` on any
    exit, so a client that goes away frees its KV."""

    def __init__(self, engine, prompts_ids, params):
        self.engine, self.loop, self.queue = engine, asyncio.get_running_loop(), asyncio.Queue()
        self.index = {f"req-{uuid.uuid4().hex}": i for i in range(len(prompts_ids))}
        self.unfinished = set(self.index)
        for rid, ids in zip(self.index, prompts_ids):
            engine.submit(rid, ids, params, self._deliver)

    def _deliver(self, item):
        """Called on the engine thread: hop onto the event loop's thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:     # the loop is closed: the server is shutting down
            pass

    async def __aiter__(self):
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, APIError):
                raise item
            if isinstance(item, Exception):
                raise APIError(f"engine failed: {type(item).__name__}: {item}", 500, "server_error")
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield self.index[item.request_id], item

    def abort_unfinished(self):
        for rid in self.unfinished:
            self.engine.abort(rid)
        self.unfinished.clear()
