"""DeepSeek-V2-style mixture-of-experts decoder: RMSNorm, RoPE, attention (MHA or MLA), router,
experts.

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
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .execution import Execution, Linear, upcast


def cache_zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed cache tensor. On the CPU it lives in an anonymous memory mapping, whose pages the
    OS zero-fills when they are first touched: resident memory grows with the positions actually
    written, not with the rows x context reserved (tiny: 0.23 GiB a row), and reading a page never
    written (masked-out positions) costs no memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale: the reference's order, which matters in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections fused."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.gate_up = Linear(dim, 2 * width, bias=False)
        self.down_proj = Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: picks `top_k` experts per token and their weights, all in fp32."""

    fp32_params = ("weight", "e_score_correction_bias")

    def __init__(self, c: LanguageConfig):
        super().__init__()
        assert c.n_routed_experts is not None and c.num_experts_per_tok is not None
        self.top_k, self.method, self.scoring = c.num_experts_per_tok, c.topk_method, c.scoring_func
        self.n_group, self.topk_group = c.n_group or 1, c.topk_group or 1
        self.normalize, self.scaling = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(c.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, D] -> weights [N, k] (fp32), expert indices [N, k]."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.method == "greedy":
            weights, indices = scores.topk(self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.unflatten(-1, (self.n_group, -1)).amax(dim=-1)
            weights, indices = self._topk_in_best_groups(scores, group_scores).topk(
                self.top_k, dim=-1, sorted=False
            )
        else:  # noaux_tc: the bias steers which experts are chosen, never how much they weigh
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.unflatten(-1, (self.n_group, -1)).topk(2, dim=-1).values.sum(-1)
            _, indices = self._topk_in_best_groups(choice, group_scores).topk(
                self.top_k, dim=-1, sorted=False
            )
            weights = scores.gather(-1, indices)
        if self.top_k > 1 and self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices

    def _topk_in_best_groups(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """Zero (not -inf, as the reference) every expert outside the `topk_group` best groups."""
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best, True)
        keep = keep.repeat_interleave(scores.shape[-1] // self.n_group, dim=-1)
        return scores.masked_fill(~keep, 0.0)


class Experts(nn.Module):
    """All routed experts' weights stacked; each token's output mixes only its selected experts."""

    execution = Execution()

    def __init__(self, n_experts: int, dim: int, width: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * width, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, width))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        execution = self.execution
        if x.shape[0] > execution.sync_free_expert_tokens:
            return self.forward_grouped(x, weights, indices)
        # Gathering copies each (token, expert) pair's weights and multiplies them: about 3x the
        # bytes of the pairs. Running every expert on every token reads each expert once.
        gathered = 3 * indices.numel() < self.w_gate_up.shape[0]
        if execution.sync_free_experts == "gathered" or (execution.sync_free_experts == "auto" and gathered):
            return self.forward_gathered(x, weights, indices)
        return self.forward_dense(x, weights, indices)

    def forward_grouped(self, x, weights, indices) -> torch.Tensor:
        """Sort (token, expert) pairs by expert and run one matmul per expert that has tokens.

        Reads each selected expert's weights once however many tokens chose it: the right shape
        for prefill. Costs one host sync to learn the group sizes.
        """
        linear = self.execution.linear
        k = indices.shape[-1]
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w_gate_up.shape[0]).tolist()
        token_of = order // k
        outputs = torch.empty(flat.numel(), x.shape[-1], device=x.device, dtype=x.dtype)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start : start + count]
            gate, up = linear(x[token_of[start : start + count]], self.w_gate_up[expert]).chunk(2, -1)
            outputs[rows] = linear(F.silu(gate) * up, self.w_down[expert])
            start += count
        return self._combine(outputs, weights, x.dtype)

    def forward_gathered(self, x, weights, indices) -> torch.Tensor:
        """Gather each token's selected expert weights and batch-multiply: no host sync, so it
        can be captured in a CUDA graph; for a few tokens, which rarely share an expert."""
        k = indices.shape[-1]
        flat = indices.flatten()
        tokens = x.repeat_interleave(k, dim=0)[:, None, :]
        gate, up = torch.bmm(tokens, self.w_gate_up[flat].transpose(1, 2)).chunk(2, -1)
        outputs = torch.bmm(F.silu(gate) * up, self.w_down[flat].transpose(1, 2))
        return self._combine(outputs[:, 0], weights, x.dtype)

    def forward_dense(self, x, weights, indices) -> torch.Tensor:
        """Every expert on every token, keeping only the selected results: no host sync, and each
        expert's weights read once; for a batch of decode rows that together touch most experts."""
        n_experts = self.w_gate_up.shape[0]
        tokens = x[None].expand(n_experts, -1, -1)
        gate, up = torch.bmm(tokens, self.w_gate_up.transpose(1, 2)).chunk(2, -1)
        outputs = torch.bmm(F.silu(gate) * up, self.w_down.transpose(1, 2))  # [E, n, D]
        selected = outputs.permute(1, 0, 2)[torch.arange(x.shape[0], device=x.device)[:, None], indices]
        return self._combine(selected.flatten(0, 1), weights, x.dtype)

    @staticmethod
    def _combine(outputs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weighted sum over each token's k experts, in fp32 like the reference."""
        n, k = weights.shape
        return (outputs.float().view(n, k, -1) * weights[..., None]).sum(dim=1).to(dtype)


class MoE(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        assert c.n_routed_experts is not None
        self.gate = Gate(c)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        width = c.shared_expert_width
        self.shared_experts = MLP(c.hidden_size, width) if width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.gate(flat)
        out = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, c: LanguageConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(c) if c.use_mla else MultiHeadAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c) if c.is_moe_layer(layer_idx) else MLP(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LanguageModel(nn.Module):
    def __init__(self, c: LanguageConfig):
        super().__init__()
        self.config = c
        self.model = DecoderStack(c)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rope = RotaryTables(c.rope_dim, c.max_position_embeddings, c.rope_theta)
        self.cache_shape: tuple[int, int] | None = None  # (batch, max_len) of the allocated caches

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Allocate every layer's cache: `batch` rows of `max_len` tokens; a no-op if that size."""
        if self.cache_shape == (batch, max_len):
            return
        if max_len > self.config.max_position_embeddings:
            raise ValueError(
                f"cache of {max_len} tokens exceeds the {self.config.max_position_embeddings}-token context"
            )
        weight = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.setup_cache(batch, max_len, weight.device, weight.dtype)
        self.cache_shape = (batch, max_len)

    def caches(self) -> list[torch.Tensor]:
        """Every cache tensor of every layer, each [rows, max_len, ...]."""
        return [cache for layer in self.model.layers for cache in layer.self_attn.caches()]

    def move_cache_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` cached tokens of row `source` into row `target`."""
        for cache in self.caches():
            cache[target, :length] = cache[source, :length]

    def context(self, positions: torch.Tensor, rows: slice | None = None, kv_len: int | None = None) -> StepContext:
        """A forward of tokens at `positions` [B, T].

        Without `rows` nothing is cached: causal attention within the tokens (full prefill).
        With `rows`, batch row b writes cache row rows.start + b at its positions and attends over
        that row's first `kv_len` entries, up to its own position.
        """
        dtype = self.lm_head.weight.dtype
        cos = self.rope.cos[positions].to(dtype)[:, None]
        sin = self.rope.sin[positions].to(dtype)[:, None]
        if rows is None:
            return StepContext(cos, sin, None, slice(0, 0), None, positions.shape[-1])
        assert kv_len is not None, "a cached forward needs kv_len"
        visible = torch.arange(kv_len, device=positions.device) <= positions[..., None]
        return StepContext(cos, sin, positions, rows, visible[:, None], kv_len)

    def forward(self, embeds: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Input embeddings [B, T, D] -> final hidden states [B, T, D] (after the last norm)."""
        x = embeds
        for layer in self.model.layers:
            x = layer(x, ctx)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
