"""Byte-level BPE tokenizer of a DeepSeek-VL2 snapshot, with the VL2 special tokens resolved by name.

Encoding and full decoding are delegated to the `tokenizers` library (the same backend Hugging Face's
fast tokenizer uses, so ids and texts match the official code). Streaming decoding needs the raw bytes
of each token, which the backend does not expose; `Tokenizer.token_bytes` rebuilds them from the
byte-level alphabet so that streamed chunks concatenate to exactly what `decode` returns.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"
REF_START_TOKEN = "<|ref|>"
REF_END_TOKEN = "<|/ref|>"
DET_START_TOKEN = "<|det|>"
DET_END_TOKEN = "<|/det|>"
GROUNDING_TOKEN = "<|grounding|>"
USER_TOKEN = "<|User|>"
ASSISTANT_TOKEN = "<|Assistant|>"


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Map each character of the byte-level alphabet back to the byte it stands for.

    Byte-level BPE spells every byte as a printable character: bytes that already print as themselves
    (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) keep their code point, the remaining ones are given the
    code points 256, 257, ... in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    char_to_byte = {chr(b): b for b in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in printable:
            char_to_byte[chr(next_code_point)] = byte
            next_code_point += 1
    return char_to_byte


def _config_token_string(value: Any, default: str) -> str:
    """`tokenizer_config.json` writes special tokens either as plain strings or as AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return default


class Tokenizer:
    """A snapshot's tokenizer plus the ids of every token the VL2 prompt format relies on."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        source: str = "tokenizer",
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        required = {
            "bos": bos_token,
            "eos": eos_token,
            "pad": pad_token,
            "image": IMAGE_TOKEN,
            "ref_start": REF_START_TOKEN,
            "ref_end": REF_END_TOKEN,
            "det_start": DET_START_TOKEN,
            "det_end": DET_END_TOKEN,
            "grounding": GROUNDING_TOKEN,
            "user": USER_TOKEN,
            "assistant": ASSISTANT_TOKEN,
        }
        ids = {name: backend.token_to_id(token) for name, token in required.items()}
        missing = [required[name] for name, token_id in ids.items() if token_id is None]
        if missing:
            raise ValueError(f"{source} lacks required DeepSeek-VL2 token(s): {', '.join(missing)}")
        self.bos_id: int = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]
        self.image_id: int = ids["image"]
        self.ref_start_id: int = ids["ref_start"]
        self.ref_end_id: int = ids["ref_end"]
        self.det_start_id: int = ids["det_start"]
        self.det_end_id: int = ids["det_end"]
        self.grounding_id: int = ids["grounding"]
        self.user_id: int = ids["user"]
        self.assistant_id: int = ids["assistant"]
        # BOS/EOS/PAD frame sequences rather than carry content: the default decode drops only these,
        # so grounding tags and chat markers stay visible to callers that parse them.
        self.sequence_control_ids: frozenset[int] = frozenset({self.bos_id, self.eos_id, self.pad_id})
        self.special_ids: frozenset[int] = frozenset(
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        )
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._is_byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) of a snapshot dir."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(
            tokenizers.Tokenizer.from_file(str(tokenizer_file)),
            bos_token=_config_token_string(config.get("bos_token"), BOS_TOKEN),
            eos_token=_config_token_string(config.get("eos_token"), EOS_TOKEN),
            pad_token=_config_token_string(config.get("pad_token"), PAD_TOKEN),
            source=str(tokenizer_file),
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no BOS/EOS added; special-token strings in it map to their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(
        self, ids: Iterable[int], skip_special_tokens: bool = False, keep_bos_eos_pad: bool = False
    ) -> str:
        """Text of `ids`, invalid UTF-8 replaced by U+FFFD.

        By default BOS/EOS/PAD are dropped and every other special token is kept (grounding output
        needs its tags). `skip_special_tokens=True` drops all special tokens; `keep_bos_eos_pad=True`
        keeps everything, i.e. Hugging Face's `decode(ids, skip_special_tokens=False)`.
        """
        ids = [int(token_id) for token_id in ids]
        if skip_special_tokens:
            return self.backend.decode(ids, skip_special_tokens=True)
        if not keep_bos_eos_pad:
            ids = [token_id for token_id in ids if token_id not in self.sequence_control_ids]
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token contributes to decoded text (empty for ids outside the vocabulary).

        Mirrors the byte-level decoder: a token spelled entirely in the byte alphabet stands for those
        bytes; any other token (e.g. `<｜end▁of▁sentence｜>`) stands for its own UTF-8 encoding.
        """
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if not self._is_byte_level:
            raise ValueError("token_bytes needs a byte-level BPE tokenizer (ByteLevel decoder)")
        token = self.backend.id_to_token(token_id)
        if token is None:
            spelled = b""
        else:
            alphabet = _byte_level_alphabet()
            if all(char in alphabet for char in token):
                spelled = bytes(alphabet[char] for char in token)
            else:
                spelled = token.encode("utf-8")
        self._bytes_cache[token_id] = spelled
        return spelled


class StreamDecoder:
    """Turn generated token ids into text incrementally without ever splitting a UTF-8 character.

    The concatenation of everything `push` and `flush` return equals `tokenizer.decode(all_ids, ...)`
    with the same options: a byte sequence that may still be completed by later tokens is held back,
    bytes that can never form a valid character become U+FFFD right away.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = False, keep_bos_eos_pad: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        if skip_special_tokens:
            self._dropped_ids = tokenizer.special_ids
        elif keep_bos_eos_pad:
            self._dropped_ids = frozenset()
        else:
            self._dropped_ids = tokenizer.sequence_control_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly empty)."""
        token_id = int(token_id)
        if token_id in self._dropped_ids:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return held-back bytes (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
