"""The three busiest requests, answered without FastAPI's routing, dependency and validation
machinery: ``GET /users/{id}/recommendations`` and ``GET /products/{id}/similar`` with at most
``n`` and ``offset``, and ``POST /carts/recommendations``.

What a request costs is measured against a bare ASGI app doing the same Redis read
(``recsys bench serve``, docs/serving.md); profiled, FastAPI's per-request work (dependencies,
parameter parsing, a thread-pool hop, response validation) cost more than the Redis round trip.
This middleware does the few checks those routes' declarations do (the key and its scope, the
path and query constraints) and calls the same service functions the routes call, so an answer
is the same bytes whichever path built it (tested). Anything else — another parameter, a value
out of bounds, a bad key — goes to the FastAPI app untouched, which answers as always (a 422
names the field, a 401 the key); a cart body is read here and handed on unchanged. An error the
service raises on a hot path (a 404, a 422 on an id, a 503) is answered by the app's own
exception handlers, without doing the request's reads a second time.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recsys.serving.schemas import ID_PATTERN, MAX_ID_LENGTH, MAX_N, MAX_OFFSET, CartIn
from recsys.serving.security import ApiKeys
from recsys.serving.service import RecsysService, cart_answer, similar_products, user_recommendations

_ID = re.compile(ID_PATTERN.replace("$", r"\Z"))
_USER_LIST = re.compile(r"/users/([^/]+)/recommendations")
_SIMILAR = re.compile(r"/products/([^/]+)/similar")
_HEADERS = [(b"content-type", b"application/json")]
Answer = Callable[[], Awaitable[bytes]]


class HotPaths:
    """In front of the API's FastAPI app (the outermost ASGI app, so the hot requests skip its
    middleware stack too); every attribute not its own is the app's (``state``, ``openapi`` ...)."""

    def __init__(
        self, app: ASGIApp, service: RecsysService, api_keys: ApiKeys, public_reads: bool, max_body_bytes: int
    ) -> None:
        self.app, self.service, self.api_keys, self.public_reads = app, service, api_keys, public_reads
        self.max_body_bytes = max_body_bytes

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        answer: Answer | None = None
        # the key is checked only for a request the hot paths answer (the app checks the others)
        if method == "GET":
            answer = self._get(path, scope["query_string"])
            if answer is not None and not self._allowed(scope):
                answer = None
        elif (method == "POST" and path == "/carts/recommendations" and not scope["query_string"]
              and self._small(scope) and self._allowed(scope)):
            body, receive = await _read_body(receive, self.max_body_bytes)
            answer = self._cart(body)
        if answer is None:
            return await self.app(scope, receive, send)
        try:
            content = await answer()
        except Exception as error:  # noqa: BLE001 - answered as the app answers it, reads not repeated
            return await self._error(scope, receive, send, error)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_HEADERS, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    async def _error(self, scope: Scope, receive: Receive, send: Send, error: Exception) -> None:
        """What the app's exception handlers answer to ``error`` (404 and 422 from the service,
        503 while Redis is down or nothing is live), without running the request again: its reads
        are not repeated, and a Redis outage costs one timeout, not two. An error no handler takes
        is a 500, as the app's outermost middleware answers it, and raised on to the server."""
        handler = _handler(self.app.exception_handlers, error)
        if handler is None:
            await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise error
        scope["app"] = self.app  # what a handler reads through request.app (the service, its prefix)
        response = await handler(Request(scope, receive), error)
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        """The read access the routes declare: public reads, or a known key (any scope reads)."""
        if self.public_reads:
            return True
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                return self.api_keys.find(value.decode("latin-1")) is not None
        return False

    def _small(self, scope: Scope) -> bool:
        """Not declared over the body limit (the app refuses such a body before reading it)."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) <= self.max_body_bytes
        return True

    def _get(self, path: str, query: bytes) -> Answer | None:
        if (match := _USER_LIST.fullmatch(path)) is not None:
            paging = _paging(query, ("n", "offset"))
            user_id = match.group(1)
            if paging is None or not _valid_id(user_id):
                return None
            n, offset = paging.get("n", 10), paging.get("offset", 0)
            return lambda: user_recommendations(self.service, user_id, n, offset, set(), None)
        if (match := _SIMILAR.fullmatch(path)) is not None:
            paging = _paging(query, ("n",))
            product_id = match.group(1)
            if paging is None or not _valid_id(product_id):
                return None
            return lambda: similar_products(self.service, product_id, paging.get("n", 10))
        return None

    def _cart(self, body: bytes | None) -> Answer | None:
        if body is None:
            return None
        try:
            cart = CartIn.model_validate_json(body)
        except ValidationError:
            return None
        return lambda: cart_answer(self.service, cart)


def _handler(handlers: dict, error: Exception) -> Callable | None:
    """The handler the app's exception middleware would pick: by status code for an HTTP error,
    else by the error's class or nearest base (``Exception`` is the server-error middleware's)."""
    if isinstance(error, HTTPException) and error.status_code in handlers:
        return handlers[error.status_code]
    for kind in type(error).__mro__:
        if kind in handlers and kind is not Exception:
            return handlers[kind]
    return None


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and _ID.match(value) is not None


def _paging(query: bytes, allowed: tuple[str, ...]) -> dict[str, int] | None:
    """``n`` (1..MAX_N) and ``offset`` (0..MAX_OFFSET) as the routes declare them, each at most
    once; None for anything else (the app then answers, and names what is wrong)."""
    found: dict[str, int] = {}
    if not query:
        return found
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name not in allowed or name in found or not value.isascii() or not value.isdigit():
            return None
        found[name] = int(value)
    if not 1 <= found.get("n", 10) <= MAX_N or not 0 <= found.get("offset", 0) <= MAX_OFFSET:
        return None
    return found


async def _read_body(receive: Receive, max_bytes: int) -> tuple[bytes | None, Receive]:
    """The whole request body, and a ``receive`` that gives what was read again to the app; None
    when the client went away first, or the body passed ``max_bytes`` (the app's limit answers)."""
    chunks, messages, size = [], [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            body = None
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_bytes:
            body = None
            break
        if not message.get("more_body", False):
            body = b"".join(chunks)
            break

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return body, replay
