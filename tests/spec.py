"""Validating response bodies against the Llama Stack spec file itself (never a copy of its schemas).

The file is ``spec/llama-stack-post-training-v1.openapi.yaml`` in this repository (see spec/README.md);
``POSTTRAIN_SPEC`` points the tests at another copy.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO = Path(__file__).resolve().parents[1]
SPEC_PATH = Path(os.environ.get("POSTTRAIN_SPEC", REPO / "spec" / "llama-stack-post-training-v1.openapi.yaml"))
SPEC_URI = "urn:llama-stack-spec"


@functools.cache
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource.from_contents(spec(), default_specification=DRAFT202012))


def validate(body: Any, schema_name: str) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``body`` is a valid ``components/schemas/<schema_name>``."""
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"},
        registry=_registry(),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    validator.validate(body)


def response_schema(path: str, method: str, status: int) -> str | None:
    """The schema name the spec gives for this operation's response (None: no body declared)."""
    operation = spec()["paths"][path][method.lower()]
    response = operation["responses"].get(str(status)) or operation["responses"]["default"]
    if "$ref" in response:
        response = spec()["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    content = response.get("content", {}).get("application/json")
    if not content:
        return None
    return content["schema"]["$ref"].rsplit("/", 1)[-1]


def validate_response(response, spec_path: str) -> None:
    """Validate an HTTP response against what the spec says ``spec_path`` answers with its status."""
    name = response_schema(spec_path, response.request.method, response.status_code)
    if name is None:
        assert response.status_code == 200
        return
    validate(response.json(), name)
