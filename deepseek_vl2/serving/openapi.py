"""The OpenAPI document Cog's HTTP server (coglet) reads from `.cog/openapi_schema.json`.

`cog build` normally writes that file; no cog CLI is available here, so we build it from the
predictor with cog's own introspection (`cog._inspector`, private API: cog is pinned exactly and a
test checks that the committed file matches the predictor signature). coglet validates request
inputs against `components.schemas.Input` (422 on a missing, mistyped or out-of-range input) and
serves the document at `GET /openapi.json`.
"""

from __future__ import annotations

import json
from typing import Any

from cog import _adt as cog_types
from cog._inspector import create_predictor

OPENAPI_VERSION = "3.0.2"
PREDICTION_STATUSES = ["starting", "processing", "succeeded", "canceled", "failed"]
WEBHOOK_EVENTS = ["start", "output", "logs", "completed"]
_OPTIONAL = (cog_types.Repetition.OPTIONAL, cog_types.Repetition.OPTIONAL_REPEATED)


def _title(name: str) -> str:
    return name.replace("_", " ").title()


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _bound(value: float, field: cog_types.InputField) -> float | int:
    # cog stores bounds as floats; write whole numbers of integer inputs as JSON integers.
    is_integer = field.type.primitive is cog_types.PrimitiveType.INTEGER
    return int(value) if is_integer and value == int(value) else value


def _input_property(field: cog_types.InputField) -> dict[str, Any]:
    prop: dict[str, Any] = {"title": _title(field.name), **field.type.json_type()}
    if field.description:
        prop["description"] = field.description
    if field.default is not None:
        prop["default"] = field.type.json_encode(field.default)
    if field.ge is not None:
        prop["minimum"] = _bound(field.ge, field)
    if field.le is not None:
        prop["maximum"] = _bound(field.le, field)
    if field.min_length is not None:
        prop["minLength"] = field.min_length
    if field.max_length is not None:
        prop["maxLength"] = field.max_length
    if field.regex is not None:
        prop["pattern"] = field.regex
    if field.choices is not None:
        prop["enum"] = list(field.choices)
    if field.type.repetition in _OPTIONAL:
        prop["nullable"] = True
    if field.deprecated:
        prop["deprecated"] = True
    prop["x-order"] = field.order
    return prop


def _input_schema(predictor: cog_types.PredictorInfo) -> dict[str, Any]:
    fields = sorted(predictor.inputs.values(), key=lambda field: field.order)
    required = [
        field.name
        for field in fields
        if field.default is None and field.type.repetition not in _OPTIONAL
    ]
    schema: dict[str, Any] = {
        "title": "Input",
        "type": "object",
        "properties": {field.name: _input_property(field) for field in fields},
    }
    if required:
        schema["required"] = required
    return schema


def _envelope_schemas() -> dict[str, Any]:
    """The request/response wrappers around Input and Output, identical for every model."""
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "created_at": {"title": "Created At", **timestamp},
                "input": _ref("Input"),
                "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
                "webhook_events_filter": {
                    "type": "array",
                    "items": _ref("WebhookEvent"),
                    "default": WEBHOOK_EVENTS,
                },
                "output_file_prefix": {"title": "Output File Prefix", "type": "string"},
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **timestamp},
                "started_at": {"title": "Started At", **timestamp},
                "completed_at": {"title": "Completed At", **timestamp},
                "status": _ref("Status"),
                "input": _ref("Input"),
                "output": _ref("Output"),
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {"title": "Status", "type": "string", "enum": PREDICTION_STATUSES},
        "WebhookEvent": {"title": "WebhookEvent", "type": "string", "enum": WEBHOOK_EVENTS},
        "ValidationError": {
            "title": "ValidationError",
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {"title": "Detail", "type": "array", "items": _ref("ValidationError")}
            },
        },
    }


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def build_openapi_schema(module_name: str, predictor_name: str) -> dict[str, Any]:
    """The OpenAPI document for the predictor `module_name.predictor_name`."""
    predictor = create_predictor(module_name, predictor_name)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/predictions": {
                "post": {
                    "summary": "Predict",
                    "description": "Run a single prediction on the model.",
                    "operationId": "predict_predictions_post",
                    "requestBody": {
                        "content": {"application/json": {"schema": _ref("PredictionRequest")}}
                    },
                    "responses": {
                        "200": _json_response("Successful Response", "PredictionResponse"),
                        "422": _json_response("Validation Error", "HTTPValidationError"),
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "Input": _input_schema(predictor),
                "Output": predictor.output.json_type(),
                **_envelope_schemas(),
            }
        },
    }


def render(schema: dict[str, Any]) -> str:
    """The exact text committed to `.cog/openapi_schema.json`."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
