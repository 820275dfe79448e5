"""Continuous batching: step after step, admit a queued request into a free cache row, advance the
request being admitted by one unit of work, and decode every running request in one batched step.

Whoever owns the scheduler calls `step`: the engine's thread (engine_thread.py) while there is
work, or a test, which then decides exactly what arrives and what is cancelled before each step.

A request's way through the scheduler follows its stage (request.py):

- QUEUED: in `waiting`, until a row is free and no other request is being admitted.
- ENCODING: `admitting`, in its own row. Admission takes what the prefix cache holds (a KV prefix
  copied into the row, image spans) and leaves the other images' tiles to the vision tower.
- PREFILLING: still `admitting`. Once every tile is encoded, the prompt's embeddings are built and
  written into the row chunk by chunk; the last chunk gives the first token.
- DECODING: in `running`, one token per step.
- FINISHED: its last event is sent and its row is free.

Chunk budget: while requests are decoding, a step does at most one unit of admission work (a vision
batch of up to `vision_chunk_tiles` tiles, or a prefill chunk of up to `prefill_chunk_size` tokens)
and then one decode step of all running requests, so a new prompt delays the running answers by at
most one such unit per token. With nothing decoding, a prompt's vision and prefill each run as one
unit: chunks would protect nobody and only add per-chunk costs.

Cache rows: running requests occupy rows 0..B-1 in the order of `running`, so a decode step reads a
slice of the cache. A request is admitted into the first row after them and moved down when it
joins the batch, if a row below it was freed meanwhile; when a running request leaves, the last one
moves into its row.

Failures: whatever raises inside a step, every request taken out of `waiting` gets its last event
(`Scheduler.step` says which requests a failure ends). The engine stays usable afterwards: rows
are only positions in the KV cache, rewritten by the next request that gets them, so once the
failed requests have left `admitting` and `running` the next step serves the queue as usual. A
failure that breaks the model itself (e.g. a CUDA error that poisons the context) fails each later
step again, and each such step fails its requests: nobody hangs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection

import torch

from .prefiller import Prefiller
from .prefix_cache import PrefixCache
from .request import IN_FLIGHT, Request, Stage
from .runner import ModelRunner
from .sampling import Sampler

log = logging.getLogger(__name__)


class RequestCancelled(Exception):
    """The request was cancelled before it finished."""


class EngineClosed(RuntimeError):
    """The engine was closed while the request was still queued or running."""


class StepFailed(RuntimeError):
    """Something raised inside a scheduler step while the request was in flight: the message
    names the request, its stage, the work that failed and the original error (its __cause__)."""

    def __init__(self, request: Request, stage: Stage, work: str, error: BaseException) -> None:
        super().__init__(
            f"request {request.id} failed while {stage.value}: {work} raised "
            f"{type(error).__name__}: {error}"
        )
        self.__cause__ = error


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
        self.prefiller = Prefiller(runner, prefill_chunk_size, vision_chunk_tiles, prefix_cache)
        self.vocab_size = runner.model.config.language.vocab_size
        self.waiting: deque[Request] = deque()  # QUEUED; shared with submitting threads: under _lock
        self.admitting: Request | None = None  # ENCODING or PREFILLING, in its own row
        self.running: list[Request] = []  # DECODING; running[i] occupies cache row i
        # Every request taken out of `waiting` and not yet FINISHED (its stage is in IN_FLIGHT), in
        # admission order: also those a failing step has left neither `admitting` nor `running`.
        self.in_flight: dict[Request, None] = {}
        self._lock = threading.Lock()
        self._closed = False

    # ---- called from any thread -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.admitting or self.running)

    @property
    def busy_rows(self) -> int:
        return len(self.running) + (self.admitting is not None)

    # ---- called from the stepping thread ----------------------------------------------------

    def close(self) -> None:
        """Refuse new requests and fail every unfinished one with EngineClosed."""
        with self._lock:
            self._closed = True
        self.fail_all(EngineClosed("the engine was closed before this request finished"))

    def fail_all(self, error: BaseException) -> None:
        """Fail every queued and in-flight request with `error` (closing, or a step whose own
        recovery failed: the engine thread's last resort)."""
        with self._lock:
            pending, self.waiting = list(self.waiting), deque()
        self._fail_in_flight(IN_FLIGHT, lambda request, stage: error)
        for request in pending:
            self._finish(request, error)

    @torch.inference_mode()
    def step(self) -> None:
        """One step. Whatever raises in it, every request in flight that it touched gets its last
        event, and the queue is left alone (its requests are served by the next steps):

        - the admitting request's work (its admission, a vision batch, a prefill chunk, its first
          token, its move into the batch) fails that request only: the running rows are not
          touched by it;
        - a decode step, or a row move while requests leave the batch, fails every DECODING
          request (those in `running` and any that a half-done move left out of it); a request
          whose answer is complete gets its result instead; the admitting request, in a row above
          them, goes on;
        - anything else fails every request in flight.

        Each failed request gets a StepFailed naming what failed, with the error as its cause.
        """
        try:
            self._drop_cancelled()
            self._admit()
            if self.admitting is not None:
                self._advance_admitting()
            if self.running:
                self._decode_running()
        except Exception as error:  # a failure of the recovery above, or a scheduler bug
            log.exception("scheduler step failed; failing its %d requests in flight", len(self.in_flight))
            self._fail_in_flight(IN_FLIGHT, lambda request, stage: StepFailed(request, stage, "the scheduler", error))

    def _advance_admitting(self) -> None:
        request = self.admitting
        assert request is not None
        try:
            self._advance(request)
        except Exception as error:  # e.g. no memory for its prompt: fail it, not the others
            stage = request.stage  # where it got to: what failed
            log.exception("request %d failed while %s", request.id, stage.value)
            if self.admitting is request:
                self.admitting = None
            if stage is Stage.ENCODING:
                work = "the prompt's embeddings" if request.encoding.done else "a vision batch"
            elif stage is Stage.PREFILLING:
                work = "a prefill chunk or its first token"
            else:  # DECODING, not yet in `running`: appending is the last thing its prefill does
                work = "moving its cache row into the batch"
            self._finish(request, StepFailed(request, stage, work, error))

    def _decode_running(self) -> None:
        try:
            self._decode()
        except Exception as error:
            log.exception("decode step failed; failing its %d requests", len(self.running))
            self._fail_in_flight(
                {Stage.DECODING}, lambda request, stage: StepFailed(request, stage, "the decode step", error)
            )

    def _fail_in_flight(self, stages: Collection[Stage], error: Callable[[Request, Stage], BaseException]) -> None:
        """End every request in flight whose stage is in `stages`: with its result when its
        answer is complete, else with `error(request, stage)`; their rows are free afterwards."""
        ending = [r for r in self.in_flight if r.stage in stages]
        if self.admitting is not None and self.admitting.stage in stages:
            self.admitting = None
        if Stage.DECODING in stages:  # also those finished this step, still there while rows move
            self.running = []
        for request in ending:
            stage = request.stage
            self._finish(request, None if self._complete(request) else error(request, stage))

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [r for r in self.waiting if r.cancelled]
            for request in cancelled:
                self.waiting.remove(request)
        if self.admitting is not None and self.admitting.cancelled:
            cancelled.append(self.admitting)
            self.admitting = None  # its row was never part of the batch: nothing to move
        rows = [i for i, r in enumerate(self.running) if r.cancelled]
        leaving = [self.running[i] for i in rows]
        for request in cancelled:
            self._cancel(request)
        try:
            # Out of the batch before they are answered, so that a caller told of its
            # cancellation never sees its row still busy.
            self._retire(rows)
        except Exception as error:
            log.exception("moving cache rows after a cancel failed; failing the running requests")
            self._fail_in_flight(
                {Stage.DECODING},
                lambda request, stage: (
                    RequestCancelled(f"request {request.id} was cancelled") if request.cancelled
                    else StepFailed(request, stage, "moving its cache row after a cancel", error)
                ),
            )  # fmt: skip
            return
        for request in leaving:
            self._cancel(request)

    def _cancel(self, request: Request) -> None:
        log.info(
            "request %d cancelled after %d tokens, while %s", request.id, len(request.tokens), request.stage.value
        )
        self._finish(request, RequestCancelled(f"request {request.id} was cancelled"))

    # ---- QUEUED -> ENCODING ------------------------------------------------------------------

    def _admit(self) -> None:
        """Give the first queued request the row after the running ones, when one is free and no
        other request is being admitted."""
        if self.admitting is not None or len(self.running) >= self.runner.max_batch:
            return
        with self._lock:
            if not self.waiting:
                return
            request = self.waiting.popleft()
        request.row = len(self.running)
        request.timings.queue_s = time.perf_counter() - request.timings.started - request.timings.preprocess_s
        self.admitting = request
        try:
            request.enter(Stage.ENCODING, self.prefiller.plan(request))
        except Exception as error:  # e.g. no memory for its copy: fail this request, not the others
            log.exception("request %d failed at admission", request.id)
            self.admitting = None
            self._finish(request, StepFailed(request, Stage.QUEUED, "its admission", error))
            return
        self.in_flight[request] = None
        log.info(
            "request %d: prefilling %d of %d prompt tokens (%d image tiles to encode) in cache "
            "row %d; %d running, %d queued",
            request.id, request.prompt_len - request.prefilled, request.prompt_len,
            request.encoding.tiles.shape[0], request.row, len(self.running), len(self.waiting),
        )  # fmt: skip

    # ---- ENCODING -> PREFILLING -> DECODING --------------------------------------------------

    def _advance(self, request: Request) -> None:
        """One unit of admission work (prefiller.py): a vision batch while tiles remain, else a
        prefill chunk; after the last chunk, sample the first token and move the request into the
        batch (or finish it)."""
        chunked = bool(self.running)  # with answers running, work in units that keep them flowing
        if request.stage is Stage.ENCODING:
            if not request.encoding.done:
                self.prefiller.encode_batch(request, chunked)
                return
            request.enter(Stage.PREFILLING, self.prefiller.embed_prompt(request))
        started = time.perf_counter()
        hidden = self.prefiller.prefill_chunk(request, chunked)
        if hidden is None:  # more of the prompt to write
            request.timings.prefill_s += time.perf_counter() - started
            return
        input_ids = request.inputs.input_ids.to(self.runner.device)
        request.sampler = Sampler(request.params, self.vocab_size, input_ids)
        token = int(request.sampler(self.runner.logits(hidden[None]))[0])
        request.timings.prefill_s += time.perf_counter() - started
        self.admitting = None
        self._record(request, token)
        if self._complete(request):
            request.emit(token)
            self._finish(request)
            return
        request.enter(Stage.DECODING)
        target = len(self.running)
        self.runner.move_row(request.row, target, request.cached_len)
        request.row = target
        self.running.append(request)
        request.emit(token)  # once in the batch: whoever holds the first token finds it there

    # ---- DECODING -> FINISHED ----------------------------------------------------------------

    def _decode(self) -> None:
        tokens = torch.tensor([r.tokens[-1] for r in self.running], device=self.runner.device)
        logits = self.runner.decode(tokens, [r.cached_len for r in self.running])
        # Each row samples with its own settings and generator, so its tokens never depend on
        # which other requests share the batch.
        sampled = [r.sampler(logits[i : i + 1]) for i, r in enumerate(self.running)]
        next_tokens = torch.cat(sampled).tolist()
        finished = [i for i, (r, t) in enumerate(zip(self.running, next_tokens)) if self._accept(r, t)]
        done = [self.running[i] for i in finished]
        # Out of the batch before they are answered, so that a caller holding its answer never sees
        # its row still busy. Should a move fail, they are complete: the step's recovery
        # (_fail_in_flight) answers them with their result.
        self._retire(finished)
        for request in done:
            self._finish(request)

    def _accept(self, request: Request, token: int) -> bool:
        """Record and send a new token; True when the request is complete."""
        self._record(request, token)
        request.emit(token)
        return self._complete(request)

    @staticmethod
    def _record(request: Request, token: int) -> None:
        request.tokens.append(token)
        request.timings.token_times.append(time.perf_counter() - request.timings.started)

    def _complete(self, request: Request) -> bool:
        """Whether the request's answer is whole: it ends with EOS or has max_new_tokens tokens."""
        tokens = request.tokens
        return bool(tokens) and (tokens[-1] == self.eos_id or len(tokens) >= request.max_new_tokens)

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
        request.enter(Stage.FINISHED)
        self.in_flight.pop(request, None)
        if error is None:
            t = request.timings
            log.info(
                "request %d finished: %d tokens, first after %.2f s, %.1f tokens/s",
                request.id, len(request.tokens), t.first_token_s, t.decode_tokens_per_s,
            )  # fmt: skip
        request.emit(error)
