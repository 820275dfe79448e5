"""python -m deepseek_vl2: streaming an answer to the terminal, saving grounding boxes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import deepseek_vl2.serving.cli as cli
from deepseek_vl2.inputs.grounding import PALETTE

TESTS = Path(__file__).parent.parent
FIXTURES = TESTS / "fixtures"
IMAGES = FIXTURES / "images"
CHECKPOINT = FIXTURES / "checkpoints" / "tiny-mla"


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepseek_vl2", *arguments],
        cwd=TESTS.parent,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        capture_output=True,
        text=True,
        encoding="utf-8",
    )


def test_streams_the_official_greedy_answer() -> None:
    case = next(
        c
        for c in json.loads((FIXTURES / "model_cases.json").read_text(encoding="utf-8"))["cases"]
        if c["key"] == "tiny-mla/m_one"
    )
    [run] = [g for g in case["generation"] if g["repetition_penalty"] == 1.1]
    result = run_cli(
        "--weights", str(CHECKPOINT),
        "--image", str(IMAGES / "vqa_1.jpg"),
        "--max-new-tokens", "24",
        "--temperature", "0",
        "--repetition-penalty", "1.1",
        "Describe each stage of this image in detail",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == run["text_with_special"] + "\n"
    assert "model ready" in result.stderr  # logs go to stderr, never into the answer
    # progress bars through the image tiles and the prompt before the first token, on stderr
    tiles = sum(1 + columns * rows for columns, rows in case["images_spatial_crop"])
    tokens = len(case["input_ids"])
    assert re.search(rf"vision: +100%\|.*\| {tiles}/{tiles} ", result.stderr), result.stderr
    assert re.search(rf"prefill: +100%\|.*\| {tokens}/{tokens} ", result.stderr), result.stderr


def test_unreadable_image_is_reported_without_a_traceback(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    result = run_cli("--weights", str(CHECKPOINT), "--image", str(broken), "What is this?")
    assert result.returncode == 2
    assert "could not be read as an image" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_directory_is_checked(tmp_path: Path) -> None:
    result = run_cli("--weights", str(tmp_path), "--image", str(IMAGES / "logo.png"), "Hi")
    assert result.returncode == 2
    assert "is not a checkpoint directory" in result.stderr


def test_save_boxes_needs_a_png_name(tmp_path: Path) -> None:
    result = run_cli(
        "--image", str(IMAGES / "logo.png"), "--save-boxes", str(tmp_path / "out.jpg"), "Hi"
    )
    assert result.returncode == 2
    assert "give it a .png name" in result.stderr


class GroundingEngine:
    """Stands in for Engine: streams a fixed grounding answer in pieces."""

    answer = "Here: <|ref|>logo<|/ref|><|det|>[[0, 0, 500, 500]]<|/det|>"

    @classmethod
    def from_pretrained(cls, path: str, **options: Any) -> GroundingEngine:
        return cls()

    def stream(self, messages: Any, images: Any, **options: Any) -> Iterator[str]:
        yield from (self.answer[:10], self.answer[10:30], self.answer[30:])


def test_save_boxes_draws_on_the_last_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "Engine", GroundingEngine)
    out = tmp_path / "boxes.png"
    code = cli.main(
        [
            "--weights", str(CHECKPOINT),
            "--image", str(IMAGES / "tiny_20x10.png"),
            "--image", str(IMAGES / "gray_300x500.png"),
            "--save-boxes", str(out),
            "Where is the logo?",
        ]
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out == GroundingEngine.answer + "\n"
    drawn = Image.open(out)
    assert drawn.format == "PNG" and drawn.size == (300, 500)
    assert drawn.convert("RGB").getpixel((0, 100)) == PALETTE[0]


def test_save_boxes_without_boxes_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "boxes.png"
    result = run_cli(
        "--weights", str(CHECKPOINT),
        "--image", str(IMAGES / "tiny_20x10.png"),
        "--max-new-tokens", "3",
        "--save-boxes", str(out),
        "Hello",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "holds no grounding boxes" in result.stderr
    assert not out.exists()


class RecordingEngine(GroundingEngine):
    """Records the options each answer was asked with."""

    options: list[dict[str, Any]] = []

    def stream(self, messages: Any, images: Any, **options: Any) -> Iterator[str]:
        self.options.append(options)
        yield "An answer."


@pytest.mark.parametrize(("arguments", "detail"), [((), "auto"), (("--image-detail", "low"), "low")])
def test_image_detail_reaches_the_engine(
    arguments: tuple[str, ...], detail: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "Engine", RecordingEngine)
    monkeypatch.setattr(RecordingEngine, "options", [])
    code = cli.main(["--weights", str(CHECKPOINT), "--image", str(IMAGES / "tiny_20x10.png"), *arguments, "Hi"])
    assert code == 0 and capsys.readouterr().out == "An answer.\n"
    assert [options["image_detail"] for options in RecordingEngine.options] == [detail]


def test_an_unknown_image_detail_is_refused() -> None:
    result = run_cli("--image", str(IMAGES / "logo.png"), "--image-detail", "high", "Hi")
    assert result.returncode == 2
    assert "--image-detail: invalid choice: 'high'" in result.stderr and "'auto', 'low'" in result.stderr
