"""hf.py against transformers, offline: random LlamaForCausalLM models in several shapes, saved
with save_pretrained, read by infer.py and fine-tuned from with training.init_from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer

import infer
import train
from export import export
from conftest import (
    CHAT_TEMPLATES,
    CHATML_TEMPLATE,
    REPO,
    TOKENIZER,
    assert_one_error_line,
    CONVERSATIONS,
    chat_llama,
    run_main,
    tiny_config,
    write_config,
    write_conversations,
)
from bpe import load_tokenizer
from data import epoch_order, prepare_tokens, split_tokens
from checkpoints import load_checkpoint
from hf import load_hf_directory
from checkpoints import load_weights
from model import Transformer
from utils import DataConfig, config_from_dict, stored_config

transformers = pytest.importorskip("transformers")

SHAPES = {
    "tied, MHA": dict(tied=True, kv_heads=4, rope_theta=10000.0, eos=None, vocab=4096, shard=None),
    "untied, GQA, </s>, padded vocab": dict(
        tied=False, kv_heads=2, rope_theta=500000.0, eos="</s>", vocab=4160, shard=None
    ),
    "sharded safetensors": dict(
        tied=True, kv_heads=2, rope_theta=10000.0, eos=None, vocab=4096, shard="200KB"
    ),
}


def save_llama(directory: Path, tied: bool, kv_heads: int, rope_theta: float, eos, vocab, shard):
    """A random LlamaForCausalLM and a tokenizer (with `eos` as its end-of-text token) in
    `directory`, as a downloaded model would be."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so a wrong weight changes greedy tokens
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    tokenizer = Tokenizer.from_file(TOKENIZER)
    if eos:
        tokenizer.add_special_tokens([eos])
    tokenizer.save(str(directory / "tokenizer.json"))
    eos = eos or "<|endoftext|>"
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return model


@pytest.fixture(params=list(SHAPES), scope="module")
def llama(request, tmp_path_factory) -> tuple[Path, object, dict]:
    directory = tmp_path_factory.mktemp("llama")
    shape = SHAPES[request.param]
    return directory, save_llama(directory, **shape), shape


def test_an_hf_llama_directory_gives_transformers_logits(llama):
    directory, hf_model, shape = llama
    if shape["shard"]:
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    checkpoint = load_hf_directory(str(directory))
    config = stored_config(checkpoint["config"], str(directory))
    assert config.model.tie_embeddings == shape["tied"]
    assert config.model.rope_theta == shape["rope_theta"]
    model = Transformer(config.model).eval()
    load_weights(model, checkpoint, str(directory))
    idx = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, expected = model(idx)[0], hf_model(idx).logits
    assert (ours - expected).abs().max().item() <= 1e-4


def test_infer_reads_any_hf_llama_directory_and_decodes_greedily_as_transformers(
    llama, monkeypatch, capsys
):
    directory, hf_model, shape = llama
    tokenizer = load_tokenizer(str(directory / "tokenizer.json"))
    prompt = "ROMEO: But soft"
    ids = torch.tensor([tokenizer.encode(prompt)])
    eos = tokenizer.token_id(shape["eos"] or "<|endoftext|>")
    with torch.no_grad():
        for _ in range(12):  # transformers' greedy choice, one token at a time
            next_id = hf_model(ids).logits[0, -1].argmax()
            if next_id == eos:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = tokenizer.decode(ids[0].tolist())  # special tokens kept
    argv = ["--ckpt_path", str(directory), "--prompt", prompt, "--temperature", "0"]
    code, stdout, stderr = run_main(
        infer.main, argv + ["--max-length", "12"], directory, monkeypatch, capsys
    )
    assert code == 0, stderr
    assert stdout.rstrip("\n") == expected


def first_batch_window(config_dict: dict, directory: Path) -> torch.Tensor:
    """The token windows (context + 1) of the first training batch, rebuilt from the data."""
    data = DataConfig(
        **{**config_dict["data"], "tokenizer_path": str(directory / "tokenizer.json")}
    )
    tokens, _ = prepare_tokens(data, load_tokenizer(data.tokenizer_path))
    train_set, _ = split_tokens(tokens, data)
    order = epoch_order(len(train_set), config_dict["training"]["seed"], 0)
    windows = [train_set[i] for i in order[: data.batch_size]]
    return torch.stack([torch.cat([x, y[-1:]]) for x, y in windows])


def test_fine_tuning_starts_from_the_pretrained_weights(llama, tmp_path, corpus):
    directory, hf_model, shape = llama
    settings = {
        "init_from": str(directory),
        "max_steps": 1,
        "log_every": 1,
        "warmup_steps": 1,
        "eval_every": 1,
        "sample_tokens": 0,
    }
    config = tiny_config(tmp_path, corpus, training=settings)
    train.train(config_from_dict(config), torch.device("cpu"))
    events = EventAccumulator(str(tmp_path / "runs" / "test"))
    events.Reload()
    (first_loss,) = [event.value for event in events.Scalars("1_train/loss")]
    window = first_batch_window(config, directory)
    with torch.no_grad():
        expected = hf_model(input_ids=window, labels=window).loss.item()
    assert abs(first_loss - expected) <= 1e-4, (first_loss, expected)

    best = load_checkpoint(str(tmp_path / "ckpt" / "best.pth"))
    assert best["config"]["model"]["tie_embeddings"] == shape["tied"]
    assert best["config"]["data"]["tokenizer_path"] == str(directory / "tokenizer.json")


def test_a_snapshot_wins_over_init_from(tmp_path, corpus, capsys):
    directory = tmp_path / "llama"
    save_llama(directory, **SHAPES["tied, MHA"])
    settings = {"init_from": str(directory), "max_steps": 2, "save_every": 2, "eval_every": 2}
    train.train(
        config_from_dict(tiny_config(tmp_path, corpus, training=settings)), torch.device("cpu")
    )
    (directory / "model.safetensors").write_bytes(b"damaged")  # a resume must not read it
    resumed = {**settings, "max_steps": 4}
    train.train(
        config_from_dict(tiny_config(tmp_path, corpus, training=resumed)), torch.device("cpu")
    )
    assert "resuming from" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "ckpt" / "snapshot.pth"))["progress"]["step"] == 4


def test_a_damaged_config_json_is_one_line_for_init_from_too(
    tmp_path, corpus, monkeypatch, capsys
):
    directory = tmp_path / "llama"
    save_llama(directory, **SHAPES["tied, MHA"])
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf, "hidden_size": "wide"}))
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))
    argv = [str(config), f"training.init_from={directory}"]
    code, _, stderr = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert_one_error_line(code, stderr, "hidden_size is 'wide', not an integer")


def test_the_config_files_model_is_replaced_but_a_contradicting_override_is_refused(
    tmp_path, corpus, monkeypatch, capsys
):
    directory = tmp_path / "llama"
    save_llama(directory, **SHAPES["untied, GQA, </s>, padded vocab"])
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path, corpus))  # 4096 vocab
    argv = [str(config), f"training.init_from={directory}", "model.embed_dim=128"]
    code, stdout, stderr = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert_one_error_line(
        code,
        stderr,
        f"model.embed_dim=128 on the command line contradicts {directory}, whose "
        "value is 64 — drop that override",
    )
    argv = [
        str(config),
        f"training.init_from={directory}",
        "training.max_steps=1",
        "model.num_kv_heads=2",
    ]  # agrees with the directory: fine
    code, stdout, stderr = run_main(train.main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    assert (
        f"model (2 layers x 64, vocab 4160) and tokenizer {directory / 'tokenizer.json'} come "
        f"from {directory}, replacing the config's" in stdout
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_bias": True}, "attention_bias=True is a Llama feature SLM's model cannot"),
        ({"mlp_bias": True}, "mlp_bias=True is a Llama feature"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is a Llama feature"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_scaling='linear' is a Llama feature",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling=.* is a Llama"),
        (
            {"head_dim": 32},
            "head_dim=32 is a Llama feature SLM's model cannot represent " r"\(it needs 16\)",
        ),
        ({"model_type": "mistral"}, "model_type='mistral' is a Llama feature"),
        ({"hidden_size": None}, "is not a Llama config.json"),
        ({"hidden_size": "wide"}, "config.json: hidden_size is 'wide', not an integer"),
        ({"rms_norm_eps": "small"}, "config.json: rms_norm_eps is 'small', not a number"),
    ],
)
def test_a_llama_feature_slm_cannot_represent_is_refused_by_name(
    tmp_path, monkeypatch, capsys, change, message
):
    directory = tmp_path / "llama"
    save_llama(directory, **SHAPES["tied, MHA"])
    hf = json.loads((directory / "config.json").read_text())
    hf.update(change)
    hf = {key: value for key, value in hf.items() if value is not None}
    (directory / "config.json").write_text(json.dumps(hf))
    code, stdout, stderr = run_main(
        infer.main, ["--ckpt_path", str(directory)], tmp_path, monkeypatch, capsys
    )
    assert_one_error_line(code, stderr, message)
    assert stdout == ""


@pytest.mark.parametrize("template", list(CHAT_TEMPLATES))
def test_infer_chat_replies_equal_transformers_greedy_generate(tmp_path, template):
    """printf 'turn one\\nturn two\\n' | infer.py --chat: transformers' two greedy replies, the
    first one's decoded text rendered back into the history of the second."""
    model, hf_tokenizer = chat_llama(tmp_path / "llama", template)
    raw = Tokenizer.from_file(str(tmp_path / "llama" / "tokenizer.json"))
    history, expected = [], []
    for turn in ("turn one", "turn two"):
        history.append({"role": "user", "content": turn})
        encoded = hf_tokenizer.apply_chat_template(history, add_generation_prompt=True)
        ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        reply_ids = out[0, len(ids):].tolist()
        if hf_tokenizer.eos_token_id in reply_ids:
            reply_ids = reply_ids[: reply_ids.index(hf_tokenizer.eos_token_id)]
        reply = raw.decode(reply_ids, skip_special_tokens=False)
        expected.append(reply)
        history.append({"role": "assistant", "content": reply})
    assert expected[0] != expected[1] and all(len(reply) > 3 for reply in expected)
    result = subprocess.run(
        [sys.executable, str(REPO / "infer.py"), "--ckpt_path", str(tmp_path / "llama"),
         "--chat", "--temperature", "0", "--max-length", "16"],
        input="turn one\nturn two\n", capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "".join(f"{reply}\n" for reply in expected)


def test_a_chat_model_fine_tuned_from_a_directory_keeps_its_template_into_the_export(
    tmp_path, monkeypatch, capsys
):
    """init_from a ChatML directory on conversations: the mask ends turns at <|im_end|>, and the
    checkpoint and its export carry the directory's template and special tokens."""
    _, hf_tokenizer = chat_llama(tmp_path / "llama")
    conversations = write_conversations(tmp_path / "chat.jsonl", 200)
    training = {"init_from": str(tmp_path / "llama"), "max_steps": 4, "eval_every": 4,
                "save_every": 4}
    config = write_config(tmp_path / "sft.yaml", tiny_config(tmp_path, conversations,
                                                             training=training))
    code, _, stderr = run_main(train.main, [str(config)], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr[-3000:]
    checkpoint = load_checkpoint(str(tmp_path / "ckpt" / "best.pth"))
    assert checkpoint["chat"]["template"] == CHATML_TEMPLATE
    assert checkpoint["chat"]["special_tokens"]["eos_token"] == "<|im_end|>"
    export(str(tmp_path / "ckpt" / "best.pth"), str(tmp_path / "hf"))
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS.values():
        assert exported.apply_chat_template(messages, tokenize=False) == (
            hf_tokenizer.apply_chat_template(messages, tokenize=False))
    assert exported.eos_token == "<|im_end|>"
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").eos_token_id == (
        hf_tokenizer.eos_token_id)


def test_a_single_weights_file_wins_over_an_index_as_in_transformers(tmp_path):
    save_llama(tmp_path, **SHAPES["tied, MHA"])
    weights = load_file(str(tmp_path / "model.safetensors"))
    stale = {name: torch.zeros_like(tensor) for name, tensor in weights.items()}
    save_file(stale, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(stale, "model-00001-of-00001.safetensors")}))
    ours = load_hf_directory(str(tmp_path))["model"]
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).state_dict()
    for name, tensor in weights.items():
        assert torch.equal(ours[name.removeprefix("model.")], tensor)
        assert torch.equal(theirs[name], tensor)


def test_rotary_inverse_frequencies_in_old_llama_files_are_dropped_on_import(tmp_path):
    model = save_llama(tmp_path, **SHAPES["untied, GQA, </s>, padded vocab"])
    weights = load_file(str(tmp_path / "model.safetensors"))
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    weights.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone()
                    for i in range(2)})
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = load_hf_directory(str(tmp_path))
    assert not [name for name in checkpoint["model"] if "inv_freq" in name]
    slm = Transformer(stored_config(checkpoint["config"], str(tmp_path)).model).eval()
    load_weights(slm, checkpoint, str(tmp_path))
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        assert (slm(ids)[0] - model(ids).logits).abs().max().item() <= 1e-4
