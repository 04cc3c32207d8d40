"""Completions in the shape of OpenAI's API, for serve.py: a request's parameters checked into
one `Completion`, its prompts built (chat messages through the model's own template, or text
and token ids), its generation run through generate.py, and the logprobs lm-evaluation-harness
reads. A bad parameter is an `ApiError`: the status, what to fix, the parameter and a code.

Streamed text is decoded a token at a time and never splits a character; text that could still
begin a stop string is held back until it cannot, so no part of a stop string is ever sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tokenizers.decoders import DecodeStream

from chat import ROLES, render
from checkpoints import TrainedModel
from generate import generate
from runtime import autocast_context
from utils import MAX_SEED, UserError

NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}  # only these values
REFUSED = ("tools", "tool_choice", "functions", "function_call", "response_format")
MAX_STOPS = 16
MAX_LOGPROBS = 20


@dataclass
class ApiError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with `status`."""
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                503: "server_busy"}.get(self.status, "invalid_request_error")


@dataclass
class Completion:
    """One request: its prompts (one choice each) and sampling settings, then per choice what
    generation made: `sampled` ids (the ending token included), `text`, `finish_reason`."""
    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt: what was asked, or the rest of the window
    end_id: int  # the token that ends a reply: end of turn (chat) or of text
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    sampled: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    choice_logprobs: list[dict] = field(default_factory=list)  # when `logprobs` is asked


def _number(body: dict, name: str, default: float | None, low: float, high: float,
            integer: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high \
            or not math.isfinite(value):
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {what} in [{low}, {high}], got {value!r}", name,
                       "invalid_value")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOPS
            and all(isinstance(text, str) and text for text in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} "
                       f"of them, got {stop!r}", "stop", "invalid_value")
    return stops


def _check_supported(body: dict) -> None:
    for name in REFUSED:
        if body.get(name) not in (None, [], {}):
            raise ApiError(400, f"{name} is not supported by this server — leave it out", name,
                           "unsupported_parameter")
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise ApiError(400, f"{name} is not supported; only {neutral!r} (no effect) is "
                           f"accepted, got {body[name]!r}", name, "unsupported_parameter")
    if _number(body, "n", 1, 1, 1 << 30, integer=True) != 1:
        raise ApiError(400, "n must be 1: this server makes one choice per prompt — send the "
                       "request again for another sample", "n", "unsupported_value")


def _fitted(trained: TrainedModel, prompt: list[int], max_tokens: int | None,
            param: str) -> int:
    """The completion's length for `prompt`: what was asked, or the rest of the window; the
    prompt and all completion tokens but the last must fit the window the model was trained
    on, so a prompt of a whole window may still ask for one token."""
    window = trained.context_length
    room = window + 1 - len(prompt)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = "" if max_tokens is None else f" and {max_tokens} for the completion"
        raise ApiError(400, f"this model's context length is {window} tokens; the prompt has "
                       f"{len(prompt)}{asked} — shorten the prompt or ask for at most "
                       f"{max(room, 0)} tokens", param, "context_length_exceeded")
    return room if max_tokens is None else max_tokens


def _settings(body: dict) -> dict:
    """The sampling settings both endpoints share."""
    _check_supported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream",
                       "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
    return {"temperature": _number(body, "temperature", 1.0, 0, 2),
            "top_p": _number(body, "top_p", 1.0, 0, 1), "seed": _number(
                body, "seed", None, 0, MAX_SEED, integer=True),
            "top_k": _number(body, "top_k", 0, 0, 1 << 24, integer=True), "stop": _stops(body),
            "stream": stream, "include_usage": stream and bool(options.get("include_usage"))}


def _max_tokens(body: dict) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else (
        "max_tokens")
    return _number(body, name, None, 1, 1 << 24, integer=True)


def _message_text(content: object, number: int) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str)
                                         for part in content):
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, f"message {number}'s content must be a string or a list of text "
                       "parts", "messages", "invalid_type")
    return content


def chat_completion(body: dict, trained: TrainedModel) -> Completion:
    """A /v1/chat/completions request: `messages` rendered through the model's chat template
    with the generation prompt, as `infer.py --chat` renders them."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects",
                       "messages", "invalid_value")
    conversation = []
    for number, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise ApiError(400, f"message {number} has role {role!r}; use one of "
                           f"{', '.join(ROLES)}", "messages", "invalid_value")
        conversation.append({"role": role, "content": _message_text(message.get("content"),
                                                                    number)})
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are served by /v1/completions only", "logprobs",
                       "unsupported_parameter")
    try:
        prompt = trained.tokenizer.encode(render(trained.tokenizer.chat, conversation, True))
    except UserError as err:
        raise ApiError(400, str(err), "messages", "invalid_value") from None
    return Completion([prompt], [_fitted(trained, prompt, _max_tokens(body), "messages")],
                      trained.tokenizer.token_id(trained.tokenizer.chat.end_of_turn),
                      **_settings(body))


def _prompts(prompt: object, trained: TrainedModel) -> list[list[int]]:
    """`prompt` as token ids: a string, a list of strings, a list of ids, or a list of such."""
    def ids(one: object) -> list[int]:
        if isinstance(one, str):
            return trained.tokenizer.encode(one)
        vocab = trained.model.config.vocab_size
        if isinstance(one, list) and one and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in one):
            return one
        raise ApiError(400, "prompt must be a string, a list of strings, a non-empty list of "
                       f"token ids in [0, {vocab}), or a list of such lists", "prompt",
                       "invalid_value")

    if isinstance(prompt, list) and prompt and all(isinstance(one, (str, list))
                                                   for one in prompt):
        return [ids(one) for one in prompt]
    return [ids(prompt)]


def text_completion(body: dict, trained: TrainedModel) -> Completion:
    """A /v1/completions request; an empty prompt is the end-of-text token, as in infer.py."""
    end_id = trained.tokenizer.end_of_text_id
    prompts = [prompt or [end_id] for prompt in _prompts(body.get("prompt", ""), trained)]
    settings = _settings(body)
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, f"echo must be true or false, got {echo!r}", "echo", "invalid_type")
    if logprobs is not None and settings["stream"]:
        raise ApiError(400, "logprobs are returned by non-streaming requests only", "logprobs",
                       "unsupported_parameter")
    max_tokens = _max_tokens(body)
    return Completion(prompts, [_fitted(trained, prompt, max_tokens, "prompt")
                                for prompt in prompts], end_id, echo=echo, logprobs=logprobs,
                      **settings)


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string."""
    return max((size for stop in stops for size in range(1, len(stop))
                if text.endswith(stop[:size])), default=0)


def generate_choice(trained: TrainedModel, completion: Completion, index: int,
                    generator: torch.Generator, cancelled: Callable[[], bool]) -> Iterator[str]:
    """Generate choice `index`, yielding its text as it may be sent, and record its sampled ids,
    text and finish reason ("stop": the ending token or a stop string; "length": max_tokens;
    "cancelled": `cancelled()` became true)."""
    tokenizer, stops = trained.tokenizer, completion.stop
    pieces, ids, text, sent = DecodeStream(skip_special_tokens=False), [], "", 0
    reason, cut = "length", None
    prompt = torch.tensor([completion.prompts[index]], device=trained.device)
    with autocast_context(trained.device, trained.precision):
        for token in generate(trained.model, prompt, completion.max_tokens[index],
                              trained.context_length, completion.temperature, completion.top_k,
                              completion.top_p, completion.end_id, generator=generator):
            ids.append(int(token))
            if ids[-1] == completion.end_id:
                reason = "stop"
                break
            text += pieces.step(tokenizer.hf, ids[-1]) or ""
            found = [text.find(stop, sent) for stop in stops]  # no sent text begins one
            if any(at >= 0 for at in found):
                reason, cut = "stop", min(at for at in found if at >= 0)
                break
            ready = len(text) - _held_back(text, stops)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
            if cancelled():
                reason = "cancelled"
                break
    if cut is None:  # what is left: held-back text, and bytes that never formed a character
        text = tokenizer.decode(ids[:-1] if reason == "stop" else ids)
        cut = min([len(text), *(at for stop in stops if (at := text.find(stop, sent)) >= 0)])
    if cut > sent:
        yield text[sent:cut]
    completion.sampled.append(ids)
    completion.texts.append(text[:cut])
    completion.finish_reasons.append(reason)


@torch.inference_mode()
def logprobs(trained: TrainedModel, completion: Completion, index: int) -> dict:
    """OpenAI's logprobs of choice `index`: per token (the prompt's too with echo; the first
    prompt token has none), its text, its logprob, the top `completion.logprobs` alternatives
    and its character offset in the choice's text."""
    prompt, sampled = completion.prompts[index], completion.sampled[index]
    sequence = prompt + sampled
    with autocast_context(trained.device, trained.precision):
        logits = trained.model(torch.tensor([sequence[:-1]], device=trained.device))[0][0]
    log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
    first = 0 if completion.echo else len(prompt)
    pieces, offset, result = DecodeStream(skip_special_tokens=False), 0, {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for position, token in enumerate(sequence):
        if position >= first:
            row = log_probs[position - 1] if position else None
            top = row.topk(completion.logprobs) if row is not None else None
            result["tokens"].append(trained.tokenizer.decode([token]))
            result["token_logprobs"].append(None if row is None else row[token].item())
            result["top_logprobs"].append(None if top is None else {
                trained.tokenizer.decode([int(i)]): value.item()
                for value, i in zip(top.values, top.indices)})
            result["text_offset"].append(offset)
        offset += len(pieces.step(trained.tokenizer.hf, token) or "") if position >= first else 0
    return result
