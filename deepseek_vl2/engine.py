"""Generation engine: processor -> vision -> chunked prefill into the KV cache -> sampled decode.

The cache is allocated once for the whole context and reused by every request, so decode shapes
never change and the decode step can be compiled (CUDA) once. Prefill runs in chunks straight into
the cache, which bounds activation memory without moving anything off the device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .model import DeepseekVL2
from .processor import Processor, ProcessorOutput
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder

log = logging.getLogger(__name__)


@dataclass
class Timings:
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # from the start of the request
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only; ends with EOS when generation stopped on it
    prompt_tokens: int
    stopped_on_eos: bool
    max_new_tokens: int  # what was actually allowed after the context guard
    max_new_tokens_clipped: bool
    timings: Timings = field(default_factory=Timings)


class ContextOverflowError(ValueError):
    """The prompt alone does not fit the model's context."""


def default_device_and_dtype() -> tuple[torch.device, torch.dtype]:
    # bf16 on the CPU here is 8-100x slower than fp32 (no bf16 units), so the CPU computes in fp32.
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


class Engine:
    def __init__(
        self,
        model: DeepseekVL2,
        processor: Processor,
        prefill_chunk_size: int = 1024,
        compile_decode: bool | None = None,
    ):
        if prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        self.model, self.processor = model, processor
        self.config = model.config
        self.prefill_chunk_size = prefill_chunk_size
        self.context_length = self.config.language.max_position_embeddings
        self.eos_id = processor.tokenizer.eos_id
        if compile_decode is None:
            compile_decode = self.device.type == "cuda"
        # Compiled decode attends over the whole fixed-size cache so its shapes never change.
        self._compiled_decode: Callable[..., torch.Tensor] | None = (
            torch.compile(self._decode_step, mode="reduce-overhead") if compile_decode else None
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Engine:
        default_device, default_dtype = default_device_and_dtype()
        device = torch.device(device) if device is not None else default_device
        if dtype is None:
            dtype = default_dtype if device.type == default_device.type else torch.float32
        started = time.perf_counter()
        model = DeepseekVL2.from_pretrained(path, device=device, dtype=dtype)
        processor = Processor.from_pretrained(path)
        log.info(
            "model ready on %s in %s after %.1f s", device, str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )  # fmt: skip
        return cls(model, processor, **kwargs)

    # ---- public API -------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[Image.Image] = (),
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> GenerationResult:
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        return self._run(messages, images, max_new_tokens, params)

    def stream(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[Image.Image] = (),
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 50,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as it is produced (never half a UTF-8 character)."""
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        decoder = StreamDecoder(self.processor.tokenizer)
        batch, timings, started, allowed, _ = self._prepare(messages, images, max_new_tokens)
        for token in self._tokens(batch, allowed, params, timings, started):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    # ---- stages ---------------------------------------------------------------------------

    def _run(self, messages, images, max_new_tokens, params) -> GenerationResult:
        batch, timings, started, allowed, clipped = self._prepare(messages, images, max_new_tokens)
        tokens = list(self._tokens(batch, allowed, params, timings, started))
        return GenerationResult(
            text=self.processor.decode(tokens),
            token_ids=tokens,
            prompt_tokens=batch.input_ids.shape[1],
            stopped_on_eos=bool(tokens) and tokens[-1] == self.eos_id,
            max_new_tokens=allowed,
            max_new_tokens_clipped=clipped,
            timings=timings,
        )

    def _prepare(
        self, messages, images, max_new_tokens: int
    ) -> tuple[ProcessorOutput, Timings, float, int, bool]:
        """Processor outputs, timings so far, start time, and the allowed new tokens (clipped?)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        started = time.perf_counter()
        batch = self.processor(messages, list(images))
        timings = Timings(preprocess_s=time.perf_counter() - started)
        self._check_fits(batch)
        allowed, clipped = self._clip(batch, max_new_tokens)
        return batch, timings, started, allowed, clipped

    def _check_fits(self, batch: ProcessorOutput) -> None:
        prompt = batch.input_ids.shape[1]
        if prompt < self.context_length:
            return
        crops = batch.images_spatial_crop[0].tolist()
        uses = [
            f"image {i + 1} ({nw}x{nh} tiles): {n} tokens"
            for i, ((nw, nh), n) in enumerate(zip(crops, batch.image_token_counts))
        ]
        uses.append(f"text: {prompt - sum(batch.image_token_counts)} tokens")
        raise ContextOverflowError(
            f"the prompt is {prompt} tokens but the model's context holds {self.context_length} "
            f"(prompt and answer together); {'; '.join(uses)}. Use fewer or smaller images "
            f"(more than two images are each reduced to one tile) or a shorter text."
        )

    def _clip(self, batch: ProcessorOutput, max_new_tokens: int) -> tuple[int, bool]:
        room = self.context_length - batch.input_ids.shape[1]
        if max_new_tokens > room:
            log.warning(
                "max_new_tokens %d clipped to %d: the prompt uses %d of %d context tokens",
                max_new_tokens, room, batch.input_ids.shape[1], self.context_length,
            )  # fmt: skip
            return room, True
        return max_new_tokens, False

    @torch.inference_mode()
    def _tokens(
        self,
        batch: ProcessorOutput,
        max_new_tokens: int,
        params: SamplingParams,
        timings: Timings,
        started: float,
    ) -> Iterator[int]:
        if max_new_tokens == 0:
            return
        language = self.model.language
        input_ids = batch.input_ids.to(self.device)
        prompt_len = input_ids.shape[1]

        t0 = time.perf_counter()
        embeds = self.model.embed(
            input_ids, batch.pixel_values, batch.images_seq_mask, batch.images_spatial_crop
        )
        self._sync()
        timings.vision_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits = self.prefill(embeds)
        sampler = Sampler(params, language.config.vocab_size, input_ids)
        token = sampler(logits)
        self._sync()
        now = time.perf_counter()
        timings.prefill_s, timings.first_token_s = now - t0, now - started
        log.info(
            "prompt %d tokens (images %s): preprocess %.2f s, vision %.2f s, prefill %.2f s (%.0f tok/s)",
            prompt_len, batch.image_token_counts, timings.preprocess_s, timings.vision_s,
            timings.prefill_s, prompt_len / max(timings.prefill_s, 1e-9),
        )  # fmt: skip

        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            token_id = int(token)
            yield token_id
            if token_id == self.eos_id or step == max_new_tokens - 1:
                break
            logits = self._decode(token.view(1, 1), prompt_len + step)
            token = sampler(logits)
            timings.decode_tokens += 1
        timings.decode_s = time.perf_counter() - t0
        if timings.decode_tokens:
            log.info(
                "decoded %d tokens in %.2f s (%.1f tok/s)",
                timings.decode_tokens, timings.decode_s, timings.decode_tokens_per_s,
            )  # fmt: skip

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """Run the prompt through the decoder in chunks, filling the cache; logits of the last token."""
        language = self.model.language
        language.setup_cache(1, self.context_length)
        prompt_len = embeds.shape[1]
        for start in range(0, prompt_len, self.prefill_chunk_size):
            end = min(start + self.prefill_chunk_size, prompt_len)
            positions = torch.arange(start, end, device=self.device)
            hidden = language(embeds[:, start:end], language.context(positions, kv_len=end))
        return language.logits(hidden[:, -1])

    def _decode(self, token: torch.Tensor, position: int) -> torch.Tensor:
        input_pos = torch.tensor([position], device=self.device)
        if self._compiled_decode is not None:
            try:
                return self._compiled_decode(token, input_pos, self.context_length)
            except Exception as error:  # a compiler problem must cost speed, never the answer
                log.warning("compiled decode failed (%s); decoding eagerly from now on", error)
                self._compiled_decode = None
        return self._decode_step(token, input_pos, position + 1)

    def _decode_step(self, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token at `input_pos`, attending over the first `kv_len` cache entries (masked)."""
        language = self.model.language
        embeds = language.model.embed_tokens(token)
        hidden = language(embeds, language.context(input_pos, kv_len=kv_len))
        return language.logits(hidden[:, -1])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
