"""The API's OpenAPI document (``/openapi.json``, shown at ``/docs``) as the routes behave.

The routes read their bodies themselves (a JSON body or a multipart upload on one route, every error in OpenAI's
shape), so FastAPI saw no body to describe: Swagger's "Try it out" could send none, and it listed 422 for errors
the API answers with 400. Routes name their bodies with ``request_body``; ``describe_api`` adds those models to the
document and gives every error response the OpenAI body the API sends.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_REF = "#/components/schemas/{model}"
_BODIES: dict[str, type[BaseModel]] = {}  # the models ``request_body`` named, by name

# An uploaded file and its form fields (``POST /v1/documents``): the pasted text's fields but ``text``.
_UPLOAD = {"type": "object", "required": ["file"], "properties": {
    "file": {"type": "string", "format": "binary", "description": "a PDF, DOCX, TXT or Markdown file"},
    "name": {"type": "string"}, "preset": {"type": "string"}, "dpi": {"type": "integer"},
    "newline": {"type": "string"}}}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
        "code": {"type": "string"}}}}}


def request_body(model: type[BaseModel], example: dict[str, Any], upload: bool = False) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body is a ``model``, shown as ``example`` (a body the route answers as
    it stands: Swagger's own, built from the schema, sent a system message of null content), or, with ``upload``,
    a file as multipart/form-data. Models are told apart by class name."""
    _BODIES[model.__name__] = model
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)},
                                                    "example": example}}
    if upload:
        content["multipart/form-data"] = {"schema": _UPLOAD}
    return {"requestBody": {"required": True, "content": content}}


def describe_api(app: FastAPI) -> None:
    """Make ``app.openapi()`` the document described above (built once, at the first request for it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                              routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            _, defs = models_json_schema([(m, "validation") for m in _BODIES.values()], ref_template=_REF)
            schemas.update(defs.get("$defs", {}))
            schemas["Error"] = _ERROR
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for path in doc.get("paths", {}).values():
                for operation in path.values():
                    _errors_as_sent(operation["responses"])
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _errors_as_sent(responses: dict[str, Any]) -> None:
    """FastAPI's 422 (its validation errors) is the API's 400 in OpenAI's shape."""
    responses.pop("422", None)
    responses["400"] = {"description": "invalid request (OpenAI's error body; other errors come in the same shape)",
                        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
