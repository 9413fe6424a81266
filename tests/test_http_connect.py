"""The HTTP port: DiffusionService over Connect (JSON and binary, HTTP/1.1 and HTTP/2) and gRPC-Web, against a
real server, with curl, connect-python's own client and plain urllib: same images, errors, auth and metrics as
gRPC."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from google.rpc import error_details_pb2

from sdserve import Client
from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1.diffusion_connect import DiffusionServiceClientSync
from tests.harness import (
    TINY,
    ServerThread,
    connect_frame,
    connect_unframe,
    pixels,
    requests_counted,
    running,
    serving,
    wait_until,
)

README = Path(__file__).resolve().parent.parent / "README.md"
PARAMS: dict[str, Any] = {"prompt": "a red circle", "steps": 2, "seed": 7, "width": 64, "height": 64, "model": TINY}


@pytest.fixture(scope="module")
def web(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir, http_port=0, default_model=TINY)


def base(srv: ServerThread) -> str:
    assert srv.server is not None
    return f"http://127.0.0.1:{srv.server.http_port}"


def post(url: str, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"content-type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def stream_json(srv: ServerThread, rpc: str, request: dict[str, Any], **headers: str) -> list[dict[str, Any]]:
    """A Connect JSON stream's messages; the end-of-stream message last (flags 2)."""
    url = f"{base(srv)}/sdserve.v1.DiffusionService/{rpc}"
    status, data = post(url, connect_frame(json.dumps(request).encode()), "application/connect+json", headers)
    assert status == 200, data
    return [dict(json.loads(msg), _end=flags & 2 == 2) for flags, msg in connect_unframe(data)]


def test_the_readme_curl_examples_run(web: ServerThread) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    block = re.search(r"<!-- curl-examples.*?```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its curl examples"
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.group(1)],
        env={"SDSERVE_HTTP": base(web), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert '"name": "tiny-sd"' in out
    for event in ('"queued"', '"started"', '"progress"', '"result"', '"data": "iVBORw0KGgo'):
        assert event in out, (event, out[:2000])


def test_a_json_stream_gives_grpcs_image_and_events(web: ServerThread) -> None:
    events = stream_json(web, "Generate", {"params": PARAMS})
    assert events[-1]["_end"] and events[-1].get("error") is None
    kinds = [next(k for k in e if k != "_end") for e in events[:-1]]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "result"
    assert kinds.count("progress") == 2
    result = events[-2]["result"]
    assert result["images"][0]["seed"] == "7"  # proto3 JSON: int64 as a string
    with Client(web.target) as c:
        direct = c.generate(PARAMS["prompt"], steps=2, seed=7, width=64, height=64, model=TINY)
    served = pixels(base64.b64decode(result["images"][0]["data"]))
    assert (served == pixels(direct.images[0].data)).all()


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
def test_connect_pythons_client_streams_binary_and_counts_the_transport(
    web: ServerThread, protocol: ProtocolType
) -> None:
    transport = "grpc-web" if protocol is ProtocolType.GRPC_WEB else "connect"
    before = requests_counted(web, transport=transport, outcome="ok", rpc="Generate")
    with DiffusionServiceClientSync(base(web), protocol=protocol) as client:
        models = client.list_models(pb.ListModelsRequest())
        assert TINY in [m.name for m in models.models]
        events = list(client.generate(pb.GenerateRequest(params=pb.GenerationParams(**PARAMS))))
    assert events[-1].WhichOneof("event") == "result"
    assert events[-1].result.images[0].seed == 7
    assert requests_counted(web, transport=transport, outcome="ok", rpc="Generate") == before + 1


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
def test_invalid_input_is_invalid_argument_with_the_field_violations(web: ServerThread, protocol: ProtocolType) -> None:
    bad = pb.GenerateRequest(params=pb.GenerationParams(prompt="x", width=7, model=TINY))
    with DiffusionServiceClientSync(base(web), protocol=protocol) as client, pytest.raises(ConnectError) as info:
        list(client.generate(bad))
    assert info.value.code is Code.INVALID_ARGUMENT
    assert "params.width" in info.value.message
    found = error_details_pb2.BadRequest()
    assert any(d.Unpack(found) for d in info.value.details)
    assert [v.field for v in found.field_violations] == ["params.width"]


def test_malformed_json_names_the_field_and_leaks_nothing(web: ServerThread) -> None:
    url = f"{base(web)}/sdserve.v1.DiffusionService/ListModels"
    status, body = post(url, b'{"bogus": 1}', "application/json")
    assert status == 400 and json.loads(body)["code"] == "invalid_argument"
    assert "bogus" in json.loads(body)["message"]
    events = stream_json(web, "Generate", {"params": {"prompt": "x", "steps": "many"}})
    error = events[-1]["error"]
    assert error["code"] == "invalid_argument" and "params.steps: must be an integer" in error["message"], error
    status, body = post(url, b"{not json", "application/json")
    assert status == 400 and json.loads(body)["code"] == "invalid_argument"
    # A lone surrogate escape is valid JSON but not text the contract's strings can hold.
    url = f"{base(web)}/sdserve.v1.DiffusionService/Generate"
    status, data = post(url, connect_frame(b'{"params": {"prompt": "a\\ud800"}}'), "application/connect+json")
    error = json.loads(connect_unframe(data)[-1][1])["error"]
    assert error["code"] == "invalid_argument" and "params.prompt" in error["message"], error


def test_invalid_utf8_in_a_binary_request_names_the_field(web: ServerThread) -> None:
    good = pb.GenerateRequest(params=pb.GenerationParams(prompt="AB", steps=2)).SerializeToString()
    broken = good.replace(b"AB", b"\xff\xfe")
    url = f"{base(web)}/sdserve.v1.DiffusionService/Generate"
    status, data = post(url, connect_frame(broken), "application/connect+proto")
    assert status == 200
    flags, end = connect_unframe(data)[-1]
    error = json.loads(end)["error"]
    assert flags & 2 and error["code"] == "invalid_argument" and "params.prompt" in error["message"]


def test_a_deadline_ends_the_stream_deadline_exceeded(web: ServerThread) -> None:
    params = dict(PARAMS, steps=150, seed=3)
    events = stream_json(web, "Generate", {"params": params}, **{"connect-timeout-ms": "300"})
    assert events[-1]["error"]["code"] == "deadline_exceeded", events[-1]
    assert not any("result" in e for e in events)


def test_a_client_that_hangs_up_cancels_its_job(web: ServerThread) -> None:
    """The caller closes the connection after the first progress event: the server counts the call cancelled
    (and the job stops within a step: the worker is free for the next request at once)."""
    assert web.server is not None
    before = requests_counted(web, transport="connect", outcome="cancelled")
    params = dict(PARAMS, steps=150, seed=4)
    url = f"{base(web)}/sdserve.v1.DiffusionService/Generate"
    body = connect_frame(json.dumps({"params": params}).encode())
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/connect+json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        seen = b""
        while b'"progress"' not in seen:
            chunk = resp.read1(65536)
            assert chunk, "stream ended before any progress"
            seen += chunk
    wait_until(lambda: requests_counted(web, transport="connect", outcome="cancelled") >= before + 1, "the cancel")
    wait_until(lambda: web.server is not None and web.server.admission.active_count() == 0, "the job to end")


def test_health_paths_answer_plain_http(web: ServerThread) -> None:
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base(web) + path, timeout=30) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "SERVING"


def test_model_manager_reads_need_a_sidecar_and_writes_stay_on_grpc(web: ServerThread) -> None:
    url = f"{base(web)}/sdserve.v1.ModelManagerService/ListStoredModels"
    status, body = post(url, b"{}", "application/json")
    assert status == 400 and json.loads(body)["code"] == "failed_precondition"
    assert "manager-target" in json.loads(body)["message"]
    status, body = post(url.replace("ListStoredModels", "DeleteStoredModel"), b"{}", "application/json")
    assert json.loads(body)["code"] == "unimplemented"


def test_api_keys_guard_every_rpc_and_count_refusals(models_dir: Path) -> None:
    with serving(models_dir, http_port=0, api_keys=("sekrit",), default_model=TINY) as srv:
        url = f"{base(srv)}/sdserve.v1.DiffusionService/ListModels"
        status, body = post(url, b"{}", "application/json")
        assert status == 401 and json.loads(body)["code"] == "unauthenticated"
        status, body = post(url, b"{}", "application/json", {"authorization": "Bearer wrong"})
        assert status == 401
        status, body = post(url, b"{}", "application/json", {"authorization": "Bearer sekrit"})
        assert status == 200 and TINY in body.decode()
        with (
            DiffusionServiceClientSync(base(srv), protocol=ProtocolType.GRPC_WEB) as client,
            pytest.raises(ConnectError) as info,
        ):
            client.list_models(pb.ListModelsRequest())
        assert info.value.code is Code.UNAUTHENTICATED
        assert requests_counted(srv, outcome="unauthenticated", transport="connect") == 2
        assert requests_counted(srv, outcome="unauthenticated", transport="grpc-web") == 1
        with urllib.request.urlopen(base(srv) + "/healthz", timeout=30) as resp:
            assert resp.status == 200  # probes need no key


def test_tls_serves_http2_with_the_grpc_certificate(models_dir: Path, tmp_path: Path) -> None:
    from tests.certs import make_ca, make_leaf, require_openssl

    require_openssl()
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    ca = make_ca(tmp_path, "ca")
    key, cert = make_leaf(tmp_path, "server", ca, server=True)
    with serving(models_dir, http_port=0, tls_cert_file=str(cert), tls_key_file=str(key), default_model=TINY) as srv:
        assert srv.server is not None
        url = f"https://127.0.0.1:{srv.server.http_port}/sdserve.v1.DiffusionService/ListModels"
        out = subprocess.run(
            ["curl", "-s", "--http2", "--cacert", str(ca[1]), "-w", "\n%{http_version}", "-H",
             "content-type: application/json", "-d", "{}", url],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        body, version = out.rsplit("\n", 1)
        assert version == "2" and TINY in body
        plain = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url.replace("https", "http")],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert plain.stdout in ("000", "400"), plain.stdout  # no plaintext on a TLS port


def test_draining_refuses_new_http_calls_unavailable(models_dir: Path) -> None:
    with serving(models_dir, http_port=0, default_model=TINY) as srv:
        assert srv.server is not None
        srv.server.admission.begin_drain()
        events = stream_json(srv, "Generate", {"params": PARAMS})
        assert events[-1]["error"]["code"] == "unavailable"


def test_grpc_clients_are_served_on_the_http_port_too(web: ServerThread) -> None:
    """HTTP/2 without TLS (prior knowledge) carries plain gRPC as well: one port can front everything."""
    assert web.server is not None
    with Client(f"127.0.0.1:{web.server.http_port}") as c:
        result = c.generate(PARAMS["prompt"], steps=2, seed=7, width=64, height=64, model=TINY)
    with Client(web.target) as c:
        direct = c.generate(PARAMS["prompt"], steps=2, seed=7, width=64, height=64, model=TINY)
    assert (pixels(result.images[0].data) == pixels(direct.images[0].data)).all()


def test_gzip_bodies_work_and_a_zip_bomb_is_refused_before_it_expands(models_dir: Path) -> None:
    import gzip

    limit = 4 * 1024 * 1024
    with serving(models_dir, http_port=0, default_model=TINY, max_message_bytes=limit) as srv:
        url = f"{base(srv)}/sdserve.v1.DiffusionService/ListModels"
        status, body = post(url, gzip.compress(b"{}"), "application/json", {"content-encoding": "gzip"})
        assert status == 200 and TINY in body.decode()
        # 64 MiB of spaces (valid JSON whitespace) in about 64 KB: refused at the limit, not decompressed whole.
        bomb = gzip.compress(b"{" + b" " * (16 * limit) + b"}", compresslevel=9)
        assert len(bomb) < limit // 8
        status, body = post(url, bomb, "application/json", {"content-encoding": "gzip"})
        assert status == 429 and json.loads(body)["code"] == "resource_exhausted", body
        assert "max_message_bytes" in json.loads(body)["message"]
        status, body = post(url, b"not gzip", "application/json", {"content-encoding": "gzip"})
        assert status == 400 and json.loads(body)["code"] == "invalid_argument"
        # A compressed stream message (flags 1) goes through the same bound.
        stream = f"{base(srv)}/sdserve.v1.DiffusionService/Generate"
        message = gzip.compress(json.dumps({"params": PARAMS}).encode())
        status, data = post(
            stream, connect_frame(message, flags=1), "application/connect+json", {"connect-content-encoding": "gzip"}
        )
        assert status == 200 and json.loads(connect_unframe(data)[-1][1]) == {}
        status, data = post(
            stream, connect_frame(bomb, flags=1), "application/connect+json", {"connect-content-encoding": "gzip"}
        )
        assert json.loads(connect_unframe(data)[-1][1])["error"]["code"] == "resource_exhausted"
