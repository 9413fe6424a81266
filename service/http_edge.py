"""Builds the HTTP port's application from the server's parts: the same servicer, keys and accounting as gRPC."""

from __future__ import annotations

from collections.abc import Callable

from sdserve.v1.diffusion_connect import DiffusionServiceASGIApplication
from sdserve.v1.model_manager_connect import ModelManagerServiceASGIApplication
from sdserve_core.auth import load_keys
from service.a1111.app import A1111App
from service.accounting import Accounting
from service.connect_edge import BoundedGzip, DiffusionConnect, install_strict_codecs
from service.http_app import ASGIApp, HttpApp
from service.manager_proxy import ManagerProxy
from service.openapi import OpenApiDocument, document
from service.servicer import DiffusionServicer
from service.settings import Settings


def build_app(
    servicer: DiffusionServicer,
    settings: Settings,
    accounting: Accounting,
    ready: Callable[[], bool],
    manager: ManagerProxy,
) -> HttpApp:
    """Connect / gRPC-Web / JSON for DiffusionService and the model manager's read-only RPCs, the A1111 REST subset
    (/sdapi/), the OpenAPI document, plus the page."""
    install_strict_codecs()
    limit = settings.max_message_bytes
    gzip = [BoundedGzip(limit)]
    diffusion = DiffusionServiceASGIApplication(DiffusionConnect(servicer), read_max_bytes=limit, compressions=gzip)
    models = ModelManagerServiceASGIApplication(manager, read_max_bytes=limit, compressions=gzip)
    keys = load_keys(settings.api_keys, settings.api_keys_file)
    sdapi = A1111App(servicer, settings, keyed=bool(keys))
    routes: dict[str, ASGIApp] = {diffusion.path + "/": diffusion, models.path + "/": models, "/sdapi/": sdapi}
    exact: dict[str, ASGIApp] = {"/openapi.json": OpenApiDocument(lambda: document(sdapi.fastapi))}
    return HttpApp(routes, exact, keys, ready, accounting.unauthenticated)
