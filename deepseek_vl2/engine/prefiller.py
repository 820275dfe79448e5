"""The admission work of one request, unit by unit, from its admission to the hidden state of its
last prompt token: reuse of what the prefix cache holds, vision batches, the prompt's embeddings,
and prefill chunks written into the request's cache row. The scheduler (scheduler.py) decides when
each unit runs, and whether units are chunked so that running answers keep flowing.
"""

from __future__ import annotations

import logging
import time

import torch

from ..model.model import tile_ranges, tiles_per_image
from .prefix_cache import PrefixCache
from .request import Encoding, Prefill, Request
from .runner import ModelRunner

log = logging.getLogger(__name__)


class Prefiller:
    def __init__(
        self,
        runner: ModelRunner,
        prefill_chunk_size: int,
        vision_chunk_tiles: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.runner = runner
        self.prefill_chunk_size = prefill_chunk_size
        self.vision_chunk_tiles = vision_chunk_tiles
        self.prefix_cache = prefix_cache  # used by the stepping thread only

    def plan(self, request: Request) -> Encoding:
        """Copy the longest cached prefix of the prompt into the request's row, take the cached
        spans of the images after it, and leave the other images to the vision tower."""
        crops = request.inputs.images_spatial_crop[0].tolist()
        after_prefix = list(range(len(crops)))
        spans: dict[int, torch.Tensor] = {}
        cache, keys = self.prefix_cache, request.keys
        if cache is not None and keys is not None:
            hit = cache.longest_prefix(keys, request.prompt_len)
            if hit is not None:
                length, prefix = hit
                self.runner.write_prefix(request.row, prefix)
                request.prefilled = request.cached_prompt_tokens = length
            after_prefix = [i for i, (start, _) in enumerate(keys.spans) if start >= request.prefilled]
            for image in after_prefix:
                span = cache.image(keys.images[image])
                if span is not None:
                    spans[image] = span
            log.info(
                "request %d: prefix cache %s: %d of %d prompt tokens reused, %d of %d image "
                "embeddings cached", request.id, "hit" if hit else "miss", request.prefilled,
                request.prompt_len, len(spans), len(after_prefix),
            )  # fmt: skip
        encode = [image for image in after_prefix if image not in spans]
        ranges = tile_ranges(crops)
        all_tiles = request.inputs.pixel_values[0]
        # A 1x1 grid's one local tile is its global view: the vision tower need not see it twice.
        shared = frozenset(
            image for image in encode
            if crops[image] == [1, 1] and torch.equal(*all_tiles[ranges[image]])
        )  # fmt: skip
        parts = [all_tiles[ranges[image]][: 1 if image in shared else None] for image in encode]
        return Encoding(encode, torch.cat(parts or [all_tiles[:0]]), spans, shared=shared)

    def encode_batch(self, request: Request, chunked: bool) -> None:
        """Encode the next batch of the request's tiles: `vision_chunk_tiles` when `chunked`, else all."""
        encoding, started = request.encoding, time.perf_counter()
        total = encoding.tiles.shape[0]
        done = encoding.encoded
        batch = encoding.tiles[done : done + (self.vision_chunk_tiles if chunked else total)]
        encoding.features.append(self.runner.encode_tiles(batch))
        self.runner.synchronize()
        request.timings.vision_s += time.perf_counter() - started
        self._report(request, "vision", encoding.encoded, total, batch.shape[0], "tiles")

    def embed_prompt(self, request: Request) -> Prefill:
        """The prompt's embeddings after the reused prefix, from every image's span; the encoded
        images' spans are offered to the prefix cache."""
        encoding, spans = request.encoding, dict(request.encoding.spans)
        if encoding.images:
            encoded = self.runner.image_spans(request.inputs, encoding.images, self._tile_features(request))
            for image, span in zip(encoding.images, encoded):
                spans[image] = span
                if self.prefix_cache is not None and request.keys is not None:
                    self.prefix_cache.put(request.keys.images[image], [span], span.shape[0])
        ordered = [spans[image] for image in sorted(spans)]
        embeds = self.runner.prompt_embeds(request.inputs, request.prefilled, ordered)
        return Prefill(embeds, start=request.prefilled)

    @staticmethod
    def _tile_features(request: Request) -> torch.Tensor:
        """The features of every tile of the encoded images, in order: a shared image's global
        view stands for its local tile too."""
        encoding = request.encoding
        features = torch.cat(encoding.features)
        if not encoding.shared:
            return features
        counts = tiles_per_image(request.inputs.images_spatial_crop[0].tolist())
        parts, offset = [], 0
        for image in encoding.images:
            encoded = 1 if image in encoding.shared else counts[image]
            part = features[offset : offset + encoded]
            parts.append(part.expand(counts[image], *part.shape[1:]) if image in encoding.shared else part)
            offset += encoded
        return torch.cat(parts)

    def prefill_chunk(self, request: Request, chunked: bool) -> torch.Tensor | None:
        """Write the next chunk of the prompt into the request's row (`prefill_chunk_size` tokens
        when `chunked`, else the rest). After the last chunk, offer the prompt's prefix to the cache
        and return the hidden state of its last token; before it, None."""
        prefill = request.prefill
        start = request.prefilled
        budget = self.prefill_chunk_size if chunked else request.prompt_len
        end = min(start + budget, request.prompt_len)
        chunk = prefill.embeds[start - prefill.start : end - prefill.start]
        hidden = self.runner.prefill(request.row, chunk, start)
        request.prefilled = end
        self._report(request, "prefill", end, request.prompt_len, end - start, "tokens")
        if end < request.prompt_len:
            self.runner.synchronize()
            return None
        self._store_prefix(request)
        return hidden

    def _store_prefix(self, request: Request) -> None:
        """Offer the prefix ending with the prompt's last image, now wholly in the cache row."""
        keys = request.keys
        if self.prefix_cache is None or keys is None or not keys.spans:
            return
        length = keys.spans[-1][1]
        if length > request.cached_prompt_tokens:
            self.prefix_cache.put(keys.prefixes[-1], self.runner.read_prefix(request.row, length), length)

    @staticmethod
    def _report(request: Request, stage: str, done: int, total: int, unit: int, what: str) -> None:
        """Tell the request's progress callback after every unit of work; log each quarter of a
        stage that takes several units (a single unit says nothing the finish line does not)."""
        request.report(stage, done, total)
        if unit < total and (done == total or done * 4 // total != (done - unit) * 4 // total):
            log.info("request %d: %s %d/%d %s", request.id, stage, done, total, what)
