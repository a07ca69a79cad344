"""The HTTP API (Starlette): place an order, read an order, read a saga.

::

    POST /orders         {"customer_id": "c-001", "items": [{"sku": "KB-01", "quantity": 1}],
                          "card_token": "tok_visa", "address": "1 Main St"}
                         -> 202 {"order_id": ..., "saga_id": ..., "links": {...}}
                         -> 422 {"error": "invalid order", "detail": "..."} on a bad body
                         -> 413 {"error": "body too large", ...} past 64 KiB (not read further)
    GET  /orders/{id}    -> 200 the order (status pending/approved/rejected, reason) | 404
    GET  /sagas/{id}     -> 200 state, data (without secrets such as the card token),
                            steps done/compensated, history | 404
    GET  /               -> saga counts by state

Placing an order only starts the saga (durably) and answers at once; poll the
order or the saga to see how it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import sagakit as sk

from .app import OrderFulfillment, UnknownProduct
from .catalog import CATALOG
from .payments import CARD_OK

MAX_BODY = 64 * 1024
#: saga data fields never sent back to a client (the API is not the card vault)
SECRET_FIELDS = frozenset({"card_token"})


class ItemIn(msgspec.Struct, forbid_unknown_fields=True):
    sku: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    quantity: Annotated[int, msgspec.Meta(ge=1, le=1000)]


class PlaceOrderIn(msgspec.Struct, forbid_unknown_fields=True):
    customer_id: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    items: Annotated[list[ItemIn], msgspec.Meta(min_length=1, max_length=100)]
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    card_token: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = CARD_OK


_decoder = msgspec.json.Decoder(PlaceOrderIn)


def invalid(detail: str) -> JSONResponse:
    return JSONResponse({"error": "invalid order", "detail": detail}, status_code=422)


def too_large() -> JSONResponse:
    return JSONResponse(
        {"error": "body too large", "detail": f"body larger than {MAX_BODY} bytes"},
        status_code=413,
    )


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit``.

    Read chunk by chunk (and refused up front on a declared Content-Length) so
    that a 200 MB POST costs at most ``limit`` bytes of memory, not 200 MB.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def not_found(what: str) -> JSONResponse:
    return JSONResponse({"error": f"{what} not found"}, status_code=404)


def create_api(of: OrderFulfillment, *, manage_app: bool = False) -> Starlette:
    """The Starlette app; with ``manage_app`` it also starts and stops ``of``."""

    async def place_order(request: Request) -> Response:
        body = await read_body(request)
        if body is None:
            return too_large()
        try:
            order = _decoder.decode(body)
        except msgspec.ValidationError as exc:
            return invalid(str(exc))
        except msgspec.DecodeError as exc:
            return invalid(f"body is not valid JSON: {exc}")
        for i, item in enumerate(order.items):
            if item.sku not in CATALOG:
                return invalid(f"unknown sku {item.sku!r} - at `$.items[{i}].sku`")
        try:
            order_id, saga_id = await of.place_order(
                order.customer_id,
                [(i.sku, i.quantity) for i in order.items],
                card_token=order.card_token,
                address=order.address,
            )
        except UnknownProduct as exc:  # the catalogue changed under us
            return invalid(f"unknown sku {exc}")
        links = {"order": f"/orders/{order_id}", "saga": f"/sagas/{saga_id}"}
        return JSONResponse(
            {"order_id": order_id, "saga_id": saga_id, "status": "pending", "links": links},
            status_code=202,
            headers={"Location": links["order"]},
        )

    async def get_order(request: Request) -> Response:
        order = await of.orders.get(request.path_params["order_id"])
        if order is None:
            return not_found("order")
        return JSONResponse(msgspec.to_builtins(dataclasses.asdict(order)))

    async def get_saga(request: Request) -> Response:
        try:
            view = await of.app.sagas.get(request.path_params["saga_id"])
        except sk.SagaNotFound:
            return not_found("saga")
        return JSONResponse(saga_json(view))

    async def index(request: Request) -> Response:
        return JSONResponse(
            {
                "sagas": await of.app.sagas.counts(),
                "links": {"place_order": "POST /orders", "order": "/orders/{id}"},
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if manage_app:
            async with of:
                yield
        else:
            yield

    return Starlette(
        routes=[
            Route("/", index),
            Route("/orders", place_order, methods=["POST"]),
            Route("/orders/{order_id}", get_order),
            Route("/sagas/{saga_id}", get_saga),
        ],
        lifespan=lifespan,
    )


def saga_json(view: sk.SagaView) -> dict[str, Any]:
    """A saga instance as JSON: state, data, progress and its full history."""
    return {
        "id": view.id,
        "type": view.type,
        "version": view.version,
        "state": view.state,
        "error": view.error,
        "created_at": view.created_at,
        "updated_at": view.updated_at,
        "done": view.done,
        "compensated": view.compensated,
        "pending": view.pending,
        "data": without_secrets(msgspec.to_builtins(view.data)),
        "history": [
            {"at": e.at, "entry": e.entry, "step": e.step, "detail": e.detail} for e in view.history
        ],
    }


def without_secrets(value: Any) -> Any:
    """``value`` with every :data:`SECRET_FIELDS` key removed, at any depth.

    Saga data must carry the card token to the payment step, but whoever can
    read a saga id (it is in the order's links) must not learn the token.
    """
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if k not in SECRET_FIELDS}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value
