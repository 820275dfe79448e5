"""DeepSeek-VL2: vision tower + projector + image-span assembly + MoE language model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .checkpoint import expected_internal_params, load_checkpoint
from .config import DeepseekVL2Config
from .language import Gate, LanguageModel, RotaryTables
from .projector import Projector
from .vision import VisionTower

log = logging.getLogger(__name__)


class DeepseekVL2(nn.Module):
    def __init__(self, config: DeepseekVL2Config):
        super().__init__()
        self.config = config
        d = config.language.hidden_size
        self.vision = VisionTower(config.vision)
        self.projector = Projector(config.projector)
        self.image_newline = nn.Parameter(torch.empty(d))
        self.view_seperator = nn.Parameter(torch.empty(d))  # sic: the checkpoint's spelling
        self.language = LanguageModel(config.language)

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: DeepseekVL2Config | None = None,
    ) -> DeepseekVL2:
        """Build on the meta device, allocate straight on `device` in `dtype`, fill from disk."""
        config = config or DeepseekVL2Config.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config)
        model.materialize(torch.device(device), dtype)
        load_checkpoint(model, path, config)
        return model.eval()

    def materialize(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate (uninitialised) parameters; routers stay fp32, RoPE tables are computed."""
        ours = {name: tuple(p.shape) for name, p in self.named_parameters()}
        expected = expected_internal_params(self.config)
        assert ours.keys() == expected.keys(), (
            f"module/format mismatch: {sorted(ours.keys() ^ expected.keys())[:5]}"
        )
        for module in self.modules():
            keep_fp32 = isinstance(module, Gate)
            for name, param in list(module.named_parameters(recurse=False)):
                empty = torch.empty(param.shape, device=device, dtype=torch.float32 if keep_fp32 else dtype)
                setattr(module, name, nn.Parameter(empty, requires_grad=False))
            if isinstance(module, RotaryTables):
                module.reset(device)

    def encode_images(
        self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor
    ) -> list[torch.Tensor]:
        """Every tile of every image through vision + projector in one batch, then each image's
        span: global rows (each + newline), separator, stitched local rows (each + newline).

        Returns one [span_tokens, D] tensor per batch row (empty for rows without images).
        """
        crops = images_spatial_crop.tolist()
        tiles_per_row = [self._tiles_per_image(row) for row in crops]
        tiles = [pixel_values[b, : sum(n)] for b, n in enumerate(tiles_per_row)]
        d = self.config.language.hidden_size
        if sum(t.shape[0] for t in tiles) == 0:
            return [torch.empty(0, d, device=self.device, dtype=self.dtype) for _ in crops]

        features = self.projector(self.vision(torch.cat(tiles).to(self.dtype)))
        side = self.config.tokens_per_side
        features = features.view(-1, side, side, d)
        spans, offset = [], 0
        for row, counts in zip(crops, tiles_per_row):
            parts = []
            for (nw, nh), n_tiles in zip(row, counts):
                global_view, local = features[offset], features[offset + 1 : offset + n_tiles]
                offset += n_tiles
                stitched = local.view(nh, nw, side, side, d).permute(0, 2, 1, 3, 4)
                stitched = stitched.reshape(nh * side, nw * side, d)
                parts += [
                    self._with_newlines(global_view),
                    self.view_seperator[None],
                    self._with_newlines(stitched),
                ]
            spans.append(torch.cat(parts) if parts else features.new_empty(0, d))
        return spans

    @staticmethod
    def _tiles_per_image(crops: list[list[int]]) -> list[int]:
        counts = []
        for nw, nh in crops:
            if nw == 0 or nh == 0:
                break  # a zero row ends the image list of a padded batch row
            counts.append(1 + nw * nh)
        return counts

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        rows = grid.shape[0]
        newline = self.image_newline.expand(rows, 1, -1)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        images_seq_mask: torch.Tensor,
        images_spatial_crop: torch.Tensor,
    ) -> torch.Tensor:
        """Token embeddings with every image position replaced, in order, by the image spans."""
        embeds = self.language.model.embed_tokens(input_ids.to(self.device))
        spans = self.encode_images(pixel_values.to(self.device), images_spatial_crop)
        for b, span in enumerate(spans):
            positions = images_seq_mask[b].to(self.device).nonzero().squeeze(-1)
            if positions.numel() != span.shape[0]:
                raise ValueError(
                    f"batch row {b}: {positions.numel()} image positions in the prompt but the "
                    f"images produce {span.shape[0]} embeddings"
                )
            embeds[b, positions] = span.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        images_seq_mask: torch.Tensor,
        images_spatial_crop: torch.Tensor,
    ) -> torch.Tensor:
        """Full prefill without cache: fp32 logits [B, T, V] at every position."""
        embeds = self.embed(input_ids, pixel_values, images_seq_mask, images_spatial_crop)
        positions = torch.arange(input_ids.shape[1], device=self.device)
        hidden = self.language(embeds, self.language.context(positions, kv_len=None))
        return self.language.logits(hidden)
