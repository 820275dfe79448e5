"""Projector: 2x2 space-to-depth of the vision grid, then an MLP to the language model's width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.execution import Linear
from .checkpoint import projector_layer_dims
from .config import ProjectorConfig


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        layers: list[nn.Module] = []
        for fan_in, fan_out in projector_layer_dims(cfg):
            if layers:
                layers.append(nn.GELU())  # exact erf form, unlike the vision tower's tanh GELU
            layers.append(Linear(fan_in, fan_out))
        self.layers = nn.Sequential(*layers)

    def space_to_depth(self, x: torch.Tensor) -> torch.Tensor:
        """[tiles, g*g, c] -> [tiles, (g/r)^2, c*r*r], zero-padding the grid to a multiple of r.

        Features are ordered channel-outermost (c*r*r + dy*r + dx), the order F.unfold yields;
        the checkpoint's first Linear is trained on exactly that order.
        """
        n, tokens, c = x.shape
        g, r = int(tokens**0.5), self.ratio
        x = x.view(n, g, g, c)
        pad = -g % r
        x = F.pad(x, (0, 0, 0, pad, 0, pad))
        s = (g + pad) // r
        x = x.view(n, s, r, s, r, c).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, s * s, c * r * r)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.space_to_depth(features))
