"""The HTTP port's OpenAPI 3.1 document (GET /openapi.json): the A1111 REST routes (FastAPI's own schema) plus the
Connect JSON RPCs, whose request and response schemas are generated from the protobuf descriptors in the proto3 JSON
mapping (lowerCamelCase names, 64-bit integers as strings, bytes as base64, enums by name)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import model_manager_pb2 as mpb
from service.convert import VERSION
from service.http_app import Receive, Scope, Send, send_bytes, send_json

Schema = dict[str, Any]

# The services the HTTP port answers over Connect, with the methods it serves (None: all of them). The model
# manager's writes answer UNIMPLEMENTED over HTTP (they stay on the sidecar's gRPC port), so they are not described.
SERVED: tuple[tuple[str, Any, frozenset[str] | None], ...] = (
    ("DiffusionService", pb.DESCRIPTOR, None),
    (
        "ModelManagerService",
        mpb.DESCRIPTOR,
        frozenset({"ListStoredModels", "GetStoredModel", "ListAdapters", "GetAdapter", "WatchModels"}),
    ),
)
_T = FieldDescriptor
_INT64 = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
_SCALARS: dict[int, Schema] = {
    _T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _T.TYPE_FLOAT: {"type": "number", "format": "float"},
    _T.TYPE_INT64: _INT64,
    _T.TYPE_SINT64: _INT64,
    _T.TYPE_SFIXED64: _INT64,
    _T.TYPE_UINT64: _UINT64,
    _T.TYPE_FIXED64: _UINT64,
    _T.TYPE_INT32: {"type": "integer", "format": "int32"},
    _T.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _T.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _T.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    _T.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"},
}
_CONNECT_CODES = [
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
]
CONNECT_SCHEMAS: dict[str, Schema] = {
    "connect.Error": {
        "type": "object",
        "description": "A Connect error: the gRPC status as a lower-case code, its message and google.rpc details "
        "(BadRequest field violations, RetryInfo), each as a type URL and base64 protobuf bytes.",
        "properties": {
            "code": {"type": "string", "enum": _CONNECT_CODES},
            "message": {"type": "string"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "value": {"type": "string", "format": "byte"},
                        "debug": {},
                    },
                },
            },
        },
        "required": ["code"],
    },
    "connect.EndStreamResponse": {
        "type": "object",
        "description": "The last envelope of a stream (flags 0x02): an error when the call failed, and trailers.",
        "properties": {
            "error": {"$ref": "#/components/schemas/connect.Error"},
            "metadata": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
        },
    },
}
ENVELOPE = (
    "Connect streaming: each message is an envelope, one flags byte (0x00; 0x02 on the last, which carries a "
    "connect.EndStreamResponse), a 4-byte big-endian length, then that many bytes of proto3 JSON."
)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _enum(desc: EnumDescriptor, schemas: dict[str, Schema]) -> Schema:
    if desc.full_name not in schemas:
        values = [v.name for v in desc.values]
        schemas[desc.full_name] = {"type": "string", "enum": values, "description": "Enum value by name."}
    return _ref(desc.full_name)


def _value(field: FieldDescriptor, schemas: dict[str, Schema]) -> Schema:
    """The schema of one value of `field` (an element, for a repeated field)."""
    if field.enum_type is not None:
        return _enum(field.enum_type, schemas)
    if field.message_type is not None:
        return message_schema(field.message_type, schemas)
    return dict(_SCALARS[field.type])


def _field(field: FieldDescriptor, schemas: dict[str, Schema]) -> Schema:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": _value(message.fields_by_name["value"], schemas)}
    item = _value(field, schemas)
    return {"type": "array", "items": item} if field.is_repeated else item


def message_schema(desc: Descriptor, schemas: dict[str, Schema]) -> Schema:
    """A $ref to the schema of message `desc`, adding it (and every type it uses) to `schemas`."""
    if desc.full_name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[desc.full_name])
    if desc.full_name not in schemas:
        schemas[desc.full_name] = {}  # claims the name first: messages may refer to themselves
        props = {f.json_name: _field(f, schemas) for f in desc.fields}
        schema: Schema = {"type": "object", "properties": props}
        real = [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]
        if real:
            groups = "; ".join(f"{o.name}: " + ", ".join(f.json_name for f in o.fields) for o in real)
            schema["description"] = f"At most one field of each oneof is set ({groups})."
        schemas[desc.full_name] = schema
    return _ref(desc.full_name)


def _headers() -> list[Schema]:
    return [
        {"name": "Connect-Protocol-Version", "in": "header", "required": False, "schema": {"type": "string"}},
        {
            "name": "Connect-Timeout-Ms",
            "in": "header",
            "required": False,
            "description": "The call's deadline in milliseconds.",
            "schema": {"type": "integer", "minimum": 1},
        },
    ]


def _operation(service: str, method: MethodDescriptor, schemas: dict[str, Schema]) -> Schema:
    """The POST operation of one Connect RPC: unary as application/json, server streaming as enveloped
    application/connect+json."""
    request, response = message_schema(method.input_type, schemas), message_schema(method.output_type, schemas)
    error = {"description": "A Connect error.", "content": {"application/json": {"schema": _ref("connect.Error")}}}
    op: Schema = {
        "operationId": f"{service}_{method.name}",
        "tags": [service],
        "summary": f"{service}.{method.name} over Connect (JSON; binary protobuf and gRPC-Web are served too)",
        "parameters": _headers(),
    }
    if not method.server_streaming:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
        ok = {"description": "The response message.", "content": {"application/json": {"schema": response}}}
        op["responses"] = {"200": ok, "default": error}
        return op
    binary = {"type": "string", "format": "binary", "description": ENVELOPE}
    op["requestBody"] = {
        "required": True,
        "content": {"application/connect+json": {"schema": binary, "x-connect-message": request}},
    }
    stream = {
        "schema": binary,
        "x-connect-message": response,
        "x-connect-end-stream": _ref("connect.EndStreamResponse"),
    }
    what = "A stream of response messages, then the end-of-stream envelope."
    ok = {"description": what, "content": {"application/connect+json": stream}}
    op["responses"] = {"200": ok, "default": error}
    return op


def connect_paths(schemas: dict[str, Schema]) -> dict[str, Schema]:
    """Every Connect RPC the HTTP port serves, adding their message schemas to `schemas`."""
    paths: dict[str, Schema] = {}
    for name, file, methods in SERVED:
        service = file.services_by_name[name]
        for method in service.methods:
            if methods is None or method.name in methods:
                paths[f"/{service.full_name}/{method.name}"] = {"post": _operation(name, method, schemas)}
    return paths


def _health() -> dict[str, Schema]:
    body = {"type": "object", "properties": {"status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]}}}
    content = {"application/json": {"schema": body}}
    paths: dict[str, Schema] = {}
    for path, what in (("/healthz", "The process is up."), ("/readyz", "The default model is served.")):
        responses = {"200": {"description": what, "content": content}, "503": {"description": "Not ready."}}
        paths[path] = {
            "get": {"operationId": path.strip("/"), "tags": ["health"], "security": [], "responses": responses}
        }
    return paths


def document(rest: FastAPI) -> Schema:
    """The whole document: `rest`'s schema, the Connect RPCs, the health checks and the bearer-key scheme."""
    doc = copy.deepcopy(rest.openapi())
    doc["info"] = {
        "title": "sdserve HTTP API",
        "version": VERSION,
        "description": "The A1111-compatible REST subset (/sdapi/v1, see docs/a1111.md) and the Connect JSON "
        "form of the gRPC contract (proto/sdserve/v1). Every path but the health checks and this document needs "
        "`Authorization: Bearer <key>` when the server has API keys.",
    }
    components = doc.setdefault("components", {})
    schemas: dict[str, Schema] = components.setdefault("schemas", {})
    schemas.update(copy.deepcopy(CONNECT_SCHEMAS))
    doc.setdefault("paths", {}).update(connect_paths(schemas))
    doc["paths"].update(_health())
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key."}}
    doc["security"] = [{"bearer": []}]
    return doc


class OpenApiDocument:
    """GET /openapi.json: the document, built on first use."""

    def __init__(self, build: Callable[[], Schema]):
        self._build = build
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await send_json(send, 405, {"detail": "only GET and HEAD are served here"}, [(b"allow", b"GET, HEAD")])
            return
        if self._body is None:
            self._body = json.dumps(self._build()).encode()
        body = b"" if scope["method"] == "HEAD" else self._body
        await send_bytes(send, 200, body, "application/json", [(b"cache-control", b"no-cache")])
