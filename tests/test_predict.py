"""predict.Predictor called in-process: wiring, validation, grounding output, official parity."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cog
import pytest
from parity import served_answer
from PIL import Image

import predict
from deepseek_vl2 import IMAGE_DETAILS
from deepseek_vl2.engine.request import Timings
from deepseek_vl2.inputs.grounding import PALETTE, to_pixel_box
from deepseek_vl2.inputs.images import ALLOW_LOCAL_FILES_ENV

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
IMAGES = FIXTURES / "images"
PROJECT_ROOT = TESTS.parent

# Robust official greedy runs (no near-tie step, tests/fixtures/README.md §6.4) that a single
# user turn can express: the Predictor must reproduce their text exactly.
PARITY_CASES = ["tiny-mla/m_one", "tiny-mla/m_two", "tiny-mha/m_two", "tiny-mla-noaux/m_three"]

_predictors: dict[Path, predict.Predictor] = {}


def make_predictor(weights: Path, monkeypatch: pytest.MonkeyPatch) -> predict.Predictor:
    """A set-up Predictor for `weights`, loaded once per checkpoint for the whole session."""
    if weights not in _predictors:
        monkeypatch.setenv("DEEPSEEK_VL2_WEIGHTS", str(weights))
        predictor = predict.Predictor()
        predictor.setup()
        _predictors[weights] = predictor
    return _predictors[weights]


@pytest.fixture
def local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOW_LOCAL_FILES_ENV, "1")


@dataclass
class FakeResult:
    text: str
    prompt_tokens: int = 100
    max_new_tokens: int = 16
    max_new_tokens_clipped: bool = False
    token_ids: list[int] = field(default_factory=lambda: [5, 6, 7])
    timings: Timings = field(default_factory=lambda: Timings(token_times=[0.5, 0.75, 1.0]))
    cached_prompt_tokens: int = 0


class RecordingEngine:
    """Stands in for the engine to observe exactly what the Predictor passes to it."""

    def __init__(self, answer: str = "An answer.", clipped: bool = False) -> None:
        self.result = FakeResult(answer, max_new_tokens_clipped=clipped)
        self.calls: list[tuple[list[dict[str, Any]], list[Image.Image], dict[str, Any]]] = []

    async def generate_async(self, messages: Any, images: Any, **options: Any) -> FakeResult:
        self.calls.append((messages, list(images), options))
        return self.result


def bare_predictor(engine: RecordingEngine) -> predict.Predictor:
    predictor = predict.Predictor()
    predictor.engine = engine
    return predictor


def call_predict(predictor: predict.Predictor, **inputs: Any) -> Any:
    """predict() is a coroutine (the server runs it on its event loop)."""
    return asyncio.run(predictor.predict(**inputs))


def official_case(key: str) -> dict[str, Any]:
    cases = json.loads((FIXTURES / "model_cases.json").read_text(encoding="utf-8"))["cases"]
    return next(case for case in cases if case["key"] == key)


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.1])
@pytest.mark.parametrize("key", PARITY_CASES)
def test_greedy_text_matches_the_official_implementation(
    key: str, repetition_penalty: float, local_files: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = official_case(key)
    [user, _assistant] = case["messages"]
    [run] = [g for g in case["generation"] if g["repetition_penalty"] == repetition_penalty]
    assert not run["fragile"]
    image_inputs = {
        f"image{number}": cog.Path(IMAGES / name) for number, name in enumerate(user["images"], 1)
    }

    predictor = make_predictor(FIXTURES / "checkpoints" / case["checkpoint"], monkeypatch)
    output = call_predict(
        predictor,
        text=user["content"],
        **image_inputs,
        max_new_tokens=run["n_new"],
        temperature=0,
        repetition_penalty=repetition_penalty,
    )

    assert output.text_out == served_answer(run)
    assert output.img_out is None


def test_unpassed_inputs_get_their_declared_defaults(local_files: None) -> None:
    engine = RecordingEngine()
    call_predict(bare_predictor(engine), image1=cog.Path(IMAGES / "tiny_20x10.png"))
    [(messages, images, options)] = engine.calls
    assert messages == [{"role": "user", "content": "<image>\nDescribe this image."}]
    assert [image.size for image in images] == [(20, 10)]
    seed = options.pop("seed")
    assert isinstance(seed, int), "a random seed is chosen (and logged) when none is given"
    assert options == {
        "max_new_tokens": 2048,
        "temperature": 0.1,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.1,
        "image_detail": "auto",
    }


def test_numbers_are_converted_and_images_passed_in_order(local_files: None) -> None:
    engine = RecordingEngine()
    call_predict(
        bare_predictor(engine),
        text="<image> vs <image>: which is larger?",
        image1=cog.Path(IMAGES / "gray_300x500.png"),
        image2=None,
        image3=cog.Path(IMAGES / "exif_rot.jpg"),
        temperature=1,  # an int for a float input, as HTTP clients may send it
        top_p=1,
        max_new_tokens=7.0,
        seed=3,
    )
    [(messages, images, options)] = engine.calls
    assert messages[0]["content"] == "<image> vs <image>: which is larger?"
    assert [image.size for image in images] == [(300, 500), (200, 400)]  # exif_rot is turned
    assert type(options["temperature"]) is float and options["temperature"] == 1.0
    assert type(options["top_p"]) is float
    assert type(options["max_new_tokens"]) is int and options["max_new_tokens"] == 7
    assert options["seed"] == 3


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"repetition_penalty": 0}, "repetition_penalty must be greater than 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be"),
        ({"temperature": -0.5}, "temperature must be at least 0"),
        ({"top_p": 1.5}, "top_p must be at most 1"),
        ({"max_new_tokens": 4097}, "max_new_tokens must be at most 4096"),
        ({"top_k": -1}, "top_k must be at least 0"),
        ({"image1": None}, "image1 is required"),
        ({"image_detail": "high"}, "image_detail must be one of auto, low; got 'high'"),
    ],
)
def test_invalid_inputs_are_refused_before_generation(inputs: dict[str, Any], message: str) -> None:
    engine = RecordingEngine()
    arguments = {"image1": cog.Path(IMAGES / "tiny_20x10.png"), **inputs}
    with pytest.raises(ValueError, match=message):
        call_predict(bare_predictor(engine), **arguments)
    assert engine.calls == []


def test_local_paths_are_refused_without_the_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_LOCAL_FILES_ENV, raising=False)
    # Only files in the temporary directory (Cog's downloads) are accepted; make sure the
    # repository's fixtures lie outside it even when the checkout itself is under /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ValueError, match="image1 must be given as an http"):
        call_predict(bare_predictor(RecordingEngine()), image1=cog.Path(IMAGES / "tiny_20x10.png"))


def test_bad_second_image_is_named(tmp_path: Path, local_files: None) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="^image2 could not be read as an image"):
        call_predict(
        bare_predictor(RecordingEngine()),
            image1=cog.Path(IMAGES / "tiny_20x10.png"), image2=cog.Path(broken)
        )


def test_grounding_boxes_are_drawn_on_the_last_image(local_files: None) -> None:
    answer = "<|ref|>the logo<|/ref|><|det|>[[100, 200, 700, 800]]<|/det|>"
    output = call_predict(
        bare_predictor(RecordingEngine(answer)),
        image1=cog.Path(IMAGES / "tiny_20x10.png"), image2=cog.Path(IMAGES / "gray_300x500.png")
    )
    assert output.text_out == answer
    assert output.img_out is not None and output.img_out.suffix == ".png"
    drawn = Image.open(output.img_out)
    assert drawn.format == "PNG"
    assert drawn.size == (300, 500)  # image2, the last one
    x1, y1, x2, _ = to_pixel_box((100, 200, 700, 800), 300, 500)
    assert drawn.convert("RGB").getpixel(((x1 + x2) // 2, y1)) == PALETTE[0]


def test_clipping_is_logged(caplog: pytest.LogCaptureFixture, local_files: None) -> None:
    engine = RecordingEngine(clipped=True)
    with caplog.at_level(logging.WARNING, logger="deepseek_vl2.predict"):
        call_predict(
        bare_predictor(engine),
            image1=cog.Path(IMAGES / "tiny_20x10.png"), max_new_tokens=4096
        )
    assert "max_new_tokens=4096 does not fit the context after the 100-token prompt" in caplog.text


def test_context_overflow_is_a_clear_error(
    local_files: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = make_predictor(FIXTURES / "checkpoints" / "tiny-mla", monkeypatch)
    with pytest.raises(ValueError, match="context"):
        call_predict(
            predictor,
            text="hello " * 4096,
            image1=cog.Path(IMAGES / "tiny_20x10.png"),
            max_new_tokens=1,
            temperature=0,
        )


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "weights"
    subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "make_demo_checkpoint.py"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_demo_checkpoint_serves_and_warns_that_answers_are_noise(
    demo_checkpoint: Path,
    local_files: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="deepseek_vl2.predict"):
        predictor = make_predictor(demo_checkpoint, monkeypatch)
    assert "DEMO checkpoint: answers are noise" in caplog.text
    output = call_predict(
        predictor,
        text="Describe each stage of this image in detail",
        image1=cog.Path(PROJECT_ROOT / "examples" / "vqa_1.jpg"),
        max_new_tokens=8,
        seed=0,
    )
    assert isinstance(output.text_out, str) and output.text_out
    repeated = call_predict(
        predictor,
        text="Describe each stage of this image in detail",
        image1=cog.Path(PROJECT_ROOT / "examples" / "vqa_1.jpg"),
        max_new_tokens=8,
        seed=0,
    )
    assert repeated.text_out == output.text_out, "a fixed seed makes sampling reproducible"


def test_setup_without_weights_fails_with_directions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSEEK_VL2_WEIGHTS", raising=False)
    monkeypatch.setenv("DEEPSEEK_VL2_VARIANT", "deepseek-vl2-tiny-missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="No DeepSeek-VL2 weights found") as error:
        predict.Predictor().setup()
    assert "weights/deepseek-vl2-tiny-missing" in str(error.value)


def test_metrics_follow_replicates_language_model_convention() -> None:
    result = FakeResult("An answer.", prompt_tokens=321, token_ids=[5, 6, 7, 8, 9], cached_prompt_tokens=300)
    result.timings = Timings(token_times=[1.25, 1.5, 1.75, 2.0, 2.25])
    assert predict.prediction_metrics(result) == {
        "input_token_count": 321,
        "output_token_count": 5,
        "time_to_first_token": 1.25,
        "tokens_per_second": 4.0,  # four tokens after the first, in one second
        "cached_prompt_tokens": 300,
    }


def test_image_detail_choices_are_the_engines() -> None:
    assert predict._INPUT_FIELDS["image_detail"].choices == list(IMAGE_DETAILS)
    assert predict._INPUT_FIELDS["image_detail"].default == "auto"


def test_low_image_detail_reports_its_smaller_prompt_in_the_metrics(
    local_files: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = make_predictor(FIXTURES / "checkpoints" / "tiny-mla", monkeypatch)
    counts = {}
    for detail in ("auto", "low"):
        metrics: dict[str, Any] = {}
        monkeypatch.setattr(predictor, "record_metric", lambda name, value: metrics.__setitem__(name, value))
        call_predict(
            predictor,
            text="Describe each stage of this image in detail",
            image1=cog.Path(IMAGES / "vqa_1.jpg"),
            max_new_tokens=2,
            temperature=0,
            image_detail=detail,
        )
        counts[detail] = metrics["input_token_count"]
    # The seed image takes 1807 tokens at auto detail (4x2 tiles, as in the official p_seed case of
    # tests/fixtures/processor_cases.json) and 421 at low detail; the text around it is the same.
    assert counts["auto"] - counts["low"] == 1807 - 421
