"""GET /openapi.json from a real server: a valid OpenAPI 3.1 document (openapi-spec-validator) describing the A1111
routes and the Connect RPCs in the proto3 JSON mapping, and live answers that validate against its schemas."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import validate as validate_spec

from tests.harness import TINY, ServerThread, connect_unframe, running
from tests.test_a1111 import SMALL, base, call


@pytest.fixture(scope="module")
def keyed(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir, http_port=0, default_model=TINY, api_keys=("k1",))


@pytest.fixture(scope="module")
def doc(keyed: ServerThread) -> dict[str, Any]:
    status, _, body = call(keyed, "/openapi.json")  # no key: the document is open, like the health checks
    assert status == 200
    return dict(body)


def conforms(doc: dict[str, Any], instance: Any, schema: dict[str, Any]) -> None:
    """Validates `instance` against `schema`, resolving its $refs in the document's components."""
    validate_instance(instance, {**schema, "components": doc["components"]})


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_the_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate_spec(doc)
    assert doc["openapi"].startswith("3.1")
    paths = set(doc["paths"])
    rest = {"txt2img", "img2img", "progress", "interrupt", "sd-models", "samplers", "options", "png-info"}
    assert {f"/sdapi/v1/{p}" for p in rest} <= paths
    rpcs = {"Generate", "Edit", "Inpaint", "ListModels", "GetServerInfo"}
    assert {f"/sdserve.v1.DiffusionService/{m}" for m in rpcs} <= paths
    assert "/sdserve.v1.ModelManagerService/ListStoredModels" in paths
    assert "/sdserve.v1.ModelManagerService/DeleteStoredModel" not in paths  # a write: gRPC only
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_proto_schemas_follow_the_proto3_json_mapping(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    params = schemas["sdserve.v1.GenerationParams"]["properties"]
    assert params["numImages"]["type"] == "integer" and "num_images" not in params
    assert params["seed"]["type"] == "string"  # uint64
    assert params["guidanceScale"]["type"] == "number"
    assert params["scheduler"] == component("sdserve.v1.Scheduler")
    assert "SCHEDULER_EULER_ANCESTRAL" in schemas["sdserve.v1.Scheduler"]["enum"]
    assert schemas["sdserve.v1.Image"]["properties"]["data"]["format"] == "byte"
    generate = doc["paths"]["/sdserve.v1.DiffusionService/Generate"]["post"]
    streamed = generate["responses"]["200"]["content"]["application/connect+json"]
    assert streamed["x-connect-message"] == component("sdserve.v1.GenerateResponse")
    unary = doc["paths"]["/sdserve.v1.DiffusionService/ListModels"]["post"]
    assert unary["requestBody"]["content"]["application/json"]["schema"] == component("sdserve.v1.ListModelsRequest")


def test_live_answers_validate_against_the_document(doc: dict[str, Any], keyed: ServerThread) -> None:
    for rpc, name in (("ListModels", "ListModelsResponse"), ("GetServerInfo", "GetServerInfoResponse")):
        req = urllib.request.Request(
            f"{base(keyed)}/sdserve.v1.DiffusionService/{rpc}",
            data=b"{}",
            headers={"content-type": "application/json", "authorization": "Bearer k1"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            conforms(doc, json.loads(resp.read()), component(f"sdserve.v1.{name}"))
    params = {
        "prompt": "a dot",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": "5",
        "preview": {"mode": "PREVIEW_MODE_LATENT_RGB"},
    }
    message = json.dumps({"params": params}).encode()
    req = urllib.request.Request(
        f"{base(keyed)}/sdserve.v1.DiffusionService/Generate",
        data=b"\x00" + len(message).to_bytes(4, "big") + message,
        headers={"content-type": "application/connect+json", "authorization": "Bearer k1"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        frames = connect_unframe(resp.read())
    assert [flags for flags, _ in frames][-1] == 2 and len(frames) >= 5
    for flags, data in frames:
        schema = "connect.EndStreamResponse" if flags == 2 else "sdserve.v1.GenerateResponse"
        conforms(doc, json.loads(data), component(schema))
    status, _, answer = call(keyed, "/sdapi/v1/txt2img", SMALL, key="k1")
    assert status == 200
    conforms(doc, answer, component("ImageResponse"))
    route = doc["paths"]["/sdapi/v1/sd-models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    conforms(doc, call(keyed, "/sdapi/v1/sd-models", key="k1")[2], route)
    conforms(doc, call(keyed, "/sdapi/v1/progress", key="k1")[2], component("ProgressResponse"))
    status, _, refused = call(keyed, "/sdapi/v1/txt2img", {**SMALL, "width": 65}, key="k1")
    assert status == 422
    conforms(doc, refused, component("HTTPValidationError"))
