"""The real Cog HTTP server (coglet) serving predict.py on a tiny parity checkpoint."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepseek_vl2.local_server import LocalCogServer

FIXTURES = Path(__file__).parent / "fixtures"
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
