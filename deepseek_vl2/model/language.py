"""DeepSeek-V2-style mixture-of-experts decoder: decoder layers of attention (attention.py) and
MoE or dense feed-forward (moe.py), the output head, and the KV caches they own.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compute.execution import Linear
from .attention import MultiHeadAttention, MultiHeadLatentAttention, RotaryTables, StepContext
from .config import LanguageConfig
from .moe import MLP, MoE
from .norm import RMSNorm


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
