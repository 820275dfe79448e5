"""The real Cog HTTP server (coglet) serving predict.py on a tiny parity checkpoint."""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from parity import case, served_answer
from PIL import Image

from deepseek_vl2 import Engine
from deepseek_vl2.serving.local_server import LocalCogServer

FIXTURES = Path(__file__).parent.parent / "fixtures"
IMAGES = FIXTURES / "images"
CHECKPOINT = FIXTURES / "checkpoints" / "tiny-mla"


def data_uri(path: Path, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


SMALL_IMAGE = data_uri(IMAGES / "tiny_20x10.png", "image/png")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCogServer]:
    environment = {
        "DEEPSEEK_VL2_WEIGHTS": str(CHECKPOINT),
        # Local paths stay refused, as in production: the opt-in is explicitly off.
        "DEEPSEEK_VL2_ALLOW_LOCAL_FILES": "0",
        # A temporary directory of its own for the downloaded inputs, so that the repository's
        # files are outside it even when the checkout itself lies under /tmp.
        "TMPDIR": str(tmp_path_factory.mktemp("server-tmp")),
        # Four rows in the engine; the launcher sets COG_MAX_CONCURRENCY to match.
        "DEEPSEEK_VL2_MAX_BATCH": "4",
    }
    with LocalCogServer(environment) as running:
        yield running


@pytest.fixture(autouse=True)
def server_stays_ready(server: LocalCogServer) -> Iterator[None]:
    yield
    assert server.settled_status() == "READY", server.log_text()


def test_health_check_is_ready(server: LocalCogServer) -> None:
    health = server.health()
    assert health["status"] == "READY"
    assert health["setup"]["status"] == "succeeded"


def test_greedy_prediction_matches_the_official_text(server: LocalCogServer) -> None:
    case = next(
        c
        for c in json.loads((FIXTURES / "model_cases.json").read_text(encoding="utf-8"))["cases"]
        if c["key"] == "tiny-mla/m_one"
    )
    [run] = [g for g in case["generation"] if g["repetition_penalty"] == 1.0]
    status, body = server.predict(
        {
            "image1": data_uri(IMAGES / "vqa_1.jpg"),
            "text": "Describe each stage of this image in detail",
            "max_new_tokens": 24,
            "temperature": 0,
            "repetition_penalty": 1,  # an int for a float input
        }
    )
    assert status == 200 and body["status"] == "succeeded", body
    assert body["output"] == {"img_out": None, "text_out": run["text_with_special"]}


def test_optional_inputs_can_be_omitted(server: LocalCogServer) -> None:
    status, body = server.predict({"image1": SMALL_IMAGE, "max_new_tokens": 2, "seed": 7})
    assert status == 200 and body["status"] == "succeeded", body
    assert isinstance(body["output"]["text_out"], str)


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        ({"text": "no image"}, "image1", "Field required"),
        ({"image1": SMALL_IMAGE, "temperature": "hot"}, "temperature", "is not of type"),
        ({"image1": SMALL_IMAGE, "temperature": -0.1}, "temperature", "less than the minimum"),
        ({"image1": SMALL_IMAGE, "top_p": 1.5}, "top_p", "greater than the maximum"),
        (
            {"image1": SMALL_IMAGE, "max_new_tokens": 4097},
            "max_new_tokens",
            "greater than the maximum",
        ),
        ({"image1": SMALL_IMAGE, "max_new_tokens": 2.5}, "max_new_tokens", "is not of type"),
        ({"image1": SMALL_IMAGE, "top_k": -1}, "top_k", "less than the minimum"),
        ({"image1": SMALL_IMAGE, "image_detail": "high"}, "image_detail", '"high" is not one of'),
    ],
)
def test_invalid_inputs_get_422(
    server: LocalCogServer, inputs: dict[str, Any], field: str, message: str
) -> None:
    status, body = server.predict(inputs)
    assert status == 422, body
    [detail] = body["detail"]
    assert detail["loc"][-1] == field
    assert message in detail["msg"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {
                "image1": SMALL_IMAGE,
                "image2": "data:image/png;base64," + base64.b64encode(b"junk").decode(),
            },
            "image2 could not be read as an image",
        ),
        ({"image1": str(IMAGES / "vqa_1.jpg")}, "local file paths on the server are refused"),
        ({"image1": "/etc/passwd"}, "local file paths on the server are refused"),
        (
            {"image1": SMALL_IMAGE, "repetition_penalty": 0},
            "repetition_penalty must be greater than 0",
        ),
    ],
    ids=["corrupt-image", "local-image-path", "local-file", "zero-penalty"],
)
def test_refused_requests_fail_with_a_clear_message(
    server: LocalCogServer, inputs: dict[str, Any], message: str
) -> None:
    status, body = server.predict(inputs)
    assert status == 200
    assert body["status"] == "failed"
    assert message in body["error"]
    assert body.get("output") is None


def test_openapi_document_is_served(server: LocalCogServer) -> None:
    with urllib.request.urlopen(f"{server.base_url}/openapi.json", timeout=5) as response:
        document = json.load(response)
    assert document["components"]["schemas"]["Input"]["required"] == ["image1"]


def parity_request(key: str, penalty: float) -> tuple[dict[str, Any], str, int]:
    """Inputs that reproduce an official greedy run; its served text and prompt length."""
    c = case(key)
    [user, _assistant] = c["messages"]
    [run] = [g for g in c["generation"] if g["repetition_penalty"] == penalty]
    inputs = {f"image{i}": data_uri(IMAGES / name) for i, name in enumerate(user["images"], 1)}
    inputs |= {
        "text": user["content"],
        "max_new_tokens": run["n_new"],
        "temperature": 0,
        "repetition_penalty": penalty,
    }
    return inputs, served_answer(run), c["seq_len"]


# Four different requests (one image or two, two penalties), each with its official answer.
FOUR = [parity_request(k, p) for k in ("tiny-mla/m_one", "tiny-mla/m_two") for p in (1.0, 1.1)]
# A request that would run for thousands of tokens unless cancelled.
ENDLESS = {"image1": SMALL_IMAGE, "text": "Count.", "max_new_tokens": 4000, "temperature": 0}


def predict_all(server: LocalCogServer, requests: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(server.predict, requests))


def test_four_simultaneous_predictions_succeed_with_their_metrics(server: LocalCogServer) -> None:
    results = predict_all(server, [inputs for inputs, _, _ in FOUR])
    for (inputs, answer, prompt_tokens), (status, body) in zip(FOUR, results):
        assert status == 200 and body["status"] == "succeeded", body
        assert body["output"]["text_out"] == answer
        metrics = body["metrics"]
        assert metrics["input_token_count"] == prompt_tokens
        assert metrics["output_token_count"] == inputs["max_new_tokens"]
        assert 0 < metrics["time_to_first_token"] < metrics["predict_time"]
        assert metrics["tokens_per_second"] > 0


def test_eight_at_once_succeed_correctly_or_get_409(server: LocalCogServer) -> None:
    requests = FOUR + FOUR
    results = predict_all(server, [inputs for inputs, _, _ in requests])
    succeeded = [
        (answer, body) for (_, answer, _), (status, body) in zip(requests, results) if status == 200
    ]
    assert len(succeeded) >= 4
    assert all(body["output"]["text_out"] == answer for answer, body in succeeded)
    assert sorted(status for status, _ in results if status != 200) == [409] * (8 - len(succeeded))


def test_cancelling_one_of_four_lets_the_other_three_succeed(server: LocalCogServer) -> None:
    with ThreadPoolExecutor(4) as pool:
        doomed = pool.submit(server.predict, ENDLESS, "endless-prediction")
        others = [pool.submit(server.predict, inputs) for inputs, _, _ in FOUR[:3]]
        time.sleep(1.0)
        assert server.cancel("endless-prediction") == 200
        status, body = doomed.result()
        assert status == 200 and body["status"] == "canceled", body
        for (_, answer, _), other in zip(FOUR[:3], others):
            status, body = other.result()
            assert status == 200 and body["output"]["text_out"] == answer, body


def test_a_client_that_disconnects_frees_its_row(server: LocalCogServer) -> None:
    cancellations = server.log_text().count("cancelled after")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(
        "POST", "/predictions", json.dumps({"input": ENDLESS}), {"Content-Type": "application/json"}
    )
    time.sleep(1.0)
    connection.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 10
    while server.log_text().count("cancelled after") == cancellations and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log_text().count("cancelled after") == cancellations + 1  # the engine dropped it
    # All four rows are free again: four predictions at once all succeed.
    results = predict_all(server, [inputs for inputs, _, _ in FOUR])
    assert [status for status, _ in results] == [200] * 4


def test_a_follow_up_question_reuses_the_image_prefix(server: LocalCogServer, tmp_path: Path) -> None:
    # An image this server has not seen: other tests send the fixture images as they are.
    image = Image.open(IMAGES / "vqa_1.jpg").convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.save(tmp_path / "flipped.png")
    flipped = data_uri(tmp_path / "flipped.png", "image/png")
    questions = ["Describe each stage of this image in detail", "Which stage comes last?"]
    bodies = []
    for question in questions:
        status, body = server.predict({"image1": flipped, "text": question, "max_new_tokens": 12, "temperature": 0})
        assert status == 200 and body["status"] == "succeeded", body
        bodies.append(body)
    first, second = bodies
    [image_tokens] = case("tiny-mla/m_one")["num_image_tokens"]  # vqa_1's tiling, so the flip's
    assert first["metrics"]["cached_prompt_tokens"] == 0
    assert second["metrics"]["cached_prompt_tokens"] >= image_tokens
    # The answer equals the one computed without a cache.
    with Engine.from_pretrained(CHECKPOINT, prefix_cache_bytes=0) as engine:
        messages = [{"role": "user", "content": f"<image>\n{questions[1]}"}]
        expected = engine.generate(messages, [image], max_new_tokens=12, temperature=0).text
    assert second["output"]["text_out"] == expected
    # A question on another image reuses none of the image tokens.
    Image.new("RGB", (40, 30), (12, 34, 56)).save(tmp_path / "plain.png")
    another = data_uri(tmp_path / "plain.png", "image/png")
    status, body = server.predict({"image1": another, "text": questions[1], "max_new_tokens": 2})
    assert status == 200 and body["metrics"]["cached_prompt_tokens"] == 0, body
