"""scheduler.py - which sequences run each step: continuous batching and load stabilization.

S-Part time grows with the number of sequences in a step; R-Part time with their total KV
length, which grows by one token per sequence per step. If a batch of sequences starts together
(`naive`: admit whenever a slot frees), the R-Part load ramps from B*prompt to B*(prompt+gen)
and back: the pipeline is balanced at one moment only. FastDecode's sequence-level
load-stabilizing schedule (`stabilized`) admits a steady trickle of sequences, about
max_batch / gen_len per step, under a cap on the total KV tokens, so the running sequences' ages
spread evenly and the total KV - and so the R-Part time - stays flat:

    naive       KV |  /|  /|  /|        stabilized  KV | ______________
                   | / | / | / |                       |/
                   +------------ step                  +------------ step

The queue is live: requests arrive while others run (the server), so the pace comes from what
can be known online, not from a fixed list. Also here: splitting the running batch into two
micro-batches of equal KV load (the pipeline's A and B) and choosing the worker with the most
free KV memory for a new sequence.
"""
import dataclasses
from collections import deque


@dataclasses.dataclass(eq=False)  # two sequences are never the same one
class Sequence:
    idx: int                     # sequence id: the key of its KV on the workers
    prompt: list                 # token ids
    max_new: int                 # tokens to generate at most (its KV room is reserved for them)
    generated: list = dataclasses.field(default_factory=list)
    done: bool = False

    @property
    def length(self):
        """Tokens whose K/V are (or are about to be) cached: prompt + generated so far."""
        return len(self.prompt) + len(self.generated)

    @property
    def capacity(self):
        return len(self.prompt) + self.max_new


@dataclasses.dataclass
class SchedulerConfig:
    max_batch: int = 32               # running sequences at most
    policy: str = "stabilized"        # or "naive"
    kv_cap: int = 0                   # total KV tokens over both micro-batches; 0: no cap
    admit_per_step: int = 0           # stabilized pace; 0: max_batch / expected generation length

    def __post_init__(self):
        if self.policy not in ("stabilized", "naive"):
            raise ValueError(f"policy must be 'stabilized' or 'naive', got {self.policy!r}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")


class Scheduler:
    """A live queue: sequences are added while others run, and leave when done or aborted."""

    def __init__(self, cfg, requests=()):
        self.cfg = cfg
        self.waiting = deque(requests)
        self.running = []
        self.credit = 1.0        # admissions earned but not yet made (the first step may admit one)
        self.mean_gen = None     # running mean of finished sequences' generated lengths

    def add(self, seq):
        self.waiting.append(seq)

    def remove(self, seq):
        """Take a sequence out wherever it is (an abort); True if it was there."""
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
                return True
        return False

    def has_work(self):
        return bool(self.waiting or self.running)

    def kv_tokens(self):
        return sum(s.length for s in self.running)

    def pace(self):
        """Admissions per step that keep max_batch sequences running: max_batch / the expected
        generation length. That length is what can be known online: the mean of finished
        sequences once some have finished (EOS shortens them), else the mean max_new asked."""
        if self.cfg.admit_per_step:
            return float(self.cfg.admit_per_step)
        known = [s.max_new for s in (*self.waiting, *self.running)]
        expect = self.mean_gen if self.mean_gen is not None else sum(known) / max(1, len(known))
        return self.cfg.max_batch / max(1.0, expect)

    def admit(self, can_place):
        """Sequences to prefill and add before this step. can_place(seq) -> bool says whether some
        worker has KV room for its whole capacity (a full cache is refused here, never mid-step)."""
        out = []
        if self.cfg.policy == "naive":
            limit = self.cfg.max_batch
        else:  # earn `pace` admissions per step; spend whole ones; never bank more than a step's worth
            pace = self.pace()
            self.credit = min(self.credit + pace, max(1.0, pace) + 1.0) if self.running else max(self.credit, 1.0)
            limit = int(self.credit)
        kv = self.kv_tokens()
        while self.waiting and len(self.running) < self.cfg.max_batch and len(out) < limit:
            seq = self.waiting[0]
            if self.cfg.kv_cap and self.cfg.policy == "stabilized" and self.running and kv + seq.length > self.cfg.kv_cap:
                break
            if not can_place(seq):
                if not self.running and not out:
                    raise MemoryError(f"request {seq.idx}: {seq.capacity} tokens fit on no worker even when empty")
                break
            self.waiting.popleft()
            self.running.append(seq)
            out.append(seq)
            kv += seq.length
        if self.cfg.policy == "stabilized":
            self.credit -= len(out)
        return out

    def retire(self):
        """Remove finished sequences; return them. Their lengths update the expected one."""
        done = [s for s in self.running if s.done]
        self.running = [s for s in self.running if not s.done]
        for s in done:  # an exponential mean over about the last 16 finished
            n = len(s.generated)
            self.mean_gen = n if self.mean_gen is None else self.mean_gen + (n - self.mean_gen) / 16
        return done

    def split(self, seqs=None):
        """Two micro-batches of about equal total KV length (greedy, longest first), of `seqs`
        (default: all running)."""
        a, b, la, lb = [], [], 0, 0
        for s in sorted(self.running if seqs is None else seqs, key=lambda s: -s.length):
            if la <= lb:
                a.append(s)
                la += s.length
            else:
                b.append(s)
                lb += s.length
        return [sorted(m, key=lambda s: s.idx) for m in (a, b) if m]


def place(free_bytes, need_bytes):
    """Index of the worker with the most free KV bytes that can hold need_bytes, or -1."""
    best = max(range(len(free_bytes)), key=lambda i: free_bytes[i], default=-1)
    return best if best >= 0 and free_bytes[best] >= need_bytes else -1
