"""chat.py: templates rendered and tokenized as transformers' apply_chat_template does, and the
assistant's tokens of a conversation."""

from collections.abc import Mapping
from pathlib import Path

import pytest

from bpe import load_tokenizer
from chat import (
    DEFAULT_TEMPLATE,
    EOT,
    ChatFormat,
    assistant_spans,
    chat_format,
    chat_prompt,
    render,
    trained_mask,
)
from conftest import (
    CHATML_TEMPLATE,
    CONVERSATIONS,
    LLAMA3_TEMPLATE,
    TOKENIZER,
    chat_tokenizer_dir,
)
from utils import UserError

transformers = pytest.importorskip("transformers")

# Written to depend on trim_blocks and lstrip_blocks (the indented block tags and the newlines
# after them must vanish), loop controls, tojson, raise_exception and strftime_now.
CONTROL_TEMPLATE = """\
{%- if strftime_now('%Y') | length != 4 %}{{ raise_exception('no clock') }}{% endif %}
{% if messages[0]['role'] == 'system' %}
    {% set turns = messages[1:] %}
<<SYS>> {{ messages[0]['content'] | tojson }}
{% else %}
    {% set turns = messages %}
{% endif %}
{% for message in turns %}
    {% if message['role'] == 'system' %}
        {{ raise_exception('a system turn must come first') }}
    {% endif %}
    {% if message['content'] == 'skip me' %}{% continue %}{% endif %}
    {% if message['role'] == 'user' %}
[{{ loop.index }}] USER: {{ message['content'] | tojson(indent=None) }}
    {% else %}
ASSISTANT:
{{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT:
{% endif %}
"""
TEMPLATES = {
    "SmolLM2 ChatML": (CHATML_TEMPLATE, {"eos_token": "<|im_end|>"}),
    "Llama-3 style": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>",
                                        "eos_token": "<|eot_id|>"}),
    "whitespace control": (CONTROL_TEMPLATE, {"eos_token": "<|im_end|>"}),
    "SLM default": (DEFAULT_TEMPLATE, {"eos_token": EOT}),
}


def hf_ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True)'s ids: a list (transformers 4) or BatchEncoding (5)."""
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


@pytest.fixture(params=list(TEMPLATES), scope="module")
def template_dir(request, tmp_path_factory) -> tuple[Path, object]:
    template, special = TEMPLATES[request.param]
    directory = chat_tokenizer_dir(tmp_path_factory.mktemp("tok"), template, special)
    return directory, transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_text_and_ids_equal_transformers_apply_chat_template(
    template_dir, conversation, generation_prompt
):
    directory, hf = template_dir
    messages = CONVERSATIONS[conversation]
    if generation_prompt:  # asking for the reply to the last user turn
        messages = messages[:-1]
    chat = chat_format(str(directory / "tokenizer.json"))
    tokenizer = load_tokenizer(str(directory / "tokenizer.json"))
    text = render(chat, messages, generation_prompt)
    assert text == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert tokenizer.encode(text) == hf_ids(
        hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    )


def reference_mask(hf, messages: list[dict]) -> list[bool]:
    """Each assistant turn's tokens, from transformers' rendering turn by turn: after the tokens
    of the conversation so far with the generation prompt, through the turn's eos token."""
    whole = hf_ids(hf.apply_chat_template(messages, tokenize=True))
    mask = [False] * len(whole)
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            before = hf_ids(hf.apply_chat_template(
                messages[:index], tokenize=True, add_generation_prompt=True))
            through = hf_ids(hf.apply_chat_template(messages[: index + 1], tokenize=True))
            assert whole[: len(before)] == before and whole[: len(through)] == through
            end = max(i for i, token in enumerate(through) if token == hf.eos_token_id) + 1
            mask[len(before):end] = [True] * (end - len(before))
    return mask


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_the_trained_tokens_are_each_assistant_turn_through_its_end_of_turn(
    template_dir, conversation
):
    directory, hf = template_dir
    messages = CONVERSATIONS[conversation]
    chat = chat_format(str(directory / "tokenizer.json"))
    tokenizer = load_tokenizer(str(directory / "tokenizer.json"))
    text, spans = assistant_spans(chat, messages)
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)  # with offsets
    mask = trained_mask(encoding.offsets, spans)
    assert mask == reference_mask(hf, messages)
    assert encoding.ids[max(i for i, m in enumerate(mask) if m)] == hf.eos_token_id


def test_the_template_comes_from_its_file_its_config_or_the_default_named_one(tmp_path):
    from_config = chat_tokenizer_dir(tmp_path / "config", CHATML_TEMPLATE,
                                     {"eos_token": "<|im_end|>"})
    from_file = chat_tokenizer_dir(tmp_path / "file", "ignored", {"eos_token": "<|im_end|>"})
    (from_file / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    named = chat_tokenizer_dir(tmp_path / "named", [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": CHATML_TEMPLATE}], {"eos_token": "<|im_end|>"})
    assert chat_format(str(from_config / "tokenizer.json")).template == CHATML_TEMPLATE
    assert chat_format(str(from_file / "tokenizer.json")).template == LLAMA3_TEMPLATE
    assert chat_format(str(named / "tokenizer.json")).template == CHATML_TEMPLATE
    slm = chat_format(TOKENIZER)
    assert slm.template == DEFAULT_TEMPLATE and slm.end_of_turn == EOT


def test_slm_default_template_uses_only_tokens_the_tokenizer_has():
    tokenizer = load_tokenizer(TOKENIZER)
    chat = chat_format(TOKENIZER)
    ids = tokenizer.encode(render(chat, CONVERSATIONS["multi-turn with system"]))
    assert max(ids) < 4096 and ids.count(tokenizer.token_id(EOT)) == 7  # one per turn


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line():
    chat = ChatFormat("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                      "{{ eos_token }}{% endfor %}", {"eos_token": EOT})
    with pytest.raises(UserError, match="only appends each turn"):
        assistant_spans(chat, CONVERSATIONS["one turn"])


def test_raise_exception_in_a_template_is_one_error_naming_its_message():
    chat = ChatFormat(CONTROL_TEMPLATE, {"eos_token": EOT})
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(UserError, match="a system turn must come first"):
        render(chat, messages)


def test_the_history_drops_its_oldest_pairs_to_fit_half_the_window_never_the_system_turn():
    tokenizer, chat = load_tokenizer(TOKENIZER), chat_format(TOKENIZER)
    history = []
    for turn in range(6):
        history += [{"role": "user", "content": f"question {turn} " * 3},
                    {"role": "assistant", "content": f"answer {turn} " * 3}]
    history.append({"role": "user", "content": "last question"})
    whole = render(chat, [{"role": "system", "content": "Be brief."}, *history], True)
    window = len(tokenizer.encode(whole))
    ids, dropped = chat_prompt(chat, tokenizer.encode, "Be brief.", history, window)
    kept = [{"role": "system", "content": "Be brief."}, *history[2 * dropped:]]
    assert dropped > 0 and ids == tokenizer.encode(render(chat, kept, True))
    assert len(ids) <= window // 2 < len(tokenizer.encode(render(
        chat, [kept[0], *history[2 * dropped - 2:]], True)))
