"""The /sdapi/v1 FastAPI application: each route reads A1111's body, runs the contract's requests through the
servicer and answers in A1111's shapes."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response

from sdserve_core.status import FieldViolation
from service.a1111 import answer, catalog, errors, images, infotext, translate
from service.a1111.limits import BodyLimit
from service.a1111.policy import ignored_header
from service.a1111.runner import ClientGone, Outcome, Runner
from service.a1111.schemas import (
    ImageResponse,
    Img2ImgBody,
    PNGInfoBody,
    PNGInfoResponse,
    ProcessingBody,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgBody,
)
from service.a1111.tracking import Tracker, caller_of
from service.convert import VERSION
from service.http_app import Receive, Scope, Send
from service.requests import Failed
from service.requests import Outcome as Ending
from service.servicer import DiffusionServicer
from service.settings import Settings

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The model cannot run this request (FAILED_PRECONDITION)."},
    401: {"description": "Missing or invalid API key (when the server has keys)."},
    404: {"description": "The model (override_settings.sd_model_checkpoint) or a LoRA does not exist."},
    429: {"description": "The queue is full or the device ran out of memory; see Retry-After."},
    503: {"description": "The server is draining; retry on another replica."},
}


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class A1111Api:
    """The route handlers, over one servicer; `keyed` says whether the server checks API keys (callers are then
    told apart by key, else by host)."""

    def __init__(self, servicer: DiffusionServicer, settings: Settings, keyed: bool):
        self._servicer = servicer
        self._settings = settings
        self._keyed = keyed
        self._runner = Runner(servicer)
        self.tracker = Tracker()

    def caller(self, request: Request) -> str:
        host = request.client.host if request.client else ""
        return caller_of(request.headers.get("authorization", ""), host, self._keyed)

    async def txt2img(self, body: Txt2ImgBody, request: Request) -> Response:
        """Text to image (the contract's Generate)."""
        try:
            prepared = translate.txt2img(body)
        except translate.Refused as exc:
            return errors.refused(exc.violations, exc.ignored)
        return await self._run("txt2img", body, prepared, request)

    async def img2img(self, body: Img2ImgBody, request: Request) -> Response:
        """Image to image (the contract's Edit), or inpainting (Inpaint) when the body has a mask."""
        try:
            prepared = await asyncio.to_thread(translate.img2img, body, self._settings)
        except translate.Refused as exc:
            return errors.refused(exc.violations, exc.ignored)
        return await self._run("img2img", body, prepared, request)

    async def _run(self, kind: str, body: ProcessingBody, prepared: translate.Prepared, request: Request) -> Response:
        job = self.tracker.open(self.caller(request), kind, prepared.iterations)
        try:
            out = await self._runner.run(prepared, job, lambda: _disconnected(request))
        except errors.A1111Failed as exc:
            return errors.failed_response(exc.failed, prepared.ignored)
        except ClientGone:
            return Response(status_code=499)
        except Exception:
            rid = uuid.uuid4().hex
            log.exception("unhandled error", extra={"rpc": prepared.rpc, "request_id": rid, "transport": "a1111"})
            message = f"internal error (request id {rid}); the server log has the details"
            return errors.failed_response(Failed(Ending.INTERNAL, message), prepared.ignored)
        finally:
            self.tracker.close(job)
        content = answer.body_of(body, prepared, out, job, self._inpainting(prepared, out))
        headers = ignored_header(prepared.ignored)
        if out.interrupted:
            headers["x-sdserve-interrupted"] = "true"
        return JSONResponse(content, headers=headers)

    def _inpainting(self, prepared: translate.Prepared, out: Outcome) -> bool:
        if prepared.rpc != "Inpaint" or not out.results:
            return False
        served = out.results[0].parameters.model
        return any(m.name == served and m.unet_in_channels == 9 for m in self._servicer.model_list().models)

    async def progress(self, request: Request, skip_current_image: bool = False) -> dict[str, Any]:
        """The caller's own oldest A1111 call in flight: progress 0 to 1, ETA, state and the latest preview."""
        return self.tracker.progress(self.caller(request), skip_current_image)

    async def interrupt(self, request: Request) -> dict[str, Any]:
        """Stops the caller's own A1111 calls: each answers with what finished before (see docs/a1111.md)."""
        self.tracker.interrupt(self.caller(request))
        return {}

    async def sd_models(self) -> list[dict[str, Any]]:
        """The models this server serves."""
        return catalog.sd_models(self._servicer.model_list())

    async def samplers(self) -> list[dict[str, Any]]:
        """The samplers this server offers, by A1111 name."""
        return catalog.sampler_items(self._servicer.server_info())

    async def schedulers(self) -> list[dict[str, Any]]:
        """The schedule types some sampler here takes."""
        return catalog.scheduler_items()

    async def loras(self) -> list[dict[str, Any]]:
        """The LoRA adapters prompts may name with <lora:NAME:WEIGHT>."""
        return catalog.loras(self._servicer.server_info())

    async def get_options(self) -> dict[str, Any]:
        """The default checkpoint and the fixed options that describe how this server generates."""
        return catalog.options(self._servicer.model_list())

    async def set_options(self, values: dict[str, Any] = Body(...)) -> Response:  # noqa: B008 - FastAPI's idiom
        """Options are read-only: a value equal to the current one is accepted, any other is refused (per-request
        override_settings choose the model and the rest)."""
        current = catalog.options(self._servicer.model_list())
        rule = "options are read-only on this server; send it per request in override_settings instead"
        bad = [FieldViolation(k, rule) for k, v in values.items() if current.get(k) != v]
        return errors.refused(bad) if bad else JSONResponse(None)

    async def png_info(self, body: PNGInfoBody) -> Response:
        """The infotext of an image (what sdserve and A1111 write into their PNGs), parsed as A1111 does."""
        try:
            text, items = infotext.read(images.decode_b64(body.image))
        except (images.BadImage, infotext.NotAnImage) as exc:
            return errors.refused([FieldViolation("image", str(exc))])
        return JSONResponse({"info": text, "items": items, "parameters": infotext.parse(text)})


def _routes(app: FastAPI, api: A1111Api) -> None:
    route = app.add_api_route
    route("/sdapi/v1/txt2img", api.txt2img, methods=["POST"], response_model=ImageResponse, responses=ERRORS)
    route("/sdapi/v1/img2img", api.img2img, methods=["POST"], response_model=ImageResponse, responses=ERRORS)
    route("/sdapi/v1/progress", api.progress, methods=["GET"], response_model=ProgressResponse)
    route("/sdapi/v1/interrupt", api.interrupt, methods=["POST"])
    route("/sdapi/v1/sd-models", api.sd_models, methods=["GET"], response_model=list[SDModelItem])
    route("/sdapi/v1/samplers", api.samplers, methods=["GET"], response_model=list[SamplerItem])
    route("/sdapi/v1/schedulers", api.schedulers, methods=["GET"], response_model=list[SchedulerItem])
    route("/sdapi/v1/loras", api.loras, methods=["GET"])
    route("/sdapi/v1/options", api.get_options, methods=["GET"])
    route("/sdapi/v1/options", api.set_options, methods=["POST"])
    route("/sdapi/v1/png-info", api.png_info, methods=["POST"], response_model=PNGInfoResponse)


async def _invalid(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 body, rendered with ASCII escapes: the `input` it echoes may hold a lone surrogate (from a JSON
    `\\ud800` escape), which the default handler fails to encode as UTF-8 and answers 500."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    body = json.dumps({"detail": jsonable_encoder(errors)}, ensure_ascii=True)
    return Response(body, status_code=422, media_type="application/json")


class A1111App:
    """The ASGI application for /sdapi/ (request bodies limited to the server's max_message_bytes); `fastapi` is
    the FastAPI application, whose schema the OpenAPI document starts from."""

    def __init__(self, servicer: DiffusionServicer, settings: Settings, keyed: bool):
        self.api = A1111Api(servicer, settings, keyed)
        self.fastapi = FastAPI(
            title="sdserve: AUTOMATIC1111-compatible API",
            version=VERSION,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )
        _routes(self.fastapi, self.api)
        self.fastapi.add_exception_handler(RequestValidationError, _invalid)
        self._asgi = BodyLimit(self.fastapi, settings.max_message_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)
