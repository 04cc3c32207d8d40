"""serve.py as a client meets it: started as a process on a free 127.0.0.1 port, spoken to with
the official openai client, raw HTTP and lm-evaluation-harness."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import torch
from tokenizers import Tokenizer

import infer
from chat import render
from checkpoints import load_trained
from conftest import REPO, chat_llama, run_main
from test_scoring import decisive_export, parity_examples

openai = pytest.importorskip("openai")

MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(ckpt: Path, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """serve.py on `ckpt` at a free port, its stderr in `log`, until SIGTERM at the end."""
    port = free_port()
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "serve.py"), "--ckpt_path", str(ckpt), "--port",
             str(port), "--device", "cpu", "--model-name", "served",
             *([] if "--compile" in args else ["--no-compile"]), *args],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=ckpt.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a cold --compile warm-up on two busy cores
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve.py did not start"
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory) -> Iterator[dict]:
    """A random ChatML Llama directory with GQA (a 256-token window), served."""
    root = tmp_path_factory.mktemp("served")
    model, hf_tokenizer = chat_llama(root / "llama")
    with serving(root / "llama", root / "serve.log") as (url, _):
        yield {"url": url, "directory": root / "llama", "model": model,
               "hf_tokenizer": hf_tokenizer, "log": root / "serve.log",
               "client": openai.OpenAI(base_url=f"{url}/v1", api_key="unused")}


def transformers_reply(server: dict, messages: list[dict], max_tokens: int) -> str:
    tokenizer = server["hf_tokenizer"]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    out = server["model"].generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                   do_sample=False)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    raw = Tokenizer.from_file(str(server["directory"] / "tokenizer.json"))
    return raw.decode(out, skip_special_tokens=False)


def streamed(server: dict, **request) -> tuple[str, list[dict]]:
    """The text of a streamed chat completion and its chunks."""
    chunks = list(server["client"].chat.completions.create(model="served", stream=True,
                                                           **request))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return text, chunks


@pytest.mark.parametrize("system", ["", "Speak in verse."])
def test_chat_at_temperature_zero_equals_transformers_and_infer_chat(chat_server, system,
                                                                     monkeypatch, capsys):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Who art thou, ünïcode 😀?"}]
    expected = transformers_reply(chat_server, messages, MAX_TOKENS)
    assert len(expected) > 3
    reply = chat_server["client"].chat.completions.create(
        model="served", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected
    assert reply.object == "chat.completion" and reply.model == "served"
    text, chunks = streamed(chat_server, messages=messages, temperature=0,
                            max_tokens=MAX_TOKENS)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    code, stdout, stderr = run_main(infer.main, [
        "--ckpt_path", str(chat_server["directory"]), "--chat", "--temperature", "0",
        "--max-length", str(MAX_TOKENS), "--prompt", messages[-1]["content"], "--system", system,
        "--device", "cpu"], chat_server["directory"], monkeypatch, capsys)
    assert code == 0, stderr
    assert stdout == expected + "\n"


def test_a_stop_string_or_max_tokens_end_the_reply_with_their_reason_and_usage(chat_server):
    messages = [{"role": "user", "content": "What news?"}]
    full = chat_server["client"].chat.completions.create(
        model="served", messages=messages, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    trained = load_trained(str(chat_server["directory"]), device_name="cpu")
    tokenizer = trained.tokenizer
    prompt_tokens = len(tokenizer.encode(render(tokenizer.chat, messages, True)))
    assert full.usage.prompt_tokens == prompt_tokens
    assert full.usage.total_tokens == prompt_tokens + full.usage.completion_tokens
    stop = text[6:9]
    for stream in (False, True):
        request = dict(messages=messages, temperature=0, max_tokens=24, stop=[stop, "\x00"])
        if stream:
            cut, chunks = streamed(chat_server, **request)
            reason = chunks[-1].choices[0].finish_reason
            assert all(stop[:2] not in (chunk.choices[0].delta.content or "")
                       for chunk in chunks[1:-1])  # no part of it was sent
        else:
            reply = chat_server["client"].chat.completions.create(model="served", **request)
            cut, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert (cut, reason) == (text[: text.find(stop)], "stop")
    short = chat_server["client"].chat.completions.create(
        model="served", messages=messages, temperature=0, max_tokens=4)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    _, chunks = streamed(chat_server, messages=messages, temperature=0, max_tokens=4,
                         stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


ERRORS = [  # (path, body, status, param, code)
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages",
     "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 2},
     400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400,
     "n", "unsupported_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400,
     "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "frequency_penalty": 0.5}, 400, "frequency_penalty",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 1000}, 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt"},
     404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": [""]},
     400, "stop", "invalid_value"),
    ("/v1/completions", {"prompt": [[1, 2, 999999]]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "stream": True}, 400, "logprobs",
     "unsupported_parameter"),
    ("/v1/nowhere", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path,body,status,param,code", ERRORS)
def test_each_bad_request_gets_its_status_and_names_the_parameter(chat_server, path, body,
                                                                  status, param, code):
    response = requests.post(chat_server["url"] + path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code) and error["message"]


def test_malformed_json_an_oversized_body_and_neutral_parameters(chat_server):
    response = requests.post(f"{chat_server['url']}/v1/chat/completions", data=b"{messages",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = requests.post(f"{chat_server['url']}/v1/completions",
                             json={"prompt": "x" * (5 << 20)})
    assert response.status_code == 413
    response = requests.post(f"{chat_server['url']}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "presence_penalty": 0,
        "frequency_penalty": 0, "logit_bias": {}, "user": "me"})
    assert response.status_code == 200
    assert "Traceback" not in chat_server["log"].read_text()


def test_completions_accept_a_whole_window_prompt_for_one_token_with_echoed_logprobs(
        chat_server):
    window = chat_server["client"].models.list().data[0].model_extra["context_length"]
    assert window == 256
    prompt = [(17 * i) % 4000 + 5 for i in range(window)]
    reply = requests.post(f"{chat_server['url']}/v1/completions", json={
        "model": "served", "prompt": [prompt], "max_tokens": 1, "echo": True, "logprobs": 2,
        "temperature": 0}).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == window + 1 and logprobs["token_logprobs"][0] is None
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    too_long = requests.post(f"{chat_server['url']}/v1/completions", json={
        "prompt": [prompt + [5]], "max_tokens": 1})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "257" in too_long.json()["error"]["message"]


def test_eight_concurrent_streams_all_complete(chat_server):
    results = {}

    def client(number: int) -> None:
        text, chunks = streamed(chat_server, messages=[{"role": "user", "content": " ".join(
            ["word"] * 24) + f" {number}"}], max_tokens=64, seed=number,
            stream_options={"include_usage": True})
        reason = [chunk for chunk in chunks if chunk.choices][-1].choices[0].finish_reason
        results[number] = (reason, chunks[-1].usage.completion_tokens, bool(text))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == list(range(8))
    assert all(reason == "length" and tokens == 64 or reason == "stop" and tokens < 64
               for reason, tokens, _ in results.values())
    assert all(has_text for *_, has_text in results.values())


def test_a_client_that_disconnects_mid_stream_is_cancelled(chat_server):
    before = requests.get(f"{chat_server['url']}/health").json()["cancelled_requests"]
    with requests.post(f"{chat_server['url']}/v1/chat/completions", stream=True, json={
            "messages": [{"role": "user", "content": "Tell me everything."}], "stream": True,
            "max_tokens": 200}) as response:
        assert next(response.iter_lines()).startswith(b"data: ")
    deadline = time.monotonic() + 60
    while requests.get(f"{chat_server['url']}/health").json()["cancelled_requests"] == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.1)
    assert "cancelled by its client" in chat_server["log"].read_text()


def test_the_page_is_served_and_uses_only_relative_urls(chat_server, tmp_path):
    response = requests.get(chat_server["url"] + "/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    page = response.text
    assert re.findall(r'fetch\("([^"]+)"', page) == ["v1/models", "v1/chat/completions"]
    assert not re.search(r"https?:|//[a-z]|\b(src|href)=", page)
    assert ".innerHTML" not in page  # the model's text is set as text
    if shutil.which("node"):  # the script at least parses
        script = tmp_path / "chat.js"
        script.write_text(re.search(r"<script>(.*)</script>", page, re.DOTALL).group(1))
        assert subprocess.run(["node", "--check", str(script)]).returncode == 0


def test_a_key_is_required_a_full_queue_answers_503_and_sigterm_ends_cleanly(tmp_path):
    model, _ = chat_llama(tmp_path / "llama")
    app = "https://app.example"
    # One row and a queue of one: of four requests at once, one runs, one waits, two get 503
    with serving(tmp_path / "llama", tmp_path / "serve.log", "--api-key", "sesame",
                 "--max-batch", "1", "--max-queue", "1", "--cors-origin", app) as (url, process):
        assert requests.get(f"{url}/v1/models").status_code == 401
        assert requests.get(f"{url}/v1/models", headers={
            "Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        assert requests.get(f"{url}/v1/models", headers={
            "Authorization": "bearer sesame"}).status_code == 200  # the scheme has no case
        assert requests.get(f"{url}/health").status_code == 200
        assert requests.get(f"{url}/").status_code == 200
        preflight = requests.options(f"{url}/v1/chat/completions", headers={"Origin": app})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == app
        refused = requests.get(f"{url}/v1/models", headers={"Origin": app})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == app
        allowed = requests.get(f"{url}/v1/models", headers={
            "Origin": app, "Authorization": "Bearer sesame"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == app
        host = url.removeprefix("http://")  # its own page behind a proxy that ends TLS
        assert requests.get(f"{url}/v1/models", headers={
            "Origin": f"https://{host}", "Authorization": "Bearer sesame"}).status_code == 200
        too_many = requests.post(f"{url}/v1/completions", json={"prompt": ["a", "b"]},
                                 headers={"Authorization": "Bearer sesame"})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert client.models.list().data[0].id == "served"
        statuses = []

        def request() -> None:
            response = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 200},
                headers={"Authorization": "Bearer sesame"})
            statuses.append((response.status_code, response.headers.get("retry-after")))

        threads = [threading.Thread(target=request) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert (503, "1") in statuses and (200, None) in statuses
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_a_port_in_use_is_one_error_line(chat_server):
    port = int(chat_server["url"].rsplit(":", 1)[1])
    result = subprocess.run([sys.executable, str(REPO / "serve.py"), "--ckpt_path",
                             str(chat_server["directory"]), "--port", str(port)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: could not listen on 127.0.0.1:{port}")


def test_lm_eval_local_completions_scores_the_served_model_as_eval_py(tmp_path, corpus,
                                                                       monkeypatch, capsys):
    """lm-eval's local-completions backend, with the server's tokenizer endpoints, scores a task
    whose examples fit the window exactly as eval.py scores the checkpoint."""
    import eval as eval_script

    model_dir = decisive_export(tmp_path)
    examples = [example for example in parity_examples(corpus.read_text(encoding="utf-8"), 48)
                if len(example["context"].split()) < 30][:30]
    task_file = tmp_path / "parity.jsonl"
    task_file.write_text("".join(json.dumps(example) + "\n" for example in examples))
    with serving(model_dir, tmp_path / "serve.log") as (url, _):
        result = subprocess.run(
            [sys.executable, str(REPO / "tests" / "lm_eval_reference.py"),
             f"{url}/v1/completions", str(task_file), "64", str(tmp_path / "lm_eval.json")],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads((tmp_path / "lm_eval.json").read_text())["examples"]
    code, out, err = run_main(eval_script.main, [
        "--ckpt_path", str(model_dir), "--tasks", str(task_file), "--json", "--device", "cpu"],
        tmp_path, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    scores = json.loads(out)["parity"]
    assert scores["n"] == len(served) == len(examples)
    for metric in ("acc", "acc_norm"):
        assert scores[metric] == sum(example[metric] for example in served) / len(served)


def post_raw(url: str, body: bytes, **headers: str) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": "application/json", **headers})


CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


def test_hostile_requests_get_a_4xx_in_openai_shape_and_the_server_stays_up(chat_server):
    url = chat_server["url"]
    chat = f"{url}/v1/chat/completions"
    cases = [  # (response, status, code, param)
        (requests.get(f"{url}/v1/models", headers={"Host": "evil.example:80"}), 403,
         "host_not_allowed", None),  # DNS rebinding: another site's name for 127.0.0.1
        (requests.post(chat, json=CHAT, headers={"Origin": "https://evil.example"}), 403,
         "origin_not_allowed", None),
        (requests.post(chat, data=json.dumps(CHAT), headers={"Content-Type": "text/plain"}),
         415, "unsupported_media_type", None),  # what a cross-site form sends
        (post_raw(chat, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'), 400,
         "invalid_value", "messages[0]['content']"),
        (post_raw(f"{url}/v1/completions", b'{"prompt": ["ok", "\\udfff"]}'), 400,
         "invalid_value", "prompt[1]"),
        (post_raw(f"{url}/tokenize", b'{"prompt": "\\ud83d"}'), 400, "invalid_value", "prompt"),
        (post_raw(chat, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, None, None),
        (post_raw(chat, b'{"a": ' + b"[" * 80 + b"]" * 80 + b"}"), 400, "invalid_value", None),
        (requests.get(chat), 405, "method_not_allowed", None),
        (requests.post(f"{url}/v1/completions", json={"prompt": "x", "echo": True,
                                                     "stream": True}), 400,
         "unsupported_parameter", "echo"),
        (requests.post(chat, json={**CHAT, "top_p": 0}), 400, "invalid_value", "top_p"),
        (requests.post(chat, json={**CHAT, "stop": ["x" * 257]}), 400, "invalid_value", "stop"),
        (requests.post(f"{url}/v1/completions", json={"prompt": ["x"] * 65}), 400,
         "invalid_value", "prompt"),
    ]
    for response, status, code, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and (code is None or error["code"] == code), error
        assert param is None or error["param"] == param, error
    own_page = requests.post(chat, json=CHAT, headers={"Origin": url})
    assert own_page.status_code == 200  # the chat page's own requests
    assert requests.get(f"{url}/health").status_code == 200
    assert "Traceback" not in chat_server["log"].read_text()


def test_metrics_count_requests_tokens_and_steps_in_prometheus_text(chat_server):
    before = requests.get(f"{chat_server['url']}/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    values = dict(line.split() for line in before.text.splitlines() if not line.startswith("#"))
    assert {"slm_requests_waiting", "slm_requests_running", "slm_tokens_generated_total",
            "slm_step_seconds", "slm_batch_size"} <= set(values)
    requests.post(f"{chat_server['url']}/v1/chat/completions",
                  json={**CHAT, "max_tokens": 5, "ignore_eos": True})
    after = dict(line.split() for line in requests.get(f"{chat_server['url']}/metrics").text
                 .splitlines() if not line.startswith("#"))
    assert float(after["slm_tokens_generated_total"]) >= float(
        values["slm_tokens_generated_total"]) + 5
    assert "x" not in requests.get(f"{chat_server['url']}/metrics").text.split("slm_")[0]


def test_ignore_eos_pins_the_reply_length(chat_server):
    reply = chat_server["client"].completions.create(
        model="served", prompt="x", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 40 and reply.choices[0].finish_reason == "length"


def test_a_client_that_leaves_a_non_streaming_request_stops_its_generation(chat_server):
    url = chat_server["url"]
    before = requests.get(f"{url}/health").json()["cancelled_requests"]
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and hangs up
        requests.post(f"{url}/v1/completions", timeout=0.5, json={
            "prompt": [[5] * 8] * 32, "max_tokens": 240, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while requests.get(f"{url}/health").json()["cancelled_requests"] == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.1)
    tokens = re.findall(r"cancelled by its client after (\d+) tokens",
                        chat_server["log"].read_text())
    assert int(tokens[-1]) < 32 * 240  # it stopped before the end


def test_an_empty_api_key_is_refused_in_one_line(chat_server):
    for args, env in ((["--api-key", ""], {}), ([], {"SLM_API_KEY": ""})):
        result = subprocess.run([sys.executable, str(REPO / "serve.py"), "--ckpt_path",
                                 str(chat_server["directory"]), *args], capture_output=True,
                                text=True, timeout=120, env={**os.environ, **env})
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: the API key is empty")


def test_sigterm_ends_running_streams_with_done_and_answers_the_waiting_503(tmp_path):
    chat_llama(tmp_path / "llama")
    with serving(tmp_path / "llama", tmp_path / "serve.log", "--max-batch", "1") as (url,
                                                                                   process):
        lines, waiting = [], {}
        response = requests.post(f"{url}/v1/completions", stream=True, json={
            "prompt": "x", "max_tokens": 250, "ignore_eos": True, "stream": True})
        lines_iter = response.iter_lines()
        lines.append(next(lines_iter))

        def wait() -> None:
            reply = requests.post(f"{url}/v1/completions", json={"prompt": "y",
                                                                 "max_tokens": 5})
            waiting.update(status=reply.status_code, body=reply.json())

        waiter = threading.Thread(target=wait)
        waiter.start()
        deadline = time.monotonic() + 30
        while "slm_requests_waiting 1" not in requests.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the second request never waited for the row"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        lines += [line for line in lines_iter if line]
        waiter.join(timeout=30)
        assert process.wait(timeout=30) == 0
    assert lines[-1] == b"data: [DONE]"
    assert json.loads(lines[-2].removeprefix(b"data: "))["error"]["code"] == (
        "server_shutting_down")
    assert waiting["status"] == 503 and waiting["body"]["error"]["code"] == "server_shutting_down"
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


FAKE_STREAMS = """
window.sent = []; window.streams = [];
window.fetch = async (url, options) => {
  window.sent.push(JSON.parse(options.body));
  let control;
  const body = new ReadableStream({start(stream) { control = stream; }});
  options.signal.addEventListener("abort", () => control.error(
    new DOMException("aborted", "AbortError")));
  window.streams.push(control);
  return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};
"""


def chromium() -> object:
    """Headless Chromium through selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver_path and browser):
        pytest.skip("no chromium and chromedriver (Debian: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))


def test_new_chat_during_a_reply_drops_everything_the_old_request_does_after(chat_server):
    browser = chromium()
    try:
        browser.get(chat_server["url"] + "/")
        browser.execute_script(FAKE_STREAMS)  # replies the test writes, chunk by chunk

        def send(text: str) -> None:
            browser.find_element("id", "input").send_keys(text)
            browser.find_element("id", "send").click()

        def push(stream: int, text: str) -> None:
            browser.execute_script(
                "window.streams[arguments[0]].enqueue(new TextEncoder().encode(arguments[1]))",
                stream, f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n")

        def log() -> str:
            return browser.find_element("id", "log").text

        send("Who goes there?")
        push(0, "the old reply")
        deadline = time.monotonic() + 10
        while "the old reply" not in log():
            assert time.monotonic() < deadline, log()
            time.sleep(0.05)
        browser.find_element("id", "new-chat").click()  # mid-reply
        time.sleep(0.3)  # the old request's abort and its handlers run
        assert log() == "" and browser.execute_script("return history.length") == 0
        send("Hello")
        push(1, "a new reply")
        browser.execute_script("window.streams[1].enqueue(new TextEncoder().encode("
                               "'data: [DONE]\\n\\n'))")
        deadline = time.monotonic() + 10
        while browser.execute_script("return history.length") < 2:
            assert time.monotonic() < deadline, log()
            time.sleep(0.05)
        sent = browser.execute_script("return window.sent")
        assert sent[1]["messages"] == [{"role": "user", "content": "Hello"}]
        assert browser.execute_script("return history") == [
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "a new reply"}]
        assert "old" not in log() and "stopped" not in log()
    finally:
        browser.quit()


def test_a_compiled_server_warms_up_then_answers_as_the_eager_one(chat_server, tmp_path):
    request = {"model": "served", "prompt": "O Romeo", "max_tokens": 24, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    eager = chat_server["client"].completions.create(**request).choices[0].text
    log = tmp_path / "serve.log"
    with serving(chat_server["directory"], log, "--compile", "--max-batch", "2",
                 "--dtype", "fp32") as (url, _):
        # width 2 compiles only while the start-up budget lasts, which two busy cores may not
        assert re.search(r"compiled the decode step for 1(, 2)? rows at once in \d+ s",
                         log.read_text())
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert client.completions.create(**request).choices[0].text == eager
