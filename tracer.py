"""trace.py - a Chrome/Perfetto trace of the pipeline: one track for the S-Part, one per worker.

`python fastdecode.py --trace run.json` records every S-Part span (pre/post attention of a
layer for a micro-batch, the LM head) and every R-Part span (from handing a micro-batch's
q, k, v to the workers until its o is back). Open the file in https://ui.perfetto.dev, or draw
one step as text with `python bench.py trace run.json`. Overlap shows as A's R-Part spans
running beside B's S-Part spans.
"""
import json
import time


class Tracer:
    def __init__(self):
        self.events, self.t0, self.open = [], time.perf_counter(), {}
        self.step = 0

    def _us(self):
        return (time.perf_counter() - self.t0) * 1e6

    def s_begin(self):
        self.open["S"] = self._us()

    def s_end(self, micro_batch, layer, what):
        """what: "pre", "post" or "head"; micro_batch: "A", "B", "all", or None for the head."""
        name = f"{what} L{layer} {micro_batch or ''}".strip()
        self.events.append({"name": name, "cat": "S-Part", "ph": "X", "pid": 1, "tid": 0, "ts": self.open["S"],
                            "dur": self._us() - self.open["S"], "args": {"step": self.step, "layer": layer}})
        if what == "head":
            self.step += 1

    def r_begin(self, micro_batch, layer):
        self.open[("R", micro_batch)] = self._us()

    def r_end(self, micro_batch, layer, workers):
        """workers: the workers that answered this micro-batch (one span on each one's track)."""
        start = self.open.pop(("R", micro_batch))
        for w in sorted(set(workers)):
            self.events.append({"name": f"attn L{layer} {micro_batch}", "cat": "R-Part", "ph": "X", "pid": 1,
                                "tid": 1 + w, "ts": start, "dur": self._us() - start,
                                "args": {"step": self.step, "layer": layer, "micro_batch": micro_batch}})

    def save(self, path, n_workers):
        names = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "S-Part"}}]
        names += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": 1 + w, "args": {"name": f"R-Part worker {w}"}}
                  for w in range(max(1, n_workers))]
        with open(path, "w") as f:
            json.dump({"traceEvents": names + self.events, "displayTimeUnit": "ms"}, f)
