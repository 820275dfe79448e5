"""Conversation validation, prompt layout and the seed-compatible `<image>` tag reconciliation."""

from __future__ import annotations

import json

import pytest
from parity import FIXTURES, model_cases

from deepseek_vl2.inputs.conversation import (
    Slot, Turn, build_messages, count_image_tags, parse_conversation, prompt_pieces,
)  # fmt: skip


def _fixture_cases() -> list[dict]:
    with open(FIXTURES / "processor_cases.json", encoding="utf-8") as f:
        return [*json.load(f)["cases"], *model_cases()]


@pytest.mark.parametrize("case", _fixture_cases(), ids=lambda case: case.get("key", case["name"]))
def test_build_messages_reproduces_fixture_contents(case):
    # The fixtures' rule for user messages without tags (one "<image>\n" per image in front) and
    # with tags (used as written) is the seed's rule restricted to those inputs.
    for message, content in zip(case["messages"], case["conversation_content"], strict=True):
        if message["role"] == "<|User|>":
            assert build_messages(message["content"], len(message["images"])) == [
                {"role": "user", "content": content}
            ]


def test_build_messages_prepends_missing_tags():
    assert build_messages("Compare.", 2)[0]["content"] == "<image>\n<image>\nCompare."
    assert build_messages("<image> left and right?", 2)[0]["content"] == "<image>\n<image> left and right?"
    assert build_messages("Hi", 0) == [{"role": "user", "content": "Hi"}]


def test_build_messages_drops_surplus_tags_from_the_left():
    assert build_messages("a<image>b<image>c<image>d", 1)[0]["content"] == "abc<image>d"
    assert build_messages("<image>\nDescribe.", 0)[0]["content"] == "\nDescribe."
    with pytest.raises(ValueError, match="n_images"):
        build_messages("x", -1)


def test_parse_accepts_both_role_spellings():
    plain = parse_conversation(
        [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"},
        ]
    )
    official = parse_conversation(
        [
            {"role": "<|User|>", "content": "Q"},
            {"role": "<|Assistant|>", "content": "A"},
            {"role": "<|User|>", "content": "Q2"},
            {"role": "<|Assistant|>", "content": ""},
        ]
    )
    assert plain == official == [Turn("user", "Q"), Turn("assistant", "A"), Turn("user", "Q2")]


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "empty"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([{"role": "user"}], "'role' and 'content'"),
        (["hello"], "'role' and 'content'"),
        ([{"role": "user", "content": None}], "must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed first"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}], "images belong"),
        ([{"role": "system", "content": "<image>"}, {"role": "user", "content": "a"}], "images belong"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "partial answer"}],
            "end with a user",
        ),
        ([{"role": "system", "content": "s"}], "end with a user"),
        ([{"role": "assistant", "content": ""}], "end with a user"),
    ],
)
def test_parse_rejects_bad_conversations(messages, message):
    with pytest.raises(ValueError, match=message):
        parse_conversation(messages)


def test_prompt_pieces_layout():
    turns = parse_conversation(
        [
            {"role": "system", "content": "  Be brief.  "},
            {"role": "user", "content": " <image>\nWhat is it? "},
            {"role": "assistant", "content": " A cat. "},
            {"role": "user", "content": "<image><image>And these?"},
            {"role": "assistant", "content": ""},
        ]
    )
    assert count_image_tags(turns) == 3
    assert prompt_pieces(turns) == [
        Slot.BOS,
        "Be brief.",
        "<|User|>: ",
        Slot.IMAGE,
        "\nWhat is it?\n\n<|Assistant|>:",
        "A cat.",
        Slot.EOS,
        "<|User|>: ",
        Slot.IMAGE,
        Slot.IMAGE,
        "And these?\n\n<|Assistant|>:",
    ]


def test_fixture_sft_format_agrees_with_layout():
    # sft_format is the reference's human-readable prompt; with the image slots spelled as tags and
    # the EOS spelled as text it contains our pieces in order (it adds a space after each
    # "<|Assistant|>:" that the token path does not have).
    for case in _fixture_cases():
        turns = parse_conversation(
            [
                {"role": m["role"], "content": c}
                for m, c in zip(case["messages"], case["conversation_content"], strict=True)
            ]
        )
        spelling = {Slot.BOS: "", Slot.EOS: "<｜end▁of▁sentence｜>", Slot.IMAGE: "<image>"}
        spelled = "".join(spelling.get(piece, piece) for piece in prompt_pieces(turns))
        assert spelled.replace("<|Assistant|>:", "<|Assistant|>: ").rstrip() == case["sft_format"]
