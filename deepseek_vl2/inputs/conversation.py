"""The DeepSeek-VL2 chat format: validating a conversation and laying it out as prompt pieces.

A conversation is a list of `{"role": ..., "content": ...}` messages. The layout (what the official
processor feeds the model) is: BOS; the system text if any; each user turn as
`"<|User|>: " + content.strip() + "\n\n<|Assistant|>:"` with every `<image>` tag standing for the next
image; each finished assistant turn as its stripped text followed by EOS. The prompt always ends
right after an `<|Assistant|>:` so the model writes the next answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from .tokenizer import ASSISTANT_TOKEN, IMAGE_TOKEN, USER_TOKEN

RoleName = Literal["system", "user", "assistant"]

_ROLE_ALIASES: dict[str, RoleName] = {
    "system": "system",
    "user": "user",
    USER_TOKEN: "user",
    "assistant": "assistant",
    ASSISTANT_TOKEN: "assistant",
}


class Slot(Enum):
    """A prompt position filled by the processor rather than by tokenizing text."""

    BOS = "bos"
    EOS = "eos"
    IMAGE = "image"


PromptPiece = str | Slot


@dataclass(frozen=True)
class Turn:
    role: RoleName
    content: str


def parse_conversation(messages: Sequence[Mapping[str, Any]]) -> list[Turn]:
    """Validate `messages` and return its turns, minus a trailing empty assistant message.

    That trailing message is the official "generation slot"; it adds nothing to the prompt because the
    prompt always ends with the last user turn's `<|Assistant|>:`.
    """
    if not messages:
        raise ValueError("conversation is empty: give at least one user message")
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a mapping with 'role' and 'content', got {message!r}")
        role = _ROLE_ALIASES.get(message["role"])
        if role is None:
            accepted = ", ".join(repr(name) for name in _ROLE_ALIASES)
            raise ValueError(f"message {index} has unknown role {message['role']!r} (accepted: {accepted})")
        content = message["content"]
        if not isinstance(content, str):
            raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")
        if role == "system" and index != 0:
            raise ValueError(f"a system message is only allowed first, found one at index {index}")
        if role != "user" and IMAGE_TOKEN in content:
            raise ValueError(
                f"message {index} ({role}) contains {IMAGE_TOKEN}: images belong in user messages"
            )
        turns.append(Turn(role, content))

    if turns[-1].role == "assistant" and not turns[-1].content.strip():
        turns.pop()
    if not turns or turns[-1].role != "user":
        raise ValueError(
            "conversation must end with a user message (optionally followed by an empty assistant message)"
        )
    return turns


def count_image_tags(turns: Sequence[Turn]) -> int:
    return sum(turn.content.count(IMAGE_TOKEN) for turn in turns)


def prompt_pieces(turns: Sequence[Turn]) -> list[PromptPiece]:
    """Lay the conversation out as text pieces (each tokenized on its own) and slots.

    Text is split at every `<image>` so that BPE never merges across an image, matching the reference.
    """
    pieces: list[PromptPiece] = [Slot.BOS]
    for turn in turns:
        text = turn.content.strip()
        if turn.role == "system":
            pieces.append(text)
        elif turn.role == "user":
            user_text = f"{USER_TOKEN}: {text}\n\n{ASSISTANT_TOKEN}:"
            for position, fragment in enumerate(user_text.split(IMAGE_TOKEN)):
                if position > 0:
                    pieces.append(Slot.IMAGE)
                pieces.append(fragment)
        else:
            pieces.extend([text, Slot.EOS])
    return [piece for piece in pieces if piece != ""]


def build_messages(text: str, n_images: int) -> list[dict[str, str]]:
    """Single user turn for `text` and `n_images` images, reconciling the `<image>` tag count.

    Same rule as the Replicate model and the official web demo: missing tags are prepended one per
    line; surplus tags are removed starting from the first occurrence.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    tags = text.count(IMAGE_TOKEN)
    if tags < n_images:
        text = f"{IMAGE_TOKEN}\n" * (n_images - tags) + text
    elif tags > n_images:
        text = text.replace(IMAGE_TOKEN, "", tags - n_images)
    return [{"role": "user", "content": text}]
