"""Checkpoint format: the tensors a config implies, and strict loading of Hugging Face snapshots.

Our modules fuse what the checkpoint keeps apart (q/k/v, gate/up, per-expert matrices stacked for
grouped matmuls), so loading goes through `internal_target`, which says where each checkpoint
tensor lands. Loading is strict in both directions: every expected tensor must be present with its
exact shape, and every tensor in the files must be used or deliberately skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import DeepseekVL2Config, LanguageConfig, ProjectorConfig, VisionConfig
from .streaming_quantizer import StreamingQuantizer

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

# The MAP attention-pool head is stored but the reference never runs it (ignore_head).
SKIPPED_PREFIXES = ("vision.attn_pool.",)


class CheckpointError(RuntimeError):
    """The files on disk do not match what the config says they should hold."""


def _vision_manifest(v: VisionConfig) -> dict[str, Shape]:
    w, hidden = v.width, v.mlp_hidden
    m: dict[str, Shape] = {
        "vision.pos_embed": (1, v.num_patches, w),
        "vision.patch_embed.proj.weight": (w, 3, v.patch_size, v.patch_size),
        "vision.patch_embed.proj.bias": (w,),
    }
    for i in range(v.layers):
        p = f"vision.blocks.{i}."
        m |= {
            p + "norm1.weight": (w,), p + "norm1.bias": (w,),
            p + "attn.qkv.weight": (3 * w, w), p + "attn.qkv.bias": (3 * w,),
            p + "attn.proj.weight": (w, w), p + "attn.proj.bias": (w,),
            p + "norm2.weight": (w,), p + "norm2.bias": (w,),
            p + "mlp.fc1.weight": (hidden, w), p + "mlp.fc1.bias": (hidden,),
            p + "mlp.fc2.weight": (w, hidden), p + "mlp.fc2.bias": (w,),
        }  # fmt: skip
    m |= {"vision.norm.weight": (w,), "vision.norm.bias": (w,)}
    p = "vision.attn_pool."
    m |= {
        p + "latent": (1, 1, w),
        p + "q.weight": (w, w), p + "q.bias": (w,),
        p + "kv.weight": (2 * w, w), p + "kv.bias": (2 * w,),
        p + "proj.weight": (w, w), p + "proj.bias": (w,),
        p + "norm.weight": (w,), p + "norm.bias": (w,),
        p + "mlp.fc1.weight": (hidden, w), p + "mlp.fc1.bias": (hidden,),
        p + "mlp.fc2.weight": (w, hidden), p + "mlp.fc2.bias": (w,),
    }  # fmt: skip
    return m


def projector_layer_dims(p: ProjectorConfig) -> list[tuple[int, int]]:
    """(in, out) of each Linear; they sit at even indices of the reference's Sequential.

    The reference always ends with GELU -> Linear(hidden, n_embed) after the input Linear, so even
    depth 1 has two Linears; depth d adds d - 2 hidden-to-hidden Linears in between.
    """
    hidden = p.n_embed * p.mlp_ratio
    first = (p.input_dim * p.downsample_ratio**2, hidden)
    return [first] + [(hidden, hidden)] * max(p.depth - 2, 0) + [(hidden, p.n_embed)]


def _projector_manifest(p: ProjectorConfig) -> dict[str, Shape]:
    m: dict[str, Shape] = {}
    for i, (fan_in, fan_out) in enumerate(projector_layer_dims(p)):
        m[f"projector.layers.{2 * i}.weight"] = (fan_out, fan_in)
        m[f"projector.layers.{2 * i}.bias"] = (fan_out,)
    return m


def _linear(name: str, fan_out: int, fan_in: int, bias: bool) -> dict[str, Shape]:
    m: dict[str, Shape] = {f"{name}.weight": (fan_out, fan_in)}
    if bias:
        m[f"{name}.bias"] = (fan_out,)
    return m


def _attention_manifest(c: LanguageConfig, p: str) -> dict[str, Shape]:
    d, h, bias = c.hidden_size, c.num_attention_heads, c.attention_bias
    if not c.use_mla:
        kv = c.num_key_value_heads * c.head_dim
        return (
            _linear(p + "q_proj", h * c.head_dim, d, bias)
            | _linear(p + "k_proj", kv, d, bias)
            | _linear(p + "v_proj", kv, d, bias)
            | _linear(p + "o_proj", d, h * c.head_dim, bias)
        )
    assert c.kv_lora_rank is not None
    m: dict[str, Shape] = {}
    if c.q_lora_rank is None:
        m |= _linear(p + "q_proj", h * c.qk_head_dim, d, False)
    else:
        m |= _linear(p + "q_a_proj", c.q_lora_rank, d, bias)
        m[p + "q_a_layernorm.weight"] = (c.q_lora_rank,)
        m |= _linear(p + "q_b_proj", h * c.qk_head_dim, c.q_lora_rank, False)
    m |= _linear(p + "kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, d, bias)
    m[p + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
    m |= _linear(p + "kv_b_proj", h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, False)
    m |= _linear(p + "o_proj", d, h * c.v_head_dim, bias)
    return m


def _mlp_manifest(p: str, d: int, width: int) -> dict[str, Shape]:
    return {
        p + "gate_proj.weight": (width, d),
        p + "up_proj.weight": (width, d),
        p + "down_proj.weight": (d, width),
    }


def _language_manifest(c: LanguageConfig) -> dict[str, Shape]:
    d = c.hidden_size
    m: dict[str, Shape] = {"language.model.embed_tokens.weight": (c.vocab_size, d)}
    for i in range(c.num_hidden_layers):
        p = f"language.model.layers.{i}."
        m |= _attention_manifest(c, p + "self_attn.")
        if c.is_moe_layer(i):
            assert c.n_routed_experts is not None
            m[p + "mlp.gate.weight"] = (c.n_routed_experts, d)
            if c.topk_method == "noaux_tc":
                m[p + "mlp.gate.e_score_correction_bias"] = (c.n_routed_experts,)
            for j in range(c.n_routed_experts):
                m |= _mlp_manifest(f"{p}mlp.experts.{j}.", d, c.moe_intermediate_size)
            if c.shared_expert_width is not None:
                m |= _mlp_manifest(p + "mlp.shared_experts.", d, c.shared_expert_width)
        else:
            m |= _mlp_manifest(p + "mlp.", d, c.intermediate_size)
        m[p + "input_layernorm.weight"] = (d,)
        m[p + "post_attention_layernorm.weight"] = (d,)
    m["language.model.norm.weight"] = (d,)
    m["language.lm_head.weight"] = (c.vocab_size, d)
    return m


def checkpoint_manifest(config: DeepseekVL2Config) -> dict[str, Shape]:
    """Every tensor name a checkpoint of this config holds, with its shape."""
    d = config.language.hidden_size
    return (
        {"image_newline": (d,), "view_seperator": (d,)}
        | _vision_manifest(config.vision)
        | _projector_manifest(config.projector)
        | _language_manifest(config.language)
    )


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a parameter of ours and the region of it to fill."""

    param: str
    index: tuple = ()


_FUSED_ROWS = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}


def _check_fits(name: str, shape: tuple[int, ...], region: tuple[int, ...]) -> None:
    if tuple(region) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} ({list(shape)}) does not fit our parameter region {list(region)}")


def internal_target(name: str, config: LanguageConfig) -> Target:
    """Map a checkpoint tensor name to our parameter layout (identity unless fused/stacked)."""
    expert = re.fullmatch(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
    if expert:
        prefix, j, proj = expert.group(1), int(expert.group(2)), expert.group(3)
        width = config.moe_intermediate_size
        if proj == "down_proj":
            return Target(f"{prefix}.experts.w_down", (j,))
        rows = slice(_FUSED_ROWS[proj] * width, (_FUSED_ROWS[proj] + 1) * width)
        return Target(f"{prefix}.experts.w_gate_up", (j, rows))

    dense = re.fullmatch(r"(.*\.(?:mlp|shared_experts))\.(gate_proj|up_proj)\.weight", name)
    if dense:
        prefix, proj = dense.group(1), dense.group(2)
        width = (
            config.shared_expert_width if prefix.endswith("shared_experts") else None
        ) or config.intermediate_size
        rows = slice(_FUSED_ROWS[proj] * width, (_FUSED_ROWS[proj] + 1) * width)
        return Target(f"{prefix}.gate_up.weight", (rows,))

    mha = re.fullmatch(r"(.*\.self_attn)\.(q_proj|k_proj|v_proj)\.(weight|bias)", name)
    if mha and not config.use_mla:
        prefix, proj, kind = mha.groups()
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        start = {"q_proj": 0, "k_proj": q, "v_proj": q + kv}[proj]
        stop = start + (q if proj == "q_proj" else kv)
        return Target(f"{prefix}.qkv.{kind}", (slice(start, stop),))

    return Target(name)


def expected_internal_params(config: DeepseekVL2Config) -> dict[str, Shape]:
    """Our parameter shapes implied by the manifest, for checking the module matches the format."""
    out: dict[str, Shape] = {}
    for name, shape in checkpoint_manifest(config).items():
        if name.startswith(SKIPPED_PREFIXES):
            continue
        target = internal_target(name, config.language)
        out.setdefault(target.param, shape)
    return out


def parameter_slot(
    params: dict[str, torch.nn.Parameter], name: str, config: LanguageConfig
) -> torch.Tensor:
    """The region of our parameter that checkpoint tensor `name` fills (a view, written in place)."""
    target = internal_target(name, config)
    if target.param not in params:
        raise CheckpointError(f"tensor {name!r} has no parameter {target.param!r}")
    return params[target.param].data[target.index]


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the file holding it (sharded index or a single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def checkpoint_identity(path: str | Path) -> str:
    """A digest of the checkpoint's config and of each weight file's name, size and modification
    time: different weights never share it (cheap: no weight bytes are read)."""
    path = Path(path)
    digest = hashlib.blake2b((path / "config.json").read_bytes(), digest_size=16)
    for file in sorted(set(_weight_files(path).values())):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def load_checkpoint(
    model: torch.nn.Module, path: str | Path, config: DeepseekVL2Config, skip_quantized: bool = False
) -> None:
    """Fill every parameter of `model` (already materialised on its device and dtype) from disk.

    One tensor at a time: each is read (memory-mapped), cast and copied into its slot, so peak
    host memory stays at one tensor rather than a second copy of the model.

    `skip_quantized`: the quantized weights were filled from the quantized cache
    (quantized_cache.py); their tensors are checked (present, with their shapes) but not read.
    """
    path = Path(path)
    started = time.perf_counter()
    manifest = checkpoint_manifest(config)
    files = _weight_files(path)

    unexpected = sorted(set(files) - set(manifest))
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} in {files[unexpected[0]].name} "
            f"({len(unexpected)} unexpected in all) for this config"
        )
    missing = sorted(set(manifest) - set(files))
    if missing:
        raise CheckpointError(
            f"missing tensor {missing[0]!r} in {path} ({len(missing)} missing in all)"
        )

    params = dict(model.named_parameters())
    filled = {name: 0 for name in params}
    quantizer = StreamingQuantizer(model)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)

    n_loaded = n_skipped = 0
    for i, (file, names) in enumerate(sorted(by_file.items())):
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} named by the index is missing in {path}")
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in sorted(names):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != manifest[name]:
                    raise CheckpointError(
                        f"tensor {name!r} in {file.name} has shape {list(shape)}, "
                        f"expected {list(manifest[name])}"
                    )
                if name.startswith(SKIPPED_PREFIXES):
                    n_skipped += 1
                    continue
                target = internal_target(name, config.language)
                if target.param in quantizer and skip_quantized:
                    _check_fits(name, shape, quantizer.region_shape(target.param, target.index))
                    n_skipped += 1
                    continue
                if target.param in quantizer:
                    # Staged in the model dtype a block of rows at a time, then quantized.
                    region = quantizer.region_shape(target.param, target.index)
                    _check_fits(name, shape, region)
                    rows = f.get_slice(name)
                    quantizer.fill(target.param, target.index, lambda a, b, rows=rows: rows[a:b])
                else:
                    slot = parameter_slot(params, name, config.language)
                    _check_fits(name, shape, tuple(slot.shape))
                    with torch.no_grad():
                        slot.copy_(f.get_tensor(name))
                    filled[target.param] += slot.numel()
                n_loaded += 1
        log.info("loaded shard %d/%d: %s", i + 1, len(by_file), file.name)

    unfilled = [n for n, p in params.items() if filled[n] != p.numel()]
    unfilled += [] if skip_quantized else quantizer.incomplete()
    if unfilled:
        raise CheckpointError(f"parameter {unfilled[0]!r} was not (fully) filled from {path}")
    log.info(
        "loaded %d tensors (%d skipped: attention-pool head%s) from %s in %.1f s",
        n_loaded, n_skipped, ", quantized weights from the cache" if skip_quantized else "", path,
        time.perf_counter() - started,
    )  # fmt: skip
    if quantizer.weights and not skip_quantized:
        log.info("quantized the language model's linear weights: %s", quantizer.summary())
