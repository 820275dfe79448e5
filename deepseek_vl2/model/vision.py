"""SigLIP vision transformer in the checkpoint's (timm) layout, as DeepSeek-VL2 runs it.

Every 384x384 tile becomes a 27x27 grid of patch embeddings; the final LayerNorm output of the last
block is the feature map. The attention-pool head stored in checkpoints is never run, so it is not
built here (the loader skips its tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.execution import Execution, Linear, upcast
from .config import VisionConfig


class PatchEmbed(nn.Module):
    execution = Execution()

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # A stride-14 conv over 384 px covers 27 patches; the last 6 rows/cols are never seen.
        weight, bias = self.proj.weight, self.proj.bias
        patches = pixels.shape[0] * (pixels.shape[-1] // weight.shape[-1]) ** 2
        if self.execution.compute_dtype(patches, weight.dtype) != weight.dtype:
            weight, bias = upcast(weight), bias.float()
        out = F.conv2d(pixels.to(weight.dtype), weight, bias, stride=self.proj.stride)
        return out.to(pixels.dtype).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = Linear(cfg.width, 3 * cfg.width)
        self.proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles, grid*grid, width]."""
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
