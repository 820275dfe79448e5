"""Attention of the language model, MHA or MLA, with the RoPE tables and the per-step context.

Attention modules own their KV cache: `max_batch` rows of the whole context, allocated once and
written at positions. One forward serves a full prefill without cache, a chunked prefill into one
cache row, and a decode step of several rows, each at its own position. MLA caches only the
compressed latent and the shared RoPE key, and decodes with the key/value up-projections absorbed
into the query and output.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
from torch import nn

from ..compute.execution import Execution, Linear, upcast
from .config import LanguageConfig
from .norm import RMSNorm


def cache_zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed cache tensor. On the CPU it lives in an anonymous memory mapping, whose pages the
    OS zero-fills when they are first touched: resident memory grows with the positions actually
    written, not with the rows x context reserved (tiny: 0.23 GiB a row), and reading a page never
    written (masked-out positions) costs no memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class RotaryTables(nn.Module):
    """cos/sin for every position up to the context length, computed in fp32."""

    def __init__(self, dim: int, max_positions: int, theta: float):
        super().__init__()
        self.dim, self.max_positions, self.theta = dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, dim), persistent=False)

    def reset(self, device: torch.device | str) -> None:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        inv_freq = 1.0 / (self.theta**exponents)
        angles = torch.outer(torch.arange(self.max_positions).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(device)
        self.sin = angles.sin().to(device)


def rotate_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE pairing dim i with dim i + d/2 ("NeoX" layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE pairing dims (2i, 2i+1); the result is written de-interleaved (evens then odds)."""
    d = x.shape[-1]
    x = x.unflatten(-1, (d // 2, 2)).transpose(-1, -2).flatten(-2)
    return rotate_half_split(x, cos, sin)


@dataclass
class StepContext:
    """What every attention layer needs to know about the tokens of one forward of [B, T] tokens."""

    cos: torch.Tensor  # [B, 1, T, rope_dim], activation dtype
    sin: torch.Tensor
    positions: torch.Tensor | None  # [B, T] cache positions written; None: no cache, causal
    rows: slice  # the cache rows of batch rows 0..B-1 (contiguous)
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool, True where attention is allowed
    kv_len: int  # cache entries visible to this step

    def write(self, cache: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Store value [B, T, ...] at each row's positions; return the rows' visible cache."""
        assert self.positions is not None and cache is not None, "setup_cache first"
        rows = cache[self.rows]
        batch = torch.arange(rows.shape[0], device=rows.device)[:, None]
        rows[batch, self.positions] = value
        return rows[:, : self.kv_len]


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention (the tiny variant), q/k/v fused into one projection."""

    execution = Execution()

    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim,
        )  # fmt: skip
        self.scale = c.attention_scale
        self.qkv = Linear(
            c.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=c.attention_bias
        )
        self.o_proj = Linear(self.heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        # [B, S, kv_heads, head_dim]; buffers, so a compiled decode step sees them as state
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def setup_cache(self, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, max_len, self.kv_heads, self.head_dim)
        self.k_cache = cache_zeros(shape, device, dtype)
        self.v_cache = cache_zeros(shape, device, dtype)

    def caches(self) -> tuple[torch.Tensor, ...]:
        return self.k_cache, self.v_cache

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim],
            dim=-1,
        )
        q = rotate_half_split(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)
        k = rotate_half_split(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if ctx.positions is not None:
            k = ctx.write(self.k_cache, k.transpose(1, 2)).transpose(1, 2)
            v = ctx.write(self.v_cache, v.transpose(1, 2)).transpose(1, 2)
        out = self.execution.attention(
            q, k, v, ctx.mask, causal=ctx.mask is None, scale=self.scale, enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MultiHeadLatentAttention(nn.Module):
    """MLA: keys and values are up-projected from a small per-token latent shared by all heads."""

    execution = Execution()

    def __init__(self, c: LanguageConfig):
        super().__init__()
        assert c.kv_lora_rank is not None
        self.heads, self.rank = c.num_attention_heads, c.kv_lora_rank
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.scale = c.attention_scale
        d, q_out = c.hidden_size, self.heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(d, q_out, bias=False)
        else:
            self.q_a_proj = Linear(d, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.rank + self.rope, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.heads * self.v_dim, d, bias=c.attention_bias)
        self.register_buffer("latent_cache", None, persistent=False)  # [B, S, rank], normed
        self.register_buffer("rope_key_cache", None, persistent=False)  # [B, S, rope], rotated

    def setup_cache(self, batch: int, max_len: int, device, dtype) -> None:
        self.latent_cache = cache_zeros((batch, max_len, self.rank), device, dtype)
        self.rope_key_cache = cache_zeros((batch, max_len, self.rope), device, dtype)

    def caches(self) -> tuple[torch.Tensor, ...]:
        return self.latent_cache, self.rope_key_cache

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.query(x).view(b, t, self.heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = rotate_interleaved(q_pe, ctx.cos, ctx.sin)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = rotate_interleaved(k_pe[:, None], ctx.cos, ctx.sin)[:, 0]  # [b, t, rope], all heads

        if ctx.positions is not None:
            latent = ctx.write(self.latent_cache, latent)
            k_pe = ctx.write(self.rope_key_cache, k_pe)

        # Decode absorbs: it reads only the small latent cache. In bf16 a prefill absorbs too: that
        # is the official model's order of products and roundings, whereas expanding rounds the
        # up-projected keys and values, which tips router near-ties (measured on the fixtures).
        if t == 1 or x.dtype != torch.float32:
            out = self._attend_absorbed(q_nope, q_pe, latent, k_pe, ctx.mask, causal=ctx.mask is None)
        else:
            out = self._attend_expanded(q_nope, q_pe, latent, k_pe, ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.v_dim))

    def _attend_expanded(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Up-project keys and values for every cached token: cheapest when many queries share them."""
        b, s, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, s, self.heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, self.heads, s, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return self.execution.attention(q, k, v, mask, causal=mask is None, scale=self.scale)

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, mask, causal: bool = False) -> torch.Tensor:
        """Fold W_UK into the query and W_UV into the output, attending over the latent directly.

        Per decoded token this reads rank + rope values per cached position instead of
        heads * (nope + v), which is the whole point of MLA. Without a mask, `causal` masks each
        query's later positions (a prefill without cache).
        """
        dtype = q_nope.dtype
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        if self.execution.fp32_attention and dtype != torch.float32:
            q_nope, q_pe, w = q_nope.float(), q_pe.float(), w.float()
            latent, k_pe = upcast(latent, slot=1), upcast(k_pe, slot=2)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        scores = q_pe @ k_pe[:, None].transpose(-1, -2) + q_latent @ latent[:, None].transpose(-1, -2)
        scores = (scores * self.scale).float()
        if causal:
            t, s = scores.shape[-2:]
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        out_latent = probs @ latent[:, None]
        return torch.einsum("bhtr,hvr->bhtv", out_latent, w_uv).to(dtype)
