"""Checkpoint format: manifests of the released variants and strict loading errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from parity import CHECKPOINTS, FIXTURES
from safetensors.torch import load_file, save_file

from deepseek_vl2 import CheckpointError, ConfigError, DeepseekVL2, DeepseekVL2Config, checkpoint_manifest


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_manifest_of_released_variants(variant):
    with open(FIXTURES / "manifests" / f"{variant}.json", encoding="utf-8") as f:
        reference = json.load(f)
    ours = checkpoint_manifest(DeepseekVL2Config.from_dict(reference["config"]))
    expected = {name: tuple(shape) for name, shape in reference["parameters"].items()}
    assert sorted(ours.keys() - expected.keys()) == [] and sorted(expected.keys() - ours.keys()) == []
    assert {n: s for n, s in ours.items() if s != expected[n]} == {}
    total = sum(math.prod(shape) for shape in ours.values())
    print(f"{variant}: {len(ours)} tensors, {total:,} parameters")
    assert (len(ours), total) == (reference["n_tensors"], reference["total_parameters"])


def test_real_configs_resolve_class_defaults():
    with open(FIXTURES / "manifests" / "small.json", encoding="utf-8") as f:
        small = DeepseekVL2Config.from_dict(json.load(f)["config"])
    assert small.vision.heads == 16 and small.vision.image_size == 384  # from model_name
    assert small.language.use_mla and small.language.kv_lora_rank == 512
    assert small.language.q_lora_rank is None
    assert small.projector.n_embed == 2048 and small.language.vocab_size == 102400


def _copy_checkpoint(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "tiny-mla", target)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


def _rewrite_shard(path: Path, edit) -> None:
    """Apply `edit(tensors, weight_map)` to the shard holding layer 1's tensors."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["language.model.layers.1.self_attn.o_proj.weight"]
    tensors = load_file(path / shard)
    edit(tensors, index["weight_map"], shard)
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_missing_tensor_is_named(tmp_path):
    path = _copy_checkpoint(tmp_path)

    def drop(tensors, weight_map, shard):
        del tensors["language.model.layers.1.self_attn.o_proj.weight"]
        del weight_map["language.model.layers.1.self_attn.o_proj.weight"]

    _rewrite_shard(path, drop)
    with pytest.raises(CheckpointError, match=r"missing tensor 'language\.model\.layers\.1\.self_attn\.o_proj\.weight'"):
        DeepseekVL2.from_pretrained(path)


def test_unexpected_tensor_is_named_with_its_file(tmp_path):
    path = _copy_checkpoint(tmp_path)

    def add(tensors, weight_map, shard):
        tensors["language.model.layers.1.self_attn.extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
        weight_map["language.model.layers.1.self_attn.extra.weight"] = shard

    _rewrite_shard(path, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'language\.model\.layers\.1\.self_attn\.extra\.weight' in model-0000\d-of-00003"):
        DeepseekVL2.from_pretrained(path)


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = _copy_checkpoint(tmp_path)

    def reshape(tensors, weight_map, shard):
        name = "language.model.layers.1.self_attn.o_proj.weight"
        tensors[name] = tensors[name][:, :-1].contiguous()

    _rewrite_shard(path, reshape)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight' in model-.* has shape \[64, 63\], expected \[64, 64\]"):
        DeepseekVL2.from_pretrained(path)


def test_single_file_checkpoint_loads(tmp_path):
    target = tmp_path / "single"
    target.mkdir()
    shutil.copy(CHECKPOINTS / "tiny-mha" / "config.json", target)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted((CHECKPOINTS / "tiny-mha").glob("model-*.safetensors")):
        tensors |= load_file(shard)
    save_file(tensors, target / "model.safetensors")
    single = DeepseekVL2.from_pretrained(target)
    sharded = DeepseekVL2.from_pretrained(CHECKPOINTS / "tiny-mha")
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        (None, "tile_tag", "1D", "tile_tag '1D'"),
        (None, "global_view_pos", "tail", "global_view_pos 'tail'"),
        ("language_config", "topk_method", "gready", "topk_method 'gready'"),
        ("language_config", "scoring_func", "tanh", "scoring_func 'tanh'"),
        ("language_config", "rope_scaling", {"type": "yarn", "factor": 4}, "rope_scaling"),
        ("language_config", "hidden_act", "gelu", "hidden_act 'gelu'"),
        ("projector_config", "projector_type", "linear", "projector_type 'linear'"),
        ("vision_config", "model_name", "siglip_large_patch16_384", "unknown model_name"),
    ],
)
def test_unsupported_config_values_fail_loudly(section, key, value, message):
    config = json.loads((CHECKPOINTS / "tiny-mla" / "config.json").read_text())
    target = config if section is None else config[section]
    target[key] = value
    if key == "model_name":
        for k in ("width", "layers", "heads"):
            target.pop(k)
    with pytest.raises(ConfigError, match=message):
        DeepseekVL2Config.from_dict(config)
