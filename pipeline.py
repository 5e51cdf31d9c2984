"""pipeline.py - one decode step through the two-micro-batch pipeline.

FastDecode's running batch is split into micro-batches A and B of equal KV load (scheduler.py).
For every layer, the R-Part of one micro-batch overlaps the S-Part of the other:

    S-Part (GPU):  preA0 preB0 | postA0 preA1 | postB0 preB1 | postA1 preA2 | postB1 ...
    R-Part (CPU):        attnA0 | attnB0      | attnA1       | attnB1       | attnA2 ...

`submit` hands a micro-batch's q, k, v to the R-Part (backend.py) and returns at once;
`collect` waits for its o. So while the workers attend over A's cache for layer l, this process
runs B's post_attn of layer l-1 and pre_attn of layer l. With S and R balanced neither side
idles; the scheduler keeps them balanced over time. With one micro-batch ("all") the same code
runs the layers serially, which is what a CPU-only machine wants (both sides share its cores).

Legend: S sequences in a micro-batch, H hidden, Hq/Hkv heads, D head dim, V vocabulary.
"""
import contextlib
import dataclasses
import time

import numpy as np
import torch


@dataclasses.dataclass
class MicroBatch:
    """The sequences of one micro-batch and what travels with them through the layers."""
    name: str                    # "A", "B", or "all" when the batch is not split
    seq_ids: list                # [S] the sequences' ids: their KV's keys on the workers
    positions: np.ndarray        # [S] int64, this step's token position (= the cached length)
    rot: object                  # spart.rotary(positions): Llama's cos, sin rows, looked up once a step
    h: torch.Tensor              # [S, H] hidden state between layers, on the device
    pending: object = None       # backend.Pending while this micro-batch's attention is in flight


@dataclasses.dataclass
class StepStats:
    """Where the time went, summed over a run's steps (each generate() starts a fresh one)."""
    s_busy: float = 0.0          # decode: S-Part work on the device, as this process saw it
    r_wait: float = 0.0          # decode: waiting in collect() for the R-Part's answer
    decode_wall: float = 0.0
    prefill_wall: float = 0.0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    step_ms: list = dataclasses.field(default_factory=list)         # per decode step
    kv_per_step: list = dataclasses.field(default_factory=list)     # total KV tokens per step
    batch_per_step: list = dataclasses.field(default_factory=list)  # sequences per step
    kv_peak: dict = dataclasses.field(default_factory=dict)         # worker -> most KV tokens held


def make_micro_batch(spart, name, seqs):
    """seqs: scheduler Sequences whose last generated token is this step's input."""
    dev = spart.device
    positions = np.array([s.length - 1 for s in seqs], dtype=np.int64)
    positions_dev = torch.from_numpy(positions).to(dev)
    tokens = torch.tensor([s.generated[-1] for s in seqs], device=dev)
    return MicroBatch(name, [s.idx for s in seqs], positions, spart.rotary(positions_dev),
                      spart.embed(tokens, positions_dev))


def to_host(x, dtype):
    """A device tensor as a NumPy array of `dtype` (float16/float32/bfloat16: for K and V the KV
    cache's row dtype, float16 for an int8 cache); one conversion, done by torch, and the .cpu() copy
    synchronizes with the GPU."""
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":  # NumPy's bfloat16 is ml_dtypes': torch hands over the bits, NumPy names them
        return x.to("cpu", torch.bfloat16).view(torch.int16).numpy().view(dt)
    return x.to("cpu", getattr(torch, dt.name)).numpy()


def q_dtype(spart):
    """The dtype q goes to the R-Part in: the S-Part's own (float32, bfloat16 or float16), which
    the kernel widens exactly; a float32 copy would be a round trip that doubles its bytes."""
    return str(spart.dtype).removeprefix("torch.")


class DecodeStep:
    """Runs decode steps of `spart` against the R-Part `backend`, adding up `stats` (a StepStats,
    which the engine may replace between runs); `tracer` may be None. k and v go to the R-Part
    as `row_dtype` (kvcache.KVConfig.row_dtype), q as `q_dtype(spart)`."""

    def __init__(self, spart, backend, row_dtype, stats, tracer=None):
        self.spart, self.backend, self.row_dtype, self.q_dtype = spart, backend, row_dtype, q_dtype(spart)
        self.stats, self.tracer = stats, tracer

    def _submit(self, layer, mb):
        """pre_attn on the device, then hand q, k, v to the R-Part; returns without waiting."""
        q, k, v = self.spart.pre_attn(layer, mb.h, mb.rot)              # [S, Hq, D], [S, Hkv, D] x2
        mb.pending = self.backend.submit(layer, mb.seq_ids, mb.positions, to_host(q, self.q_dtype),
                                         to_host(k, self.row_dtype), to_host(v, self.row_dtype))
        if self.tracer:
            self.tracer.r_begin(mb.name, layer)

    @torch.inference_mode()
    def __call__(self, micro):
        """micro: lists of Sequences (one or two micro-batches) -> logits [sum S, V] float32,
        rows in the order of the micro-batches' sequences."""
        n_layers, t0 = self.spart.cfg.n_layers, time.perf_counter()
        mbs = [make_micro_batch(self.spart, "AB"[i] if len(micro) > 1 else "all", seqs)
               for i, seqs in enumerate(micro)]
        for mb in mbs:                    # prologue: layer 0's R work of A, then of B
            with self._s_span(mb.name, 0, "pre"):
                self._submit(0, mb)
        for layer in range(n_layers):
            for mb in mbs:                # while mb's R work runs, the other's S work runs
                t = time.perf_counter()
                o = self.backend.collect(mb.pending)                     # [S, Hq, D] float32
                self.stats.r_wait += time.perf_counter() - t
                if self.tracer:
                    self.tracer.r_end(mb.name, layer, mb.pending.workers)
                with self._s_span(mb.name, layer, "post"):
                    mb.h = self.spart.post_attn(layer, mb.h, torch.from_numpy(o).to(self.spart.device))
                    if layer + 1 < n_layers:
                        self._submit(layer + 1, mb)
        with self._s_span(None, n_layers, "head"):
            logits = self.spart.lm_head(torch.cat([mb.h for mb in mbs]))
        self.stats.step_ms.append(1e3 * (time.perf_counter() - t0))
        return logits

    @contextlib.contextmanager
    def _s_span(self, name, layer, what):
        """Times S-Part work (and traces it when a tracer is set)."""
        t = time.perf_counter()
        if self.tracer:
            self.tracer.s_begin()
        try:
            yield
        finally:
            self.stats.s_busy += time.perf_counter() - t
            if self.tracer:
                self.tracer.s_end(name, layer, what)
