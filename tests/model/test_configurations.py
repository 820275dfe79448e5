"""Architectures the fixtures do not cover (grouped-query MHA, MLA with a query LoRA, other MoE
layouts and routers): the cached engine paths must agree with the uncached forward on them too."""

from __future__ import annotations

import json

import pytest
import torch
from parity import CHECKPOINTS

from deepseek_vl2 import DeepseekVL2, DeepseekVL2Config
from deepseek_vl2.model.random_weights import randomize_

# Products, attention and routing differ in rounding between torch's CPU kernel levels (Makefile).
pytestmark = pytest.mark.kernel_level

VARIATIONS = {
    "mha-grouped-query": dict(use_mla=False, num_attention_heads=4, num_key_value_heads=2),
    "mla-query-lora": dict(q_lora_rank=24),
    "moe-every-other-layer": dict(num_hidden_layers=4, first_k_dense_replace=0, moe_layer_freq=2),
    "group-limited-greedy": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "noaux-grouped": dict(
        topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    ),  # fmt: skip
    "no-shared-experts": dict(n_shared_experts=None, first_k_dense_replace=2),
}


def build(variation: dict) -> tuple[DeepseekVL2, DeepseekVL2Config]:
    raw = json.loads((CHECKPOINTS / "tiny-mla" / "config.json").read_text())
    raw["language_config"] |= variation
    config = DeepseekVL2Config.from_dict(raw)
    with torch.device("meta"):
        model = DeepseekVL2(config)
    model.materialize(torch.device("cpu"), torch.float32)
    randomize_(model, config, seed=1)
    return model.eval(), config


@pytest.mark.parametrize("name", VARIATIONS)
@torch.inference_mode()
def test_cached_paths_agree_with_full_forward(name):
    model, config = build(VARIATIONS[name])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.language.vocab_size, (1, 40), generator=generator)
    no_images = dict(
        pixel_values=torch.zeros(1, 0, 3, 384, 384),
        images_seq_mask=torch.zeros(1, 40, dtype=torch.bool),
        images_spatial_crop=torch.zeros(1, 0, 2, dtype=torch.long),
    )
    full = model(ids, **no_images)[0]
    language = model.language
    language.setup_cache(1, 64)
    embeds = language.model.embed_tokens(ids)
    for start in range(0, 32, 16):  # chunked prefill of the first 32 tokens
        positions = torch.arange(start, start + 16)[None]
        ctx = language.context(positions, rows=slice(0, 1), kv_len=start + 16)
        hidden = language(embeds[:, start : start + 16], ctx)
    torch.testing.assert_close(language.logits(hidden[:, -1])[0], full[31], rtol=0, atol=1e-4)
    for position in range(32, 40):  # then one token at a time
        ctx = language.context(torch.tensor([[position]]), rows=slice(0, 1), kv_len=position + 1)
        step = language(embeds[:, position : position + 1], ctx)
        torch.testing.assert_close(language.logits(step[:, -1])[0], full[position], rtol=0, atol=1e-4)
