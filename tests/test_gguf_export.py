"""export.py --format gguf: the file's metadata, tokenizer and tensors, and llama.cpp itself
(llama-cpp-python) computing, generating, tokenizing and chatting as SLM does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import export as export_script
import infer
from chat import chat_format
from checkpoints import load_trained
from conftest import (
    CHAT_SPECIAL_TOKENS,
    TOKENIZER,
    assert_one_error_line,
    chat_llama,
    file_tree,
    run_main,
    run_script,
    tiny_config,
    write_config,
    write_conversations,
)
from export import export
from generate import generate
from gguf_export import interleave_rope_rows, llama_cpp_pre_tokenizer
from model import apply_rope, rope_tables
from test_export import RANDOM_MODELS, random_checkpoint
from test_hf import SHAPES, save_llama
from utils import ModelConfig

ODD_ROWS = ModelConfig(embed_dim=64, num_heads=4, num_kv_heads=2, ff_dim=72, num_layers=2,
                       max_seq_len=96)  # down_proj rows of 72 values: not q8_0 blocks


def read_fields(path: Path) -> tuple[dict, dict]:
    """The file's metadata by key, and its tensors by name."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}, {tensor.name: tensor for tensor in reader.tensors}


def edited_tokenizer(path: Path, source: Path | str = TOKENIZER, **changes) -> Path:
    """The tokenizer at `source` with top-level sections of its JSON replaced (or its model's,
    under model=...), written to `path`."""
    spec = json.loads(Path(source).read_text())
    spec["model"].update(changes.pop("model", {}))
    spec.update(changes)
    Tokenizer.from_str(json.dumps(spec)).save(str(path))
    return path


SMOLLM_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def test_the_file_holds_the_trained_models_llama_metadata_tokenizer_and_template(
        tmp_path, trained_run):
    ckpt = trained_run / "ckpt" / "best.pth"
    export(str(ckpt), str(tmp_path / "m.gguf"), out_format="gguf")
    fields, tensors = read_fields(tmp_path / "m.gguf")
    tokenizer = Tokenizer.from_file(TOKENIZER)
    assert fields["general.architecture"] == "llama"
    assert {key: fields[f"llama.{key}"] for key in (
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "rope.dimension_count")} == {
        "context_length": 32, "embedding_length": 64, "block_count": 2,
        "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
        "rope.dimension_count": 16}  # the trained context, not max_seq_len (64)
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.id_to_token(i) for i in range(4096)]
    assert fields["tokenizer.ggml.token_type"][:2] == [gguf.TokenType.CONTROL,
                                                       gguf.TokenType.NORMAL]
    merges = json.loads(Path(TOKENIZER).read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(merge) for merge in merges]
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert fields["tokenizer.chat_template"] == chat_format(TOKENIZER).template
    assert "output.weight" not in tensors  # tied: the embedding is the head
    assert len(tensors) == 2 + 2 * 9


def test_interleaved_q_and_k_rows_under_llama_cpps_pair_rope_give_slms_attention_scores():
    """Scores q·k of permuted rows rotated by pairs (x0, x1), (x2, x3), ... equal model.py's,
    for every pair of positions: the permutation is the one llama.cpp's graph needs."""
    torch.manual_seed(0)
    heads, head_dim, dim, positions = 3, 8, 24, 10
    weight, x = torch.randn(heads * head_dim, dim), torch.randn(positions, dim)
    cos, sin = rope_tables(head_dim, positions, 10000.0)
    rotated = apply_rope((x @ weight.T).view(positions, heads, head_dim).transpose(0, 1), cos, sin)
    pairs = (x @ interleave_rope_rows(weight, heads).T).view(positions, heads, head_dim // 2, 2)
    frequencies = 10000.0 ** -(torch.arange(0, head_dim, 2) / head_dim)
    angle = torch.outer(torch.arange(positions).float(), frequencies)[:, None, :]  # pos, 1, d/2
    first, second = pairs[..., 0], pairs[..., 1]
    pair_rotated = torch.stack((first * angle.cos() - second * angle.sin(),
                                first * angle.sin() + second * angle.cos()), -1)
    pair_rotated = pair_rotated.reshape(positions, heads, head_dim).transpose(0, 1)
    torch.testing.assert_close(pair_rotated @ pair_rotated.transpose(1, 2),
                               rotated @ rotated.transpose(1, 2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_each_dtype_stores_weights_that_dequantize_close_to_the_checkpoint(tmp_path, dtype):
    ckpt = random_checkpoint(tmp_path, ODD_ROWS)
    export(str(ckpt), str(tmp_path / "m.gguf"), out_format="gguf", dtype=dtype)
    _, tensors = read_fields(tmp_path / "m.gguf")
    state = torch.load(ckpt, weights_only=True)["model"]
    expected_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == expected_type
    down = tensors["blk.1.ffn_down.weight"]  # rows of 72: q8_0 falls back to f16
    assert down.tensor_type.name == ("F16" if dtype == "q8_0" else expected_type)
    for name, tensor in (("embed_tokens.weight", tensors["token_embd.weight"]),
                         ("layers.1.mlp.down_proj.weight", down)):
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            state[name].shape)
        error = np.abs(values - state[name].numpy()).max() / state[name].abs().max().item()
        assert error < {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2}[dtype]


@pytest.fixture(scope="module")
def padded_llama(tmp_path_factory) -> Path:
    """A Hugging Face Llama directory whose 4160 embedding rows outnumber its 4097 tokens
    (</s> added as eos), untied, with GQA and rope_theta 500000."""
    directory = tmp_path_factory.mktemp("padded")
    save_llama(directory, **SHAPES["untied, GQA, </s>, padded vocab"])
    return directory


def test_a_padded_vocabulary_gets_unused_placeholder_tokens(tmp_path, padded_llama):
    export(str(padded_llama), str(tmp_path / "m.gguf"), out_format="gguf")
    fields, tensors = read_fields(tmp_path / "m.gguf")
    assert len(fields["tokenizer.ggml.tokens"]) == 4160 == tensors["token_embd.weight"].shape[1]
    assert fields["tokenizer.ggml.tokens"][4096:4099] == ["</s>", "[PAD4097]", "[PAD4098]"]
    assert set(fields["tokenizer.ggml.token_type"][4097:]) == {gguf.TokenType.UNUSED}
    assert fields["tokenizer.ggml.eos_token_id"] == 4096
    assert fields["llama.context_length"] == 128  # its max_position_embeddings
    assert "output.weight" in tensors


def test_smollm2s_digit_splitting_pre_tokenizer_is_named_for_llama_cpp(tmp_path):
    smollm = edited_tokenizer(tmp_path / "smollm.json", pre_tokenizer=SMOLLM_PRE_TOKENIZER)
    assert llama_cpp_pre_tokenizer(Tokenizer.from_file(str(smollm)), "x") == "smollm"
    assert llama_cpp_pre_tokenizer(Tokenizer.from_file(TOKENIZER), "x") == "gpt-2"


@pytest.mark.parametrize("tokenizer_change,message", [
    ({"model": {"byte_fallback": True}, "pre_tokenizer": {
        "type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}},
     r"a byte-fallback \(SentencePiece-style\) BPE tokenizer, not byte-level BPE"),
    ({"pre_tokenizer": {"type": "Whitespace"}}, r"pre-tokenizer \(Whitespace\)"),
    ({"normalizer": {"type": "NFC"}}, r"normalizes text first \(NFC\)"),
    ({"model": {"ignore_merges": True}}, r"skips the merges .* \(ignore_merges\)"),
    ({"model": {"end_of_word_suffix": "</w>"}}, "dropout or subword affixes"),
    ({"decoder": {"type": "Fuse"}}, r"decoder \(Fuse\) is not ByteLevel"),
    ({"added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False,
                        "lstrip": True, "rstrip": False, "normalized": False, "special": True}]},
     "added token '<\\|endoftext\\|>' strips the spaces beside it"),
])
def test_a_tokenizer_llama_cpp_would_not_reproduce_is_one_line_and_writes_nothing(
        tmp_path, monkeypatch, capsys, tokenizer_change, message):
    ckpt = random_checkpoint(tmp_path, RANDOM_MODELS["mha"])
    other = edited_tokenizer(tmp_path / "other.json", **tokenizer_change)
    before = file_tree(tmp_path)
    code, _, stderr = run_main(export_script.main, [
        "--ckpt_path", str(ckpt), "--tokenizer", str(other), "--out", "m.gguf"], tmp_path,
        monkeypatch, capsys)
    assert_one_error_line(code, stderr, message + ".*export a Hugging Face directory instead")
    assert file_tree(tmp_path) == before


def test_the_command_line_picks_gguf_by_suffix_and_refuses_what_does_not_fit(
        tmp_path, monkeypatch, capsys):
    ckpt = str(random_checkpoint(tmp_path, RANDOM_MODELS["mha"]))
    code, stdout, _ = run_main(export_script.main, ["--ckpt_path", ckpt, "--out", "m.gguf",
                                                    "--dtype", "q8_0"], tmp_path, monkeypatch,
                               capsys)
    assert code == 0 and "m.gguf (q8_0)" in stdout
    assert read_fields(tmp_path / "m.gguf")[0]["general.file_type"] == (
        gguf.LlamaFileType.MOSTLY_Q8_0)
    before = file_tree(tmp_path)
    for argv, message in (
            (["--out", "m.gguf"], "m.gguf already exists — .* add --force"),
            (["--out", str(tmp_path), "--format", "gguf"], "is a directory — give a GGUF file"),
            (["--out", "hf", "--dtype", "f16"], "--dtype applies to GGUF model files only"),
            (["--out", "m.gguf", "--format", "hf"], "m.gguf is a file — give a directory"),
            (["--out", "m.gguf/x.gguf"], "cannot create .*m.gguf is a file")):
        code, _, stderr = run_main(export_script.main, ["--ckpt_path", ckpt, *argv], tmp_path,
                                   monkeypatch, capsys)
        assert_one_error_line(code, stderr, message)
        assert file_tree(tmp_path) == before
    code, _, _ = run_main(export_script.main, ["--ckpt_path", ckpt, "--out", "m.gguf",
                                               "--force"], tmp_path, monkeypatch, capsys)
    assert code == 0
    assert read_fields(tmp_path / "m.gguf")[0]["general.file_type"] == gguf.LlamaFileType.ALL_F32


# ---- llama.cpp itself ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, which compiles llama.cpp at install (.ci/run installs it)."""
    return pytest.importorskip("llama_cpp")


TEXTS = [  # whitespace runs, digits, punctuation, contractions, non-ASCII, emoji, specials
    "", " ", "  ", "\n", "\n\n\n", "\t\tindented", "trailing   ", "   leading", "a  b   c    d",
    "1", "12", "123", "1234567890", "3.14159", "1,000,000", "v2.0.1-rc3", "x1y22z333",
    "Hello, world!", "What?!... No—never.", "(a) [b] {c} <d>", "#hashtag @user $5 100%",
    "don't", "I'LL", "we've", "she'd", "it's 'quoted'", "\"double\"", "a-b_c/d\\e|f",
    "café", "naïve Übermensch", "東京タワー", "Привет, мир", "مرحبا", "ñandú", "ß ẞ ǅ",
    "👍", "👍🏽", "🇫🇷", "👨‍👩‍👧", "a😀b", "😀😀😀",
    "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>", " <|endoftext|> x",
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "To be, or not to be: that is the question:\n\nWhether 'tis nobler in the mind to suffer",
]


def all_texts() -> list[str]:
    """A few hundred strings: each one above, and each beside the next ones."""
    return TEXTS + [a + b for a in TEXTS[::3] for b in TEXTS[1::2]]


def llama_cpp_model(llama_cpp, path: Path, context: int):
    """llama.cpp on the file, every position's logits kept, its KV cache in f32."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=2,
                           logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                           type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def llama_cpp_greedy(llm, ids: list[int], count: int) -> list[int]:
    tokens = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == count:
            return tokens
    return tokens


def slm_greedy(ckpt: str, ids: list[int], count: int) -> list[int]:
    trained = load_trained(ckpt, device_name="cpu")
    return [int(token) for token in generate(trained.model, torch.tensor([ids]), count,
                                             trained.context_length, temperature=0)]


@pytest.mark.parametrize("source", ["trained", "padded directory"])
def test_llama_cpp_computes_slms_logits_and_greedy_continuation_in_f32(
        llama_cpp, tmp_path, trained_run, padded_llama, source):
    ckpt = str(trained_run / "ckpt" / "best.pth" if source == "trained" else padded_llama)
    export(ckpt, str(tmp_path / "m.gguf"), out_format="gguf")
    trained = load_trained(ckpt, device_name="cpu")
    ids = trained.tokenizer.encode("ROMEO:\nBut soft, what light")
    llm = llama_cpp_model(llama_cpp, tmp_path / "m.gguf", trained.context_length)
    llm.eval(ids)
    with torch.no_grad():
        expected = trained.model(torch.tensor([ids]))[0][0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), expected, atol=2e-3)
    count = min(40, trained.context_length - len(ids))
    assert llama_cpp_greedy(llm, ids, count) == slm_greedy(ckpt, ids, count)


def numbers_tokenizer(directory: Path) -> Path:
    """A byte-level BPE with GPT-2's pre-tokenizer trained on text full of numbers, so that it
    merges digits: under SmolLM2's pre-tokenizer, which splits them, it tokenizes otherwise."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([f"{i} x{i * 37}y {i % 97}.{i ** 2}" for i in range(4000)]
                                  + TEXTS, trainer)
    tokenizer.save(str(directory / "numbers.json"))
    return directory / "numbers.json"


def test_llama_cpp_tokenizes_as_slm_for_gpt2_and_smollm_pre_tokenizers(tmp_path, llama_cpp):
    numbers = numbers_tokenizer(tmp_path)
    smollm = edited_tokenizer(tmp_path / "smollm.json", numbers, pre_tokenizer=SMOLLM_PRE_TOKENIZER)
    assert Tokenizer.from_file(str(smollm)).encode("x1234y").ids != (
        Tokenizer.from_file(str(numbers)).encode("x1234y").ids)  # digits split: other tokens
    texts = all_texts()
    assert len(texts) > 300
    for tokenizer_path in (TOKENIZER, str(numbers), str(smollm)):
        tokenizer = Tokenizer.from_file(tokenizer_path)
        ckpt = random_checkpoint(tmp_path, ModelConfig(
            vocab_size=tokenizer.get_vocab_size(), embed_dim=64, num_heads=4, ff_dim=128,
            num_layers=1, max_seq_len=96))
        export(str(ckpt), str(tmp_path / "m.gguf"), tokenizer_path, force=True,
               out_format="gguf")
        llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True,
                              verbose=False)
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == (
                tokenizer.encode(text, add_special_tokens=False).ids), (tokenizer_path, text)


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A random ChatML Llama directory with GQA, and a checkpoint fine-tuned from it on
    conversations (a 128-token window), each beside its GGUF export."""
    root = tmp_path_factory.mktemp("chat")
    chat_llama(root / "llama")
    conversations = write_conversations(root / "chat.jsonl", 200)
    config = tiny_config(root, conversations, model={"max_seq_len": 256},
                         data={"context_length": 128}, training={
        "init_from": str(root / "llama"), "max_steps": 4, "eval_every": 4, "save_every": 4})
    result = run_script("train.py", str(write_config(root / "sft.yaml", config)), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    models = {"directory": root / "llama", "fine-tuned": root / "ckpt" / "best.pth"}
    for name, source in models.items():
        export(str(source), str(root / f"{name}.gguf"), out_format="gguf")
    return {name: (source, root / f"{name}.gguf") for name, source in models.items()}


@pytest.mark.parametrize("source", ["directory", "fine-tuned"])
def test_llama_cpp_chats_as_infer_chat_and_continues_as_slm_at_temperature_zero(
        llama_cpp, chat_models, source, monkeypatch, capsys):
    """llama-cpp-python's chat completion, through the template inside the file, replies as
    `infer.py --chat --temperature 0` does; greedy continuations agree token for token."""
    ckpt, gguf_path = chat_models[source]
    trained = load_trained(str(ckpt), device_name="cpu")
    llm = llama_cpp_model(llama_cpp, gguf_path, trained.context_length)
    replies = set()
    for system, user in (("", "Who art thou?"), ("Speak in verse.", "What news?"),
                         ("", "Good morrow, ünïcode 😀")):
        code, stdout, stderr = run_main(infer.main, [
            "--ckpt_path", str(ckpt), "--chat", "--temperature", "0", "--max-length", "24",
            "--prompt", user, "--system", system, "--device", "cpu"], ckpt.parent,
            monkeypatch, capsys)
        assert code == 0, stderr
        messages = [{"role": "system", "content": system}] if system else []
        reply = llm.create_chat_completion(messages + [{"role": "user", "content": user}],
                                           temperature=0.0, max_tokens=24, repeat_penalty=1.0)
        # llama-cpp-python leaves a control token's text and bytes that form no character out
        # of a reply, where infer.py prints the token and U+FFFD: the same tokens, shown so.
        shown = re.sub("|".join(map(re.escape, [*CHAT_SPECIAL_TOKENS, "\ufffd"])), "", stdout)
        assert reply["choices"][0]["message"]["content"] + "\n" == shown
        replies.add(stdout)
    assert len(replies) == 3  # the replies depend on the prompt
    ids = trained.tokenizer.encode("<|im_start|>user\nWhat news?<|im_end|>\n")
    assert llama_cpp_greedy(llm, ids, 40) == slm_greedy(str(ckpt), ids, 40)
