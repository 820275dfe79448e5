"""One generation request as the scheduler tracks it: inputs, sampling state, cache row, progress,
and the channel its tokens go out through."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .prefix_cache import PromptKeys
from .processor import ProcessorOutput
from .sampling import Sampler, SamplingParams

# What the scheduler reports to whoever waits on a request, in order: each new token id, then
# None when it has finished, or the exception that failed it.
Event = int | BaseException | None


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
    id: int = field(default_factory=lambda: next(_ids))
    row: int = -1  # its cache row once admitted (prefilling or decoding)
    tokens: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    keys: PromptKeys | None = None  # for the prefix cache; None when it is off
    cached_prompt_tokens: int = 0  # prompt positions taken from the prefix cache
    # Prefill progress: the images that need the vision tower and their tiles, the features of
    # the tiles encoded so far, every image span at hand (by image index), the prompt embeddings
    # once complete, and how many prompt positions are in the cache.
    encode: list[int] = field(default_factory=list)
    tiles: torch.Tensor | None = None
    features: list[torch.Tensor] = field(default_factory=list)
    spans: dict[int, torch.Tensor] = field(default_factory=dict)
    embeds: torch.Tensor | None = None
    prefilled: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event)

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

    def emit(self, event: Event) -> None:
        """Report to the waiter; a waiter that has gone away cancels the request."""
        try:
            self.notify(event)
        except Exception:  # e.g. the waiter's event loop is closed
            self.cancel()
