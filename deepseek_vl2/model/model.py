"""DeepSeek-VL2: vision tower + projector + image-span assembly + MoE language model."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import torch
from torch import nn

from ..compute.execution import Execution, parse_choices
from ..compute.quantized import QuantizeSpec
from .attention import RotaryTables
from .checkpoint import checkpoint_identity, expected_internal_params, load_checkpoint
from .config import DeepseekVL2Config
from .language import LanguageModel
from .moe import Gate
from .projector import Projector
from .quantized_cache import fill_with_cache
from .quantized_modules import QuantizedModule, quantize_model
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
        # What the weights are, for cache keys: a checkpoint's digest once loaded from disk.
        self.weights_id = uuid.uuid4().hex
        # How products run: the device's baseline (materialize) unless the caller sets another
        # (set_execution; the engine's calibration chooses one for the machine).
        self.execution = Execution()
        self.quantization = QuantizeSpec()  # set by quantize_model
        # Where the quantized weights came from: "hit", "miss" or "off" (quantized_cache.py).
        self.quantized_cache = "off"

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
        execution: Execution | str | None = None,
        quantize: QuantizeSpec | None = None,
        quantized_cache: str | Path | None = None,
    ) -> DeepseekVL2:
        """Build on the meta device, allocate straight on `device` in `dtype` and fill from disk.

        Products run as `execution` says: an Execution, or a forced choice such as "native"
        (compute/execution.py, `parse_choices`); by default the device's baseline. Choosing them
        for the machine by measuring is the engine's (engine/calibration.py, `choose_execution`).

        With `quantize` (compute/quantized.py), the language model's linear weights are allocated
        only in their quantized form and quantized tensor by tensor as they are read; with
        `quantized_cache` (a folder), they are read from there when an earlier load left them, and
        left there otherwise (quantized_cache.py).
        """
        config = config or DeepseekVL2Config.from_pretrained(path)
        quantize = quantize or QuantizeSpec()
        with torch.device("meta"):
            model = cls(config)
        quantize_model(model, quantize)
        model.materialize(torch.device(device), dtype)
        model.weights_id = checkpoint_identity(path)
        directory = Path(quantized_cache) if quantized_cache is not None else None
        model.quantized_cache = fill_with_cache(
            model, model.weights_id, directory, lambda skip: load_checkpoint(model, path, config, skip)
        )
        if execution is not None:
            model.set_execution(model.forced_execution(execution))
        return model.eval()

    def forced_execution(self, execution: Execution | str) -> Execution:
        """`execution` as a setting for this model: as given, or the setting a forced choice makes
        on the CPU (`auto`, and any choice on a GPU, whose setting is fixed: the baseline)."""
        if isinstance(execution, Execution):
            return execution
        forced = parse_choices(execution, self.dtype)  # raises on a bad choice, on every device
        if forced is None or self.device.type == "cuda":
            return Execution.for_device(self.device, self.dtype)
        return Execution.from_choices(forced)

    def set_execution(self, execution: Execution) -> None:
        """Choose how every product runs (see execution.py); every module that has a choice
        reads it from here."""
        self.execution = execution
        for module in self.modules():
            if hasattr(type(module), "execution"):
                module.execution = execution

    def materialize(self, device: torch.device, dtype: torch.dtype) -> None:
        """Allocate (uninitialised) parameters; routers stay fp32, RoPE tables are computed."""
        ours = {name: tuple(p.shape) for name, p in self.named_parameters()}
        # Quantized weights (compute/quantized.py) are buffers in another format, the same tensors.
        for name, module in self.named_modules():
            if isinstance(module, QuantizedModule):
                ours |= {f"{name}.{weight}": shape for weight, shape in module.quantized.items()}
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
            if isinstance(module, QuantizedModule):
                module.allocate(device, dtype)
        self.set_execution(Execution.for_device(device, dtype))

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Pixel tiles [n, 3, S, S] through vision + projector: [n, side, side, D] features."""
        side = self.config.tokens_per_side
        features = self.projector(self.vision(tiles.to(device=self.device, dtype=self.dtype)))
        return features.view(-1, side, side, self.config.language.hidden_size)

    def image_span(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One image's embeddings from its tiles' features (global view, then the local tiles of
        a (columns, rows) grid): global rows (each + newline), separator, stitched local rows
        (each + newline). [span_tokens, D]."""
        nw, nh = grid
        side, d = features.shape[1], features.shape[-1]
        stitched = features[1:].view(nh, nw, side, side, d).permute(0, 2, 1, 3, 4)
        stitched = stitched.reshape(nh * side, nw * side, d)
        return torch.cat(
            [self._with_newlines(features[0]), self.view_seperator[None], self._with_newlines(stitched)]
        )

    def encode_images(
        self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor
    ) -> list[torch.Tensor]:
        """Every tile of every image through vision + projector in one batch, then each image's
        span. Returns one [span_tokens, D] tensor per batch row (empty for rows without images)."""
        crops = images_spatial_crop.tolist()
        tiles_per_row = [tiles_per_image(row) for row in crops]
        tiles = [pixel_values[b, : sum(n)] for b, n in enumerate(tiles_per_row)]
        d = self.config.language.hidden_size
        if sum(t.shape[0] for t in tiles) == 0:
            return [torch.empty(0, d, device=self.device, dtype=self.dtype) for _ in crops]

        features = self.encode_tiles(torch.cat(tiles))
        spans, offset = [], 0
        for row, counts in zip(crops, tiles_per_row):
            parts = []
            for grid, n_tiles in zip(row, counts):
                parts.append(self.image_span(features[offset : offset + n_tiles], grid))
                offset += n_tiles
            spans.append(torch.cat(parts) if parts else features.new_empty(0, d))
        return spans

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        rows = grid.shape[0]
        newline = self.image_newline.expand(rows, 1, -1)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    def embed_prompt(
        self, input_ids: torch.Tensor, images_seq_mask: torch.Tensor, spans: list[torch.Tensor]
    ) -> torch.Tensor:
        """One prompt's token embeddings [T, D] with its image positions [T] replaced, in order, by
        the image spans."""
        embeds = self.language.model.embed_tokens(input_ids.to(self.device))
        positions = images_seq_mask.to(self.device).nonzero().squeeze(-1)
        span = torch.cat(spans) if spans else embeds.new_empty(0, embeds.shape[-1])
        if positions.numel() != span.shape[0]:
            raise ValueError(
                f"{positions.numel()} image positions in the prompt but the images produce "
                f"{span.shape[0]} embeddings"
            )
        embeds[positions] = span.to(embeds.dtype)
        return embeds

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        images_seq_mask: torch.Tensor,
        images_spatial_crop: torch.Tensor,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] of a batch, image positions replaced by the image spans."""
        spans = self.encode_images(pixel_values.to(self.device), images_spatial_crop)
        return torch.stack(
            [self.embed_prompt(ids, mask, [span]) for ids, mask, span in zip(input_ids, images_seq_mask, spans)]
        )

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
        positions = torch.arange(input_ids.shape[1], device=self.device)[None]
        hidden = self.language(embeds, self.language.context(positions))
        return self.language.logits(hidden)


def tile_ranges(crops: list[list[int]]) -> list[slice]:
    """Each image's tiles within the prompt's tiles."""
    ranges, offset = [], 0
    for count in tiles_per_image(crops):
        ranges.append(slice(offset, offset + count))
        offset += count
    return ranges


def tiles_per_image(crops: list[list[int]]) -> list[int]:
    """Tiles of each image (global view + columns x rows local tiles) from its spatial crop."""
    counts = []
    for nw, nh in crops:
        if nw == 0 or nh == 0:
            break  # a zero row ends the image list of a padded batch row
        counts.append(1 + nw * nh)
    return counts
