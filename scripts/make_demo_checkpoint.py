#!/usr/bin/env python3
"""Write a small random-weight DeepSeek-VL2 checkpoint for demos and smoke tests.

The checkpoint has the Hugging Face layout of the released models (config.json, sharded bf16
safetensors with an index, tokenizer and processor files) and the tiny test architecture (hidden
size 64, 3 layers, MLA attention, 8 routed experts), with the realistic 129280-row vocabulary so
that the real DeepSeek tokenizer can be used. The weights are random: THE MODEL'S ANSWERS ARE
NOISE. It exists to exercise the whole service (HTTP, processor, engine) in seconds on a CPU.

Usage: python scripts/make_demo_checkpoint.py [--out weights/demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from deepseek_vl2.model.checkpoint import checkpoint_manifest  # noqa: E402
from deepseek_vl2.model.config import DeepseekVL2Config  # noqa: E402
from deepseek_vl2.model.random_weights import random_tensor  # noqa: E402
from deepseek_vl2.serving.weights import DEMO_MARKER  # noqa: E402

TOKENIZER_ASSETS = PROJECT_ROOT / "deepseek_vl2" / "assets" / "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
)
NUM_SHARDS = 3
NOISE_NOTICE = (
    "Random-weight DEMO checkpoint written by scripts/make_demo_checkpoint.py: "
    "its answers are noise. Use real weights (scripts/download_weights.py) for real answers."
)

# Every (width, height) grid of 384 px tiles with at most 9 tiles, in the released order
# (the order decides ties when the processor picks a resolution).
CANDIDATE_RESOLUTIONS = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
    [3456, 384], [1152, 1152],
]  # fmt: skip

DEMO_CONFIG = {
    "architectures": ["DeepseekVLV2ForCausalLM"],
    "model_type": "deepseek_vl_v2",
    "_comment": NOISE_NOTICE,
    "candidate_resolutions": CANDIDATE_RESOLUTIONS,
    "global_view_pos": "head",
    "tile_tag": "2D",
    "torch_dtype": "bfloat16",
    "vision_config": {
        "model_type": "vision",
        "model_name": "siglip_so400m_patch14_384",
        "patch_size": 14,
        "width": 64,
        "layers": 2,
        "heads": 2,
        "mlp_ratio": 3.7362,
        "weight_init": "skip",
    },
    "projector_config": {
        "model_type": "mlp_projector",
        "input_dim": 64,
        "n_embed": 64,
        "token_pooling": False,
    },
    "language_config": {
        "model_type": "deepseek_v2",
        "vocab_size": 129280,  # the realistic tokenizer's ids go up to 128822
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": 64,
        "intermediate_size": 160,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "max_position_embeddings": 4096,
    },
}


def shard_names(names: list[str], shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Split tensor names into NUM_SHARDS consecutive groups of roughly equal byte size."""
    total = sum(math.prod(shapes[name]) for name in names)
    shards: list[list[str]] = [[] for _ in range(NUM_SHARDS)]
    running = 0
    for name in names:
        index = min(running * NUM_SHARDS // total, NUM_SHARDS - 1)
        shards[index].append(name)
        running += math.prod(shapes[name])
    return [shard for shard in shards if shard]


def write_demo_checkpoint(out_dir: Path, seed: int = 0) -> None:
    config = DeepseekVL2Config.from_dict(DEMO_CONFIG)
    shapes = checkpoint_manifest(config)
    names = sorted(shapes)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: random_tensor(name, shapes[name], generator).to(torch.bfloat16) for name in names
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = shard_names(names, shapes)
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in group}, out_dir / filename, {"format": "pt"})
        weight_map |= dict.fromkeys(group, filename)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}, indent=2) + "\n"
    )
    for filename in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_ASSETS / filename, out_dir / filename)
    (out_dir / DEMO_MARKER).write_text(NOISE_NOTICE + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "weights" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_demo_checkpoint(args.out, args.seed)
    print(f"Wrote demo checkpoint to {args.out}. {NOISE_NOTICE}")


if __name__ == "__main__":
    main()
