"""server.py - online serving: an OpenAI-compatible HTTP server over FastDecode's step API.

FastDecode is a serving system: requests arrive while others run, and the load-stabilizing
schedule (scheduler.py) exists for exactly that. This module puts the engine (fastdecode.py)
behind HTTP, the way vLLM does, on FastAPI and uvicorn:

    HTTP handlers (asyncio, main thread)            engine thread
      validate (protocol.py), check_request  --inbox (queue.Queue)-->  add_request / abort
      await the request's asyncio.Queue      <--call_soon_threadsafe--  step() outputs

One engine thread runs `step()` in a loop and owns the engine: add_request, abort and step are
not thread-safe, so only it calls them. The handlers never run model code and never wait on the
engine; they validate, hand the request over through a thread-safe queue, and await their own
asyncio queue, which the engine thread feeds with `loop.call_soon_threadsafe`. A client that
disconnects aborts its request, which frees its KV on the worker at the next step. The engine
thread and the metrics it feeds are in serving.py; the wire format (request models, response
bodies, chat templates) in protocol.py.

    python server.py --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    curl -N localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "Hello", "max_tokens": 16, "stream": true}'

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text, `fastdecode:` names after vLLM's `vllm:` ones).
"""
import argparse
import sys
import asyncio
import dataclasses
import hmac
import ipaddress

from pydantic import ValidationError

import kvcache
import protocol
import wire
from protocol import APIError
from serving import EngineLoop, Flight, Metrics

# --- turning requests into engine requests ---


@dataclasses.dataclass
class Serving:
    """Everything the handlers need, passed explicitly (app.state.serving)."""
    llm: object
    engine: EngineLoop
    metrics: Metrics
    model_name: str
    template: object = None          # protocol.ChatTemplate or None
    api_key: str = None
    max_body_bytes: int = 1 << 20
    chat_max_tokens: int = 512       # max_tokens when a chat request omits it (capped by positions)


async def parse(request, model):
    """The body, size-capped and validated by `model`; APIError otherwise."""
    cap = request.app.state.serving.max_body_bytes
    if int(request.headers.get("content-length") or 0) > cap:
        raise APIError(f"request body over {cap} bytes", 413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > cap:      # chunked bodies carry no length: count as they come
            raise APIError(f"request body over {cap} bytes", 413)
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        raise protocol.validation_error(e) from None


def sampling_params(req, max_tokens):
    from fastdecode import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                          stop=req.stop_strings(), ignore_eos=req.ignore_eos)


def check(llm, prompt, params):
    """Token ids of a prompt the engine can serve; a 400 naming why not (empty, id outside
    the vocabulary, longer than the positions, more KV than any worker holds)."""
    try:
        return llm.check_request(prompt, params)
    except ValueError as e:
        raise APIError(f"prompt: {e}", param="prompt") from None


def chat_prompt(s, req):
    """messages -> token ids through the checkpoint's chat template."""
    if s.template is None:
        raise APIError(f"model {s.model_name!r} has no chat template (chat_template.jinja or chat_template in "
                       "tokenizer_config.json): use /v1/completions", param="messages", code="no_chat_template")
    if s.llm.tokenizer is None:
        raise APIError(f"model {s.model_name!r} has no tokenizer: use /v1/completions with token ids",
                       code="no_tokenizer")
    text = s.template.render([m.as_template_input() for m in req.messages], req.add_generation_prompt)
    return s.llm.tokenizer.encode(text, add_special_tokens=False).ids


# --- responses: one body, or a stream of server-sent events ---


async def collect(request, flight, builder, want_ids):
    """Wait for every choice to finish -> the JSON body. Checks for a vanished client once
    a second (without a stream, only a receive can tell), and aborts if it went."""
    n = len(flight.index)
    texts, ids, reasons, ptoks = [""] * n, [[] for _ in range(n)], [None] * n, [0] * n

    async def gather():
        async for i, out in flight:
            texts[i] += out.text_delta
            ids[i] += out.new_token_ids
            reasons[i], ptoks[i] = out.finish_reason, out.prompt_tokens

    task = asyncio.ensure_future(gather())
    try:
        while not (await asyncio.wait({task}, timeout=1.0))[0]:
            if await request.is_disconnected():
                task.cancel()
                return None
        task.result()            # re-raises an engine error as APIError
    finally:
        flight.abort_unfinished()
    return builder.full([(i, texts[i], reasons[i]) for i in range(n)], sum(ptoks), sum(map(len, ids)),
                        ids if want_ids else None)


async def stream(flight, builder, want_ids):
    """Server-sent events: chunks as tokens come, a usage chunk if asked, then [DONE]. A client
    that disconnects gets this generator cancelled by Starlette: `finally` aborts its requests."""
    ptoks, ctoks = {}, {}
    try:
        if builder.chat:         # the role first, as OpenAI's chat streams do
            for i in range(len(flight.index)):
                yield protocol.sse(builder.chunk(i, "", first=True))
        async for i, out in flight:
            ptoks[i], ctoks[i] = out.prompt_tokens, out.completion_tokens
            if out.new_token_ids or out.finished:   # one event per token, even with no text yet
                yield protocol.sse(builder.chunk(i, out.text_delta, out.finish_reason,
                                                 token_ids=out.new_token_ids if want_ids else None))
        if builder.include_usage:
            yield protocol.sse(builder.usage_chunk(sum(ptoks.values()), sum(ctoks.values())))
    except APIError as e:        # the status line went out already: the error is an event
        yield protocol.sse(e.body())
    finally:
        flight.abort_unfinished()
    yield protocol.SSE_DONE


async def respond(request, s, prompts_ids, params, req, chat):
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    if s.engine.error is not None:
        raise APIError(f"engine stopped: {s.engine.error}", 503, "server_error")
    builder = protocol.ResponseBuilder(s.model_name, chat, req.include_usage())
    flight = Flight(s.engine, prompts_ids, params)
    if req.stream:
        return StreamingResponse(stream(flight, builder, req.return_token_ids), media_type="text/event-stream")
    body = await collect(request, flight, builder, req.return_token_ids)
    return JSONResponse(body) if body is not None else Response(status_code=499)  # nginx's "client closed"


# --- the app ---


def install_errors_and_auth(app, api_key):
    """Every error as OpenAI's body (ours, FastAPI's 404/405/422 too), and the bearer key on /v1/*."""
    from fastapi.exceptions import RequestValidationError, StarletteHTTPException
    from fastapi.responses import JSONResponse
    error = lambda e: JSONResponse(e.body(), status_code=e.status)
    app.add_exception_handler(APIError, lambda r, e: error(e))
    app.add_exception_handler(StarletteHTTPException, lambda r, e: error(APIError(str(e.detail), e.status_code)))
    app.add_exception_handler(RequestValidationError, lambda r, e: error(APIError(str(e.errors()[0]["msg"]))))

    @app.middleware("http")
    async def bearer(request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(APIError("missing or wrong API key (Authorization: Bearer KEY)", 401,
                                      code="invalid_api_key"))
        return await call_next(request)


def build_app(s):
    """The FastAPI app over a Serving; its lifespan runs the engine thread."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    @contextlib.asynccontextmanager
    async def lifespan(app):
        s.engine.start()
        yield
        s.engine.stop()

    app = FastAPI(title="FastDecode", lifespan=lifespan)
    app.state.serving = s
    install_errors_and_auth(app, s.api_key)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, protocol.CompletionRequest)
        params = sampling_params(req, req.max_tokens or 16)       # OpenAI's default for completions
        ids = [check(s.llm, p, params) for p in req.prompts()]
        return await respond(request, s, ids, params, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, protocol.ChatRequest)
        ids = chat_prompt(s, req)
        room = s.llm.spart.cfg.max_pos - len(ids)
        params = sampling_params(req, req.max_new() or max(1, min(s.chat_max_tokens, room)))
        return await respond(request, s, [check(s.llm, ids, params)], params, req, chat=True)

    @app.get("/v1/models")
    async def models():
        card = {"id": s.model_name, "object": "model", "created": 0, "owned_by": "fastdecode",
                "max_model_len": s.llm.spart.cfg.max_pos, "vocab_size": s.llm.spart.cfg.vocab_size}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if s.engine.error is not None or not s.engine.thread.is_alive():
            return JSONResponse({"status": "error", "error": str(s.engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body, ctype = s.metrics.exposition()
        return Response(body, media_type=ctype)

    return app


# --- the command line ---


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:       # a name other than localhost may resolve anywhere
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FastDecode's OpenAI-compatible server.")
    a = p.add_argument
    a("--model", required=True, help="short name (opt-125m), hub repo id, or checkpoint directory")
    a("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    a("--host", default="127.0.0.1", help="address to bind; anything but loopback requires --api-key")
    a("--port", type=int, default=8000, help="TCP port")
    a("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    a("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (413 beyond)")
    a("--chat-max-tokens", type=int, default=512, help="max_tokens of a chat request that gives none")
    a("--workers", type=int, default=1, help="local R-Part worker processes to spawn (0: in-process)")
    a("--worker-hosts", default=None, help="comma-separated host:port of running workers (instead of spawning)")
    a("--secret-file", default=None, help="shared secret for workers beyond loopback")
    a("--device", default=None, help="S-Part device (default: cuda if available, else cpu)")
    a("--dtype", default=None, help="S-Part dtype (default: fp16/bf16 on CUDA; on a CPU bf16 where it has bf16 instructions, else float32)")
    a("--kv-dtype", default=None, choices=kvcache.KV_DTYPES,
      help="KV-cache element type; int8: per-token, per-head float16 scales, half fp16's bytes; "
           "bfloat16: fp16's bytes, half its arithmetic where the CPU has AVX512-BF16 (default: bfloat16 "
           "when the S-Part runs in bfloat16, else float16)")
    a("--kv-mem", default=None, help="KV memory budget per worker (default: the engine's)")
    a("--worker-threads", type=int, default=None, help="attention threads per local worker")
    a("--pipeline", dest="pipeline", action="store_true", default=None, help="two micro-batches")
    a("--no-pipeline", dest="pipeline", action="store_false", help="run one batch serially")
    a("--schedule", default="stabilized", choices=["stabilized", "naive"], help="admission policy")
    a("--max-batch", type=int, default=None, help="most sequences running at once (default: the engine's)")
    a("--kv-cap", type=int, default=0, help="cap on the running batch's KV tokens (0: none)")
    a("--max-prefill-tokens", type=int, default=None,
      help="prompt tokens prefilled per step at most: a long prompt takes several steps while others decode")
    a("--log-level", default="info", help="uvicorn's log level")
    args = p.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        p.error(f"--host {args.host} is not loopback: pass --api-key so that strangers cannot use the model")
    return args


def warm_up(llm):
    """One tiny request before the first user's: the first pass through torch and the workers
    pays one-time costs (kernel selection, page faults) that would land on someone's TTFT."""
    llm.generate([[llm.spart.cfg.bos_id]], max_new_tokens=2, ignore_eos=True, progress=False)


def serve(args):
    import torch
    import uvicorn

    import fastdecode
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    secret = wire.read_secret(args.secret_file)
    optional = {k: v for k, v in (("kv_mem", args.kv_mem), ("max_prefill_tokens", args.max_prefill_tokens)) if v}
    with fastdecode.LLM(args.model, workers=args.workers, device=args.device, dtype=args.dtype,
                        worker_hosts=args.worker_hosts.split(",") if args.worker_hosts else None,
                        kv_dtype=args.kv_dtype, pipeline=args.pipeline, **optional,
                        worker_threads=fastdecode.default_threads(args, device), schedule=args.schedule,
                        max_batch=args.max_batch, kv_cap=args.kv_cap, secret=secret, quiet=True) as llm:
        warm_up(llm)
        metrics = Metrics()
        metrics.describe(llm)
        s = Serving(llm, EngineLoop(llm, metrics), metrics, args.served_model_name or args.model,
                    protocol.ChatTemplate.load(llm.spart.source), args.api_key, args.max_body_bytes,
                    args.chat_max_tokens)
        uvicorn.run(build_app(s), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)


def main(argv=None):
    args = parse_args(argv)
    import fastdecode
    try:
        serve(args)
    except (ValueError, MemoryError, OSError, fastdecode.backend.WorkerStartError) as e:  # no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
