"""The committed .cog/openapi_schema.json must match the Predictor signature."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from deepseek_vl2.serving.openapi import build_openapi_schema, render

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = PROJECT_ROOT / ".cog" / "openapi_schema.json"


@pytest.fixture(scope="module")
def schema() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # BasePredictor/predict() names
        return build_openapi_schema("predict", "Predictor")


def test_committed_schema_is_up_to_date(schema: dict) -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(schema), "run `make schema`"


def test_check_mode_of_the_script_agrees() -> None:
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "make_openapi_schema.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_document_has_the_shape_coglet_reads(schema: dict) -> None:
    assert schema["openapi"] == "3.0.2"
    post = schema["paths"]["/predictions"]["post"]
    request_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert request_ref == "#/components/schemas/PredictionRequest"
    components = schema["components"]["schemas"]
    for name in ("Input", "Output", "PredictionRequest", "PredictionResponse"):
        assert name in components
    assert components["PredictionRequest"]["properties"]["input"] == {
        "$ref": "#/components/schemas/Input"
    }
    assert components["PredictionResponse"]["properties"]["output"] == {
        "$ref": "#/components/schemas/Output"
    }


def test_inputs_in_order_with_defaults_and_bounds(schema: dict) -> None:
    inputs = schema["components"]["schemas"]["Input"]
    properties = inputs["properties"]
    assert list(properties) == [
        "text", "image1", "image2", "image3", "max_new_tokens", "temperature", "top_p",
        "repetition_penalty", "top_k", "seed", "image_detail",
    ]  # fmt: skip
    assert [p["x-order"] for p in properties.values()] == list(range(11))
    assert inputs["required"] == ["image1"]
    assert properties["image1"]["format"] == "uri" and "nullable" not in properties["image1"]
    assert properties["image2"]["nullable"] is True
    assert properties["max_new_tokens"] | {"description": ""} == {
        "title": "Max New Tokens",
        "type": "integer",
        "description": "",
        "default": 2048,
        "minimum": 0,
        "maximum": 4096,
        "x-order": 4,
    }
    assert properties["temperature"]["default"] == 0.1
    assert properties["top_p"]["maximum"] == 1.0
    assert properties["seed"]["nullable"] is True and "default" not in properties["seed"]
    assert all(p.get("description") for p in properties.values())
    detail = properties["image_detail"]
    assert detail["type"] == "string" and detail["enum"] == ["auto", "low"] and detail["default"] == "auto"
    assert "421 tokens" in detail["description"] and "first token" in detail["description"]


def test_output_is_optional_image_and_text(schema: dict) -> None:
    output = schema["components"]["schemas"]["Output"]
    assert output["type"] == "object"
    assert output["required"] == ["text_out"]
    assert output["properties"]["img_out"]["format"] == "uri"
    assert output["properties"]["img_out"]["nullable"] is True
    assert output["properties"]["text_out"]["type"] == "string"
