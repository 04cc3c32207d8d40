"""scoring.py: lm-evaluation-harness's multiple-choice rule, checked against lm-eval itself."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors

import eval as eval_script
from bpe import load_tokenizer
from checkpoints import load_trained, save_checkpoint
from conftest import REPO, TOKENIZER, make_decisive_model, run_main
from export import export
from scoring import (Encoder, Example, Task, choice_scores, continuation_logprobs,
                     forwards_needed, read_task_file, task_metrics, task_requests, with_fewshot)
from utils import Config, DataConfig, UserError, config_to_dict

WINDOW = 64  # the parity model's context: long contexts overflow it


def decisive_export(out_dir: Path) -> Path:
    """An exported SLM model whose random weights are large enough that choices' scores differ
    by whole nats, so a wrong token or position changes the chosen answer."""
    model = make_decisive_model(vocab_size=4096, embed_dim=64, num_heads=4, num_kv_heads=2,
                                ff_dim=128, num_layers=2, max_seq_len=WINDOW)
    config = Config(model=model.config,
                    data=DataConfig(tokenizer_path=TOKENIZER, context_length=WINDOW))
    checkpoint = out_dir / "decisive.pth"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(config),
                     "tokenizer": load_tokenizer(TOKENIZER).fingerprint},
                    str(checkpoint))
    export(str(checkpoint), str(out_dir / "hf"))
    return out_dir / "hf"


def parity_examples(text: str, count: int = 240) -> list[dict]:
    """Examples of every kind the rule treats apart: contexts ending in spaces or a newline,
    contexts longer than the window, empty contexts, duplicate and one-word choices, and
    multi-token choices of unequal lengths."""
    rng, words = random.Random(0), text.split()

    def phrase(low: int, high: int) -> str:
        start = rng.randrange(len(words) - high)
        return " ".join(words[start:start + rng.randint(low, high)])

    examples = []
    for index in range(count):
        kind = index % 6
        context = phrase(60, 120) if kind == 2 else "" if kind == 4 else phrase(3, 25)
        context += {0: " ", 1: "\n", 5: "  "}.get(kind, "")
        choices = [phrase(1, 1 if kind == 3 else 8) for _ in range(rng.randint(2, 5))]
        if kind == 3:
            choices[-1] = choices[0]
        examples.append({"context": context, "choices": choices,
                         "gold": rng.randrange(len(choices))})
    return examples


@pytest.fixture(scope="module")
def parity(tmp_path_factory, corpus) -> dict:
    workdir = tmp_path_factory.mktemp("parity")
    model_dir = decisive_export(workdir)
    task_file = workdir / "parity.jsonl"
    examples = parity_examples(corpus.read_text(encoding="utf-8"))
    task_file.write_text("".join(json.dumps(example) + "\n" for example in examples))
    reference = workdir / "lm_eval.json"
    result = subprocess.run([sys.executable, str(REPO / "tests" / "lm_eval_reference.py"),
                             str(model_dir), str(task_file), str(WINDOW), str(reference)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HOME": str(workdir / "hf_home")})
    assert result.returncode == 0, ("lm-eval failed (pip install -r requirements-dev.txt "
                                    "installs it):\n" + result.stderr[-3000:])
    return {"model_dir": model_dir, "task_file": task_file,
            "reference": json.loads(reference.read_text())}


def our_scores(model_dir: Path, task_file: Path) -> tuple[Task, list[list[float]]]:
    trained = load_trained(str(model_dir), device_name="cpu")
    task = read_task_file(str(task_file))
    encoder = Encoder(trained.tokenizer)
    return task, choice_scores(trained.model, encoder, task, trained.context_length,
                               trained.device, "fp32")


def test_every_choice_and_answer_equals_lm_evaluation_harness(parity):
    reference = parity["reference"]
    assert reference["version"] == "0.4.13"
    task, scores = our_scores(parity["model_dir"], parity["task_file"])
    assert len(reference["examples"]) == len(task.examples) >= 200
    for example, mine, theirs in zip(task.examples, scores, reference["examples"]):
        assert max(abs(a - b) for a, b in zip(mine, theirs["lls"])) <= 1e-4, example.where
        metrics = task_metrics([example], [mine])
        assert (metrics["acc"], metrics["acc_norm"]) == (theirs["acc"], theirs["acc_norm"]), \
            example.where
    # The set is decisive: answers differ between the two metrics, and scores span nats.
    assert any(e["acc"] != e["acc_norm"] for e in reference["examples"])
    assert max(max(e["lls"]) - min(e["lls"]) for e in reference["examples"]) > 5


def test_eval_json_equals_lm_evaluation_harness_means(parity, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(eval_script.main, [
        "--ckpt_path", str(parity["model_dir"]), "--tasks", str(parity["task_file"]), "--json",
        "--device", "cpu"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    scores = json.loads(out)["parity"]  # stdout is the JSON line alone
    examples = parity["reference"]["examples"]
    assert scores["n"] == len(examples)
    for metric in ("acc", "acc_norm"):
        assert scores[metric] == sum(e[metric] for e in examples) / len(examples)
    assert "acc_norm" in err  # the table goes to stderr with --json


def test_kv_shared_context_scores_equal_one_forward_per_choice(parity):
    """Prefilling an example's context once and running its choices on copies of the cache
    gives what a whole forward of each (truncated) input gives."""
    trained = load_trained(str(parity["model_dir"]), device_name="cpu")
    task = Task("parity", read_task_file(str(parity["task_file"])).examples[:30])
    requests = task_requests(task, Encoder(trained.tokenizer), WINDOW)
    shared = continuation_logprobs(trained.model, requests, trained.device, "fp32")
    with torch.no_grad():
        for (inputs, continuation), score in zip(requests, shared):
            logprobs = trained.model(torch.tensor([inputs]))[0][0].log_softmax(-1)
            positions = range(len(inputs) - len(continuation), len(inputs))
            alone = sum(logprobs[p, token].item() for p, token in zip(positions, continuation))
            assert abs(alone - score) < 1e-4


def test_a_rank_with_fewer_requests_runs_as_many_forwards_as_asked(parity):
    """Under FSDP each forward meets the other ranks: scoring runs the forwards its requests
    need (counted by forwards_needed), then one-token forwards up to the busiest rank's count,
    and its scores stay the same."""
    trained = load_trained(str(parity["model_dir"]), device_name="cpu")
    task = Task("parity", read_task_file(str(parity["task_file"])).examples[:5])
    requests = task_requests(task, Encoder(trained.tokenizer), WINDOW)
    calls = []
    trained.model.register_forward_hook(lambda *_: calls.append(1))
    alone = continuation_logprobs(trained.model, requests, trained.device, "fp32")
    needed = len(calls)
    assert needed == forwards_needed(requests) > len(task.examples)
    padded = continuation_logprobs(trained.model, requests, trained.device, "fp32",
                                   forwards=needed + 3)
    assert len(calls) == 2 * needed + 3 and padded == alone


def test_trailing_whitespace_moves_to_the_continuation_and_empty_contexts_start_from_eot():
    tokenizer = load_tokenizer(TOKENIZER)
    encoder = Encoder(tokenizer)
    context, continuation = encoder.pair("Good morrow, ", " sir")
    assert context == tokenizer.encode("Good morrow,")
    assert context + continuation == tokenizer.encode("Good morrow,  sir")
    eot = tokenizer.token_id("<|endoftext|>")
    assert encoder.pair("", " sir") == ([eot], tokenizer.encode(" sir"))


def test_a_tokenizer_that_adds_bos_adds_it_to_the_context_only(tmp_path):
    """A post-processor that adds bos (Llama 3's) adds it once, before the context; an empty
    context is the bos token itself."""
    tokenizer = Tokenizer.from_file(TOKENIZER)
    eot = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)])
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    encoder = Encoder(load_tokenizer(str(path)))
    context, continuation = encoder.pair("Good morrow,", " sir")
    plain = load_tokenizer(TOKENIZER)
    assert context == [eot] + plain.encode("Good morrow,")
    assert continuation == plain.encode(" sir")
    assert encoder.pair("", " sir") == ([eot], plain.encode(" sir"))
    assert encoder.pair("<|endoftext|>Hi", " sir")[0] == plain.encode("<|endoftext|>Hi")


def test_metrics_take_the_first_best_choice_and_the_sample_standard_error():
    examples = [Example("", ("a", "bbbb"), 1, "x"), Example("", ("aa", "aa"), 1, "x"),
                Example("", ("a", "bb"), 0, "x")]
    scores = [[-2.0, -4.0], [-1.0, -1.0], [-1.0, -1.5]]
    result = task_metrics(examples, scores)
    # 1: acc picks a (-2 > -4), acc_norm picks bbbb (-1 > -2); 2: a tie goes to choice 0;
    # 3: acc picks a, acc_norm picks bb (-0.75 > -1).
    assert (result["acc"], result["acc_norm"], result["n"]) == (1 / 3, 1 / 3, 3)
    assert result["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


def test_a_long_input_keeps_its_newest_tokens():
    tokenizer = load_tokenizer(TOKENIZER)
    encoder = Encoder(tokenizer)
    task = Task("t", [Example("word " * 100 + "end", ("one two", "three"), 0, "t")])
    (inputs, continuation), _ = task_requests(task, encoder, 16)
    whole = tokenizer.encode("word " * 100 + "end one two")
    assert len(inputs) == 16 and inputs + continuation[-1:] == whole[-17:]


def test_fewshot_prefixes_other_examples_with_their_gold_choice_and_is_fixed():
    examples = [Example(f"q{i}", (f"a{i}", f"b{i}"), i % 2, "t") for i in range(10)]
    shots = with_fewshot(Task("t", examples), 3)
    for index, example in enumerate(shots.examples):
        blocks = example.context.split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == f"q{index}"
        for block in blocks[:-1]:
            question, answer = block.split(" ")
            other = int(question[1:])
            assert other != index and answer == examples[other].choices[other % 2]
    assert with_fewshot(Task("t", examples), 3) == shots
    with pytest.raises(UserError, match="--fewshot 10 needs more than 10"):
        with_fewshot(Task("t", examples), 10)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: not JSON"),
    ('{"context": "a", "gold": 0}', r"line 2: \"choices\" is not a list"),
    ('{"context": "a", "choices": [], "gold": 0}', r"line 2: \"choices\" is not a list"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}', r"line 2: \"gold\" is 2"),
    ('{"context": "a", "choices": ["x", 3], "gold": 0}', r"line 2: choice 1 is 3"),
    ('["a"]', r"line 2: not a JSON object"),
])
def test_a_malformed_task_line_is_refused_with_its_number(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "gold": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=f"{path}, {message}"):
        read_task_file(str(path))
