"""Conversations: their checks, the chat template that renders them as text, and which tokens
of a rendered conversation are the assistant's (the ones chat fine-tuning trains on).

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}.
The template is the tokenizer's own (`chat_template.jinja` beside it, or `chat_template` in its
`tokenizer_config.json`), rendered as transformers' `apply_chat_template` renders it; a tokenizer
without one (SLM's) gets DEFAULT_TEMPLATE. A turn ends with the tokenizer's eos_token.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from utils import UserError, require

EOT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")
# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
# Plain-text role markers and <|endoftext|> closing each turn: tokens every SLM tokenizer has.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- (message['role'] | upper) + ':\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:\\n' }}{%- endif %}")


@dataclass(frozen=True)
class ChatFormat:
    """How a model's conversations read as text; checkpoints and exports carry it."""
    template: str
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the tokenizer names them

    @property
    def end_of_turn(self) -> str:
        return self.special_tokens["eos_token"]


def tokenizer_settings(tokenizer_path: str) -> dict:
    """The tokenizer_config.json beside a tokenizer, or {} (SLM's own tokenizers have none)."""
    try:
        with open(os.path.join(os.path.dirname(tokenizer_path), "tokenizer_config.json"),
                  encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError):  # none there, or not JSON
        return {}
    return settings if isinstance(settings, dict) else {}


def special_tokens(tokenizer_path: str) -> dict[str, str]:
    """The named special tokens of a tokenizer's config ({} without one)."""
    settings, tokens = tokenizer_settings(tokenizer_path), {}
    for key in SPECIAL_TOKENS:
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token:
            tokens[key] = token
    return tokens


def chat_format(tokenizer_path: str) -> ChatFormat:
    """The chat format of the tokenizer at `tokenizer_path`: its directory's template and
    special tokens; SLM's tokenizers: DEFAULT_TEMPLATE, and <|endoftext|> for each token."""
    tokens = special_tokens(tokenizer_path)
    template_file = os.path.join(os.path.dirname(tokenizer_path), "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            template = f.read()
    else:
        template = tokenizer_settings(tokenizer_path).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template
                 if isinstance(entry, dict)}
        template = named.get("default")
        require(isinstance(template, str), f"the tokenizer config beside {tokenizer_path} names "
                f"chat templates {sorted(map(str, named))} but none 'default' — name one so")
    if not tokens:
        tokens = dict.fromkeys(("bos_token", "eos_token", "unk_token", "pad_token"), EOT)
    tokens.setdefault("eos_token", EOT)
    return ChatFormat(template if isinstance(template, str) else DEFAULT_TEMPLATE, tokens)


def stored_chat_format(stored: object, own: ChatFormat) -> ChatFormat:
    """A checkpoint's "chat" entry as a ChatFormat; `own` (the tokenizer's) when it records
    none."""
    if isinstance(stored, dict) and isinstance(stored.get("template"), str):
        return ChatFormat(stored["template"], dict(stored.get("special_tokens") or {}))
    return own


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in."""
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise UserError(f"the chat template does not parse (line {err.lineno}: {err.message}) "
                        "— fix chat_template.jinja or tokenizer_config.json") from None


def render(chat: ChatFormat, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, as transformers' apply_chat_template(tokenize=False) writes it;
    with `add_generation_prompt`, followed by what opens the assistant's next turn."""
    try:
        return _compiled(chat.template).render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **chat.special_tokens)
    except jinja2.exceptions.TemplateError as err:
        raise UserError(f"the chat template refused the conversation ({err}) — fix the "
                        "conversation or the template") from None


def conversation_problem(record: object) -> str:
    """What makes a JSONL record not a conversation, or "" when it is one."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        return "'messages' is not a non-empty list"
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            return f"message {number} has role {role!r}, not one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {number}'s content is not a string"
    if not any(message["role"] == "assistant" for message in messages):
        return "it has no assistant turn to train on"
    return ""


def assistant_spans(chat: ChatFormat, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the characters trained on: from just
    after its generation prompt through its end-of-turn token. A template whose rendering of the
    first k messages does not begin the whole is refused: its turns could not be found."""
    whole, spans = render(chat, messages), []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(chat, messages[:index], add_generation_prompt=True)
        through = render(chat, messages[:index + 1])
        require(whole.startswith(through) and through.startswith(prompt), f"the chat template "
                f"does not render the first {index + 1} messages of a conversation as the start "
                "of the whole, so its assistant turns cannot be told apart — use a template "
                "that only appends each turn")
        end = through.rfind(chat.end_of_turn)
        require(end >= len(prompt), f"the chat template does not end an assistant turn with the "
                f"tokenizer's eos_token {chat.end_of_turn}, so generation could not stop — end "
                "each assistant turn with eos_token")
        spans.append((len(prompt), end + len(chat.end_of_turn)))
    return whole, spans


def trained_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (its character offsets): does it overlap an assistant span."""
    return [any(start < span_end and end > span_start for span_start, span_end in spans)
            for start, end in offsets]


def chat_prompt(chat: ChatFormat, encode: Callable[[str], list[int]], system: str,
                history: list[dict], window: int) -> tuple[list[int], int]:
    """The ids that ask for the next reply to `history` (user and assistant turns, ending with a
    user turn) under the system turn, if any, and how many oldest user+assistant pairs were
    dropped so that the prompt takes at most half the window, leaving the reply the rest."""
    head = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        ids = encode(render(chat, head + history[2 * dropped:], True))
        if len(ids) <= window // 2 or 2 * dropped + 1 >= len(history):
            return ids, dropped
        dropped += 1
