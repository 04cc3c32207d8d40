"""Decoder-only Transformer, numerically the Llama architecture.

Pre-norm blocks: RMSNorm -> causal self-attention (RoPE, rotate-half convention, optional GQA) ->
residual -> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; output head tied to the token embedding.
Module names (q_proj, gate_proj, ...) and math match Hugging Face's LlamaForCausalLM one to one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import ModelConfig, UserError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is the fp32 residual stream even under autocast, so this normalises in fp32; one fused op on CUDA.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def compiled_cpu_decode(x: torch.Tensor) -> bool:
    """True while torch.compile traces a one-token, batch-1 step on CPU. Such a step reads every weight once;
    written as multiply-and-sum, Inductor fuses all of it into one C++ kernel, 2-3x faster than an MKL
    matrix-vector call per weight plus an SDPA call per layer. Eager or batched, the library kernels are
    the faster ones; on a GPU this form has not been measured, so it stays CPU-only."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[:-1].numel() == 1


class Linear(nn.Linear):
    """Bias-free nn.Linear with the compiled CPU decode form above."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if compiled_cpu_decode(x):
            return (x.unsqueeze(-2) * self.weight).sum(-1)
        return F.linear(x, self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (max_seq_len, head_dim), rotate-half layout: both halves repeat the same
    frequencies, and the first half of sin is negated so apply_rope needs no negation of its own."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim); cos/sin: (T, head_dim) from rope_tables. Rotates channel i with channel
    i + head_dim/2: x * cos + (-x2, x1) * sin, where roll swaps the halves and sin carries the sign."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)


@dataclass
class KVCache:
    """Keys/values of one layer by position: (B, num_kv_heads, max_seq_len, head_dim). Fixed shapes, so a
    compiled decode step never recompiles; attention masks out the positions not written yet."""
    k: torch.Tensor
    v: torch.Tensor


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.q_proj = Linear(config.embed_dim, self.num_heads * self.head_dim)
        self.k_proj = Linear(config.embed_dim, self.num_kv_heads * self.head_dim)
        self.v_proj = Linear(config.embed_dim, self.num_kv_heads * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.embed_dim)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k.index_copy_(2, input_pos, k)
            cache.v.index_copy_(2, input_pos, v)
            k, v = cache.k, cache.v
        if self.num_kv_heads != self.num_heads:  # GQA: kv head j serves query heads j*g .. j*g+g-1 (HF's repeat_kv)
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if cache is not None and compiled_cpu_decode(x):  # one query per head against the whole cache
            scores = (q * k).sum(-1) * self.head_dim ** -0.5  # (B, heads, max_seq_len)
            y = (scores.masked_fill(~mask, float("-inf")).softmax(-1).unsqueeze(-1) * v).sum(-2, keepdim=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.embed_dim, config.ff_dim)
        self.up_proj = Linear(config.embed_dim, config.ff_dim)
        self.down_proj = Linear(config.ff_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout  # functional, not an nn.Dropout: no module call per decode step in eval

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, cache, input_pos, mask)
        x = x + F.dropout(attn_out, self.dropout, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.lm_head = Linear(config.embed_dim, config.vocab_size)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one matrix reads tokens in and writes logits out
        cos, sin = rope_tables(config.embed_dim // config.num_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual writes scaled by 1/sqrt(2 * layers) so the residual stream's variance stays O(1) with depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, vocab), mean loss; last_only: logits (B, 1, vocab) of the
        last position, all that sampling needs (the head is a fifth of a forward at the default size).

        Without caches idx holds positions 0..T-1. With caches, input_pos (T,) gives the positions of idx's
        tokens; their keys/values are written there and each attends to every cached position up to its own.
        """
        T = idx.shape[1]
        if caches is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            cos, sin = self.rope_cos.index_select(0, input_pos), self.rope_sin.index_select(0, input_pos)
            mask = torch.arange(self.config.max_seq_len, device=idx.device) <= input_pos[:, None]  # (T, max_seq_len)
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, caches[i] if caches is not None else None, input_pos, mask)
        logits = self.lm_head(self.norm(x[:, -1:] if last_only else x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        """Parameters counted once (the tied embedding/head matrix is one tensor)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM-style: 6N for the matmuls (head included) + 12·L·d·T for attention."""
        c = self.config
        return 6 * self.num_params() + 12 * c.num_layers * c.embed_dim * seq_len

    def new_caches(self, batch_size: int) -> list[KVCache]:
        """Zeroed caches in the dtype keys and values are computed in: autocast's when it is on (bf16/fp16, half
        the memory of fp32), else the weights'."""
        c = self.config
        param = self.embed_tokens.weight
        device_type = param.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else param.dtype
        shape = (batch_size, c.num_kv_heads, c.max_seq_len, c.embed_dim // c.num_heads)
        return [KVCache(torch.zeros(shape, device=param.device, dtype=dtype),
                        torch.zeros(shape, device=param.device, dtype=dtype)) for _ in range(c.num_layers)]

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_id: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
        """Yield the next (B,) token ids one step at a time; temperature 0 = greedy.

        With the cache the prompt is prefilled once, then each step feeds one position. When the
        context fills up, the most recent half is prefilled again and decoding goes on from there.
        Stops early once every row has produced eos_id (rows that finished keep emitting eos_id).
        compile=True runs the decode step (or, without the cache, the forward) through torch.compile:
        a one-off compile of seconds, then fewer, fused kernels per token.
        """
        max_len = self.config.max_seq_len
        # The newest max_len tokens, always a fresh contiguous tensor made here, so a compiled step sees
        # the same strides and tensor kind every call and never recompiles for them.
        window = idx[:, -max_len:].clone(memory_format=torch.contiguous_format)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        caches, cached_len = None, 0
        positions = torch.arange(max_len, device=idx.device)
        # On CPU a decode step is ~100 µs of compute, so per-call costs count: the C++ wrapper launches kernels
        # without Python, and memory planning takes the step's ~50 intermediates from one allocation.
        options = {"cpp_wrapper": True, "memory_planning": True} if idx.device.type == "cpu" else None
        step = torch.compile(self, options=options) if compile else self
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = step(window, last_only=True)
            elif caches is not None and cached_len < max_len:  # decode: one new position
                logits, _ = step(next_token[:, None], caches=caches, input_pos=positions[cached_len:cached_len + 1])
                cached_len += 1
            else:  # first step, or the cache is full: prefill (the newest half of) the window, eagerly
                if caches is None:
                    caches = self.new_caches(idx.shape[0])
                else:  # positions past the refilled ones keep stale keys, which the mask hides
                    window = window[:, -(max_len // 2):]
                cached_len = window.shape[1]
                logits, _ = self(window, caches=caches, input_pos=positions[:cached_len], last_only=True)
            next_token = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            window = torch.cat((window[:, -(max_len - 1):], next_token[:, None]), dim=1)
            yield next_token
            if eos_id is not None and bool(finished.all()):
                return


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, vocab) -> (B,) ids. top_k <= 0 and top_p >= 1 disable those filters."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the best token always stays.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def load_weights(model: Transformer, checkpoint: dict, source: str) -> None:
    """Load checkpoint["model"] into `model`, refusing (with the differing settings named) another architecture."""
    saved = checkpoint["config"].get("model", {}) if isinstance(checkpoint.get("config"), dict) else {}
    differences = [f"{key}={saved.get(key)!r} vs {value!r}" for key, value in dataclasses.asdict(model.config).items()
                   if key != "dropout" and saved.get(key) != value]
    if differences:
        raise UserError(f"{source} was trained with a different model ({', '.join(differences)}, checkpoint vs "
                        "config) — use the config it was trained with or start a new run elsewhere")
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"{source} does not fit the model ({str(err).splitlines()[0][:160]}) — "
                        "the checkpoint is damaged or from another program") from None
