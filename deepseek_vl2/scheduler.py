"""Continuous batching: one thread owns the model and, step after step, admits queued requests into
free cache rows, advances the request being prefilled by one chunk, and decodes every running
request in one batched step.

Chunk budget: while requests are decoding, a step does at most one unit of prefill work (a vision
batch of up to `vision_chunk_tiles` tiles, or a prefill chunk of up to `prefill_chunk_size` tokens)
and then one decode step of all running requests, so a new prompt delays the running answers by at
most one such unit per token. With nothing decoding, a prompt's vision and prefill each run as one
unit: chunks would protect nobody and only add per-chunk costs.

Cache rows: running requests occupy rows 0..B-1 in the order of `running`, so a decode step reads a
slice of the cache. A request is prefilled in the first row after them and moved down when it joins
the batch, if a row below it was freed meanwhile; when a running request leaves, the last one moves
into its row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from .model import tile_ranges
from .prefix_cache import PrefixCache
from .request import Request
from .runner import ModelRunner
from .sampling import Sampler

log = logging.getLogger(__name__)


class RequestCancelled(Exception):
    """The request was cancelled before it finished."""


class EngineClosed(RuntimeError):
    """The engine was closed while the request was still queued or running."""


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        eos_id: int,
        prefill_chunk_size: int,
        vision_chunk_tiles: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if prefill_chunk_size < 1 or vision_chunk_tiles < 1:
            raise ValueError(
                f"chunk sizes must be >= 1, got prefill {prefill_chunk_size}, vision {vision_chunk_tiles}"
            )
        self.runner = runner
        self.eos_id = eos_id
        self.prefill_chunk_size = prefill_chunk_size
        self.vision_chunk_tiles = vision_chunk_tiles
        self.prefix_cache = prefix_cache  # used by this thread only
        self.vocab_size = runner.model.config.language.vocab_size
        self.waiting: deque[Request] = deque()  # shared with submitting threads: under _wakeup
        self.prefilling: Request | None = None
        self.running: list[Request] = []  # running[i] occupies cache row i
        self._wakeup = threading.Condition()
        self._closed = False
        warmed_up = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(warmed_up,), name="deepseek-vl2-scheduler", daemon=True
        )
        self._thread.start()
        warmed_up.wait()

    # ---- called from any thread -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._wakeup:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self.waiting.append(request)
            self._wakeup.notify()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join()

    @property
    def busy_rows(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    # ---- the scheduler thread ---------------------------------------------------------------

    def _loop(self, warmed_up: threading.Event) -> None:
        with torch.inference_mode():
            # Compiled graphs (CUDA graph trees) belong to the thread that records them.
            try:
                self.runner.warm_up()
            except Exception:
                log.exception("decode warm-up failed; requests will compile or run eagerly")
            finally:
                warmed_up.set()
            while True:
                with self._wakeup:
                    while not self._closed and not (self.waiting or self.prefilling or self.running):
                        self._wakeup.wait()
                    if self._closed:
                        break
                try:
                    self.step()
                except Exception as error:  # a scheduler bug must fail requests, never hang them
                    log.exception("scheduler step failed")
                    self._fail_all(error)
        self._fail_all(EngineClosed("the engine was closed before this request finished"))

    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.prefilling is not None:
            request = self.prefilling
            try:
                self._advance_prefill(request)
            except Exception as error:
                log.exception("request %d failed during prefill", request.id)
                self.prefilling = None
                self._finish(request, error)
        if self.running:
            try:
                self._decode()
            except Exception as error:
                log.exception("decode step failed; failing its %d requests", len(self.running))
                failed, self.running = self.running, []
                for request in failed:
                    self._finish(request, error)

    def _drop_cancelled(self) -> None:
        with self._wakeup:
            cancelled = [r for r in self.waiting if r.cancelled]
            for request in cancelled:
                self.waiting.remove(request)
        if self.prefilling is not None and self.prefilling.cancelled:
            cancelled.append(self.prefilling)
            self.prefilling = None  # its row was never part of the batch: nothing to move
        rows = [i for i, r in enumerate(self.running) if r.cancelled]
        cancelled += [self.running[i] for i in rows]
        self._retire(rows)
        for request in cancelled:
            log.info("request %d cancelled after %d tokens", request.id, len(request.tokens))
            self._finish(request, RequestCancelled(f"request {request.id} was cancelled"))

    def _admit(self) -> None:
        if self.prefilling is not None or len(self.running) >= self.runner.max_batch:
            return
        with self._wakeup:
            if not self.waiting:
                return
            request = self.waiting.popleft()
        request.row = len(self.running)
        request.timings.queue_s = time.perf_counter() - request.timings.started - request.timings.preprocess_s
        self.prefilling = request
        try:
            self._plan_prefill(request)
        except Exception as error:  # e.g. no memory for its copy: fail this request, not the others
            log.exception("request %d failed at admission", request.id)
            self.prefilling = None
            self._finish(request, error)
            return
        log.info(
            "request %d: prefilling %d of %d prompt tokens (%d image tiles) in cache row %d; "
            "%d running, %d queued",
            request.id, request.prompt_len - request.prefilled, request.prompt_len,
            request.tiles.shape[0], request.row, len(self.running), len(self.waiting),
        )  # fmt: skip

    def _plan_prefill(self, request: Request) -> None:
        """Take what the prefix cache holds for this prompt; list the images that still need the
        vision tower (those after the reused prefix whose embeddings are not cached)."""
        crops = request.inputs.images_spatial_crop[0].tolist()
        after_prefix = range(len(crops))
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
                    request.spans[image] = span
            log.info(
                "request %d: prefix cache %s: %d of %d prompt tokens reused, %d of %d image "
                "embeddings cached", request.id, "hit" if hit else "miss", request.prefilled,
                request.prompt_len, len(request.spans), len(after_prefix),
            )  # fmt: skip
        request.encode = [image for image in after_prefix if image not in request.spans]
        ranges = tile_ranges(crops)
        all_tiles = request.inputs.pixel_values[0]
        request.tiles = torch.cat([all_tiles[ranges[image]] for image in request.encode] or [all_tiles[:0]])

    def _advance_prefill(self, request: Request) -> None:
        """One unit of work: a vision batch while tiles remain, otherwise a prefill chunk."""
        started = time.perf_counter()
        tile_budget = self.vision_chunk_tiles if self.running else request.tiles.shape[0]
        token_budget = self.prefill_chunk_size if self.running else request.prompt_len
        encoded = sum(f.shape[0] for f in request.features)
        if encoded < request.tiles.shape[0]:
            tiles = request.tiles[encoded : encoded + tile_budget]
            request.features.append(self.runner.encode_tiles(tiles))
            self.runner.synchronize()
            request.timings.vision_s += time.perf_counter() - started
            return
        if request.embeds is None:
            self._collect_spans(request)
            spans = [request.spans[image] for image in sorted(request.spans)]
            request.embeds = self.runner.prompt_embeds(request.inputs, request.prefilled, spans)
        start = request.prefilled
        end = min(start + token_budget, request.prompt_len)
        offset = request.prompt_len - request.embeds.shape[0]  # the embeddings start after the reused prefix
        hidden = self.runner.prefill(request.row, request.embeds[start - offset : end - offset], start)
        request.prefilled = end
        if end < request.prompt_len:
            self.runner.synchronize()
            request.timings.prefill_s += time.perf_counter() - started
            return
        request.embeds = None
        self._store_prefix(request)
        input_ids = request.inputs.input_ids.to(self.runner.device)
        request.sampler = Sampler(request.params, self.vocab_size, input_ids)
        token = int(request.sampler(self.runner.logits(hidden[None]))[0])
        request.timings.prefill_s += time.perf_counter() - started
        self.prefilling = None
        if self._accept(request, token):
            self._finish(request)
            return
        target = len(self.running)
        self.runner.move_row(request.row, target, request.cached_len)
        request.row = target
        self.running.append(request)

    def _collect_spans(self, request: Request) -> None:
        """Turn the encoded tiles into image spans, and offer them to the prefix cache."""
        if not request.encode:
            return
        spans = self.runner.image_spans(request.inputs, request.encode, torch.cat(request.features))
        request.features, request.tiles = [], None
        for image, span in zip(request.encode, spans):
            request.spans[image] = span
            if self.prefix_cache is not None and request.keys is not None:
                self.prefix_cache.put(request.keys.images[image], [span], span.shape[0])

    def _store_prefix(self, request: Request) -> None:
        """Offer the prefix ending with the prompt's last image, now wholly in the cache row."""
        keys = request.keys
        if self.prefix_cache is None or keys is None or not keys.spans:
            return
        length = keys.spans[-1][1]
        if length > request.cached_prompt_tokens:
            self.prefix_cache.put(keys.prefixes[-1], self.runner.read_prefix(request.row, length), length)

    def _decode(self) -> None:
        tokens = torch.tensor([r.tokens[-1] for r in self.running], device=self.runner.device)
        logits = self.runner.decode(tokens, [r.cached_len for r in self.running])
        # Each row samples with its own settings and generator, so its tokens never depend on
        # which other requests share the batch.
        sampled = [r.sampler(logits[i : i + 1]) for i, r in enumerate(self.running)]
        next_tokens = torch.cat(sampled).tolist()
        finished = [i for i, (r, t) in enumerate(zip(self.running, next_tokens)) if self._accept(r, t)]
        done = [self.running[i] for i in finished]
        self._retire(finished)
        for request in done:
            self._finish(request)

    def _accept(self, request: Request, token: int) -> bool:
        """Record and send a new token; True when the request is complete."""
        request.tokens.append(token)
        request.timings.token_times.append(time.perf_counter() - request.timings.started)
        request.emit(token)
        return token == self.eos_id or len(request.tokens) >= request.max_new_tokens

    def _retire(self, indices: list[int]) -> None:
        """Remove running[i] for each i, keeping the rest in rows 0..B-1: the last running request
        moves into each freed row (highest indices first, so every move stays valid)."""
        for index in sorted(indices, reverse=True):
            last = self.running.pop()
            if index < len(self.running):
                self.runner.move_row(last.row, index, last.cached_len)
                last.row, self.running[index] = index, last

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        request.row = -1
        request.tiles, request.features, request.spans, request.embeds = None, [], {}, None
        if error is None:
            t = request.timings
            log.info(
                "request %d finished: %d tokens, first after %.2f s, %.1f tokens/s",
                request.id, len(request.tokens), t.first_token_s, t.decode_tokens_per_s,
            )  # fmt: skip
        request.emit(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._wakeup:
            pending, self.waiting = list(self.waiting), deque()
        pending += self.running + ([self.prefilling] if self.prefilling else [])
        self.running, self.prefilling = [], None
        for request in pending:
            self._finish(request, error)
