"""Special-token lookup, decoding modes and streaming decoding against the fixtures."""

from __future__ import annotations

import json
import random
import shutil
from functools import lru_cache

import pytest
from parity import CHECKPOINTS, FIXTURES, model_cases

from deepseek_vl2.inputs.tokenizer import EOS_TOKEN, StreamDecoder, Tokenizer

CHECKPOINT_NAMES = sorted({case["checkpoint"] for case in model_cases()})
GENERATIONS = [
    pytest.param(case["checkpoint"], run, id=f"{case['key']}-rp{run['repetition_penalty']}")
    for case in model_cases()
    for run in case["generation"]
]
ID_ATTRIBUTES = {
    "<｜begin▁of▁sentence｜>": "bos_id",
    "<｜end▁of▁sentence｜>": "eos_id",
    "<｜▁pad▁｜>": "pad_id",
    "<image>": "image_id",
    "<|ref|>": "ref_start_id",
    "<|/ref|>": "ref_end_id",
    "<|det|>": "det_start_id",
    "<|/det|>": "det_end_id",
    "<|grounding|>": "grounding_id",
    "<|User|>": "user_id",
    "<|Assistant|>": "assistant_id",
}


@lru_cache
def realistic() -> Tokenizer:
    return Tokenizer.from_pretrained(FIXTURES / "tokenizer")


@lru_cache
def tiny(name: str = "tiny-mha") -> Tokenizer:
    return Tokenizer.from_pretrained(CHECKPOINTS / name)


def _stream(tokenizer: Tokenizer, ids: list[int], **options: bool) -> list[str]:
    decoder = StreamDecoder(tokenizer, **options)
    return [decoder.push(token_id) for token_id in ids] + [decoder.flush()]


def test_realistic_special_ids_match_fixture():
    with open(FIXTURES / "processor_cases.json", encoding="utf-8") as f:
        expected = json.load(f)["token_ids"]
    assert {ID_ATTRIBUTES[token]: getattr(realistic(), ID_ATTRIBUTES[token]) for token in expected} == {
        ID_ATTRIBUTES[token]: token_id for token, token_id in expected.items()
    }


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_tiny_special_ids_match_fixture(name):
    with open(FIXTURES / "model_cases.json", encoding="utf-8") as f:
        expected = json.load(f)["token_ids"]
    for token, token_id in expected.items():
        assert getattr(tiny(name), ID_ATTRIBUTES[token]) == token_id, token


def test_missing_special_token_is_a_clear_error(tmp_path):
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHECKPOINTS / "tiny-mha" / file, tmp_path / file)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["content"] != "<|grounding|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match=r"<\|grounding\|>"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_adds_no_special_tokens_but_maps_tag_strings():
    tokenizer = realistic()
    ids = tokenizer.encode("<|User|>: <|ref|>cat<|/ref|>")
    assert ids[0] == tokenizer.user_id and tokenizer.ref_start_id in ids and ids[-1] == tokenizer.ref_end_id
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


@pytest.mark.parametrize(("checkpoint", "run"), GENERATIONS)
def test_decode_generations_match_reference(checkpoint, run):
    tokenizer = tiny(checkpoint)
    ids = run["new_token_ids"]
    assert tokenizer.decode(ids, keep_bos_eos_pad=True) == run["text_with_special"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == run["text_skip_special"]
    # The default keeps content specials but not BOS/EOS/PAD; the generations hold EOS at most last.
    sequence_control = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    expected_default = run["text_with_special"]
    for token in sequence_control:
        expected_default = expected_default.replace(token, "")
    assert tokenizer.decode(ids) == expected_default


@pytest.mark.parametrize(("checkpoint", "run"), GENERATIONS)
def test_stream_decoder_concatenates_to_full_decode(checkpoint, run):
    tokenizer = tiny(checkpoint)
    ids = run["new_token_ids"]
    assert "".join(_stream(tokenizer, ids, keep_bos_eos_pad=True)) == run["text_with_special"]
    assert "".join(_stream(tokenizer, ids, skip_special_tokens=True)) == run["text_skip_special"]
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_default_decode_keeps_grounding_tags():
    for tokenizer in (realistic(), tiny()):
        text = "<|ref|>The giraffe<|/ref|><|det|>[[580, 270, 999, 900]]<|/det|>"
        ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id, tokenizer.pad_id]
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == "The giraffe[[580, 270, 999, 900]]"
        assert tokenizer.decode(ids, keep_bos_eos_pad=True).endswith(text + EOS_TOKEN + tokenizer.pad_token)
        assert "".join(_stream(tokenizer, ids)) == text


@pytest.mark.parametrize("make_tokenizer", [realistic, tiny], ids=["realistic", "tiny"])
def test_stream_decoder_never_splits_a_character(make_tokenizer):
    tokenizer = make_tokenizer()
    text = "数字 🙂 and 🙂🙂 ünïcödé"
    ids = tokenizer.encode(text)
    chunks = _stream(tokenizer, ids)
    assert "".join(chunks) == text == tokenizer.decode(ids)
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_stream_decoder_holds_back_partial_characters():
    # The tiny vocabulary has no token for 🙂 (4 bytes), so its bytes arrive over several tokens.
    tokenizer = tiny()
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    decoder = StreamDecoder(tokenizer)
    assert [decoder.push(token_id) for token_id in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "🙂"
    # A stream cut inside the character: the held-back bytes become U+FFFD at the end, as in decode.
    decoder = StreamDecoder(tokenizer)
    assert "".join(decoder.push(token_id) for token_id in ids[:-1]) == ""
    assert decoder.flush() == tokenizer.decode(ids[:-1]) == "\ufffd"


def _single_byte_ids(tokenizer: Tokenizer) -> dict[int, int]:
    """byte value -> id of the tiny vocabulary's token for exactly that byte."""
    by_byte = {}
    for token_id in range(tokenizer.vocab_size):
        spelled = tokenizer.token_bytes(token_id)
        if len(spelled) == 1 and token_id not in tokenizer.special_ids:
            by_byte.setdefault(spelled[0], token_id)
    return by_byte


def test_stream_decoder_matches_lossy_decode_on_random_bytes():
    # Random byte soup exercises every kind of invalid UTF-8; the backend's lossy decode (one U+FFFD
    # per maximal invalid subpart) must equal the streamed concatenation, and invalid bytes must not
    # be held back longer than needed.
    tokenizer = tiny()
    by_byte = _single_byte_ids(tokenizer)
    assert len(by_byte) == 256
    generator = random.Random(0)
    for _ in range(200):
        data = bytes(generator.choice([generator.randrange(256), *"é🙂数".encode()]) for _ in range(24))
        ids = [by_byte[byte] for byte in data]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids) == data.decode("utf-8", "replace")
    decoder = StreamDecoder(tokenizer)
    assert decoder.push(by_byte[0xFF]) == "\ufffd"  # can never start a character: emitted at once


@pytest.mark.parametrize("make_tokenizer", [realistic, tiny], ids=["realistic", "tiny"])
def test_token_bytes_agree_with_backend_decode(make_tokenizer):
    tokenizer = make_tokenizer()
    ids = range(tokenizer.vocab_size)
    decoded = tokenizer.backend.decode_batch([[token_id] for token_id in ids], skip_special_tokens=False)
    mismatches = [
        token_id
        for token_id, text in zip(ids, decoded, strict=True)
        if tokenizer.token_bytes(token_id).decode("utf-8", "replace") != text
    ]
    assert mismatches == []
    assert tokenizer.token_bytes(tokenizer.vocab_size + 10) == b""
