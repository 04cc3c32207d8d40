"""Decoder-only Transformer, numerically Llama's: the file to edit to try an idea.

Pre-norm blocks: RMSNorm -> causal self-attention (rotate-half RoPE, optional GQA) -> residual ->
RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; head tied to the token embedding (unless
model.tie_embeddings is false). Module names (q_proj, gate_proj, ...) and math match Hugging
Face's LlamaForCausalLM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import ModelConfig, host_memory_bytes, require


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is the fp32 residual stream even under autocast, so this normalises in fp32.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (max_seq_len, head_dim), rotate-half layout: both halves repeat the
    frequencies, and sin's first half is negated so apply_rope needs no negation. Computed on
    the CPU (the model moves them with itself), also for a model built on the meta device."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
                                .float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device="cpu"), inv_freq)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim) * cos + (-x2, x1) * sin: roll swaps halves, sin has the sign."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)


@dataclass
class KVCache:
    """One layer's keys and values by position, (B, kv_heads, length, head_dim): fixed shapes,
    so a compiled decode step never recompiles; unwritten positions are masked. Positions are
    the same for every row (input_pos (T,)) or each row's own (input_pos (B, T))."""
    k: torch.Tensor
    v: torch.Tensor

    def update(self, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:  # row b's T new keys go to its positions input_pos[b]: (B, T, kv_heads, head_dim)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, :, input_pos] = k.transpose(1, 2)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.q_proj = nn.Linear(config.embed_dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.embed_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.embed_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.embed_dim, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, input_pos: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
        # GQA: kv head j serves query heads j*g .. j*g+g-1, read in place (no copy per group)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.embed_dim, config.ff_dim, bias=False)
        self.up_proj = nn.Linear(config.embed_dim, config.ff_dim, bias=False)
        self.down_proj = nn.Linear(config.ff_dim, config.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.embed_dim, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout  # functional: no module call per decode step in eval

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, input_pos: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, cache, input_pos, mask)
        x = x + F.dropout(attn_out, self.dropout, self.training)
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(mlp_out, self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if torch.get_default_device().type != "meta":
            check_fits_in_memory(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix reads and writes tokens
            self.lm_head.weight = self.embed_tokens.weight
        self.init_rope_tables()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # Residual writes scaled by 1/sqrt(2 * layers) keep the residual variance O(1) with depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, vocab) and the mean loss against targets; last_only: the
        last position's logits, all sampling needs. Without caches idx holds positions 0..T-1;
        with them, its keys/values go to positions input_pos, (T,) for every row or (B, T) for
        each row its own, and each token attends to every cached position up to its own."""
        T = idx.shape[1]
        if caches is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"{T} tokens exceed max_seq_len={self.config.max_seq_len}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = torch.arange(caches[0].k.shape[2], device=idx.device) <= input_pos[..., None]
            if input_pos.dim() == 2:  # per row: (B, 1, T, ...) broadcasts over the heads
                cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, caches[i] if caches is not None else None, input_pos, mask)
        logits = self.lm_head(self.norm(x[:, -1:] if last_only else x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def init_rope_tables(self) -> None:
        """The RoPE tables: buffers derived from the config, in no checkpoint. Computed at
        construction, and again once a model built on the meta device has memory (to_empty)."""
        c, device = self.config, self.embed_tokens.weight.device
        cos, sin = rope_tables(c.embed_dim // c.num_heads, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def num_params(self) -> int:
        """Parameters counted once (the tied embedding/head matrix is one tensor)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM-style: 6N for the matmuls + 12·L·d·T for attention."""
        c = self.config
        return 6 * self.num_params() + 12 * c.num_layers * c.embed_dim * seq_len

    def new_caches(self, batch_size: int, length: int) -> list[KVCache]:
        """Zeroed caches for `length` positions, in the dtype keys and values are computed in:
        autocast's when it is on (half the memory of fp32), else the weights'."""
        c, weight = self.config, self.embed_tokens.weight
        autocast = torch.is_autocast_enabled(weight.device.type)
        dtype = torch.get_autocast_dtype(weight.device.type) if autocast else weight.dtype
        shape = (batch_size, c.num_kv_heads, length, c.embed_dim // c.num_heads)
        return [KVCache(torch.zeros(shape, device=weight.device, dtype=dtype),
                        torch.zeros(shape, device=weight.device, dtype=dtype))
                for _ in range(c.num_layers)]


def meta_model(config: ModelConfig) -> Transformer:
    """The model on the meta device: its shapes, no memory. Meta tensors hold no values, so
    normal_ is skipped: its first call there would import seconds of torch's decompositions."""
    with torch.device("meta"), mock.patch.object(nn.init, "normal_", lambda tensor, *_, **__:
                                                 tensor):
        return Transformer(config)


def check_fits_in_memory(config: ModelConfig) -> None:
    """Refuse a model whose fp32 weights alone exceed this machine's memory before allocating
    any: its parameters are counted on the meta device, so the count is the model's own."""
    weight_bytes = 4 * meta_model(config).num_params()
    memory = host_memory_bytes()
    require(weight_bytes <= memory, f"this model's fp32 weights alone take "
            f"{weight_bytes / 2**30:,.0f} GiB, more than this machine's {memory / 2**30:.0f} GiB "
            "of memory — lower embed_dim, ff_dim, num_layers or vocab_size")
