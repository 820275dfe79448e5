"""Generation engine: the public API over the scheduler.

`generate`, `stream` and `generate_async` may be called from any number of threads and event loops
at once. Each call runs the processor in the caller's thread (tokenization, tiling and the context
check fail there, before anything is queued), then hands the request to the engine's thread
(engine_thread.py), which batches it with the others (scheduler.py) and sends its tokens back. That
thread also builds the model and runs all of its torch work. An engine built with `threaded=False`
has no such thread: its owner calls `engine.scheduler.step()`
(the deterministic schedule tests do).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from ..compute.quantized import QuantizeSpec
from ..inputs.processor import Processor
from ..inputs.tokenizer import StreamDecoder
from ..model.model import DeepseekVL2
from . import memory
from .admission import admit
from .calibration import choose_execution
from .engine_thread import EngineThread
from .prefix_cache import PrefixCache, cache_budget
from .request import Event, Progress, Request, Stage, Timings
from .runner import ModelRunner, cache_bytes_per_row, default_max_batch, free_memory_bytes
from .sampling import SamplingParams
from .scheduler import Scheduler
from .settings import (
    CONCURRENCY_ENV, MAX_BATCH_ENV, PREFILL_CHUNK_ENV, PREFIX_CACHE_ENV, default_device, default_dtype,
    default_quantize, default_quantized_cache, env_gib, env_int, planned_max_batch,
)  # fmt: skip

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFILL_CHUNK = 512
# Tiles per vision step: on a GPU all of a request's tiles (at most 3 images x 10); on the CPU,
# where one 384x384 tile takes seconds, two at a time so running answers keep flowing.
DEFAULT_VISION_CHUNK_TILES = {"cuda": 32, "cpu": 2}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only; ends with EOS when generation stopped on it
    prompt_tokens: int
    stopped_on_eos: bool
    max_new_tokens: int  # what was actually allowed after the context guard
    max_new_tokens_clipped: bool
    timings: Timings = field(default_factory=Timings)
    cached_prompt_tokens: int = 0  # prompt positions taken from the prefix cache


class Engine:
    def __init__(
        self,
        model: DeepseekVL2 | Callable[[], DeepseekVL2],
        processor: Processor,
        *,
        max_batch: int | None = None,
        prefill_chunk_size: int | None = None,
        vision_chunk_tiles: int | None = None,
        compile_decode: bool | None = None,
        prefix_cache_bytes: int | None = None,
        threaded: bool = True,
    ):
        """One engine per model: it owns the model's KV cache and runs it on its own thread.

        `model` is the model or a function that builds it. Given a function, the engine builds the
        model on its thread, which then runs all of the model's torch work (engine_thread.py says
        why that makes a CPU decode up to 1.9x faster); `from_pretrained` does so.

        Unset arguments come from DEEPSEEK_VL2_MAX_BATCH / DEEPSEEK_VL2_PREFILL_CHUNK /
        DEEPSEEK_VL2_PREFIX_CACHE_GB, then from defaults: max_batch as many rows as the server
        admits predictions (COG_MAX_CONCURRENCY) or, unset, runner.default_max_batch, within GPU
        memory; prefill chunks of 512 tokens; decode compiled on CUDA; a prefix cache sized from the
        memory left (prefix_cache.cache_budget; 0 turns it off). `threaded=False`: no engine
        thread; the caller's thread builds everything and steps `engine.scheduler` itself.
        """
        self._thread = EngineThread() if threaded else None
        try:
            self._on_thread(
                lambda: self._build(
                    model, processor, max_batch, prefill_chunk_size, vision_chunk_tiles, compile_decode,
                    prefix_cache_bytes,
                )  # fmt: skip
            )
            if self._thread is not None:
                self._thread.call(self._warm_up)
                self._thread.serve(self.scheduler)
        except BaseException:
            if self._thread is not None:
                self._thread.close()
            raise
        # Stop the engine thread when the engine is dropped or the interpreter exits (a thread
        # still inside torch at exit aborts the process).
        self._stop_scheduler = weakref.finalize(self, (self._thread or self.scheduler).close)
        log.info(
            "engine ready: batch up to %d, prefill chunks of %d tokens and vision batches of %d "
            "tiles while answers run, decode %s, prefix cache %.2f GiB",
            self.max_batch, self.scheduler.prefiller.prefill_chunk_size, self.scheduler.prefiller.vision_chunk_tiles,
            "compiled" if self.runner.decode_compiled else "eager",
            self.prefix_cache.budget_bytes / 2**30 if self.prefix_cache is not None else 0.0,
        )  # fmt: skip

    def _on_thread(self, job: Callable[[], T]) -> T:
        return self._thread.call(job) if self._thread is not None else job()

    def _build(
        self,
        model: DeepseekVL2 | Callable[[], DeepseekVL2],
        processor: Processor,
        max_batch: int | None,
        prefill_chunk_size: int | None,
        vision_chunk_tiles: int | None,
        compile_decode: bool | None,
        prefix_cache_bytes: int | None,
    ) -> None:
        self.model = model if isinstance(model, DeepseekVL2) else model()
        self.processor = processor
        self.config = self.model.config
        self.context_length = self.config.language.max_position_embeddings
        self.eos_id = processor.tokenizer.eos_id
        log.info(memory.read_memory().describe())  # the cache sizes below keep within it
        if not max_batch and self.device.type != "cuda":
            # The rule calibration measured at, within what the memory holds (runner.default_max_batch).
            max_batch = default_max_batch(self.model, planned_max_batch(cuda=False))
        max_batch = max_batch or env_int(MAX_BATCH_ENV) or default_max_batch(self.model, env_int(CONCURRENCY_ENV))
        prefill_chunk_size = prefill_chunk_size or env_int(PREFILL_CHUNK_ENV) or DEFAULT_PREFILL_CHUNK
        if vision_chunk_tiles is None:
            vision_chunk_tiles = DEFAULT_VISION_CHUNK_TILES.get(self.device.type, 2)
        if compile_decode is None:
            compile_decode = self.device.type == "cuda"
        self.runner = ModelRunner(self.model, max_batch, compile_decode)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = env_gib(PREFIX_CACHE_ENV)
        free = free_memory_bytes(self.device)
        if self.device.type == "cpu":
            # The KV cache's pages become resident as positions are written (language.cache_zeros):
            # what is free now must leave room for all of it.
            free -= max_batch * cache_bytes_per_row(self.model)
        budget = cache_budget(self.device, free, prefix_cache_bytes)
        self.prefix_cache = PrefixCache(budget) if budget > 0 else None
        # Cached values depend on the weights and on how they were computed.
        quantization = self.model.quantization.name
        self._cache_identity = f"{self.model.weights_id}/{str(self.dtype)}/{self.device.type}/{quantization}"
        self.scheduler = Scheduler(
            self.runner, self.eos_id, prefill_chunk_size, vision_chunk_tiles, self.prefix_cache
        )

    def _warm_up(self) -> None:
        # Compiled graphs (CUDA graph trees) belong to the thread that records them: this one.
        try:
            with torch.inference_mode():
                self.runner.warm_up()
        except Exception:
            log.exception("decode warm-up failed; requests will compile or run eagerly")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def max_batch(self) -> int:
        return self.runner.max_batch

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        quantize: QuantizeSpec | None = None,
        **kwargs: Any,
    ) -> Engine:
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype()
        quantize = quantize or default_quantize()
        quantized_cache = default_quantized_cache()
        processor = Processor.from_pretrained(path)

        def load() -> DeepseekVL2:
            started = time.perf_counter()
            model = DeepseekVL2.from_pretrained(
                path, device=device, dtype=dtype, quantize=quantize, quantized_cache=quantized_cache
            )
            # On the CPU, calibration measures at the batch the engine will run (planned_max_batch).
            choose_execution(model, rows=kwargs.get("max_batch"))
            log.info(
                "model ready on %s in %s (quantization: %s, quantized cache: %s) after %.1f s", device,
                str(dtype).removeprefix("torch."), quantize.name, model.quantized_cache, time.perf_counter() - started,
            )  # fmt: skip
            return model

        return cls(load, processor, **kwargs)

    def close(self) -> None:
        """Stop the scheduler and the engine thread; unfinished requests fail with EngineClosed."""
        self._stop_scheduler()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
        progress: Progress | None = None,
        image_detail: str = "auto",
    ) -> GenerationResult:
        """The whole answer. `progress(stage, done, total)` is called from the engine thread
        after each vision batch ("vision", tiles) and each prefill chunk ("prefill", prompt
        tokens); it must be quick. `image_detail`: "auto" (the official tiling rule) or "low"
        (every image one 384x384 view and tile, 421 tokens: a much faster first token);
        anything else is a ValueError."""
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        request, events = self._start(messages, images, max_new_tokens, params, progress, image_detail)
        return self._result(request, list(self._tokens(request, events)))

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
        progress: Progress | None = None,
        image_detail: str = "auto",
    ) -> Iterator[str]:
        """Yield the answer's text as it is produced (never half a UTF-8 character). Closing the
        iterator early cancels the request. `progress` and `image_detail` as for `generate`."""
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        request, events = self._start(messages, images, max_new_tokens, params, progress, image_detail)
        decoder = StreamDecoder(self.processor.tokenizer)
        for token in self._tokens(request, events):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    async def generate_async(
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
        progress: Progress | None = None,
        image_detail: str = "auto",
    ) -> GenerationResult:
        """`generate` for an event loop: never blocks it; cancelling the awaiting task cancels
        the request, which leaves the batch at the scheduler's next step. `progress` (called from
        the engine thread, not the event loop) and `image_detail` as for `generate`."""
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        notify = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731
        # Prepared in a worker thread but submitted here: a task cancelled while the processor
        # runs never queues its request.
        request = await asyncio.to_thread(
            self._prepare, messages, images, max_new_tokens, params, notify, progress, image_detail
        )
        self._submit(request)
        tokens: list[int] = []
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                tokens.append(event)
        finally:
            request.cancel()  # a no-op once finished
        return self._result(request, tokens)

    # ---- stages ---------------------------------------------------------------------------

    def _prepare(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[Image.Image],
        max_new_tokens: int,
        params: SamplingParams,
        notify: Callable[[Event], None],
        progress: Progress | None = None,
        image_detail: str = "auto",
    ) -> Request:
        return admit(
            self.processor, self.context_length, messages, images, max_new_tokens, params, notify, progress,
            self._cache_identity if self.prefix_cache is not None else None, image_detail,
        )  # fmt: skip

    def submit(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[Image.Image],
        max_new_tokens: int,
        params: SamplingParams,
        notify: Callable[[Event], None],
        progress: Progress | None = None,
        image_detail: str = "auto",
    ) -> Request:
        """Prepare a request in the caller's thread and queue it; `notify` gets its events from
        the engine's thread (or, with `threaded=False`, from whoever steps it). `image_detail` as
        for `generate`."""
        request = self._prepare(messages, images, max_new_tokens, params, notify, progress, image_detail)
        self._submit(request)
        return request

    def _start(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[Image.Image],
        max_new_tokens: int,
        params: SamplingParams,
        progress: Progress | None,
        image_detail: str,
    ) -> tuple[Request, queue.Queue[Event]]:
        """Prepare and queue a request for a waiting thread; its events arrive on the queue."""
        events: queue.Queue[Event] = queue.Queue()
        request = self.submit(messages, images, max_new_tokens, params, events.put, progress, image_detail)
        return request, events

    def _submit(self, request: Request) -> None:
        if request.max_new_tokens == 0:  # nothing to generate: the model is never touched
            request.enter(Stage.FINISHED)
            request.emit(None)
        elif self._thread is not None:
            self._thread.submit(request)
        else:
            self.scheduler.submit(request)

    @staticmethod
    def _tokens(request: Request, events: queue.Queue[Event]) -> Iterator[int]:
        try:
            while (event := events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            request.cancel()  # the consumer stopped early (or it finished: then a no-op)

    def _result(self, request: Request, tokens: list[int]) -> GenerationResult:
        return GenerationResult(
            text=self.processor.decode(tokens),
            token_ids=tokens,
            prompt_tokens=request.prompt_len,
            stopped_on_eos=bool(tokens) and tokens[-1] == self.eos_id,
            max_new_tokens=request.max_new_tokens,
            max_new_tokens_clipped=request.max_new_tokens_clipped,
            timings=request.timings,
            cached_prompt_tokens=request.cached_prompt_tokens,
        )
