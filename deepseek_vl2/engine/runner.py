"""Runs the model for the scheduler: vision batches, prefill chunks into one cache row, batched
decode steps, cache-row moves.

The KV cache has `max_batch` rows of the whole context, allocated once. The scheduler keeps the
decoding requests in rows 0..B-1, so a decode step reads a plain slice of the cache, and on CUDA it
is compiled (CUDA graphs) once per batch-size bucket: a batch is padded up to its bucket with rows
that write only the context's last position, which no request ever reads (a prompt is shorter than
the context and the last generated token is never fed back).
"""

from __future__ import annotations

import logging
import time

import torch

from ..inputs.processor import ProcessorOutput
from ..model.model import DeepseekVL2, tiles_per_image
from . import memory
from .settings import CPU_DEFAULT_MAX_BATCH, GPU_MAX_BATCH_CAP

log = logging.getLogger(__name__)

# Memory kept free on the GPU for activations (prefill chunk, vision batch, logits) and graphs.
GPU_ACTIVATION_RESERVE_BYTES = 4 * 2**30


# Tiles the vision tower encodes at once on the CPU. Its activations grow with the batch, while one
# tile's 729 rows already keep the products busy: the seed image's 9 tiles (tiny, bf16, 2-core
# AVX512 Xeon) took 7.0 s in one batch and 6.5 s in batches of 3, with a peak 0.21 GiB lower.
CPU_VISION_TILES_AT_ONCE = 3


def cache_bytes_per_row(model: DeepseekVL2) -> int:
    """Bytes of one KV-cache row holding the whole context."""
    c = model.config.language
    element = torch.finfo(model.dtype).bits // 8
    return c.cache_values_per_token * c.max_position_embeddings * element


def free_memory_bytes(device: torch.device) -> int:
    """Memory still free for caches: the GPU's free memory less the activation reserve, or the
    host memory the process may still take (memory.read_memory: Linux MemAvailable within the
    cgroup's memory limit; 0 where neither can be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] - GPU_ACTIVATION_RESERVE_BYTES
    return memory.read_memory().available or 0


def default_max_batch(model: DeepseekVL2, wanted: int | None = None) -> int:
    """`wanted` rows (the HTTP concurrency, when it is set), else 4 on the CPU and 16 on a GPU,
    at most what half of the memory left after the weights holds (the other half is for the prefix
    cache and, on the CPU, activations): on a GPU beyond the activation reserve, on the CPU within
    the cgroup limit. The CPU cache's pages become resident only as they are written, but a full
    batch of long requests writes them all."""
    if model.device.type != "cuda":
        rows = wanted or CPU_DEFAULT_MAX_BATCH
        available = memory.read_memory().available
        if available is None:
            return rows  # unknown (no /proc/meminfo, no cgroup): as asked
        fits = available // 2 // cache_bytes_per_row(model)
        if fits < rows:
            log.warning(
                "host memory holds %d cache rows of the whole context (%.2f GiB each), not %d: "
                "%.2f GiB available to the process; the other concurrent requests wait in the queue",
                max(fits, 1), cache_bytes_per_row(model) / 2**30, rows, available / 2**30,
            )  # fmt: skip
            rows = max(int(fits), 1)
        return rows
    free = free_memory_bytes(model.device)
    rows = min(wanted or GPU_MAX_BATCH_CAP, free // 2 // cache_bytes_per_row(model))
    if rows < 1:
        raise MemoryError(
            f"only {free / 2**30:.1f} GiB of GPU memory is free after loading the weights and "
            f"keeping {GPU_ACTIVATION_RESERVE_BYTES / 2**30:.0f} GiB for activations; one cache "
            f"row needs {cache_bytes_per_row(model) / 2**30:.2f} GiB"
        )
    if wanted and rows < wanted:
        log.warning(
            "GPU memory holds %d cache rows, not %d: the other concurrent requests wait in the queue",
            rows, wanted,
        )  # fmt: skip
    return int(rows)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch: the batch sizes a compiled decode runs at."""
    buckets = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return buckets + [max_batch]


class ModelRunner:
    def __init__(self, model: DeepseekVL2, max_batch: int, compile_decode: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.language = model, model.language
        self.max_batch = max_batch
        self.context_length = model.config.language.max_position_embeddings
        needed = max_batch * cache_bytes_per_row(model)
        if model.device.type == "cuda" and needed > (free := free_memory_bytes(model.device)):
            raise MemoryError(
                f"a KV cache of {max_batch} rows needs {needed / 2**30:.1f} GiB but only "
                f"{free / 2**30:.1f} GiB of GPU memory is free beyond the "
                f"{GPU_ACTIVATION_RESERVE_BYTES / 2**30:.0f} GiB activation reserve: lower "
                f"DEEPSEEK_VL2_MAX_BATCH"
            )
        self.language.setup_cache(max_batch, self.context_length)
        self.buckets = batch_buckets(max_batch)
        log.info(
            "KV cache: %d rows x %d tokens, %.2f GiB (%.3f GiB per row) in %s",
            max_batch, self.context_length, needed / 2**30, needed / max_batch / 2**30,
            str(model.dtype).removeprefix("torch."),
        )  # fmt: skip
        self._compiled_decode = None
        if compile_decode:
            # Static shapes: one graph per bucket, attending over the whole (masked) context.
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self._compiled_decode = torch.compile(
                self._decode_step, mode=mode, fullgraph=True, dynamic=False
            )

    def warm_up(self) -> None:
        """Compile every bucket's decode graph now rather than during the first requests. The
        warm-up rows write only the context's last position, which no request reads."""
        if self._compiled_decode is None:
            return
        for bucket in self.buckets:
            started = time.perf_counter()
            self.decode(torch.zeros(bucket, dtype=torch.long, device=self.device), [self.context_length - 1] * bucket)
            self.synchronize()
            log.info("decode step for batch %d compiled in %.1f s", bucket, time.perf_counter() - started)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def decode_compiled(self) -> bool:
        return self._compiled_decode is not None

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """The vision features of `tiles`, on the CPU encoded CPU_VISION_TILES_AT_ONCE at a time."""
        step = CPU_VISION_TILES_AT_ONCE if self.model.device.type == "cpu" else tiles.shape[0]
        if tiles.shape[0] <= step:
            return self.model.encode_tiles(tiles)
        return torch.cat([self.model.encode_tiles(tiles[i : i + step]) for i in range(0, tiles.shape[0], step)])

    def image_spans(
        self, inputs: ProcessorOutput, images: list[int], features: torch.Tensor
    ) -> list[torch.Tensor]:
        """The spans of the given images, from the features of their tiles (concatenated in order)."""
        crops = inputs.images_spatial_crop[0].tolist()
        counts = tiles_per_image(crops)
        spans, offset = [], 0
        for image in images:
            spans.append(self.model.image_span(features[offset : offset + counts[image]], crops[image]))
            offset += counts[image]
        return spans

    def prompt_embeds(self, inputs: ProcessorOutput, start: int, spans: list[torch.Tensor]) -> torch.Tensor:
        """Embeddings [T - start, D] of the prompt from position `start`, given the spans of the
        images in that part, in order."""
        return self.model.embed_prompt(inputs.input_ids[0, start:], inputs.images_seq_mask[0, start:], spans)

    def read_prefix(self, row: int, length: int) -> list[torch.Tensor]:
        """Views of the first `length` positions of every cache tensor of row `row`."""
        return [cache[row, :length] for cache in self.language.caches()]

    def write_prefix(self, row: int, prefix: list[torch.Tensor]) -> None:
        for cache, values in zip(self.language.caches(), prefix, strict=True):
            cache[row, : values.shape[0]] = values

    def prefill(self, row: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Write `embeds` [T, D] at positions start.. of cache row `row`; the last token's final
        hidden state [D]."""
        positions = torch.arange(start, start + embeds.shape[0], device=self.device)[None]
        ctx = self.language.context(positions, rows=slice(row, row + 1), kv_len=start + embeds.shape[0])
        return self.language(embeds[None].to(self.model.dtype), ctx)[0, -1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, D] -> fp32 logits [B, V]."""
        return self.language.logits(hidden)

    def decode(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One step for rows 0..B-1: row b feeds tokens[b] at positions[b]. fp32 logits [B, V]."""
        batch = len(positions)
        position_tensor = torch.tensor(positions, device=self.device)
        if self._compiled_decode is not None:
            bucket = next(size for size in self.buckets if size >= batch)
            pad = bucket - batch
            padded_tokens = torch.cat([tokens, tokens.new_zeros(pad)])
            padded_positions = torch.cat([position_tensor, position_tensor.new_full((pad,), self.context_length - 1)])
            try:
                return self._compiled_decode(padded_tokens, padded_positions, self.context_length)[:batch].clone()
            except Exception as error:  # a compiler problem must cost speed, never the answer
                log.warning("compiled decode failed (%s); decoding eagerly from now on", error)
                self._compiled_decode = None
        # Eager: attend only as far as the furthest row has written.
        return self._decode_step(tokens, position_tensor, max(positions) + 1)

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        embeds = self.language.model.embed_tokens(tokens[:, None])
        ctx = self.language.context(positions[:, None], rows=slice(0, tokens.shape[0]), kv_len=kv_len)
        return self.language.logits(self.language(embeds, ctx)[:, -1])

    def synchronize(self) -> None:
        """Wait for the device, so that stage timings measure work rather than queued launches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def move_row(self, source: int, target: int, length: int) -> None:
        if source != target and length > 0:
            self.language.move_cache_row(source, target, length)
