"""protocol.py without a server: request validation and chat templates."""
import json

import pytest

import protocol
from protocol import APIError, ChatTemplate, CompletionRequest

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
            "{{ raise_exception('no tools here') }}{% endif %}"
            "<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def write_config(d, **cfg):
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def test_template_from_tokenizer_config(tmp_path):
    t = ChatTemplate.load(write_config(tmp_path, chat_template=TEMPLATE, bos_token="<s>",
                                       eos_token={"content": "</s>", "lstrip": False}))
    text = t.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<s><user>hi</s>\n<assistant>"
    assert not t.render([{"role": "user", "content": "hi"}], add_generation_prompt=False).endswith("<assistant>")


def test_jinja_file_wins_and_named_templates(tmp_path):
    write_config(tmp_path, chat_template=[{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}])
    assert ChatTemplate.load(str(tmp_path)).render([]) == "A"
    (tmp_path / "chat_template.jinja").write_text("C")
    assert ChatTemplate.load(str(tmp_path)).render([]) == "C"


def test_no_template_is_none(tmp_path):
    assert ChatTemplate.load(write_config(tmp_path, bos_token="<s>")) is None
    assert ChatTemplate.load("random") is None


def test_raise_exception_is_a_400(tmp_path):
    t = ChatTemplate.load(write_config(tmp_path, chat_template=TEMPLATE))
    with pytest.raises(APIError, match="no tools here") as e:
        t.render([{"role": "tool", "content": "x"}])
    assert e.value.status == 400


@pytest.mark.parametrize("src", ["{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"])
def test_template_is_sandboxed(src):
    """A template is code from a download: no Python internals, no mutating its inputs."""
    with pytest.raises(APIError, match="refused"):
        ChatTemplate(src, {}).render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("body,prompts", [
    ('{"prompt": "a"}', ["a"]), ('{"prompt": [1, 2]}', [[1, 2]]),
    ('{"prompt": ["a", "b"]}', ["a", "b"]), ('{"prompt": [[1], [2, 3]]}', [[1], [2, 3]]), ('{"prompt": []}', [[]]),
])
def test_prompt_shapes(body, prompts):
    assert CompletionRequest.model_validate_json(body).prompts() == prompts


def test_strict_types():
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json('{"prompt": "a", "seed": "1"}')
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json('{"prompt": [1, "2"]}')
    assert CompletionRequest.model_validate_json('{"prompt": "a", "temperature": 1}').temperature == 1.0


def test_chunks_carry_null_usage_until_the_last():
    b = protocol.ResponseBuilder("m", chat=True, include_usage=True)
    first, last = b.chunk(0, "", first=True), b.usage_chunk(3, 4)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 7 and last["id"] == first["id"]
