"""GGUF files for llama.cpp (and Ollama and LM Studio, built on it): SLM weights written as
llama.cpp's `llama` architecture, with the tokenizer and the chat template inside, by `gguf`,
llama.cpp's own reader and writer (export.py --format gguf).

Two things differ from SLM's layout. llama.cpp's Llama graph rotates interleaved pairs
(x0, x1), (x2, x3), ... where model.py rotates halves (x_i, x_{i + head_dim/2}); permuting the
rows of q_proj and k_proj within each head maps one onto the other, as llama.cpp's converter does
for Hugging Face Llama weights. And its tokenizer is its own reimplementation of byte-level BPE:
only a tokenizer whose pre-tokenizer it knows is written, so the file tokenizes as SLM does.
"""
from __future__ import annotations

import json
from typing import BinaryIO

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from chat import ChatFormat
from files import atomic_write
from utils import Config, UserError

Q = gguf.GGMLQuantizationType
DTYPES = {  # --dtype: (file type, what 2-D weights are stored as); norms always stay f32
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
Q8_BLOCK = gguf.GGML_QUANT_SIZES[Q.Q8_0][0]  # values per q8_0 block; other rows are f16
TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
DIGITS = {"type": "Digits", "individual_digits": True}
PRE_TOKENIZERS = {  # llama.cpp's name for each pre-tokenizer whose regex it implements
    "gpt-2": [BYTE_LEVEL],  # SLM's own tokenizers
    "smollm": [DIGITS, BYTE_LEVEL],  # SmolLM2's: each digit apart, then GPT-2's regex
}


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q_proj or k_proj (heads * head_dim, in): each head's rows (0..d/2-1, d/2..d-1) reordered
    as pairs (0, d/2), (1, d/2+1), ..., the order llama.cpp rotates them in."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(
        rows, columns)


def _pre_tokenizer_steps(spec: dict) -> list[dict]:
    """The pre-tokenizer as a list of steps, each with only the settings that change what it
    splits (trim_offsets changes offsets, not tokens)."""
    step = spec.get("pre_tokenizer") or {}
    steps = step.get("pretokenizers", []) if step.get("type") == "Sequence" else [step]
    return [{key: value for key, value in part.items() if key != "trim_offsets"}
            for part in steps]


def llama_cpp_pre_tokenizer(tokenizer: Tokenizer, source: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; a tokenizer llama.cpp's byte-level
    BPE would split, merge or decode otherwise is refused, naming what differs."""
    spec = json.loads(tokenizer.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    steps = _pre_tokenizer_steps(spec)
    names = [name for name, expected in PRE_TOKENIZERS.items() if steps == expected]
    stripped = [token["content"] for token in spec.get("added_tokens", [])
                if any(token.get(flag) for flag in ("lstrip", "rstrip", "single_word"))]
    if model.get("byte_fallback"):
        problem = "it is a byte-fallback (SentencePiece-style) BPE tokenizer, not byte-level BPE"
    elif model.get("type") != "BPE":
        problem = f"it is a {model.get('type')} tokenizer, not byte-level BPE"
    elif spec.get("normalizer"):
        problem = f"it normalizes text first ({spec['normalizer'].get('type')})"
    elif model.get("ignore_merges"):
        problem = "it skips the merges of words in its vocabulary (ignore_merges)"
    elif any(model.get(key) for key in ("dropout", "continuing_subword_prefix",
                                          "end_of_word_suffix")):
        problem = "its BPE sets dropout or subword affixes"
    elif not names:
        kinds = "+".join(str(step.get("type")) for step in steps) or "none"
        problem = f"its pre-tokenizer ({kinds}) is none of those llama.cpp implements"
    elif decoder.get("type") != "ByteLevel":
        problem = f"its decoder ({decoder.get('type')}) is not ByteLevel"
    elif stripped:
        problem = f"its added token {stripped[0]!r} strips the spaces beside it"
    else:
        return names[0]
    raise UserError(f"{source}: {problem}, so a GGUF file would tokenize text differently — "
                    "export a Hugging Face directory instead (--format hf)")


def _merges(tokenizer: Tokenizer) -> list[str]:
    """BPE merges as llama.cpp stores them, "left right" (tokenizer.json holds either form)."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def _vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """One token per embedding row with its llama.cpp type: rows the tokenizer never produces
    (a padded vocabulary) get unused placeholder tokens, as llama.cpp's converter writes them."""
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = tokenizer.id_to_token(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token_id not in added else
                         gguf.TokenType.CONTROL if added[token_id].special else
                         gguf.TokenType.USER_DEFINED)
    return tokens, types


def _stored(weight: torch.Tensor, weight_type: Q) -> tuple[np.ndarray, Q]:
    """The array to write for one weight and its type: 1-D weights (norms) stay f32, and rows
    q8_0 cannot split into blocks fall back to f16."""
    array = weight.detach().float().cpu().numpy()
    if array.ndim == 1 or weight_type == Q.F32:
        return array, Q.F32
    if weight_type == Q.Q8_0 and array.shape[-1] % Q8_BLOCK:
        weight_type = Q.F16
    return gguf.quants.quantize(array, weight_type), weight_type


def gguf_tensors(state: dict[str, torch.Tensor], config: Config, dtype: str
                 ) -> dict[str, tuple[np.ndarray, Q]]:
    """llama.cpp's tensors, by its names, from a model.py state dict: q and k rows interleaved
    for its RoPE, and a tied head stored once, as the embedding."""
    model = config.model
    tensors = {}
    for name, weight in state.items():
        if name == "lm_head.weight" and model.tie_embeddings:
            continue
        if name in TOP_NAMES:
            tensors[TOP_NAMES[name]] = _stored(weight, DTYPES[dtype][1])
            continue
        _, layer, module = name.removesuffix(".weight").split(".", 2)  # layers.3.mlp.up_proj
        if module == "self_attn.q_proj":
            weight = interleave_rope_rows(weight, model.num_heads)
        elif module == "self_attn.k_proj":
            weight = interleave_rope_rows(weight, model.num_kv_heads)
        tensors[f"blk.{layer}.{LAYER_NAMES[module]}.weight"] = _stored(weight, DTYPES[dtype][1])
    return tensors


def write_gguf(out_path: str, state: dict[str, torch.Tensor], config: Config,
               tokenizer: Tokenizer, pre_tokenizer: str, chat: ChatFormat, dtype: str) -> None:
    """Write the model as a GGUF file at `out_path`, its tokenizer split as llama.cpp's
    `pre_tokenizer` (llama_cpp_pre_tokenizer), crash-safely: a failure leaves any earlier file
    there as it was."""
    model = config.model
    tokens, token_types = _vocabulary(tokenizer, model.vocab_size)
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name("SLM")  # llama.cpp changes how it tokenizes for some names (phi-3's)
    writer.add_file_type(DTYPES[dtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.data.context_length)
    writer.add_embedding_length(model.embed_dim)
    writer.add_block_count(model.num_layers)
    writer.add_feed_forward_length(model.ff_dim)
    writer.add_head_count(model.num_heads)
    writer.add_head_count_kv(model.num_kv_heads)
    writer.add_layer_norm_rms_eps(model.norm_eps)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_rope_dimension_count(model.embed_dim // model.num_heads)
    writer.add_vocab_size(model.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(_merges(tokenizer))
    # A tokenizer naming no bos or pad token gets its end-of-turn token for both, as in the
    # Hugging Face export: llama.cpp would otherwise take token 11 for a missing one.
    special = {"bos_token": chat.end_of_turn, "pad_token": chat.end_of_turn,
               **chat.special_tokens}
    for add_id, token in ((writer.add_bos_token_id, special["bos_token"]),
                          (writer.add_eos_token_id, chat.end_of_turn),
                          (writer.add_eot_token_id, chat.end_of_turn),
                          (writer.add_pad_token_id, special["pad_token"])):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"the chat format's special token {token!r} is not in the "
                            "tokenizer's vocabulary — fix the tokenizer_config.json that names "
                            "it")
        add_id(token_id)
    writer.add_add_bos_token(False)  # SLM trains without a bos token before each document
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat.template)
    for tensor_name, (array, tensor_type) in gguf_tensors(state, config, dtype).items():
        writer.add_tensor(tensor_name, array, raw_dtype=tensor_type)
    write_atomically(writer, out_path)


def write_gguf_lora(out_path: str, adapter: dict[str, torch.Tensor], config: Config) -> None:
    """Write a LoRA adapter (lora.py's tensors) as llama.cpp's LoRA GGUF at `out_path`, which
    llama.cpp applies over a GGUF of its base (`--lora`): each adapted weight's A and B, in f32,
    under the weight's name plus `.lora_a` / `.lora_b`, in PEFT's shapes; B's rows of q and k
    interleaved as the base's are, since (P B) A = P (B A). Crash-safe, as write_gguf."""
    model, t = config.model, config.training
    writer = gguf.GGUFWriter(None, "llama")  # llama.cpp refuses an adapter of another architecture
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, t.lora_alpha or 2.0 * t.lora_rank)
    for name, tensor in adapter.items():  # layers.3.self_attn.q_proj.lora_A.weight
        linear, part = name.removesuffix(".weight").rsplit(".", 1)
        _, layer, module = linear.split(".", 2)
        heads = {"self_attn.q_proj": model.num_heads, "self_attn.k_proj": model.num_kv_heads}
        if part == "lora_B" and module in heads:
            tensor = interleave_rope_rows(tensor, heads[module])
        suffix = "lora_a" if part == "lora_A" else "lora_b"
        writer.add_tensor(f"blk.{layer}.{LAYER_NAMES[module]}.weight.{suffix}",
                          tensor.detach().float().contiguous().numpy(), raw_dtype=Q.F32)
    write_atomically(writer, out_path)


def write_atomically(writer: gguf.GGUFWriter, out_path: str) -> None:
    """The writer's header, metadata and tensors into `out_path` crash-safely: a failure leaves
    any earlier file there as it was."""

    def write(file: BinaryIO) -> None:  # gguf opens a path itself unless given its open files
        writer.fout, writer.state = [file], gguf.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)  # atomic_write syncs and closes the file

    atomic_write(out_path, write)
