"""protocol.py - the OpenAI API as server.py speaks it: request models, response bodies, chat templates.

server.py runs the HTTP side of FastDecode; this module is what goes over that wire, with no
I/O and no engine: pydantic models that validate every request body, builders for the JSON
responses and the server-sent-event chunks of a stream, OpenAI's error body, and the chat
template a checkpoint ships (rendered with jinja2 the way Hugging Face transformers renders it).

Reference: the OpenAI API reference (Completions, Chat Completions, streaming chunks).

    POST /v1/completions       {"prompt": "Hello", "max_tokens": 16, "stream": true}
    POST /v1/chat/completions  {"messages": [{"role": "user", "content": "Hi"}]}

Every request model is strict: a JSON string where a number belongs is a 400, not coerced, and
fields this server cannot honour (n > 1, best_of, logprobs, echo, suffix) are refused by name
instead of silently ignored. Unknown extra fields are ignored, as OpenAI's API does.
"""
import datetime
import json
import os
import time
from typing import Literal, Optional, Union

import jinja2
import jinja2.ext
import jinja2.sandbox
from pydantic import BaseModel, ConfigDict, Field, model_validator

# --- errors ---


class APIError(Exception):
    """An error the client caused (or may retry): becomes OpenAI's error body with `status`."""

    def __init__(self, message, status=400, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc):
    """A pydantic ValidationError -> APIError naming the first offending field."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    if err["type"] == "value_error":      # one of our own refusals: its message says it all
        return APIError(str(err["ctx"]["error"]), code="unsupported")
    loc = [str(p) for p in err["loc"]]
    if loc and loc[0] == "prompt":        # a union: name what is allowed, not each member's failure
        return APIError("prompt: must be a string, a list of token ids, or a list of either",
                        param="prompt", code="invalid_type")
    param = ".".join(loc) or None
    return APIError(f"{param or 'body'}: {err['msg']}", param=param, code=err["type"])


# --- request models ---

Prompt = Union[str, list[int], list[str], list[list[int]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share: the sampling parameters and the refusals."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)     # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    best_of: Optional[int] = None
    logprobs: Optional[Union[bool, int]] = None
    ignore_eos: bool = False                 # not OpenAI's: vLLM's extensions, for benchmarks
    return_token_ids: bool = False           # and for models without a tokenizer (choices get token_ids)

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.n != 1:
            raise ValueError("n: only n=1 is supported (one choice per prompt)")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: not supported")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs: not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stop_strings(self):
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise APIError("stop: stop strings must not be empty", param="stop")
        return tuple(stop)

    def include_usage(self):
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _refuse_echo(self):
        if self.echo or self.suffix:
            raise ValueError("echo and suffix: not supported")
        return self

    def prompts(self):
        """One engine request per prompt: a string or a token-id list each."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)) or not p:
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None

    def as_template_input(self):
        """{'role', 'content': str}: parts joined, as the templates of text models expect."""
        c = self.content
        text = "".join(p.text for p in c) if isinstance(c, list) else (c or "")
        return {"role": self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)   # the newer name of max_tokens
    add_generation_prompt: bool = True

    def max_new(self):
        return self.max_completion_tokens or self.max_tokens


# --- chat templates ---


def _special(cfg, name):
    tok = cfg.get(name)
    return tok.get("content") if isinstance(tok, dict) else tok


class ChatTemplate:
    """The checkpoint's own chat template: `chat_template.jinja` (transformers >= 4.50 writes
    that) or `chat_template` in tokenizer_config.json (a string, or a list of named templates of
    which "default" is used). Rendered like transformers' apply_chat_template: a sandboxed jinja2
    environment (a template is code from a download: it must not reach Python objects), with
    trim_blocks and lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, the special
    tokens' strings as variables, and the text then tokenized WITHOUT adding special tokens
    (the template already placed any BOS it wants)."""

    def __init__(self, source, variables):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = self._raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.variables = variables

    @staticmethod
    def _raise(message):
        raise jinja2.exceptions.TemplateError(message)

    @classmethod
    def load(cls, directory):
        """The template of a checkpoint directory, or None when it has none."""
        if not directory or not os.path.isdir(directory):
            return None
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
        source = cfg.get("chat_template")
        if isinstance(source, list):
            source = {t.get("name"): t.get("template") for t in source}.get("default")
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if os.path.exists(jinja_path):
            source = open(jinja_path).read()
        if not source:
            return None
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return cls(source, {n: _special(cfg, n) or "" for n in names})

    def render(self, messages, add_generation_prompt=True):
        """messages: [{'role', 'content'}] -> prompt text; APIError when the template refuses."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except jinja2.exceptions.TemplateError as e:
            raise APIError(f"messages: the chat template refused them: {e}", param="messages") from e


# --- responses ---


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseBuilder:
    """Bodies of one response: the same id, creation time and model in every chunk.
    `chat` picks the chat shapes (message/delta) over the completion ones (text)."""

    def __init__(self, model, chat, include_usage=False):
        self.model, self.chat, self.include_usage = model, chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        self.created = int(time.time())

    def _head(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices, prompt_tokens, completion_tokens, token_ids=None):
        """choices: [(index, text, finish_reason)] -> the non-streamed body; token_ids: one list
        per choice to return alongside (return_token_ids), or None."""
        if self.chat:
            cs = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
                  for i, t, f in choices]
        else:
            cs = [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, t, f in choices]
        for c, ids in zip(cs, token_ids or []):
            c["token_ids"] = ids
        body = self._head("chat.completion" if self.chat else "text_completion")
        return {**body, "choices": cs, "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, index, text, finish_reason=None, first=False, token_ids=None):
        """One streamed choice delta (with its new token ids if asked). A chat stream's first
        chunk per choice carries the role."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None      # every chunk but the last carries a null usage
        return body

    def usage_chunk(self, prompt_tokens, completion_tokens):
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**body, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj):
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
