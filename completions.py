"""Completions in the shape of OpenAI's API, for serve.py: a request's parameters checked into
one `Completion`, its prompts built (chat messages through the model's own template, or text
and token ids), each prompt a `Choice` the engine steps (engine.py), and the logprobs
lm-evaluation-harness reads. A bad parameter is an `ApiError`: the status, what to fix, the
parameter and a code.

A choice's text is decoded a token at a time and never splits a character; text that could
still begin a stop string is held back until it cannot, so no part of a stop string is ever
sent. Stop strings are matched as the text grows, in time linear in the text and the stops'
length (a Knuth-Morris-Pratt automaton per stop).
"""
from __future__ import annotations

import dataclasses
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from tokenizers.decoders import DecodeStream

from bpe import BPETokenizer
from chat import ROLES, render
from checkpoints import TrainedModel
from engine import Request
from generate import Sampling
from runtime import autocast_context
from utils import MAX_SEED, UserError

NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}  # only these values
REFUSED = ("tools", "tool_choice", "functions", "function_call", "response_format")
MAX_STOPS = 16
MAX_STOP_CHARS = 256     # per stop string: matching costs the stops' total length per character
MAX_PROMPTS = 64         # prompts in one /v1/completions request: each is a row of the engine
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
        return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error",
                503: "server_busy"}.get(self.status, "invalid_request_error")


class StopMatcher:
    """Finds the first stop string in a text fed as it grows, and says how many characters at
    its end could still begin one: per stop, the length of the longest prefix of it that the
    text ends with, advanced a character at a time through the stop's failure table."""

    def __init__(self, stops: list[str]):
        self.stops, self.matched = stops, [0] * len(stops)
        self.failure = []
        for stop in stops:  # failure[i]: the longest proper prefix of stop[:i+1] it ends with
            table, length = [0] * len(stop), 0
            for i in range(1, len(stop)):
                while length and stop[i] != stop[length]:
                    length = table[length - 1]
                length += stop[i] == stop[length]
                table[i] = length
            self.failure.append(table)

    def feed(self, text: str, start: int) -> int:
        """Take text[start:] (text[:start] was fed before); -> where the first stop string to
        complete in it begins (of two completing at one character, the longer), or -1."""
        for position in range(start, len(text)):
            char, found = text[position], -1
            for i, stop in enumerate(self.stops):
                length = self.matched[i]
                while length and stop[length] != char:
                    length = self.failure[i][length - 1]
                length += stop[length] == char
                if length == len(stop):  # of two ending here, the one that began first
                    at = position + 1 - length
                    found = at if found < 0 else min(found, at)
                    length = self.failure[i][length - 1]
                self.matched[i] = length
            if found >= 0:
                return found
        return -1

    @property
    def held_back(self) -> int:
        return max(self.matched, default=0)


@dataclass(eq=False)
class Choice(Request):
    """One prompt of a request as the engine steps it (engine.Request: its tokens, settings and
    how it finished), and its text as it grows: what may be sent is text[:sendable]."""
    index: int = 0
    stops: StopMatcher = field(default_factory=lambda: StopMatcher([]))
    pieces: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=False))
    text: str = ""
    sendable: int = 0
    final: bool = False  # finished, its text complete


@dataclass(eq=False)
class Completion:
    """One request: its choices (one per prompt) and what to send back. The engine updates the
    choices on its thread and calls `notify`; the HTTP side reads them under `lock`."""
    choices: list[Choice]
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    notify: Callable[[], None] = lambda: None  # on the engine's thread, after each update
    on_finished: Callable[[Completion], None] = lambda completion: None  # once, when all are

    def attach(self, tokenizer: BPETokenizer) -> None:
        """Make each choice's text as the engine steps it."""
        for choice in self.choices:
            choice.on_update = lambda choice: self._update(choice, tokenizer)

    def _update(self, choice: Choice, tokenizer: BPETokenizer) -> None:
        with self.lock:
            if choice.final:  # a stop string ended it; this is the engine retiring it
                return
            if choice.finish_reason is None:  # a new token
                if choice.tokens[-1] != choice.end_id:
                    self._grow(choice, tokenizer)
            else:  # ended by its end token, length, cancel or shutdown
                # the text held back, and bytes that never formed a character (U+FFFD)
                ids = choice.tokens[:-1] if choice.tokens[-1:] == [choice.end_id] else (
                    choice.tokens)
                text = tokenizer.decode(ids)
                found = [at for stop in choice.stops.stops
                         if (at := text.find(stop, choice.sendable)) >= 0]
                choice.text = text[:min(found)] if found else text
                choice.sendable = len(choice.text)
            choice.final = choice.finish_reason is not None
            finished = choice.final and all(other.final for other in self.choices)
        self.notify()
        if finished:
            self.on_finished(self)

    @staticmethod
    def _grow(choice: Choice, tokenizer: BPETokenizer) -> None:
        """The choice's last token decoded onto its text; a stop string in it ends the choice."""
        start = len(choice.text)
        choice.text += choice.pieces.step(tokenizer.hf, choice.tokens[-1]) or ""
        stop_at = choice.stops.feed(choice.text, start)
        if stop_at >= 0:
            choice.text, choice.sendable = choice.text[:stop_at], stop_at
            choice.finish_reason = "stop"  # the engine retires it
        else:
            choice.sendable = len(choice.text) - choice.stops.held_back



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
            and all(isinstance(text, str) and 0 < len(text) <= MAX_STOP_CHARS
                    for text in stops)):
        raise ApiError(400, f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a "
                       f"list of at most {MAX_STOPS} of them, got {str(stop)[:100]!r}", "stop",
                       "invalid_value")
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


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", name, "invalid_type")
    return value


def _completion(body: dict, trained: TrainedModel, prompts: list[list[int]], param: str,
                end_id: int, **fields: object) -> Completion:
    """The request's choices, one per prompt, with the sampling settings both endpoints share;
    choice i samples from seed + i."""
    _check_supported(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
    sampling = Sampling(**{name: default if body.get(name) is None else body[name]
                           for name, default in (("temperature", 1.0), ("top_k", 0),
                                                 ("top_p", 1.0))})
    setting, problem = sampling.problem()
    if setting:
        raise ApiError(400, f"{setting} {problem}", setting, "invalid_value")
    seed = _number(body, "seed", None, 0, MAX_SEED, integer=True)
    seed = secrets.randbelow(MAX_SEED) if seed is None else seed
    settings = dataclasses.asdict(sampling)
    stops, max_tokens = _stops(body), _max_tokens(body)
    end_id = None if _flag(body, "ignore_eos") else end_id
    choices = [Choice(prompt, _fitted(trained, prompt, max_tokens, param), end_id,
                      seed=(seed + index) % MAX_SEED, index=index, stops=StopMatcher(stops),
                      **settings)
               for index, prompt in enumerate(prompts)]
    completion = Completion(choices, stream=stream,
                            include_usage=stream and bool(options.get("include_usage")),
                            **fields)
    completion.attach(trained.tokenizer)
    return completion


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
    if body.get("echo"):
        raise ApiError(400, "echo is served by /v1/completions only", "echo",
                       "unsupported_parameter")
    try:
        prompt = trained.tokenizer.encode(render(trained.tokenizer.chat, conversation, True))
    except UserError as err:
        raise ApiError(400, str(err), "messages", "invalid_value") from None
    tokenizer = trained.tokenizer
    return _completion(body, trained, [prompt], "messages",
                       tokenizer.token_id(tokenizer.chat.end_of_turn))


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
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"prompt holds {len(prompt)} prompts; send at most "
                           f"{MAX_PROMPTS} in one request", "prompt", "invalid_value")
        return [ids(one) for one in prompt]
    return [ids(prompt)]


def text_completion(body: dict, trained: TrainedModel) -> Completion:
    """A /v1/completions request; an empty prompt is the end-of-text token, as in infer.py."""
    end_id = trained.tokenizer.end_of_text_id
    prompts = [prompt or [end_id] for prompt in _prompts(body.get("prompt", ""), trained)]
    logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    echo = _flag(body, "echo")
    for name, asked in (("logprobs", logprobs is not None), ("echo", echo)):
        if asked and _flag(body, "stream"):
            raise ApiError(400, f"{name} is returned by non-streaming requests only", name,
                           "unsupported_parameter")
    return _completion(body, trained, prompts, "prompt", end_id, echo=echo, logprobs=logprobs)


@torch.inference_mode()
def logprobs(trained: TrainedModel, completion: Completion, choice: Choice) -> dict:
    """OpenAI's logprobs of `choice`: per token (the prompt's too with echo; the first prompt
    token has none), its text, its logprob, the top `completion.logprobs` alternatives and its
    character offset in the choice's text. On the thread that owns the model."""
    prompt, sampled = choice.prompt, choice.tokens
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
