"""Random weights with the fixtures' initialisation, for the demo checkpoint and benchmarks.

Scales follow the parity fixtures (linear N(0, 1/fan_in), norms near 1, sharper router and output
head) so activations stay well scaled through any depth. The answers of such a model are noise.

Each tensor is drawn from a generator of its own, seeded from the seed and the tensor's name, so
that any tensor can be skipped without changing the others (`skip_quantized`: the quantized cache
gave those), and `random_weights_identity` names the weights for cache keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import torch

from .checkpoint import SKIPPED_PREFIXES, checkpoint_manifest, internal_target, parameter_slot
from .config import DeepseekVL2Config
from .streaming_quantizer import StreamingQuantizer


def init_distribution(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the normal distribution checkpoint tensor `name` is drawn from."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
        return 1.0, 0.1
    if name.endswith("bias"):  # includes the router's e_score_correction_bias
        return 0.0, 0.02
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    if name == "vision.pos_embed":
        return 0.0, 0.1
    if name in ("image_newline", "view_seperator"):
        return 0.0, 0.5
    if len(shape) == 1 or name.endswith("attn_pool.latent"):
        return 0.0, 0.02
    std = 1.0 / math.sqrt(math.prod(shape[1:]))
    if name.endswith("lm_head.weight"):
        std *= 4.0
    elif name.endswith("mlp.gate.weight"):
        std *= 3.0
    return 0.0, std


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    mean, std = init_distribution(name, shape)
    return mean + std * torch.randn(shape, generator=generator, dtype=torch.float32)


# Bump when the values drawn change (the distributions, the seeding): it is part of the identity.
RANDOM_WEIGHTS_VERSION = 2


def random_weights_identity(config: DeepseekVL2Config, seed: int, device: torch.device) -> str:
    """What random weights are, for cache keys: their config, seed and generator (the device's
    kind draws its own stream; the dtype is each cache's own key)."""
    text = json.dumps(
        [RANDOM_WEIGHTS_VERSION, dataclasses.asdict(config), seed, torch.device(device).type], sort_keys=True, default=str
    )
    return "random-" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


@torch.no_grad()
def randomize_(model: torch.nn.Module, config: DeepseekVL2Config, seed: int = 0, skip_quantized: bool = False) -> None:
    """Fill a materialised model in place, tensor by tensor, without building a checkpoint, and set
    its `weights_id` (random_weights_identity).

    Quantized weights (compute/quantized.py) draw the same values in the model dtype, one matrix at
    a time, and store them quantized: a quantized model never exists in the model dtype. With
    `skip_quantized` they are left as they are (filled from the quantized cache).
    """
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    generator = torch.Generator(device=device)
    quantizer = StreamingQuantizer(model)
    for name, shape in checkpoint_manifest(config).items():
        if name.startswith(SKIPPED_PREFIXES):
            continue
        mean, std = init_distribution(name, shape)
        target = internal_target(name, config.language)
        generator.manual_seed(tensor_seed(seed, name))
        if target.param in quantizer and skip_quantized:
            continue
        if target.param in quantizer:
            # Drawn a block of rows at a time: the same values as one draw over the region (the
            # generator's stream is consumed in order), which the unquantized model gets.
            weight = quantizer.weights[target.param]

            def draw(a: int, b: int) -> torch.Tensor:
                rows = torch.empty(b - a, weight.in_features, dtype=weight.dtype, device=device)
                return rows.normal_(mean, std, generator=generator)

            quantizer.fill(target.param, target.index, draw)
        else:
            parameter_slot(params, name, config.language).normal_(mean, std, generator=generator)
    assert skip_quantized or not quantizer.incomplete(), quantizer.incomplete()
    model.weights_id = random_weights_identity(config, seed, device)
