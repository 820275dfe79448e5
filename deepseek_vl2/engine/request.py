"""One generation request as the scheduler tracks it: inputs, its stage and that stage's data,
sampling state, cache row, and the channels its tokens and progress go out through.

A request moves through the stages in one direction only:

    QUEUED -> ENCODING -> PREFILLING -> DECODING -> FINISHED

(and to FINISHED from any stage, when it is cancelled or fails). The data a stage works on belongs
to that stage (`Encoding`, `Prefill`) and exists only while the request is in it, so a step can
never read what an earlier stage left behind: `Request.enter` checks every transition.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..inputs.processor import ProcessorOutput
from .prefix_cache import PromptKeys
from .sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

# What the scheduler reports to whoever waits on a request, in order: each new token id, then
# None when it has finished, or the exception that failed it.
Event = int | BaseException | None
# Progress of the work before the first token, called on the engine thread after each vision
# batch ("vision", tiles encoded, tiles to encode) and each prefill chunk ("prefill", prompt
# positions in the cache, prompt length).
Progress = Callable[[str, int, int], None]


class Stage(enum.Enum):
    QUEUED = "queued"  # waiting for a cache row
    ENCODING = "encoding"  # has a row; the vision tower runs over the images nobody cached
    PREFILLING = "prefilling"  # the prompt goes into its row, chunk by chunk
    DECODING = "decoding"  # in the batch: one token per step
    FINISHED = "finished"  # answered, cancelled or failed; its last event is sent


@dataclass
class Encoding:
    """ENCODING: the images the vision tower must encode and their tiles, the features of the
    tiles encoded so far, and every image span already at hand (from the prefix cache)."""

    images: list[int]  # image indices, in prompt order
    tiles: torch.Tensor  # their tiles, concatenated (a shared image's global view only)
    spans: dict[int, torch.Tensor]  # by image index
    features: list[torch.Tensor] = field(default_factory=list)  # one tensor per vision batch
    # Images with a 1x1 grid whose local tile is their global view (tiling.py renders it so, and
    # the official model encodes both): encoded once, the features standing for both tiles.
    shared: frozenset[int] = frozenset()

    @property
    def encoded(self) -> int:
        return sum(f.shape[0] for f in self.features)

    @property
    def done(self) -> bool:
        return self.encoded == self.tiles.shape[0]


@dataclass
class Prefill:
    """PREFILLING: the embeddings of the prompt's positions `start`.. (those the prefix cache did
    not provide); `Request.prefilled` says how far they are in the cache row."""

    embeds: torch.Tensor  # [prompt_len - start, D]
    start: int


# The stages each stage may move to, and the data a stage holds (none when not listed).
_NEXT = {
    Stage.QUEUED: {Stage.ENCODING, Stage.FINISHED},
    Stage.ENCODING: {Stage.PREFILLING, Stage.FINISHED},
    Stage.PREFILLING: {Stage.DECODING, Stage.FINISHED},
    Stage.DECODING: {Stage.FINISHED},
    Stage.FINISHED: set(),
}
_DATA = {Stage.ENCODING: Encoding, Stage.PREFILLING: Prefill}
# The stages of a request that has been taken out of the queue (it holds a cache row) and has not
# had its last event: the scheduler's `in_flight`, which a failing step must answer.
IN_FLIGHT = frozenset({Stage.ENCODING, Stage.PREFILLING, Stage.DECODING})


@dataclass
class Timings:
    started: float = field(default_factory=time.perf_counter)  # when the request was made
    preprocess_s: float = 0.0
    queue_s: float = 0.0  # waiting for a cache row
    vision_s: float = 0.0
    prefill_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds since `started`, per token

    @property
    def first_token_s(self) -> float:
        return self.token_times[0] if self.token_times else 0.0

    @property
    def decode_tokens(self) -> int:
        return max(len(self.token_times) - 1, 0)

    @property
    def decode_s(self) -> float:
        return self.token_times[-1] - self.token_times[0] if self.decode_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    inputs: ProcessorOutput
    params: SamplingParams
    max_new_tokens: int  # after the context guard
    max_new_tokens_clipped: bool  # lowered by the context guard?
    notify: Callable[[Event], None]
    timings: Timings
    on_progress: Progress | None = None
    id: int = field(default_factory=lambda: next(_ids))
    stage: Stage = Stage.QUEUED
    # The current stage's data: an Encoding while ENCODING, a Prefill while PREFILLING, else None.
    work: Encoding | Prefill | None = None
    row: int = -1  # its cache row from ENCODING to DECODING
    prefilled: int = 0  # prompt positions in its cache row
    tokens: list[int] = field(default_factory=list)
    sampler: Sampler | None = None  # from its first token on
    keys: PromptKeys | None = None  # for the prefix cache; None when it is off
    cached_prompt_tokens: int = 0  # prompt positions taken from the prefix cache
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def enter(self, stage: Stage, work: Encoding | Prefill | None = None) -> None:
        """Move to `stage` with its data; the previous stage's data goes."""
        if stage not in _NEXT[self.stage]:
            raise RuntimeError(f"request {self.id}: no way from {self.stage.name} to {stage.name}")
        expected = _DATA.get(stage, type(None))
        if not isinstance(work, expected):
            raise TypeError(
                f"request {self.id}: {stage.name} holds {expected.__name__}, got {type(work).__name__}"
            )
        self.stage, self.work = stage, work

    @property
    def encoding(self) -> Encoding:
        assert isinstance(self.work, Encoding) and self.stage is Stage.ENCODING, self.stage
        return self.work

    @property
    def prefill(self) -> Prefill:
        assert isinstance(self.work, Prefill) and self.stage is Stage.PREFILLING, self.stage
        return self.work

    @property
    def prompt_len(self) -> int:
        return self.inputs.input_ids.shape[1]

    @property
    def cached_len(self) -> int:
        """Cache positions written: the prompt, then every generated token but the last."""
        return self.prefilled + max(len(self.tokens) - 1, 0)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (safe from any thread)."""
        self._cancelled.set()

    def report(self, stage: str, done: int, total: int) -> None:
        """Tell the progress callback; one that fails is dropped, never the request."""
        if self.on_progress is None:
            return
        try:
            self.on_progress(stage, done, total)
        except Exception:
            log.warning("request %d: progress callback failed; no more reports", self.id, exc_info=True)
            self.on_progress = None

    def emit(self, event: Event) -> None:
        """Report to the waiter; a waiter that has gone away cancels the request."""
        try:
            self.notify(event)
        except Exception:  # e.g. the waiter's event loop is closed
            self.cancel()
