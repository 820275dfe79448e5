"""Turn a conversation and its images into the model's inputs, identical to the official processor.

Steps: validate the conversation (conversation.py), choose each image's tile grid (tiling.py), lay
out the token ids with one `<image>`-id span per image, render and normalise the pixel tiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .conversation import Slot, Turn, count_image_tags, parse_conversation, prompt_pieces
from .tiling import (
    TilingConfig, check_image_detail, choose_grids, image_token_count, normalize_tiles, render_tiles,
)  # fmt: skip
from .tokenizer import IMAGE_TOKEN, Tokenizer


@dataclass
class ProcessorOutput:
    """Batch-of-one model inputs.

    input_ids            [1, T] long
    images_seq_mask      [1, T] bool, True on every image-span position
    images_spatial_crop  [1, n_images, 2] long, (columns, rows) of each image's local grid
    pixel_values         [1, n_tiles, 3, tile, tile] float32 in [-1, 1]; per image global then local tiles
    image_token_counts   span length of each image, in image order
    """

    input_ids: torch.Tensor
    images_seq_mask: torch.Tensor
    images_spatial_crop: torch.Tensor
    pixel_values: torch.Tensor
    image_token_counts: list[int]


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of a prompt and which of them are image placeholders."""

    input_ids: list[int]
    images_seq_mask: list[bool]


class Processor:
    def __init__(self, tokenizer: Tokenizer, tiling: TilingConfig) -> None:
        self.tokenizer = tokenizer
        self.tiling = tiling

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        """Load from a snapshot dir: tokenizer.json, tokenizer_config.json, processor_config.json
        (or config.json's candidate_resolutions when the processor config is absent)."""
        return cls(Tokenizer.from_pretrained(path), TilingConfig.from_pretrained(path))

    def __call__(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[Image.Image] = (),
        image_detail: str = "auto",
    ) -> ProcessorOutput:
        """The model inputs; `image_detail` (tiling.IMAGE_DETAILS) "low" turns tiling off for
        every image, as the official processor does for more than two."""
        check_image_detail(image_detail)
        turns = parse_conversation(messages)
        tags = count_image_tags(turns)
        if tags != len(images):
            raise ValueError(
                f"the conversation has {tags} {IMAGE_TOKEN} tag(s) but {len(images)} image(s) were given; "
                f"each image needs exactly one {IMAGE_TOKEN} tag in a user message"
            )
        grids = choose_grids([image.size for image in images], self.tiling, image_detail)
        token_counts = [image_token_count(grid, self.tiling.tokens_per_side) for grid in grids]
        layout = self.layout_prompt(turns, token_counts)

        tile = self.tiling.tile_size
        if images:
            pixel_values = normalize_tiles(render_tiles(images, grids, self.tiling), self.tiling)
        else:
            pixel_values = torch.zeros((0, 3, tile, tile), dtype=torch.float32)
        spatial_crop = torch.tensor([[grid.columns, grid.rows] for grid in grids], dtype=torch.long)
        return ProcessorOutput(
            input_ids=torch.tensor([layout.input_ids], dtype=torch.long),
            images_seq_mask=torch.tensor([layout.images_seq_mask], dtype=torch.bool),
            images_spatial_crop=spatial_crop.view(1, len(grids), 2),
            pixel_values=pixel_values.unsqueeze(0),
            image_token_counts=token_counts,
        )

    def layout_prompt(self, turns: Sequence[Turn], image_token_counts: Sequence[int]) -> PromptLayout:
        """Tokenize the conversation, giving the i-th `<image>` tag a span of image_token_counts[i]."""
        input_ids: list[int] = []
        images_seq_mask: list[bool] = []
        spans = iter(image_token_counts)
        for piece in prompt_pieces(turns):
            if piece is Slot.IMAGE:
                span = next(spans)
                input_ids.extend([self.tokenizer.image_id] * span)
                images_seq_mask.extend([True] * span)
                continue
            if piece is Slot.BOS:
                ids = [self.tokenizer.bos_id]
            elif piece is Slot.EOS:
                ids = [self.tokenizer.eos_id]
            else:
                ids = self.tokenizer.encode(piece)
            input_ids.extend(ids)
            images_seq_mask.extend([False] * len(ids))
        return PromptLayout(input_ids, images_seq_mask)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of generated ids: BOS/EOS/PAD dropped, other special tokens (grounding tags) kept;
        `skip_special_tokens=True` drops every special token."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
