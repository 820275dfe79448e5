"""Admission: a caller's messages and images made into a Request, in the caller's thread, before
anything is queued. The processor tokenizes and tiles; a prompt that cannot fit the context fails
here with a message that says what takes the room; an answer that would overflow it is clipped."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from ..inputs.processor import Processor, ProcessorOutput
from .prefix_cache import PromptKeys
from .request import Event, Progress, Request, Timings
from .sampling import SamplingParams

log = logging.getLogger(__name__)


class ContextOverflowError(ValueError):
    """The prompt alone does not fit the model's context."""


def admit(
    processor: Processor,
    context_length: int,
    messages: Sequence[dict[str, Any]],
    images: Sequence[Image.Image],
    max_new_tokens: int,
    params: SamplingParams,
    notify: Callable[[Event], None],
    progress: Progress | None = None,
    cache_identity: str | None = None,
    image_detail: str = "auto",
) -> Request:
    """The request for this conversation, ready to queue. `cache_identity` (the weights and how
    they compute) keys its prompt for the prefix cache; None when there is no prefix cache.
    `image_detail` goes to the processor; the keys hash its output (grids, tiles, token ids), so
    prompts whose detail changed what the model sees never share cache entries."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    timings = Timings()
    inputs = processor(messages, list(images), image_detail)
    timings.preprocess_s = time.perf_counter() - timings.started
    check_fits(inputs, context_length)
    allowed = clip(inputs, max_new_tokens, context_length)
    request = Request(inputs, params, allowed, allowed < max_new_tokens, notify, timings, progress)
    if cache_identity is not None:
        request.keys = PromptKeys.of(inputs, cache_identity)
    return request


def check_fits(inputs: ProcessorOutput, context_length: int) -> None:
    """Raise ContextOverflowError, with what each image and the text take, when the prompt leaves
    no room for a single answer token."""
    prompt = inputs.input_ids.shape[1]
    if prompt < context_length:
        return
    crops = inputs.images_spatial_crop[0].tolist()
    uses = [
        f"image {i + 1} ({nw}x{nh} tiles): {n} tokens"
        for i, ((nw, nh), n) in enumerate(zip(crops, inputs.image_token_counts))
    ]
    uses.append(f"text: {prompt - sum(inputs.image_token_counts)} tokens")
    raise ContextOverflowError(
        f"the prompt is {prompt} tokens but the model's context holds {context_length} "
        f"(prompt and answer together); {'; '.join(uses)}. Use fewer or smaller images, "
        f"image_detail low (one tile per image, as with more than two images) or a shorter text."
    )


def clip(inputs: ProcessorOutput, max_new_tokens: int, context_length: int) -> int:
    """`max_new_tokens`, or the room the prompt leaves in the context if that is less (logged)."""
    room = context_length - inputs.input_ids.shape[1]
    if max_new_tokens > room:
        log.warning(
            "max_new_tokens %d clipped to %d: the prompt uses %d of %d context tokens",
            max_new_tokens, room, inputs.input_ids.shape[1], context_length,
        )  # fmt: skip
        return room
    return max_new_tokens
