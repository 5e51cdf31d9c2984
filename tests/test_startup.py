"""Starting up as a new user does: a plain script, workers that cannot start, bad input on the
command line. Each runs a real subprocess, as a user's shell would."""
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import fastdecode

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[2, 17, 45, 99, 3], [2, 80], [2, 5, 6, 7, 8, 9]]


def run_py(args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or HERE, env={**os.environ, "PYTHONPATH": HERE})


def test_plain_script_without_main_guard_runs_two_local_workers(checkpoint, tmp_path):
    """No `if __name__ == "__main__":`: a worker start that re-imported the main module would
    run LLM(...) again in every worker (and hang or fork without end)."""
    d, _ = checkpoint("llama-gqa")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        from fastdecode import LLM
        llm = LLM({d!r}, workers=2, quiet=True)
        outs = llm.generate({PROMPTS!r}, max_new_tokens=12, ignore_eos=True)
        print("TOKENS", [o.token_ids for o in outs])
        print("WORKERS", len(llm.backend.alive))
        llm.close()
    """))
    t = time.time()
    out = run_py([str(script)], timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.time() - t < 60
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("TOKENS", "WORKERS")))
    assert lines["WORKERS"] == "2"
    with fastdecode.LLM(d, workers=0, quiet=True) as ref:
        want = [o.token_ids for o in ref.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)]
    assert lines["TOKENS"] == repr(want)


def test_worker_that_cannot_start_fails_fast_with_its_own_error(checkpoint):
    """A budget larger than this machine's memory passes the engine's own checks (it is a
    valid size) but the worker refuses it: LLM(...) must fail in seconds and say why."""
    d, _ = checkpoint("opt-preln")
    t = time.time()
    with pytest.raises(fastdecode.backend.WorkerStartError, match="exceeds this machine's memory"):
        fastdecode.LLM(d, workers=1, kv_mem="100TiB", quiet=True)
    assert time.time() - t < 10


def test_kernel_is_built_on_a_thread_beside_the_weights(tmp_path, monkeypatch):
    """`make run` leaves attn_cpu.so to the engine, which builds it on a thread while the S-Part
    loads: the thread runs `make` for a missing library and leaves it loaded; a failed build is
    not raised there (start_local_workers raises it with its message)."""
    import backend
    import rpart
    calls = []
    monkeypatch.setattr(rpart, "_lib", None)
    monkeypatch.setattr(rpart, "LIB_PATH", str(tmp_path / "attn_cpu.so"))    # missing: must be built
    monkeypatch.setattr(rpart, "_build", lambda: calls.append("make") or (_ for _ in ()).throw(RuntimeError("no cc")))
    t = backend.build_kernel_in_background()
    t.join(30)
    assert not t.is_alive() and calls == ["make"] and rpart._lib is None   # tried, failed quietly
    with pytest.raises(backend.WorkerStartError, match="no cc"):
        backend.start_local_workers(1)
    real = os.path.join(HERE, "attn_cpu.so")
    monkeypatch.setattr(rpart, "_build", lambda: calls.append("make") or shutil.copy(real, rpart.LIB_PATH))
    t = backend.build_kernel_in_background()
    t.join(30)
    assert calls == ["make", "make", "make"] and rpart._lib is not None and rpart.kernel_info()["simd"]


def test_worker_port_in_use_is_a_one_line_error():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_py(["rpart.py", "--listen", f"127.0.0.1:{port}"], timeout=60)
    assert out.returncode == 2, out
    assert out.stderr.startswith("error: cannot listen on") and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, says", [
    (["--model", "/no/such/dir"], "no such model directory"),
    (["--prompt", ""], "empty"),
    (["--prompt-ids", "1,99999999"], "outside the vocabulary"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "2,3", "--max-new-tokens", "100", "--kv-mem", "10KB"], "fit on no worker"),
    (["--prompt-ids", "2,3", "--kv-mem", "banana"], "expected a positive size"),
])
def test_cli_bad_input_is_one_error_line_and_exit_2(checkpoint, args, says):
    d, _ = checkpoint("opt-preln")
    if "--model" not in args:
        args = ["--model", d, "--workers", "0", *args]
    out = run_py(["fastdecode.py", *args])
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_perfmodel_bad_input_is_one_error_line():
    out = run_py(["perfmodel.py", "predict", "--model", "no-such-model"], timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_step_stats_start_fresh_for_each_generate(checkpoint):
    d, _ = checkpoint("opt-preln")
    with fastdecode.LLM(d, workers=0, quiet=True) as llm:
        llm.generate(PROMPTS, max_new_tokens=5, ignore_eos=True)
        first = llm.stats.decode_tokens + llm.stats.prefill_tokens
        llm.generate(PROMPTS, max_new_tokens=5, ignore_eos=True)
        assert llm.stats.decode_tokens + llm.stats.prefill_tokens == first > 0
