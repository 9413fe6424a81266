"""The A1111 edge's CallContext and its error answers: the servicer's outcomes as HTTP statuses, field violations
in FastAPI's 422 shape under A1111's field names."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from starlette.responses import JSONResponse

from sdserve_core.status import FieldViolation
from service import status
from service.a1111.policy import ignored_header
from service.requests import Failed, Outcome

HTTP_STATUS = {
    Outcome.INVALID: 422,
    Outcome.NOT_FOUND: 404,
    Outcome.FAILED_PRECONDITION: 400,
    Outcome.OVERLOADED: 429,
    Outcome.OOM: 429,
    Outcome.UNAVAILABLE: 503,
    Outcome.CANCELLED: 409,
    Outcome.DEADLINE: 504,
    Outcome.UNAUTHENTICATED: 401,
    Outcome.INTERNAL: 500,
}
# Contract field paths -> the A1111 fields they come from (a path under a key maps with it).
A1111_FIELDS = {
    "params.model": "override_settings.sd_model_checkpoint",
    "params.prompt": "prompt",
    "params.negative_prompt": "negative_prompt",
    "params.width": "width",
    "params.height": "height",
    "params.steps": "steps",
    "params.guidance_scale": "cfg_scale",
    "params.scheduler": "sampler_name",
    "params.seed": "seed",
    "params.num_images": "batch_size",
    "params.clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "params.request_id": "force_task_id",
    "params.refiner.switch_at": "refiner_switch_at",
    "params.refiner": "refiner_checkpoint",
    "params.preview": "override_settings.show_progress_every_n_steps",
    "params.adapters": "prompt",
    "params": "body",
    "image": "init_images.0",
    "mask": "mask",
    "mask_blur": "mask_blur",
    "strength": "denoising_strength",
    "area": "inpaint_full_res",
    "mask_padding": "inpaint_full_res_padding",
    "invert_mask": "inpainting_mask_invert",
}
_PARAMS_PATH = re.compile(r"\bparams(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])+")


class A1111Failed(Exception):
    """How a servicer call ended without a result, carried out of the servicer's stream."""

    def __init__(self, failed: Failed):
        super().__init__(failed.message)
        self.failed = failed


class A1111Call:
    """An A1111 REST call as the servicer's CallContext: no deadline (A1111 has none); failures raise A1111Failed,
    which the edge answers with an HTTP error."""

    transport = "a1111"

    def time_remaining(self) -> float | None:
        return None

    async def fail(self, failed: Failed) -> NoReturn:
        raise A1111Failed(failed)


def a1111_field(path: str) -> str:
    """The A1111 field a contract field path (`params.width`, `image`) comes from."""
    for key, name in A1111_FIELDS.items():
        if path == key or path.startswith((key + ".", key + "[")):
            return name
    return path


def loc(field: str) -> list[str | int]:
    """FastAPI's `loc` of an A1111 field name (`init_images.0` -> ["body", "init_images", 0])."""
    parts = [p for p in field.split(".") if p and p != "body"]
    return ["body", *(int(p) if p.isdigit() else p for p in parts)]


def unprocessable(violations: Sequence[FieldViolation], ignored: Sequence[str] = (), kind: str = "") -> JSONResponse:
    """422 in FastAPI's shape, one entry per violation; `kind` is the entry type (default: value_error)."""
    detail = [{"type": kind or "value_error", "loc": loc(v.field), "msg": v.description} for v in violations]
    return JSONResponse({"detail": detail}, status_code=422, headers=ignored_header(ignored))


def refused(violations: Sequence[FieldViolation], ignored: Sequence[str] = ()) -> JSONResponse:
    """422 for fields sdserve does not support (or edge-only rules)."""
    return unprocessable(violations, ignored)


def _text(failed: Failed) -> str:
    """The servicer's message with contract field paths replaced by A1111's field names."""
    if failed.violations:
        return "; ".join(f"{a1111_field(v.field)}: {v.description}" for v in failed.violations)
    message = _PARAMS_PATH.sub(lambda m: a1111_field(m.group(0)), failed.message)
    if failed.outcome is Outcome.NOT_FOUND and not message.startswith("refiner_checkpoint"):
        message = "override_settings.sd_model_checkpoint: " + message
    return message.replace("ListModels shows what is served", "GET /sdapi/v1/sd-models lists what is served")


def failed_response(failed: Failed, ignored: Sequence[str] = ()) -> JSONResponse:
    """The HTTP answer to a servicer failure: 422 with FastAPI's detail list for invalid fields; otherwise A1111's
    error body ({error, detail, body, errors}) with Retry-After where the servicer says when to retry."""
    if failed.outcome is Outcome.INVALID and failed.violations:
        mapped = [FieldViolation(a1111_field(v.field), v.description) for v in failed.violations]
        return unprocessable(mapped, ignored)
    code = HTTP_STATUS.get(failed.outcome, 500)
    text = _text(failed)
    headers = ignored_header(ignored)
    if failed.retry_after_seconds > 0 or failed.outcome is Outcome.UNAVAILABLE:
        headers["retry-after"] = str(max(1, math.ceil(failed.retry_after_seconds)))
    body: dict[str, Any] = {"error": status.CODES[failed.outcome].name, "detail": text, "body": "", "errors": text}
    return JSONResponse(body, status_code=code, headers=headers)
