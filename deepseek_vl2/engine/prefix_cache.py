"""Prefix cache: a follow-up question about the same image(s) skips the vision tower and the prefill
of the image prefix.

A prompt puts its images right after `<|User|>: `, so the tokens up to the end of an image span, and
their KV cache, are the same for every question about the same images. Two kinds of entries share
one LRU and one byte budget, on the model's device:

- KV prefixes: every cache tensor's first `length` positions of a row (MLA: latent and rotated
  RoPE key; MHA: keys and values). The key is the weights' identity, the exact prompt token ids up
  to the end of an image span, and the pixel digest of every image inside it. Only whole prompts
  that finished their prefill are stored, at their last image's end.
- Image embeddings: one image's span (vision tower + projector output), keyed by the weights and
  the image's pixel digest. They serve prompts whose text before the image differs (multi-turn
  conversations, in-context examples), where no KV prefix matches; at 1/24 of the bytes of the KV
  prefix they stand for (tiny, fp32) they are cheap to keep.

Pixel digests hash the tiles after tiling and normalisation, so the same pixels hit however they
were sent (data URI, URL, file format), while another tiling of the same picture does not.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..inputs.processor import ProcessorOutput
from ..model.model import tile_ranges

log = logging.getLogger(__name__)


CPU_DEFAULT_BUDGET_BYTES = 2 * 2**30


def cache_budget(device: torch.device, free_bytes: int, requested_bytes: int | None) -> int:
    """The byte budget: the requested one if it fits in the free memory (refused, with a log line,
    if not: 0), else by default half of the free GPU memory, or on the CPU a quarter of the
    available memory up to 2 GiB."""
    if requested_bytes is None:
        if device.type == "cuda":
            return max(free_bytes // 2, 0)
        return max(min(CPU_DEFAULT_BUDGET_BYTES, free_bytes // 4), 0)
    if requested_bytes > free_bytes:
        log.warning(
            "prefix cache of %.2f GiB refused: only %.2f GiB free after the weights and the KV "
            "cache; running without a prefix cache", requested_bytes / 2**30, free_bytes / 2**30,
        )  # fmt: skip
        return 0
    return requested_bytes


def image_digests(inputs: ProcessorOutput) -> list[str]:
    """A digest per image of its grid and its tiles' pixel values."""
    crops = inputs.images_spatial_crop[0].tolist()
    tiles = inputs.pixel_values[0]
    digests = []
    for (columns, rows), image_tiles in zip(crops, tile_ranges(crops)):
        digest = hashlib.blake2b(f"{columns}x{rows}:".encode(), digest_size=16)
        digest.update(tiles[image_tiles].contiguous().numpy().tobytes())
        digests.append(digest.hexdigest())
    return digests


def image_span_ranges(inputs: ProcessorOutput) -> list[tuple[int, int]]:
    """(start, end) prompt positions of each image's span, in order."""
    mask = inputs.images_seq_mask[0].tolist()
    ranges, start = [], None
    for position, is_image in enumerate(mask + [False]):
        if is_image and start is None:
            start = position
        elif not is_image and start is not None:
            ranges.append((start, position))
            start = None
    return ranges


@dataclass(frozen=True)
class PromptKeys:
    """What the cache needs to know about a prompt, computed before it is queued."""

    spans: list[tuple[int, int]]  # each image's (start, end) in the prompt
    images: list[str]  # each image's key
    prefixes: list[str]  # key of the prefix ending with image i, for each i

    @classmethod
    def of(cls, inputs: ProcessorOutput, weights_id: str) -> PromptKeys:
        spans = image_span_ranges(inputs)
        digests = image_digests(inputs)
        ids = inputs.input_ids[0].numpy()
        prefixes = []
        for index, (_, end) in enumerate(spans):
            key = hashlib.blake2b(weights_id.encode(), digest_size=16)
            key.update(ids[:end].tobytes())
            key.update("".join(digests[: index + 1]).encode())
            prefixes.append(key.hexdigest())
        return cls(spans, [f"{weights_id}/{d}" for d in digests], prefixes)


@dataclass
class _Entry:
    tensors: list[torch.Tensor]
    nbytes: int
    tokens: int


class PrefixCache:
    """LRU of KV prefixes and image embeddings within `budget_bytes`. Used by the engine thread
    only; entries are never modified after insertion, so one being copied out stays valid even
    if it is evicted meanwhile."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, keys: PromptKeys, prompt_len: int) -> tuple[int, list[torch.Tensor]] | None:
        """The longest cached prefix of a prompt that leaves at least one token to prefill (the
        last token's logits come from a forward): (its length, its cache tensors)."""
        for (_, end), key in zip(reversed(keys.spans), reversed(keys.prefixes)):
            entry = self._get(key) if end < prompt_len else None
            if entry is not None:
                return end, entry.tensors
        return None

    def image(self, key: str) -> torch.Tensor | None:
        entry = self._get(key)
        return None if entry is None else entry.tensors[0]

    def put(self, key: str, tensors: Sequence[torch.Tensor], tokens: int) -> bool:
        """Store copies of `tensors` (a prefix's cache slices, or an image span) under `key`,
        evicting the least recently used entries as needed. False, with a log line, when it
        cannot be stored."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if nbytes > self.budget_bytes:
            log.info(
                "prefix cache: %d tokens (%.1f MiB) exceed its %.1f MiB budget; not cached",
                tokens, nbytes / 2**20, self.budget_bytes / 2**20,
            )  # fmt: skip
            return False
        while self.used_bytes + nbytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.nbytes
        try:
            copies = [t.clone() for t in tensors]
        except (torch.OutOfMemoryError, RuntimeError) as error:  # never fail a request over it
            log.warning("prefix cache: could not store %d tokens (%s)", tokens, error)
            return False
        self._entries[key] = _Entry(copies, nbytes, tokens)
        self.used_bytes += nbytes
        return True

    def _get(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry
