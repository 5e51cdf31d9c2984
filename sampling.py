"""sampling.py - what each request asks for, and turning logits into tokens and tokens into text.

Per request: `SamplingParams` (how many tokens, temperature, top-p, seed, stop strings and
token ids). Per step: `sample` picks one token per sequence (greedy at temperature 0, else
nucleus sampling with one torch.Generator per request, so a request's draws do not depend on
its batch-mates); `TextStream` turns the growing list of token ids into text deltas for
streaming, holding back what may still change: an incomplete UTF-8 character, or the start
of a stop string (which is cut from the text when it completes, as OpenAI's API does).

Legend: S sequences in a step, V vocabulary.
"""
import dataclasses

import torch


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16                 # tokens to generate at most
    temperature: float = 0.0             # 0: greedy
    top_p: float = 1.0                   # nucleus: the smallest prefix of the sorted probabilities reaching top_p
    seed: int = None                     # None: a fresh random seed
    stop: tuple = ()                     # strings that end generation; cut from the text
    stop_token_ids: tuple = ()           # token ids that end generation (kept in token_ids)
    ignore_eos: bool = False             # generate through the model's EOS token

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop, self.stop_token_ids = tuple(self.stop), tuple(int(t) for t in self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

    def generator(self, fallback_seed):
        """The request's own random stream: from `seed`, else from `fallback_seed`."""
        return torch.Generator().manual_seed(self.seed if self.seed is not None else fallback_seed)


# --- sampling ---


def sample(logits, temperature, top_p, generators):
    """logits [S, V] float32 -> S token ids. Greedy at temperature 0; else top-p sampling with
    one generator per sequence."""
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


def sample_each(logits, params, generators):
    """logits [S, V]; params, generators: one per row, each row sampled as its request asks."""
    greedy = logits.argmax(-1).tolist()
    return [greedy[i] if p.temperature <= 0 else sample(logits[i:i + 1], p.temperature, p.top_p, [g])[0]
            for i, (p, g) in enumerate(zip(params, generators))]


# --- text ---


class TextStream:
    """Incremental detokenization with stop strings. `update(token_ids)` -> (delta, stopped):
    the text that may be shown now, and whether a stop string completed (the text then ends
    before it). `text` is everything shown so far."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, stop
        self.text = ""
        self.hold = max((len(s) for s in stop), default=1) - 1   # a stop string's start may be at the end

    def update(self, token_ids, final=False):
        if self.tokenizer is None:
            return "", False
        full = self.tokenizer.decode(token_ids)
        cut = self._find_stop(full)
        if cut is not None:
            return self._emit(full[:cut]), True
        if final:
            return self._emit(full), False
        if full.endswith("\ufffd"):  # the last token ends inside a UTF-8 character: wait for the rest
            full = full[:-1]
        return self._emit(full[:max(len(self.text), len(full) - self.hold)]), False

    def _find_stop(self, full):
        start = max(0, len(self.text) - self.hold)  # earlier text was searched already
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, upto):
        """The part of `upto` not shown yet. Decoding a longer sequence can rewrite the last
        characters (a space merged into the next token): never take back what was shown."""
        if not upto.startswith(self.text):
            upto = self.text + upto[len(self.text):]
        delta, self.text = upto[len(self.text):], upto
        return delta
