"""Model configuration: the nested `config.json` of a DeepSeek-VL2 snapshot mapped to dataclasses.

Released configs are written by transformers' `save_pretrained`, which omits every value equal to
the reference class default, so the defaults below are part of the checkpoint format: changing one
silently changes the architecture of the small and base models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The reference builds the vision tower from a table keyed by `model_name`; the config only
# overrides what it spells out.
VISION_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "siglip_so400m_patch14_384": dict(
        image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362
    ),
}

SUPPORTED_ROUTERS = ("greedy", "group_limited_greedy", "noaux_tc")
SUPPORTED_SCORING = ("softmax", "sigmoid")


class ConfigError(ValueError):
    """A config value this implementation cannot honour; raised instead of guessing."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class VisionConfig:
    model_name: str = "siglip_so400m_patch14_384"
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side; the conv stride drops the pixels that do not fill a whole patch."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        name = d.get("model_name", cls.model_name)
        values: dict[str, Any] = dict(VISION_ARCHITECTURES.get(name, {}))
        for key in ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio"):
            if key in d:
                values[key] = d[key]
        missing = [
            k
            for k in ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")
            if k not in values
        ]
        _require(not missing, f"vision_config: unknown model_name {name!r} and no {missing} given")
        _require(
            d.get("ignore_head", True) is True,
            "vision_config.ignore_head=false (attention-pool output) is not supported",
        )
        _require(
            not d.get("class_token", False), "vision_config.class_token=true is not supported"
        )
        _require(
            d.get("select_layer", -1) == -1,
            "vision_config.select_layer other than -1 is not supported",
        )
        _require(
            values["width"] % values["heads"] == 0,
            f"vision width {values['width']} is not divisible by {values['heads']} heads",
        )
        return cls(model_name=name, **values)


@dataclass(frozen=True)
class ProjectorConfig:
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjectorConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        _require(
            cfg.projector_type == "downsample_mlp_gelu",
            f"projector_type {cfg.projector_type!r} is not supported (only downsample_mlp_gelu)",
        )
        _require(not d.get("token_pooling", False), "projector token_pooling is not supported")
        _require(cfg.depth >= 1, f"projector depth must be >= 1, got {cfg.depth}")
        return cfg


@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "gready"  # sic: the reference default matches no router
    n_group: int | None = None
    topk_group: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    use_mla: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int | None = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        """Per-head width of plain multi-head attention."""
        return self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.use_mla else self.head_dim

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.qk_head_dim if self.use_mla else self.head_dim)

    @property
    def cache_values_per_token(self) -> int:
        """Numbers one token keeps in the KV cache over all layers (MLA: latent + RoPE key)."""
        if self.use_mla:
            return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def shared_expert_width(self) -> int | None:
        if not self.n_shared_experts:
            return None
        return self.moe_intermediate_size * self.n_shared_experts

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LanguageConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _require(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported")
        _require(
            self.rope_scaling is None,
            f"rope_scaling {self.rope_scaling!r} is not supported (no released VL2 uses it)",
        )
        _require(not self.tie_word_embeddings, "tie_word_embeddings=true is not supported")
        if self.use_mla:
            _require(self.kv_lora_rank is not None, "use_mla requires kv_lora_rank")
            _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        else:
            _require(
                self.hidden_size % self.num_attention_heads == 0
                and self.num_attention_heads % self.num_key_value_heads == 0,
                "hidden_size must divide into heads and heads into key/value heads",
            )
        if self.n_routed_experts is not None:
            _require(
                self.topk_method in SUPPORTED_ROUTERS,
                f"topk_method {self.topk_method!r} is not one of {SUPPORTED_ROUTERS}",
            )
            _require(
                self.scoring_func in SUPPORTED_SCORING,
                f"scoring_func {self.scoring_func!r} is not one of {SUPPORTED_SCORING}",
            )
            _require(
                self.num_experts_per_tok is not None and self.num_experts_per_tok >= 1,
                "MoE layers need num_experts_per_tok",
            )
            if self.topk_method != "greedy":
                n_group = self.n_group or 0
                _require(
                    n_group >= 1 and self.n_routed_experts % n_group == 0,
                    f"{self.topk_method} needs n_group dividing n_routed_experts",
                )
                _require(
                    self.topk_group is not None and 1 <= self.topk_group <= n_group,
                    f"{self.topk_method} needs 1 <= topk_group <= n_group",
                )


@dataclass(frozen=True)
class DeepseekVL2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    candidate_resolutions: tuple[tuple[int, int], ...] = ((384, 384),)
    tile_tag: str = "2D"
    global_view_pos: str = "head"

    @property
    def tokens_per_side(self) -> int:
        """Projected tokens per tile side: the patch grid after padding to a multiple of the ratio."""
        return math.ceil(self.vision.grid / self.projector.downsample_ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepseekVL2Config:
        model_type = d.get("model_type", "deepseek_vl_v2")
        _require(model_type == "deepseek_vl_v2", f"model_type {model_type!r} is not deepseek_vl_v2")
        tile_tag = d.get("tile_tag", "2D")
        _require(tile_tag == "2D", f"tile_tag {tile_tag!r} is not supported (only 2D)")
        global_view_pos = d.get("global_view_pos", "head")
        _require(
            global_view_pos == "head",
            f"global_view_pos {global_view_pos!r} is not supported (only head)",
        )
        resolutions = tuple(tuple(r) for r in d.get("candidate_resolutions", [(384, 384)]))
        _require(
            all(len(r) == 2 for r in resolutions) and len(resolutions) > 0,
            "candidate_resolutions must be a non-empty list of (width, height) pairs",
        )
        cfg = cls(
            vision=VisionConfig.from_dict(d.get("vision_config", {})),
            projector=ProjectorConfig.from_dict(d.get("projector_config", {})),
            language=LanguageConfig.from_dict(d.get("language_config", {})),
            candidate_resolutions=resolutions,  # type: ignore[arg-type]
            tile_tag=tile_tag,
            global_view_pos=global_view_pos,
        )
        _require(
            cfg.projector.input_dim == cfg.vision.width,
            f"projector input_dim {cfg.projector.input_dim} != vision width {cfg.vision.width}",
        )
        _require(
            cfg.projector.n_embed == cfg.language.hidden_size,
            f"projector n_embed {cfg.projector.n_embed} != hidden_size {cfg.language.hidden_size}",
        )
        tile = cfg.vision.image_size
        _require(
            all(w % tile == 0 and h % tile == 0 for w, h in resolutions),
            f"candidate_resolutions must be multiples of the {tile}px tile",
        )
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DeepseekVL2Config:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        with open(config_path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
