"""server.py end to end: a real server process on 127.0.0.1 and a free port, driven with the
official `openai` client (and httpx where a client must send what openai never would).

Two servers, each started once per module and stopped by it: a tiny random Llama (no
tokenizer: token-id prompts, concurrency, aborts, every bad input; a small KV budget so that
some requests must wait and some can never fit), and SmolLM2-135M-Instruct (text, chat
template, streaming text, stop strings). Greedy results are compared with `LLM.generate` run
in this process on the same checkpoint, one prompt at a time.
"""
import concurrent.futures
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
# llama-gqa: 2 layers x 2 KV heads x 8 dims, K and V in fp16 = 128 bytes per token, so a 32 KiB
# worker holds 256 tokens: 8 requests of ~40 tokens queue, and a 300-token request never fits.
TINY_KV_MEM, TINY_KV_TOKENS = "32KiB", 256


# --- a server process ---


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python server.py ...` on 127.0.0.1:<free port>; `stop` ends it (SIGTERM, then SIGKILL),
    and the server stops the workers it started on its way out."""

    def __init__(self, model, *extra, timeout=180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, os.path.join(ROOT, "server.py"), "--model", model, "--port", str(self.port),
               "--log-level", "warning", *extra]
        self.log = tempfile.TemporaryFile("w+")   # the server's output, for failure messages; gone at close
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.output()}")

    def output(self):
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def metric(self, name, labels=""):
        """One sample's value from /metrics (0.0 when absent)."""
        text = httpx.get(self.url + "/metrics").text
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def tiny(checkpoint):
    directory, _ = checkpoint("llama-gqa")
    srv = ServerProcess(directory, "--workers", "1", "--kv-mem", TINY_KV_MEM, "--api-key", KEY,
                        "--max-body-bytes", "65536", "--served-model-name", "tiny")
    yield srv, directory
    srv.stop()


@pytest.fixture(scope="module")
def smol(smollm2):
    srv = ServerProcess(smollm2, "--workers", "1", "--served-model-name", "smollm2")
    yield srv, smollm2
    srv.stop()


@pytest.fixture(scope="module")
def reference():
    """greedy(directory, prompt, n) -> token ids from LLM.generate in this process, alone."""
    import fastdecode
    engines = {}

    def greedy(directory, prompt, n, ignore_eos=True):
        if directory not in engines:
            engines[directory] = fastdecode.LLM(directory, workers=0, quiet=True)
        return engines[directory].generate([prompt], max_new_tokens=n, ignore_eos=ignore_eos)[0]
    yield greedy
    for e in engines.values():
        e.close()


def client(srv, key=KEY):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def ids_of(choice):
    return choice.model_extra["token_ids"]


TOKEN_IDS = {"ignore_eos": True, "return_token_ids": True}


# --- completions on the tiny model: token ids ---


def test_models_and_health(tiny):
    srv, _ = tiny
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client(srv).models.list().data] == ["tiny"]


def test_token_id_prompt_equals_generate(tiny, reference):
    srv, directory = tiny
    prompt = [5, 17, 99, 3, 42, 8]
    r = client(srv).completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body=TOKEN_IDS)
    assert ids_of(r.choices[0]) == reference(directory, prompt, 12).token_ids
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 12)


def test_streamed_ids_equal_non_streamed(tiny):
    srv, _ = tiny
    c, prompt = client(srv), [7, 7, 1, 200, 31]
    whole = c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, extra_body=TOKEN_IDS)
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=TOKEN_IDS))
    streamed = [t for ch in chunks if ch.choices for t in ids_of(ch.choices[0])]
    assert streamed == ids_of(whole.choices[0])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(ch.usage is None for ch in chunks[:-1])


def test_several_prompts_one_choice_each(tiny, reference):
    srv, directory = tiny
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    r = client(srv).completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0,
                                       extra_body=TOKEN_IDS)
    got = {c.index: ids_of(c) for c in r.choices}
    assert got == {i: reference(directory, p, 5).token_ids for i, p in enumerate(prompts)}


def test_requests_arriving_while_others_run(tiny, reference):
    """8 requests of ~40 tokens, started 50 ms apart, on a worker that holds 256 tokens: they
    join a running batch, some wait for KV to free, and each greedy result equals that prompt
    run alone."""
    srv, directory = tiny
    prompts = [[(13 * i + 7 * j) % 250 + 3 for j in range(8 + i)] for i in range(8)]
    c = client(srv)

    def one(i):
        time.sleep(0.05 * i)
        r = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=30, temperature=0, extra_body=TOKEN_IDS)
        return ids_of(r.choices[0])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert sum(len(p) + 30 for p in prompts) > TINY_KV_TOKENS  # the test needs the queue
    for p, g in zip(prompts, got):
        assert g == reference(directory, p, 30).token_ids


@pytest.fixture(scope="module")
def roomy(checkpoint):
    """The tiny model with KV for 8192 tokens: a request as long as its 512 positions allow takes
    ~0.75 s here, time enough for a client to read a few tokens, look at the metrics and hang up
    before it would end. (With the `tiny` server's 256 tokens of KV a request could last only
    ~0.3 s, and on a busy machine it finished before the hang-up was seen.)"""
    directory, _ = checkpoint("llama-gqa")
    srv = ServerProcess(directory, "--workers", "1", "--kv-mem", "1MiB", "--api-key", KEY, "--served-model-name", "tiny")
    yield srv
    srv.stop()


def test_disconnect_aborts_and_frees_kv(roomy):
    srv = roomy
    body = {"model": "tiny", "prompt": [4, 5, 6], "max_tokens": 500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    aborted = srv.metric("fastdecode:request_success_total", '{finished_reason="abort"}')
    with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):       # a few tokens in: the request holds KV
            while not next(lines).startswith("data: "):
                pass
        assert srv.metric("fastdecode:kv_cache_usage_perc", '{worker="0"}') > 0
    deadline = time.monotonic() + 20      # closed mid-stream: the server must notice and abort
    while time.monotonic() < deadline:
        if srv.metric("fastdecode:kv_cache_usage_perc", '{worker="0"}') == 0 and \
                srv.metric("fastdecode:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert srv.metric("fastdecode:kv_cache_usage_perc", '{worker="0"}') == 0
    assert srv.metric("fastdecode:request_success_total", '{finished_reason="abort"}') == aborted + 1


def test_metrics_count_tokens(tiny):
    srv, _ = tiny
    before = srv.metric("fastdecode:generation_tokens_total")
    client(srv).completions.create(model="tiny", prompt=[3, 4], max_tokens=4, temperature=0, extra_body=TOKEN_IDS)
    assert srv.metric("fastdecode:generation_tokens_total") == before + 4
    assert srv.metric("fastdecode:time_to_first_token_seconds_count") >= 1
    assert srv.metric("fastdecode:step_kv_tokens_count") >= 1


# --- bad input: OpenAI's error body, and the server keeps serving ---

BAD = [  # (body, status, what the message must mention)
    (b'{"prompt": [1, 2', 400, "not valid JSON"),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": [1, 2], "max_tokens": "4"}', 400, "max_tokens"),
    (b'{"prompt": [1, 2], "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": [1, 2], "stream": "yes"}', 400, "stream"),
    (b'{"prompt": [1, 2], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": []}', 400, "empty"),
    (b'{"prompt": ""}', 400, "prompt"),              # a string, and this model has no tokenizer
    (b'{"prompt": [1, 256]}', 400, "vocabulary"),    # VOCAB = 256
    (b'{"prompt": [1, -3]}', 400, "vocabulary"),
    (b'{"prompt": [1, 2], "max_tokens": 600}', 400, "position"),   # 512 positions
    (b'{"prompt": [1, 2], "max_tokens": 300}', 400, "worker"),     # fits 512 positions, not 256 KV tokens
    (b'{"prompt": [1, 2], "n": 2}', 400, "n"),
    (b'{"prompt": [1, 2], "best_of": 3}', 400, "best_of"),
    (b'{"prompt": [1, 2], "stop": [""]}', 400, "stop"),
    (b'{"prompt": [1, 2], "max_tokens": 2, "x": "' + b"a" * 70000 + b'"}', 413, "bytes"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_completion_requests(tiny, body, status, words):
    srv, _ = tiny
    r = httpx.post(srv.url + "/v1/completions", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words.lower() in err["message"].lower(), err


def test_bad_request_through_openai_client(tiny):
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client(tiny[0]).completions.create(model="tiny", prompt=[1, 999], max_tokens=2)


def test_chat_without_template_is_400(tiny):
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client(tiny[0]).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_api_key_required(tiny):
    srv, _ = tiny
    with pytest.raises(openai.AuthenticationError):
        client(srv, key="wrong").models.list()
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_refuses_public_bind_without_key():
    import server
    with pytest.raises(SystemExit):
        server.parse_args(["--model", "x", "--host", "0.0.0.0"])
    assert server.parse_args(["--model", "x", "--host", "0.0.0.0", "--api-key", "k"]).host == "0.0.0.0"
    assert server.parse_args(["--model", "x"]).host == "127.0.0.1"


# --- SmolLM2: text, chat template, streaming text, stop strings ---

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_text_completion_equals_generate(smol, reference):
    srv, directory = smol
    prompt = "The three primary colors are"
    r = client(srv).completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
    want = reference(directory, prompt, 16, ignore_eos=False)
    assert r.choices[0].text == want.text


def test_streamed_text_equals_non_streamed(smol):
    srv, _ = smol
    c, prompt = client(srv), "Once upon a time, in a small village,"
    whole = c.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0)
    parts = [ch.choices[0].text for ch in c.completions.create(model="smollm2", prompt=prompt, max_tokens=24,
                                                               temperature=0, stream=True)]
    assert "".join(parts) == whole.choices[0].text and len(parts) > 1


def test_chat_uses_the_checkpoint_template(smol, reference):
    srv, directory = smol
    r = client(srv).chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=30, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    # the same prompt rendered by transformers' apply_chat_template, run through generate
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(directory).apply_chat_template(QUESTION, add_generation_prompt=True,
                                                                       tokenize=True, return_dict=False)
    want = reference(directory, list(ids), 30, ignore_eos=False)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == want.text.removesuffix("<|im_end|>")


def test_chat_stream_with_usage(smol):
    srv, _ = smol
    c = client(srv)
    whole = c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=30, temperature=0)
    chunks = list(c.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_string(smol):
    srv, _ = smol
    c, prompt = client(srv), "Count: 1, 2, 3, 4, 5,"
    full = c.completions.create(model="smollm2", prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    assert " 8" in full, full
    r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=20, temperature=0, stop=[" 8"])
    assert r.choices[0].text == full[:full.index(" 8")] and r.choices[0].finish_reason == "stop"


def test_bench_serve_against_the_server(tiny, capsys):
    """bench.py serve drives the tiny server: every request completes, and the per-step KV it
    reports comes from the server's metrics."""
    import json

    import bench
    srv, _ = tiny
    bench.main(["serve", "--url", srv.url, "--api-key", KEY, "--num-prompts", "6", "--request-rate", "20",
                "--input-len", "12", "--output-len", "6", "--json"])
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rep["completed"], rep["failed"]) == (6, 0)
    kv = rep["step_kv_tokens"]     # each request holds 6-12 prompt + 3-6 generated tokens
    assert kv["steps"] >= 5 and 6 <= kv["mean"] <= 6 * (12 + 6)
    assert 'schedule="stabilized"' in rep["step_kv_tokens"]["engine"]
    assert rep["ttft"]["p50_ms"] > 0 and rep["output_tok_s"] > 0


# --- a worker lost mid-stream ---


def worker_pids(server_pid):
    """The R-Part workers a server started: `rpart.py --listen ... --parent-pid <server>`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"rpart.py") for a in argv) and str(server_pid).encode() in argv:
            pids.append(int(entry))
    return sorted(pids)


def test_worker_killed_mid_stream_loses_no_token(checkpoint, reference):
    """Two workers, two streams (placement puts one on each); worker 0 is killed after a few
    tokens. Both streams go on after the engine re-prefills the lost sequence on the survivor,
    and each equals its prompt run alone: no token lost, none repeated. float32 S-Part and KV:
    a re-prefill (a matrix product over the prompt) and the decode steps it replaces (one row at
    a time) then agree to ~1e-7; with fp16 KV that difference can round differently and, over a
    hundred tokens of a random model, flip a near-tie (seen at token 95 of 120)."""
    import signal
    import threading
    directory, _ = checkpoint("llama-gqa")
    srv = ServerProcess(directory, "--workers", "2", "--dtype", "float32", "--kv-dtype", "float32",
                        "--served-model-name", "tiny")
    try:
        pids = worker_pids(srv.proc.pid)
        assert len(pids) == 2, pids
        prompts, n = [[5, 9, 13, 2], [40, 41, 42]], 120
        got, seen = [[], []], threading.Event()

        def stream(i):
            for ch in client(srv).completions.create(model="tiny", prompt=prompts[i], max_tokens=n, temperature=0,
                                                     stream=True, extra_body=TOKEN_IDS):
                if ch.choices:
                    got[i] += ids_of(ch.choices[0])
                    if len(got[0]) >= 5 and len(got[1]) >= 5:
                        seen.set()
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert seen.wait(120), got
        os.kill(pids[0], signal.SIGKILL)
        killed_at = [len(g) for g in got]
        for t in threads:
            t.join(180)
        assert min(killed_at) < n, "the kill came after the streams had finished"
        assert "worker 0 lost" in srv.output() or srv.metric("fastdecode:num_requests_running") == 0
        import fastdecode
        with fastdecode.LLM(directory, workers=0, dtype="float32", kv_dtype="float32", quiet=True) as ref:
            want = [o.token_ids for o in ref.generate(prompts, max_new_tokens=n, ignore_eos=True)]
        for g, w in zip(got, want):
            k = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
            assert g == w, (len(g), len(w), k, killed_at, g[k - 2:k + 3] if k else None, w[k - 2:k + 3] if k else None)
    finally:
        srv.stop()
    deadline = time.monotonic() + 10   # a worker leaves within 0.2 s of seeing its server gone
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "a worker outlived its server"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has exited
    except OSError:
        return False
